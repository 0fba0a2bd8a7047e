"""History buffers reused across solves, the large-state paths of the quasi-Newton solvers, a
step handing its residual to the loop, and the bench's allocator settings."""

from __future__ import annotations

import subprocess
import sys

import attrs
import pytest
import torch

import implicit
import implicit_solvers.rows as rows
from implicit.solver import iterate
from implicit.workspace import Workspace, workspace

D64 = torch.float64


def test_workspace_hands_back_a_given_buffer_and_never_one_in_use():
    pool = Workspace()
    like = torch.zeros(1)
    a = pool.empty(4, 3, 8, like=like)
    b = pool.empty(4, 3, 8, like=like)  # `a` is out: a second one, not the same
    assert a.data_ptr() != b.data_ptr()
    pool.give(a)
    assert pool.empty(4, 3, 8, like=like) is a
    assert pool.empty(4, 3, 8, like=like) is not a  # taken again: the pool is empty
    pool.give(b)
    assert pool.empty(4, 3, 8, like=like.double()) is not b  # another dtype


def test_workspace_is_bounded_and_clearable():
    like = torch.zeros(1)
    pool = Workspace(max_bytes=3 * 100 * 4)
    buffers = [pool.empty(100, like=like) for _ in range(5)]
    pool.give(*buffers)
    assert pool.held_bytes == 3 * 100 * 4  # the least recently given are dropped
    pool.give(torch.zeros(1000))  # larger than the bound: not kept
    assert pool.held_bytes == 3 * 100 * 4
    pool.clear()
    assert pool.held_bytes == 0


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_a_solve_under_inference_mode_leaves_no_inference_buffer_behind(solver):
    # inference-mode tensors cannot be written outside inference mode: were one pooled, the
    # next ordinary solve of that shape would fail writing its history
    fn = _contraction(3, 16, seed=4)
    kw = dict(solver=solver, tol=1e-10, stop="abs", max_iter=60)
    workspace.clear()
    with torch.inference_mode():
        inside = implicit.solve(fn, torch.zeros(3, 16, dtype=D64), **kw)
    outside = implicit.solve(fn, torch.zeros(3, 16, dtype=D64), **kw)
    assert inside.all_converged and outside.all_converged
    torch.testing.assert_close(outside.z, inside.z.clone())


def _contraction(b: int, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=gen, dtype=D64) / n**0.5
    w = w / torch.linalg.matrix_norm(w, ord=2)
    scale = torch.linspace(0.3, 0.9, b, dtype=D64)[:, None]  # samples converge at different steps
    c = torch.randn(b, n, generator=gen, dtype=D64)
    return lambda z: torch.tanh(scale * (z @ w.T) + c)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_large_state_path_matches_the_small_state_path(solver, monkeypatch):
    # b × n ≥ CHAIN_MIN_NUMEL takes the addcmul chains and, for Anderson, the residual written
    # straight into the history; the samples stop at different steps, so masking is exercised
    f = _contraction(b=4, n=512, seed=0)
    z0 = torch.zeros(4, 512, dtype=D64)
    kw = dict(solver=solver, tol=1e-11, stop="abs", max_iter=80)
    monkeypatch.setattr(rows, "CHAIN_MIN_NUMEL", 1)
    chain = implicit.solve(f, z0, **kw)
    monkeypatch.setattr(rows, "CHAIN_MIN_NUMEL", 2**62)
    batched = implicit.solve(f, z0, **kw)
    assert chain.all_converged and len(set(chain.nfe.tolist())) > 1
    torch.testing.assert_close(chain.z, batched.z, rtol=1e-10, atol=1e-10)
    assert torch.equal(chain.nfe, batched.nfe)


