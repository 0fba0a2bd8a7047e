"""Anderson and Broyden: scipy's nonlinear test problems, cos, component invariants, batches.

The problems are those of scipy's ``optimize/tests/test_nonlin.py`` (5-dim diagonal F, identity,
the tridiagonal linear system, F6), written here as fixed points z = z − F(z) and z = z + F(z).
A pairing a solver cannot do is declared in KNOWN_BAD and runs as a strict xfail, so it is seen
(and a fix is noticed), never silently skipped.
"""

from __future__ import annotations

import math

import pytest
import torch

import implicit
from implicit_solvers.anderson import anderson_weights
from implicit_solvers.broyden import broyden_update, matvec

QUASI_NEWTON = ["anderson", "broyden"]
D64 = torch.float64


def diagonal_f(x):  # scipy's F: root at 0
    d = torch.tensor([3, 2, 1.5, 1, 0.5], dtype=D64)
    return -d * x - 0.01 * (x * x).sum(dim=1, keepdim=True) * x


def identity_f(x):  # scipy's F2
    return x


def tridiagonal_f(x):  # scipy's F3: A x − b
    a = torch.tensor([[-2, 1, 0.0], [1, -2, 1], [0, 1, -2]], dtype=D64)
    return x @ a.T - torch.tensor([1, 2, 3.0], dtype=D64)


def f6(x):  # scipy's F6: −J0⁻¹ v(x)
    j0 = torch.tensor([[-4.256, 14.7], [0.8394989, 0.59964207]], dtype=D64)
    x1, x2 = x[:, 0], x[:, 1]
    v = torch.stack([(x1 + 3) * (x2**5 - 7) + 18, torch.sin(x2 * torch.exp(x1) - 1)], dim=1)
    return -torch.linalg.solve(j0, v.T).T


PROBLEMS = {
    "diagonal": (diagonal_f, [1, 1, 1, 1, 1]),
    "identity": (identity_f, [1, 2, 3, 4, 5, 6]),
    "identity_lucky": (identity_f, [0, 0, 0, 0, 0, 0]),
    "tridiagonal": (tridiagonal_f, [1, 2, 3]),
    "f6": (f6, [-0.5, 1.4]),
}
# (solver, problem, form) pairings that do not converge, with the reason.
_REPELLING = "plain iteration diverges: the Jacobian of z ± F(z) has spectral radius > 1"
KNOWN_BAD: dict[tuple[str, str, str], str] = {
    ("forward", "diagonal", "minus"): _REPELLING,
    ("forward", "diagonal", "plus"): _REPELLING,
    ("forward", "identity", "plus"): _REPELLING,
    ("forward", "tridiagonal", "minus"): _REPELLING,
    ("forward", "tridiagonal", "plus"): _REPELLING,
    ("forward", "f6", "minus"): "plain iteration overflows (non-finite) from x0",
}


def _cases():
    for solver in ["forward", *QUASI_NEWTON]:
        for problem in PROBLEMS:
            for form in ("minus", "plus"):
                reason = KNOWN_BAD.get((solver, problem, form))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                yield pytest.param(solver, problem, form, marks=marks,
                                   id=f"{solver}-{problem}-z{'-' if form == 'minus' else '+'}F")


@pytest.mark.parametrize("solver, problem, form", list(_cases()))
def test_scipy_nonlinear_problems(solver, problem, form):
    F, x0 = PROBLEMS[problem]
    sign = -1.0 if form == "minus" else 1.0
    sol = implicit.solve(lambda z: z + sign * F(z), torch.tensor([x0], dtype=D64),
                         solver=solver, tol=1e-7, stop="abs", max_iter=200, policy="ignore")
    residual = F(sol.z).abs().max().item()
    assert sol.all_converged and residual < 1e-6, (sol.summary(), residual)


