"""The accelerator branches (no host checks, ``check_every = 4``, unconditional fix-ups, no
buffer pooling) taken on CPU by ``IMPLICIT_ACCELERATOR_PATHS`` / ``accelerator_paths``: they
agree with the CPU branches, and the contract suite passes under them (every solver and
backward, on the tanh cell)."""

from __future__ import annotations

import pytest
import torch

import implicit
from implicit.accelerator import ENV, accelerator_paths, forced, host_checks
from implicit.cli import verify
from implicit.workspace import Workspace


def _tanh_problem(batch=6, d=24, seed=0, hard=False):
    with implicit.seeded(seed) as gen:
        cell = implicit.make_cell("tanh", features=d, in_features=d).double()
        x = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    if hard:  # a nearly critical cell: some samples need many steps, some hit the budget
        with torch.no_grad():
            cell.W.weight.mul_(0.99 / torch.linalg.matrix_norm(cell.W.weight, ord=2))
            x[: batch // 2] *= 4
    with torch.no_grad():
        u = cell.injection(x)
    return (lambda z: cell.update(z, u)), torch.zeros(batch, d, dtype=torch.float64)


def test_the_switch_reads_the_environment_and_the_context(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(ENV, raising=False)
    assert host_checks(cpu) and not forced()
    monkeypatch.setenv(ENV, "1")
    assert not host_checks(cpu)
    with accelerator_paths(False):
        assert host_checks(cpu)
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match="IMPLICIT_ACCELERATOR_PATHS must be"):
        forced()
    monkeypatch.delenv(ENV)
    with accelerator_paths():
        assert not host_checks(cpu)


@pytest.mark.parametrize("hard", [False, True], ids=["easy", "hard"])
def test_accelerator_branches_agree_with_the_cpu_ones(solver_name, hard):
    spec = implicit.get_registry().get("solver", solver_name).spec
    if "linear_only" in spec.capabilities:
        pytest.skip("a linear-only solver: checked on the adjoint below")
    f, z0 = _tanh_problem(hard=hard)
    solver = implicit.make_solver(solver_name, tol=1e-9, stop="abs", max_iter=40,
                                  policy="ignore")
    cpu = implicit.solve(f, z0, solver=solver)
    with accelerator_paths():
        acc = implicit.solve(f, z0, solver=solver)
    every = solver.check_every or 4  # the accelerator default
    assert torch.allclose(cpu.z, acc.z, rtol=1e-12, atol=1e-14)
    assert torch.equal(cpu.nfe, acc.nfe) and torch.equal(cpu.converged, acc.converged)
    assert torch.equal(cpu.sample_status, acc.sample_status)
    assert torch.allclose(cpu.abs_residual, acc.abs_residual, rtol=1e-10, atol=1e-15)
    assert cpu.n_calls <= acc.n_calls <= min(solver.max_iter, cpu.n_calls + every - 1)


@pytest.mark.parametrize("backward", ["ift", "phantom", "unrolled"])
def test_gradients_agree_on_the_accelerator_branches(backward):
    def grads():
        with implicit.seeded(1) as gen:
            cell = implicit.make_cell("tanh", features=16, in_features=16).double()
            x = torch.randn(4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
        layer = implicit.DEQ(cell, solver="forward", backward=backward, tol=1e-10,
                             max_iter=300, policy="ignore").eval()
        layer(x).square().sum().backward()
        return [x.grad] + [p.grad for p in cell.parameters()]

    cpu = grads()
    with accelerator_paths():
        acc = grads()
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(cpu, acc))


def test_the_workspace_does_not_pool_on_the_accelerator_branches():
    pool = Workspace()
    like = torch.zeros(1)
    with accelerator_paths():
        buffer = pool.empty(3, 4, like=like)
        pool.give(buffer)
        assert pool.held_bytes == 0
    buffer = pool.empty(3, 4, like=like)
    pool.give(buffer)
    assert pool.held_bytes == buffer.numel() * buffer.element_size()


def test_the_contract_suite_passes_on_the_accelerator_branches(monkeypatch, capsys):
    """Every solver and every backward at least once (the tanh cell), as CI's log shows."""
    monkeypatch.setenv(ENV, "1")
    code = verify(max_examples=3, extra_args=["-k", "tanh or linear_termination"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    with capsys.disabled():  # into the CI log
        print(f"\n[accelerator branches on CPU] {lines[0]} -> {lines[-1]}")
    assert code == 0, out[-3000:]