def test_combine_and_dots_match_dense_products(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    R = torch.randn(3, 4, 50, generator=gen, dtype=D64)
    c = torch.randn(3, 4, generator=gen, dtype=D64)
    base = torch.randn(3, 50, generator=gen, dtype=D64)
    before = base.clone()
    for threshold in (1, 2**62):  # the chain and the bmm paths
        monkeypatch.setattr(rows, "CHAIN_MIN_NUMEL", threshold)
        torch.testing.assert_close(rows.combine(c, R), torch.einsum("bk,bkn->bn", c, R))
        torch.testing.assert_close(rows.combine(c, R, base=base, base_scale=-1.0),
                                   -base + torch.einsum("bk,bkn->bn", c, R))
        torch.testing.assert_close(rows.combine(c[:, :0], R[:, :0], base=base, base_scale=2.0),
                                   2 * base)
        assert torch.equal(base, before)
    torch.testing.assert_close(rows.dots(base, R), torch.einsum("bn,bkn->bk", base, R))


def test_anderson_reuses_its_history_across_solves_and_nested_solves_stay_apart():
    workspace.clear()
    solver = implicit.make_solver("anderson", tol=1e-10, stop="abs", max_iter=60)
    inner_f = _contraction(b=2, n=8, seed=1)

    def outer(z):  # each outer evaluation runs a whole inner solve with the same solver
        inner = iterate(solver, inner_f, torch.zeros(2, 8, dtype=D64)).z
        return 0.5 * torch.tanh(z) + 0.1 * inner.sum()

    z0 = torch.zeros(2, 8, dtype=D64)
    nested = iterate(solver, outer, z0).solution
    fresh = implicit.make_solver("anderson", tol=1e-10, stop="abs", max_iter=60)
    inner_star = iterate(fresh, inner_f, torch.zeros(2, 8, dtype=D64)).z
    alone = iterate(fresh, lambda z: 0.5 * torch.tanh(z) + 0.1 * inner_star.sum(), z0).solution
    assert nested.all_converged
    torch.testing.assert_close(nested.z, alone.z, rtol=1e-9, atol=1e-9)
    held = workspace.held_bytes
    assert held > 0  # the histories came back after the solves
    iterate(solver, inner_f, torch.zeros(2, 8, dtype=D64))
    assert workspace.held_bytes == held  # and the next solve took them and gave them back


@attrs.frozen(kw_only=True)
class _HalfStep(implicit.Solver):
    """z ← (z + f(z)) / 2, handing the loop its residual (and recording that it did)."""

    name = "half"
    uses_residual = True
    handed: list = attrs.field(factory=list, eq=False)

    def step(self, fn, z, fz, state, g=None):
        z_next = z + 0.5 * g
        fz_next = fn(z_next)
        g_next = fz_next - z_next
        self.handed.append(g_next)
        return z_next, fz_next, state, g_next


def test_a_step_may_hand_the_loop_its_residual():
    solver = _HalfStep(tol=1e-12, stop="abs", max_iter=200)
    result = iterate(solver, lambda z: torch.cos(z), torch.zeros(3, 1, dtype=D64))
    torch.testing.assert_close(result.solution.z, torch.full((3, 1), 0.73908513321516, dtype=D64))
    assert result.solution.all_converged and len(solver.handed) == result.solution.n_calls - 1


def test_bench_allocator_modes():
    from implicit.bench.allocator import configure

    with pytest.raises(ValueError, match="malloc mode 'fast'"):
        configure("fast")
    # mallopt changes the whole process: try it in a fresh one
    code = ("from implicit.bench.allocator import configure; "
            "print(configure('system')); print(configure('tuned'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    system, tuned = out.stdout.strip().splitlines()
    assert "defaults" in system
    if sys.platform.startswith("linux") and "glibc" in system:
        assert tuned == "glibc, mmap threshold 32 MiB, no automatic trim"


def _reference_anderson(f, x0, m, lam, steps):
    """Textbook Anderson (β = 1, relative ridge), one sample at a time, no buffers reused."""
    xs, fs = [x0], [f(x0)]
    for _ in range(steps):
        hist = list(range(max(0, len(xs) - m), len(xs)))
        G = torch.stack([fs[i] - xs[i] for i in hist])
        gram = G @ G.T
        ridge = lam * gram.diagonal().mean()
        w = torch.linalg.solve(gram + ridge * torch.eye(len(hist), dtype=gram.dtype),
                               torch.ones(len(hist), dtype=gram.dtype))
        alpha = w / w.sum()
        x = sum(a * fs[i] for a, i in zip(alpha, hist))
        xs.append(x)
        fs.append(f(x))
    return torch.stack([torch.linalg.vector_norm(fx - x) for x, fx in zip(xs, fs)])


@pytest.mark.parametrize("numel", ["small", "large"])
def test_anderson_iterates_are_textbook_anderson_even_on_reused_nan_buffers(numel, monkeypatch):
    # the pool hands out buffers full of NaN: a read of a history slot before it is written
    # would poison the iterates; the chain ("large") and bmm paths are both checked
    monkeypatch.setattr(rows, "CHAIN_MIN_NUMEL", 1 if numel == "large" else 2**62)
    b, n, m, steps = 3, 6, 3, 12
    f = _contraction(b=b, n=n, seed=4)
    workspace.clear()
    workspace.give(*(torch.full((b, m, n), float("nan"), dtype=D64) for _ in range(2)))
    solver = implicit.make_solver("anderson", m=m, tol=0.0, stop="abs", max_iter=steps + 1,
                                  trace=True, policy="ignore")
    result = iterate(solver, f, torch.zeros(b, n, dtype=D64)).solution
    for i in range(b):
        expected = _reference_anderson(lambda z: f(z.expand(b, n))[i], torch.zeros(n, dtype=D64),
                                       m, 1e-4, steps)
        torch.testing.assert_close(result.trace[:, i], expected, rtol=1e-9, atol=1e-14)


def test_broyden_never_reads_an_unwritten_history_row():
    b, n, memory = 2, 5, 4
    f = _contraction(b=b, n=n, seed=5)
    kw = dict(memory=memory, tol=1e-12, stop="abs", max_iter=30)
    workspace.clear()
    clean = iterate(implicit.make_solver("broyden", **kw), f, torch.zeros(b, n, dtype=D64))
    workspace.give(*(torch.full((b, memory, n), float("nan"), dtype=D64) for _ in range(2)))
    reused = iterate(implicit.make_solver("broyden", **kw), f, torch.zeros(b, n, dtype=D64))
    assert clean.solution.all_converged and clean.solution.stats["restarts"] > 0
    torch.testing.assert_close(reused.z, clean.z, rtol=0, atol=0)