@pytest.mark.parametrize("solver", QUASI_NEWTON)
def test_cos_fixed_point(solver):
    sol = implicit.solve(torch.cos, torch.zeros(1, 1, dtype=D64), solver=solver, tol=1e-12,
                         stop="abs", max_iter=100)
    assert abs(sol.z.item() - 0.73908513321516) < 1e-9
    assert sol.n_calls < 30


def test_anderson_weights_sum_to_one_and_minimise():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(6, 4, 9, generator=gen, dtype=D64)
    alpha, failed = anderson_weights(G @ G.transpose(1, 2), lam=0.0)
    assert not failed.any()
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(6, dtype=D64))
    # optimality: the mixed residual is orthogonal to every difference g_i − g_j
    mixed = (alpha.unsqueeze(1) @ G).squeeze(1)
    diffs = G[:, 1:] - G[:, :1]
    torch.testing.assert_close((diffs @ mixed.unsqueeze(2)).squeeze(2),
                               torch.zeros(6, 3, dtype=D64), atol=1e-10, rtol=0)


def test_anderson_weights_fall_back_per_sample_when_singular():
    gram = torch.stack([torch.eye(3, dtype=D64), torch.full((3, 3), float("nan"), dtype=D64)])
    alpha, failed = anderson_weights(gram, lam=0.0, newest=1)
    assert failed.tolist() == [False, True]
    assert alpha[1].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(alpha[0].sum(), torch.tensor(1.0, dtype=D64))


def test_anderson_counts_fallbacks_instead_of_crashing():
    # a map with f(z) = z + const: every residual is identical, the Gram matrix is rank one
    sol = implicit.solve(lambda z: z * 0 + 1.0, torch.zeros(2, 3, dtype=D64),
                         solver=implicit.make_solver("anderson", lam=0.0), tol=1e-10,
                         stop="abs", max_iter=6, policy="ignore")
    assert "fallbacks" in sol.stats and sol.all_converged


def test_broyden_update_satisfies_the_secant_condition():
    gen = torch.Generator().manual_seed(1)
    b, n, memory = 3, 6, 4
    U, VT = torch.zeros(b, memory, n, dtype=D64), torch.zeros(b, memory, n, dtype=D64)
    for used in range(memory):
        dz = torch.randn(b, n, generator=gen, dtype=D64)
        dg = torch.randn(b, n, generator=gen, dtype=D64)
        b_dg = matvec(U[:, :used], VT[:, :used], dg)
        skip = broyden_update(U, VT, used, used, dz, b_dg, dg)
        assert not skip.any()
        torch.testing.assert_close(matvec(U[:, : used + 1], VT[:, : used + 1], dg), dz)


def _dense_broyden_trace(f, z, steps):
    """‖f(z) − z‖ per call of f for textbook good Broyden with a dense inverse Jacobian
    B (from −I): z ← z − B g, B ← B + (Δz − BΔg) ΔzᵀB / (ΔzᵀBΔg). One sample, float64."""
    b = -torch.eye(z.shape[1], dtype=D64)
    g = f(z) - z
    trace = [g.norm().item()]
    for _ in range(steps - 1):
        z_next = z - g @ b.T
        g_next = f(z_next) - z_next
        dz, dg = (z_next - z)[0], (g_next - g)[0]
        dz_b = dz @ b
        b = b + torch.outer(dz - b @ dg, dz_b) / (dz_b @ dg)
        z, g = z_next, g_next
        trace.append(g.norm().item())
    return trace


