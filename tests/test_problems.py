"""The standard nonlinear test problems (implicit.problems) and the side-by-side bench.

The batched implementations are checked against the textbook formulas written as plain
Python loops over indices (Moré, Garbow & Hillstrom 1981; scipy's test_nonlin.py), at random
points, so a vectorisation slip cannot hide behind a root computed from the same code.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import implicit
from implicit import problems
from implicit.bench import problems as bench_problems

D64 = torch.float64
ALL = problems.standard()


def _loop_reference(name: str, x: list[float]) -> list[float]:
    """F(x) of one point, straight from the published definitions (1-based formulas)."""
    n = len(x)
    h = 1.0 / (n + 1)
    t = [(k + 1) * h for k in range(n)]
    at = lambda k: x[k] if 0 <= k < n else 0.0  # noqa: E731 — x_0 = x_{n+1} = 0
    if name == "scipy_F":
        d = [3, 2, 1.5, 1, 0.5]
        s = sum(v * v for v in x)
        return [-d[i] * x[i] - 0.01 * s * x[i] for i in range(n)]
    if name == "scipy_F2":
        return list(x)
    if name == "scipy_F3":
        a = [[-2, 1, 0], [1, -2, 1], [0, 1, -2]]
        return [sum(a[i][j] * x[j] for j in range(3)) - (i + 1) for i in range(3)]
    if name in ("scipy_F4_powell", "powell_badly_scaled"):
        return [1e4 * x[0] * x[1] - 1, math.exp(-x[0]) + math.exp(-x[1]) - 1.0001]
    if name == "scipy_F5":
        p = [0.5 * v * v for v in x]
        return [p[i] - p[0] for i in range(1, 4)] + [sum(x) - 4]
    if name == "scipy_F6":
        j0 = torch.tensor([[-4.256, 14.7], [0.8394989, 0.59964207]], dtype=D64)
        v = torch.tensor([(x[0] + 3) * (x[1] ** 5 - 7) + 18,
                          math.sin(x[1] * math.exp(x[0]) - 1)], dtype=D64)
        return (-torch.linalg.solve(j0, v)).tolist()
    if name == "rosenbrock":
        return [10 * (x[1] - x[0] ** 2), 1 - x[0]]
    if name == "freudenstein_roth":
        return [-13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1],
                -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1]]
    if name == "helical_valley":
        theta = math.atan(x[1] / x[0]) / (2 * math.pi) + (0.5 if x[0] < 0 else 0.0)
        return [10 * (x[2] - 10 * theta), 10 * (math.hypot(x[0], x[1]) - 1), x[2]]
    if name in ("powell_singular", "extended_powell_singular"):
        out = []
        for b in range(0, n, 4):
            x1, x2, x3, x4 = x[b:b + 4]
            out += [x1 + 10 * x2, math.sqrt(5) * (x3 - x4), (x2 - 2 * x3) ** 2,
                    math.sqrt(10) * (x1 - x4) ** 2]
        return out
    if name == "wood":
        x1, x2, x3, x4 = x
        return [-200 * x1 * (x2 - x1 ** 2) - (1 - x1),
                200 * (x2 - x1 ** 2) + 20.2 * (x2 - 1) + 19.8 * (x4 - 1),
                -180 * x3 * (x4 - x3 ** 2) - (1 - x3),
                180 * (x4 - x3 ** 2) + 20.2 * (x4 - 1) + 19.8 * (x2 - 1)]
    if name == "extended_rosenbrock":
        out = []
        for i in range(0, n, 2):
            out += [10 * (x[i + 1] - x[i] ** 2), 1 - x[i]]
        return out
    if name == "variably_dimensioned":
        s = sum((j + 1) * (x[j] - 1) for j in range(n))
        return [x[k] - 1 + (k + 1) * s * (1 + 2 * s * s) for k in range(n)]
    if name == "trigonometric":
        c = sum(math.cos(v) for v in x)
        return [n - c + (i + 1) * (1 - math.cos(x[i])) - math.sin(x[i]) for i in range(n)]
    if name == "brown_almost_linear":
        return [x[k] + sum(x) - (n + 1) for k in range(n - 1)] + [math.prod(x) - 1]
    if name == "discrete_boundary_value":
        return [2 * x[k] - at(k - 1) - at(k + 1) + h * h * (x[k] + t[k] + 1) ** 3 / 2
                for k in range(n)]
    if name == "discrete_integral_equation":
        out = []
        for k in range(n):
            lower = sum(t[j] * (x[j] + t[j] + 1) ** 3 for j in range(k + 1))
            upper = sum((1 - t[j]) * (x[j] + t[j] + 1) ** 3 for j in range(k + 1, n))
            out.append(x[k] + h * ((1 - t[k]) * lower + t[k] * upper) / 2)
        return out
    if name == "broyden_tridiagonal":
        return [(3 - 2 * x[k]) * x[k] - at(k - 1) - 2 * at(k + 1) + 1 for k in range(n)]
    if name == "broyden_banded":
        out = []
        for k in range(n):
            band = [j for j in range(max(0, k - 5), min(n - 1, k + 1) + 1) if j != k]
            out.append(x[k] * (2 + 5 * x[k] ** 2) + 1 - sum(x[j] * (1 + x[j]) for j in band))
        return out
    if name == "chebyquad":
        out = []
        for i in range(1, n + 1):
            # T_i on [0, 1] through the recurrence of the shifted Chebyshev polynomials
            total = 0.0
            for v in x:
                y, t0, t1 = 2 * v - 1, 1.0, 2 * v - 1
                for _ in range(i - 1):
                    t0, t1 = t1, 2 * y * t1 - t0
                total += t1
            out.append(total / n - (-1.0 / (i * i - 1) if i % 2 == 0 else 0.0))
        return out
    raise KeyError(name)


@pytest.mark.parametrize("problem", ALL, ids=lambda p: p.name)
def test_batched_problem_matches_its_published_formula(problem):
    gen = torch.Generator().manual_seed(7)
    x = problem.start() + 0.3 * torch.randn(4, problem.n, generator=gen, dtype=D64)
    x[:, 0] += 0.1  # keep helical valley's x1 off 0, where θ has its branch cut
    got = problem.F(x)
    for row in range(4):
        expected = torch.tensor(_loop_reference(problem.name, x[row].tolist()), dtype=D64)
        torch.testing.assert_close(got[row], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("problem", [p for p in ALL if p.roots], ids=lambda p: p.name)
def test_known_solutions_are_roots(problem):
    for root in problem.root_tensors():
        # by the batched F and by the published formula
        assert float(torch.linalg.vector_norm(problem.F(root[None]))) <= 1e-8
        assert math.hypot(*_loop_reference(problem.name, root.tolist())) <= 1e-8
        # and a fixed point of the form the solvers take
        assert torch.allclose(problem.fixed_point(root[None]), root[None], atol=1e-8, rtol=0)


def test_problem_set_has_the_standard_members_and_clear_errors():
    names = {p.name for p in ALL}
    assert len(ALL) == len(names) >= 20
    assert {"rosenbrock", "powell_singular", "helical_valley", "trigonometric",
            "broyden_tridiagonal", "broyden_banded", "discrete_boundary_value",
            "variably_dimensioned", "brown_almost_linear", "chebyquad", "scipy_F6"} <= names
    assert problems.get("wood").n == 4
    assert torch.equal(problems.get("rosenbrock").start(10), torch.tensor([[-12.0, 10.0]],
                                                                          dtype=D64))
    with pytest.raises(KeyError, match="no test problem 'nope'.*rosenbrock"):
        problems.get("nope")
    with pytest.raises(ValueError, match=r"takes \(B, 2\) batches"):
        problems.get("rosenbrock").F(torch.zeros(1, 3, dtype=D64))
    assert [p.name for p in problems.problem_set("wood, rosenbrock")] == ["wood", "rosenbrock"]


def test_side_by_side_bench_counts_calls_alike_and_writes_results(tmp_path):
    result = bench_problems.run_problems("rosenbrock,scipy_F5", ["broyden", "anderson"],
                                         tol=1e-8, budget=200, out=tmp_path, plots=True)
    assert json.loads((tmp_path / "results.json").read_text())["schema"] == "implicit-problems/1"
    assert (tmp_path / "problems.png").stat().st_size > 10_000
    records = result["records"]
    assert {(r["side"], r["method"]) for r in records} == {
        ("implicit", "broyden"), ("implicit", "anderson"), ("scipy", "broyden1"),
        ("scipy", "anderson")}
    for r in records:
        assert r["calls"] <= 200
        # the recorded residual is the problem's own ‖F‖ at the returned point
        assert r["solved"] == (r["claimed"] and r["true_residual"] <= 1e-7)
    # ours solve both; a failed scipy run is recorded with its reason, never as solved
    assert all(r["solved"] for r in records if r["side"] == "implicit"), records
    assert all(r["status"] == "converged" or (not r["solved"] and r["message"])
               for r in records if r["side"] == "scipy")
    assert result["summary"]["broyden"]["scipy:broyden1"]["of"] == 2
    assert "| broyden | implicit `broyden` |" in bench_problems.markdown(result)


def test_bench_flags_a_false_convergence(monkeypatch):
    """F = 28 everywhere has no root; at ‖x‖ = 8e17, f(z) − z = (z − 28) − z rounds to 0. With
    the precision rule switched off the loop claims convergence, and the bench, recomputing
    ‖F‖ = 28·√2 from the definition, must call it a false convergence."""
    constant = problems.TestProblem(name="constant", n=2, x0=(8e17, 8e17), source="test",
                                    residual=lambda x: torch.full_like(x, 28.0))
    honest = bench_problems.run_ours(constant, "broyden", tol=1e-8, budget=20)
    assert not honest["claimed"] and not honest["false_convergence"]
    monkeypatch.setattr(implicit.solver, "PRECISION", 0.0)
    fooled = bench_problems.run_ours(constant, "broyden", tol=1e-8, budget=20)
    assert fooled["claimed"] and fooled["false_convergence"] and not fooled["solved"]
    assert fooled["true_residual"] == pytest.approx(28 * math.sqrt(2))


def test_cli_bench_problems(tmp_path, capsys):
    from implicit.cli import main

    code = main(["bench", "--problems", "rosenbrock", "--solvers", "broyden",
                 "--out", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert code == 0 and "rosenbrock" in out and "scipy" in out
    assert (tmp_path / "results.json").exists() and not (tmp_path / "problems.png").exists()
    assert main(["bench", "--problems", "nope"]) == 2
    assert "no test problem 'nope'" in capsys.readouterr().err
