"""Property tests of the solver contract over every registered solver × cell with a strategy.

Each cell plugin's Hypothesis strategy draws a contractive instance; Hypothesis searches it
adversarially, so every property here is a theorem for contractive problems.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit
from implicit.deq import flat_map
from implicit.solver import residuals
from implicit.state import StateSpec


def _flat_problem(example):
    cell = example.cell
    u = cell.injection(example.x) if isinstance(cell, implicit.Cell) else example.x
    z0 = example.z0 if example.z0 is not None else cell.init_state(example.x)
    spec = StateSpec.of(z0)
    return flat_map(lambda z: implicit.cell.update_of(cell, z, u), spec), spec, z0


@settings(max_examples=15)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_solver_contract(registry, solver_name, cell_with_strategy, data, dtype):
    spec_entry = registry.get("cell", cell_with_strategy).spec
    example = data.draw(spec_entry.strategy(dtype=dtype), label="example")
    tol = data.draw(st.sampled_from([1e-3, 1e-5] if dtype == torch.float32 else [1e-5, 1e-9]))
    stop = data.draw(st.sampled_from(["abs", "rel"]))
    max_iter = data.draw(st.integers(1, 60))
    fn, spec, z0 = _flat_problem(example)
    z0_before = [t.clone() for t in (z0 if isinstance(z0, (tuple, list)) else (z0,))]
    solver = registry.make("solver", solver_name, tol=tol, stop=stop, max_iter=max_iter,
                           policy="ignore")
    with torch.no_grad():
        sol = implicit.solve(lambda z: spec.unflatten(fn(spec.flatten(z))), z0, solver=solver)
    z_flat = spec.flatten(sol.z)
    # shape, dtype and device are the state's; no autograd graph was built
    assert StateSpec.of(sol.z) == spec
    assert not z_flat.requires_grad
    # caller's tensors untouched
    for before, after in zip(z0_before, (z0 if isinstance(z0, (tuple, list)) else (z0,))):
        assert torch.equal(before, after)
    # budgets
    assert 1 <= sol.n_calls <= max_iter
    assert bool((sol.nfe >= 1).all()) and bool((sol.nfe <= sol.n_calls).all())
    # the record is truthful: converged[i] <=> recomputed residual <= tol
    with torch.no_grad():
        abs_res, rel_res = residuals(z_flat, fn(z_flat))
    recomputed = abs_res if stop == "abs" else rel_res
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(sol.residual, recomputed, rtol=1e-4, atol=10 * eps)
    margin = (recomputed - tol).abs() > 1e-3 * tol
    assert torch.equal(sol.converged[margin], (recomputed <= tol)[margin])
    assert sol.all_converged == bool(sol.converged.all())


@settings(max_examples=10)
@given(data=st.data())
def test_batch_rows_match_solving_alone(registry, solver_name, cell_with_strategy, data):
    entry = registry.get("cell", cell_with_strategy).spec
    if "batch_independent" not in entry.capabilities:
        return
    example = data.draw(entry.strategy(dtype=torch.float64), label="example")
    fn, spec, z0 = _flat_problem(example)
    solver = registry.make("solver", solver_name, tol=1e-10, stop="abs", max_iter=300,
                           policy="ignore")
    flat0 = spec.flatten(z0)
    with torch.no_grad():
        together = implicit.iterate(solver, fn, flat0).solution
        for i in range(flat0.shape[0]):
            row = implicit.iterate(solver, lambda z: fn(_embed(z, i, flat0))[i : i + 1],
                                   flat0[i : i + 1]).solution
            torch.testing.assert_close(row.z[0], together.z[i], rtol=1e-7, atol=1e-9)
            assert bool(row.converged[0]) == bool(together.converged[i])


def _embed(row: torch.Tensor, i: int, batch: torch.Tensor) -> torch.Tensor:
    """Evaluate the batched map on one row: other rows are held at the initial iterate."""
    out = batch.clone()
    out[i : i + 1] = row
    return out
