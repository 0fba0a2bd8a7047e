"""The budget ``max_iter`` is a hard bound on calls of f, and no solve can spin without calling f.

Every registered solver (``linear_only`` ones included: on a nonlinear map their result is not
promised, but returning within the budget is), ``max_iter`` from 1 to 5, on an affine and on a
nonlinear map; each solve runs under a wall-clock alarm, so a loop that spins fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import signal
import warnings

import attrs
import pytest
import torch

import implicit
from implicit import PluginError, Status

from conftest import REGISTRY

SOLVERS = REGISTRY.names("solver")
#: a solve of a 3 × 4 problem takes milliseconds; one still running after this is spinning
ALARM_S = 20.0


@contextlib.contextmanager
def returns_within(seconds: float = ALARM_S):
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"the solve did not return within {seconds} s: the loop spins")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def affine(seed: int = 0):
    """The map of the bug report: ``f(z) = A_i z + b_i`` per sample, ``‖A_i‖ ≈ 0.3``."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64) * 0.1
    b = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    return lambda z: torch.einsum("bij,bj->bi", A, z) + b


def nonlinear(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.4
    b = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    return lambda z: torch.tanh(z @ W.T + b)


def counting(fn):
    calls = [0]

    def counted(z):
        calls[0] += 1
        return fn(z)

    return counted, calls


@pytest.mark.parametrize("kind", ["affine", "nonlinear"])
@pytest.mark.parametrize("max_iter", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", SOLVERS)
def test_every_solver_returns_within_its_budget(name, max_iter, kind):
    fn, calls = counting((affine if kind == "affine" else nonlinear)())
    with returns_within():
        sol = implicit.solve(fn, torch.zeros(3, 4, dtype=torch.float64), solver=name,
                             max_iter=max_iter, tol=1e-12, policy="ignore")
    # the record's count is the calls f really received, and the budget bounds both
    assert sol.n_calls == calls[0] <= max_iter
    assert bool((sol.nfe <= sol.n_calls).all())
    solver = implicit.make_solver(name)
    need = type(solver).min_step_calls
    if not sol.all_converged:
        # the loop stopped because no further step fitted in what was left of the budget
        assert max_iter - sol.n_calls < need
        assert sol.stats.get("unused_calls", 0) == max_iter - sol.n_calls


def test_gmres_with_a_budget_of_two_evaluates_z0_and_says_why_it_stopped():
    """A GMRES step is a Krylov product and f at the new iterate: with two calls in all, one is
    left after f(z0), no step fits, and the record and the warning say so."""
    fn, calls = counting(affine())
    with returns_within(), pytest.warns(implicit.ConvergenceWarning,
                                        match=r"1 call\(s\) of max_iter went unused.*gmres step "
                                              r"needs 2 calls"):
        sol = implicit.solve(fn, torch.zeros(3, 4, dtype=torch.float64), solver="gmres",
                             max_iter=2, tol=1e-12)
    assert calls[0] == sol.n_calls == 1
    assert sol.status is Status.MAX_ITER
    assert sol.stats["unused_calls"] == 1 and sol.stats["min_step_calls"] == 2


@pytest.mark.parametrize("max_iter", [3, 4, 5, 6])
def test_gmres_spends_the_whole_budget_and_its_last_call_is_the_new_iterate(max_iter):
    """Each step is one cycle of k products and f at the new iterate: max_iter − 2 products in
    one step from z0 (restart ≥ that), no product spent on a true residual the next call of f
    gives anyway; on n = 4 the cycle is exact once it has 4 products."""
    fn, calls = counting(affine())
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    with returns_within():
        sol = implicit.solve(fn, z0, solver=implicit.make_solver("gmres", restart=20),
                             max_iter=max_iter, tol=1e-10, stop="abs", policy="ignore")
    assert sol.n_calls == calls[0] == max_iter
    assert sol.stats["loop_steps"] == 1
    assert sol.all_converged == (max_iter >= 6)  # f(z0), 4 products, f at the solution
    # the record's residuals are those of a real evaluation at the returned iterate
    torch.testing.assert_close(sol.abs_residual,
                               torch.linalg.vector_norm(fn(sol.z) - sol.z, dim=1))


def test_ift_backward_with_a_two_call_gmres_adjoint_finishes():
    """The bug report's training case: the adjoint solve gets the same budget rules."""
    torch.manual_seed(0)
    cell = implicit.make_cell("tanh", features=6, in_features=3)
    layer = implicit.DEQ(cell, backward=implicit.make_backward("ift", solver="gmres",
                                                               max_iter=2), tol=1e-8)
    x = torch.randn(4, 3)
    with returns_within(), warnings.catch_warnings():
        warnings.simplefilter("ignore", implicit.ConvergenceWarning)
        layer(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())


def test_gmres_inner_products_are_bounded_by_max_matvecs():
    """``batched_gmres`` counts the true residual after a cycle against ``max_matvecs`` too."""
    from implicit_solvers.krylov import batched_gmres

    gen = torch.Generator().manual_seed(1)
    A = torch.eye(6, dtype=torch.float64) + 0.5 * torch.randn(2, 6, 6, generator=gen,
                                                               dtype=torch.float64)
    b = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    for budget in range(1, 9):
        made = [0]

        def matvec(v):
            made[0] += 1
            return torch.einsum("bij,bj->bi", A, v)

        result = batched_gmres(matvec, b, rtol=1e-14, restart=3, max_matvecs=budget)
        assert made[0] == result.matvecs <= budget
        # the reported residual is the true one, or (budget spent) the cycle's estimate of it
        true = torch.linalg.vector_norm(b - torch.einsum("bij,bj->bi", A, result.x), dim=1)
        torch.testing.assert_close(result.residual, true, rtol=1e-6, atol=1e-12)


@attrs.frozen(kw_only=True)
class _Stuck(implicit.Solver):
    """A plugin whose step sometimes returns without calling f."""

    name = "stuck"
    every: int = 1

    def init(self, z, fz):
        return [0]

    def step(self, fn, z, fz, state):
        state[0] += 1
        if state[0] % self.every == 0:
            return z, fz, state
        z_next = 0.5 * (z + fz)
        return z_next, fn(z_next), state


@pytest.mark.parametrize("every", [1, 3])
def test_a_step_that_makes_no_call_is_an_error_naming_the_solver(every):
    with returns_within(), pytest.raises(PluginError, match=r"solver 'stuck' took a step that "
                                                            r"made no call of f"):
        implicit.solve(affine(), torch.zeros(3, 4, dtype=torch.float64),
                       solver=_Stuck(every=every, max_iter=50, tol=1e-14))


@attrs.frozen(kw_only=True)
class _Greedy(implicit.Solver):
    """A plugin whose step makes two calls without looking at the budget."""

    name = "greedy"

    def step(self, fn, z, fz, state):
        trial = fn(0.5 * (z + fz))
        return fz, fn(fz), state


def test_a_call_past_the_budget_is_an_error_naming_the_solver():
    with returns_within(), pytest.raises(PluginError, match=r"solver 'greedy' called f past its "
                                                            r"budget: max_iter=4"):
        implicit.solve(affine(), torch.zeros(3, 4, dtype=torch.float64),
                       solver=_Greedy(max_iter=4, tol=1e-14))


@attrs.frozen(kw_only=True)
class _BadDeclaration(implicit.Solver):
    name = "bad_declaration"
    min_step_calls = 0

    def step(self, fn, z, fz, state):
        return fz, fn(fz), state


def test_a_min_step_calls_below_one_is_an_error():
    with pytest.raises(PluginError, match="min_step_calls=0"):
        implicit.solve(affine(), torch.zeros(3, 4, dtype=torch.float64),
                       solver=_BadDeclaration())


def test_newton_krylov_steps_on_samples_that_meet_tol_only_below_precision():
    """With stop='abs' at ‖f(z)‖ = 2e12 a residual of 0 is not resolvable in float64, so the
    loop keeps the samples active; the scipy backend used to make no call then (and the loop
    spun). Now it evaluates them and the solve ends MAX_ITER, its note saying why."""
    z0 = torch.full((2, 3), 2e12, dtype=torch.float64)
    with returns_within():
        sol = implicit.solve(lambda z: 0.5 * z + 1e12, z0, solver="newton_krylov", max_iter=6,
                             tol=1e-4, stop="abs", policy="ignore")
    assert sol.n_calls == 6 and sol.status is Status.MAX_ITER
    assert sol.stats["below_precision"] == 2