@pytest.mark.parametrize("line_search", [False, True])
def test_broyden_iterates_match_dense_good_broyden(line_search):
    # the library forms Δz, Δz − BΔg and the next step without extra passes while the loop
    # keeps its full step, and forms them explicitly once the loop masks a finished sample:
    # both must give textbook good Broyden's iterates (a line search that never cuts is a
    # no-op here: the residual decreases at every step on this map)
    gen = torch.Generator().manual_seed(3)
    n = 8
    w = torch.randn(n, n, generator=gen, dtype=D64)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    scale = torch.tensor([0.2, 0.9], dtype=D64)[:, None]  # converges early, late
    c = torch.randn(2, n, generator=gen, dtype=D64)

    def f(z):
        return torch.tanh(scale[: z.shape[0]] * (z @ w.T) + c[: z.shape[0]])

    solver = implicit.make_solver("broyden", line_search=line_search, trace=True)
    sol = implicit.solve(f, torch.zeros(2, n, dtype=D64), solver=solver, tol=1e-9,
                         stop="abs", max_iter=40)
    assert sol.all_converged and sol.nfe[0] < sol.nfe[1]
    steps = int(sol.nfe[1])
    hard = _dense_broyden_trace(lambda z: torch.tanh(0.9 * (z @ w.T) + c[1:]),
                                torch.zeros(1, n, dtype=D64), steps)
    torch.testing.assert_close(sol.trace[:steps, 1], torch.tensor(hard, dtype=D64),
                               rtol=1e-7, atol=1e-13)
    assert sol.stats["line_search_calls"] == 0


@pytest.mark.parametrize("solver", QUASI_NEWTON)
def test_batch_of_easy_and_hard_samples(solver):
    gen = torch.Generator().manual_seed(2)
    n = 16
    w = torch.randn(n, n, generator=gen, dtype=D64)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    scale = torch.tensor([0.1, 0.95], dtype=D64)[:, None]  # easy, hard
    c = torch.randn(2, n, generator=gen, dtype=D64)

    def f(z):
        return torch.tanh(scale * (z @ w.T) + c)

    kw = dict(solver=solver, tol=1e-10, stop="abs", max_iter=200)
    both = implicit.solve(f, torch.zeros(2, n, dtype=D64), **kw)
    assert both.all_converged and both.nfe[0] < both.nfe[1]
    alone = implicit.solve(lambda z: torch.tanh(0.1 * (z @ w.T) + c[:1]),
                           torch.zeros(1, n, dtype=D64), **kw)
    torch.testing.assert_close(both.z[0], alone.z[0], rtol=1e-12, atol=1e-12)
    assert both.nfe[0] == alone.nfe[0]


