"""No false convergence: a residual below the tolerance counts only where the state's dtype can
resolve the tolerance at that ‖f(z)‖ (``implicit.solver.PRECISION · eps · ‖f(z)‖``)."""

from __future__ import annotations

import pytest
import torch

import implicit
import implicit.solver
from implicit.testing import ContractViolation, check_solver_contract


def runaway(z):
    """No fixed point (‖f(z) − z‖ = 28·√n everywhere), but at ‖z‖ ~ 1e18 the float64
    difference f(z) − z rounds to 0 — the false convergence Broyden once reported."""
    return z + 28.0


@pytest.mark.parametrize("solver", ["forward", "anderson", "broyden"])
def test_a_residual_lost_in_rounding_is_not_convergence(solver):
    z0 = torch.full((2, 3), 8e17, dtype=torch.float64)
    sol = implicit.solve(runaway, z0, solver=solver, tol=1e-8, stop="abs", max_iter=6,
                         policy="ignore")
    assert not bool(sol.converged.any()) and sol.status is implicit.Status.MAX_ITER
    assert float(sol.abs_residual.max()) == 0.0  # what the loop saw
    assert sol.stats["below_precision"] == 2
    assert "tolerance below attainable precision at ‖f(z)‖ = 1.39e+18" in sol.summary()


def test_the_warning_names_the_precision():
    with pytest.warns(implicit.ConvergenceWarning, match="below attainable precision"):
        implicit.solve(runaway, torch.full((1, 3), 8e17, dtype=torch.float64),
                       solver="forward", tol=1e-8, stop="abs", max_iter=3)


def test_a_large_state_with_an_attainable_tolerance_still_converges():
    # fixed point 2e6: eps · ‖f‖ ≈ 8e-10 in float64, below tol 1e-6
    sol = implicit.solve(lambda z: 0.5 * z + 1e6, torch.zeros(3, 3, dtype=torch.float64),
                         solver="anderson", tol=1e-6, stop="abs", max_iter=50)
    assert sol.all_converged and "below_precision" not in sol.stats


def test_a_relative_tolerance_below_eps_never_converges():
    sol = implicit.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 4), solver="forward",
                         tol=1e-9, stop="rel", max_iter=40, policy="ignore")  # float32
    assert not bool(sol.converged.any()) and sol.stats["below_precision"] == 2


def test_the_contract_catches_a_loop_that_claims_it(monkeypatch):
    """With the safeguard switched off the loop reports the runaway map converged, and the
    solver contract (its own recomputation of ‖f(z)‖) rejects that."""
    monkeypatch.setattr(implicit.solver, "PRECISION", 0.0)
    sol = implicit.solve(runaway, torch.full((1, 3), 8e17, dtype=torch.float64),
                         solver="forward", tol=1e-8, stop="abs", max_iter=3, policy="ignore")
    assert sol.all_converged  # the false convergence, without the safeguard

    class Runaway(torch.nn.Module):
        def forward(self, z, x):
            return z + 28.0

    example = implicit.CellExample(cell=Runaway(), x=torch.zeros(1, 3, dtype=torch.float64),
                                   z0=torch.full((1, 3), 8e17, dtype=torch.float64))
    with pytest.raises(ContractViolation, match="below the attainable precision"):
        check_solver_contract(implicit.get_registry(), "forward", example, tol=1e-8,
                              stop="abs", max_iter=3)


def test_an_iterate_running_away_with_a_bounded_residual_is_diverged():
    """f(z) = z + 1 has no fixed point and a residual of exactly √n everywhere; a step that
    doubles the iterate runs off without the residual ever growing. The loop flags it DIVERGED
    from the iterate's growth (‖f(z)‖ beyond divergence_factor × its start), not MAX_ITER."""
    import attrs

    @attrs.frozen(kw_only=True)
    class Doubling(implicit.Solver):
        name = "doubling"

        def step(self, fn, z, fz, state):
            z_next = 2 * fz
            return z_next, fn(z_next), state

    sol = implicit.solve(lambda z: z + 1, torch.ones(2, 3, dtype=torch.float64),
                         solver=Doubling(tol=1e-8, stop="abs", max_iter=80, policy="ignore"))
    assert sol.status is implicit.Status.DIVERGED and sol.n_calls < 80
    assert torch.allclose(sol.abs_residual, torch.full((2,), 3 ** 0.5, dtype=torch.float64))