@pytest.mark.parametrize("solver", QUASI_NEWTON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tuple_state_and_dtypes(solver, dtype):
    a = torch.tensor(0.5, dtype=dtype)

    def f(state):
        p, q = state
        return torch.tanh(a * q.sum(dim=2) + 1), torch.tanh(a * p[:, :, None] - 1).expand(-1, -1, 2)

    z0 = (torch.zeros(3, 4, dtype=dtype), torch.zeros(3, 4, 2, dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    sol = implicit.solve(f, z0, solver=solver, tol=tol, stop="abs", max_iter=100)
    assert sol.all_converged and all(t.dtype == dtype for t in sol.z)


def test_broyden_line_search_respects_the_budget():
    sol = implicit.solve(lambda z: 3 * z + 1, torch.zeros(2, 3, dtype=D64),
                         solver=implicit.make_solver("broyden", line_search=True, ls_steps=3),
                         tol=1e-10, stop="abs", max_iter=7, policy="ignore")
    assert sol.n_calls <= 7 and bool((sol.nfe <= 7).all())


def test_options_are_validated():
    with pytest.raises(implicit.OptionError, match="did you mean 'lam'"):
        implicit.make_solver("anderson", lamda=1e-3)
    with pytest.raises(implicit.OptionError, match="m must be"):
        implicit.make_solver("anderson", m=0)
    with pytest.raises(implicit.OptionError, match="memory"):
        implicit.make_solver("broyden", memory=0)
    assert math.isclose(implicit.make_solver("anderson", beta=1.5).beta, 1.5)


@pytest.mark.parametrize("solver", QUASI_NEWTON)
@pytest.mark.parametrize("name", ["brown_almost_linear", "variably_dimensioned"])
def test_safeguard_cuts_a_step_that_blows_up(solver, name):
    """From their standard starts the first full steps on Brown's almost-linear and the
    variably dimensioned problem blow ‖F‖ up: unguarded, both solvers are DIVERGED within three
    calls; the safeguard (on by default on CPU) cuts the steps back and they solve both."""
    from implicit import problems

    problem = problems.get(name)
    z0 = problem.start()
    plain = implicit.solve(problem.fixed_point, z0, solver=solver, tol=1e-8, stop="abs",
                           max_iter=200, policy="ignore", safeguard=False)
    assert plain.status is implicit.Status.DIVERGED and plain.n_calls <= 3
    guarded = implicit.solve(problem.fixed_point, z0, solver=solver, tol=1e-8, stop="abs",
                             max_iter=200, policy="ignore")
    assert guarded.all_converged, guarded.summary()
    assert guarded.stats["safeguard_cuts"] >= 1 and guarded.stats["safeguard_calls"] >= 1
    assert float(torch.linalg.vector_norm(problem.F(guarded.z))) <= 1e-8


@pytest.mark.parametrize("solver", QUASI_NEWTON)
def test_safeguard_leaves_steps_that_do_not_blow_up_and_finished_samples_alone(solver):
    """A contraction never grows its residual tenfold: no cut, the same iterates as unguarded.
    A sample the loop has stopped counting (here: at its fixed point from the start, with a
    map that later runs away under it) never costs the batch a cut."""
    fn_c = lambda z: 0.5 * torch.tanh(z) + 0.3  # noqa: E731
    z0 = torch.zeros(3, 4, dtype=D64)
    guarded = implicit.solve(fn_c, z0, solver=solver, tol=1e-10, stop="abs", max_iter=60)
    plain = implicit.solve(fn_c, z0, solver=solver, tol=1e-10, stop="abs", max_iter=60,
                           safeguard=False)
    assert guarded.stats["safeguard_cuts"] == 0 and guarded.n_calls == plain.n_calls
    assert torch.equal(guarded.z, plain.z)

    calls = []

    def runaway(z):
        calls.append(1)
        row0 = torch.zeros_like(z[0]) if len(calls) < 3 else 1e6 * (z[0] + 1)
        return torch.stack([row0, 0.5 * torch.tanh(z[1]) + 0.3])

    alone = implicit.solve(lambda z: 0.5 * torch.tanh(z) + 0.3, z0[1:2], solver=solver,
                           tol=1e-10, stop="abs", max_iter=60)
    mixed = implicit.solve(runaway, z0[:2], solver=solver, tol=1e-10, stop="abs", max_iter=60)
    assert mixed.stats["safeguard_cuts"] == 0 and mixed.n_calls == alone.n_calls


@pytest.mark.parametrize("solver", QUASI_NEWTON)
def test_one_sample_blowing_up_every_step_cannot_spend_the_batch_budget_on_cuts(solver):
    """Sample 0's map has no fixed point and its residual grows with every step: the safeguard
    would cut it at every step; its per-solve budget of cuts (CUT_BUDGET × max_cuts) stops
    that, and sample 1 converges within the batch's budget as it does alone."""
    from implicit_solvers.linesearch import CUT_BUDGET

    def fn(z):
        good = 0.5 * torch.tanh(z[1:]) + 0.3
        bad = z[:1] + 1 + (z[:1] ** 2).sum()
        return torch.cat([bad, good])

    z0 = torch.zeros(2, 4, dtype=D64)
    sol = implicit.solve(fn, z0, solver=solver, tol=1e-10, stop="abs", max_iter=80,
                         policy="ignore", growth=2.0, divergence_factor=0)
    assert sol.stats["safeguard_calls"] <= CUT_BUDGET * 8
    assert bool(sol.converged[1]) and not bool(sol.converged[0])
