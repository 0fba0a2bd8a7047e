"""``implicit bench --problems standard``: our solvers and scipy's, side by side, on the
standard nonlinear test problems (:mod:`implicit.problems`).

Each problem ``F(x) = 0`` is solved from its standard start in float64 on the CPU, in this
process, by every selected solver of ours (as the fixed point ``f(z) = z − F(z)``, absolute
stop on ``‖f(z) − z‖₂ = ‖F(z)‖₂``) and by scipy's method of the same family
(``scipy.optimize.anderson`` / ``broyden1`` / ``newton_krylov``, defaults, stopping on the
same 2-norm: ``tol_norm=numpy.linalg.norm``, ``f_tol=tol``). Calls of ``F`` are counted alike,
by a wrapper around ``F`` that sees every call (the torch Newton–Krylov's forward-mode JVPs
included) and ends a run once it has made ``budget`` calls. A run *solves* the problem when
the method reports success within the budget and ``‖F(x)‖₂ ≤ 10 · tol`` at the point it
returns, recomputed from the problem's definition; a reported success above that is a *false
convergence* and is counted as such.

``results.json`` (``"schema": "implicit-problems/1"``)::

    {"schema", "machine", "config": {tol, budget, factor, solvers, problems, argv},
     "records": [{problem, n, factor, side ("implicit" | "scipy"), method, family,
                  solved, claimed, false_convergence, calls, time_s, true_residual,
                  status, message}],
     "summary": {family: {method: {"solved": k, "of": n, "false_convergences": j}}}}
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .. import problems as problem_sets
from ..deq import solve
from ..registry import get_registry
from ..solution import Status
from .matrix import parse_selection

SCHEMA = "implicit-problems/1"
#: our solver family -> scipy's method of that family
SCIPY_METHODS = {"anderson": "anderson", "broyden": "broyden1", "newton_krylov": "newton_krylov"}
DEFAULT_SOLVERS = ("anderson", "broyden", "newton_krylov", "newton_krylov:backend=torch")


class _BudgetSpent(Exception):
    """Raised by the counted ``F`` when a run has used its budget of calls."""


class _Counted:
    """``F`` counting its calls; past ``budget`` calls it raises (scipy) or is only counted
    (ours: the loop's ``max_iter`` bounds its own calls, JVPs are counted on top)."""

    def __init__(self, F: Callable, budget: Optional[int]) -> None:
        self.F, self.budget, self.calls = F, budget, 0

    def __call__(self, x):
        self.calls += 1
        if self.budget is not None and self.calls > self.budget:
            raise _BudgetSpent
        return self.F(x)


def true_residual(problem: problem_sets.TestProblem, x: torch.Tensor) -> float:
    """``‖F(x)‖₂`` recomputed in float64 from the problem's definition (inf if non-finite)."""
    with torch.no_grad():
        value = problem.F(x.detach().to(torch.float64).reshape(1, problem.n))
    norm = float(torch.linalg.vector_norm(value))
    return norm if math.isfinite(norm) else math.inf


def run_ours(problem, spec: str, *, tol: float, budget: int, factor: float = 1.0) -> dict:
    name, options = parse_selection(spec)
    solver = get_registry().make("solver", name, **options)
    counted = _Counted(problem.F, None)
    z0 = problem.start(factor)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = solve(lambda z: z - counted(z), z0, solver=solver, tol=tol, stop="abs",
                    max_iter=budget, policy="ignore")
    elapsed = time.perf_counter() - start
    claimed = bool(sol.converged.all())
    residual = true_residual(problem, sol.z)
    within = counted.calls <= budget
    return _record(problem, factor, "implicit", spec, name, claimed and within, residual,
                   counted.calls, elapsed, tol, status=sol.status.name.lower(),
                   message=sol.summary() if not claimed else "")


def run_scipy(problem, family: str, *, tol: float, budget: int, factor: float = 1.0) -> dict:
    import numpy as np
    from scipy import optimize

    method = SCIPY_METHODS[family]
    counted = _Counted(lambda x: problem.F(torch.as_tensor(x, dtype=torch.float64)[None])[0]
                       .numpy(), budget)
    x0 = problem.start(factor)[0].numpy()
    start = time.perf_counter()
    claimed, status, message, x = False, "failed", "", x0
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            x = getattr(optimize, method)(counted, x0, f_tol=tol, tol_norm=np.linalg.norm,
                                          maxiter=budget)
            claimed, status = True, "converged"
        except _BudgetSpent:
            status, message = "max_iter", f"{budget} calls of F used"
        except optimize.NoConvergence as exc:
            status, message = "no_convergence", "scipy raised NoConvergence"
            x = exc.args[0] if exc.args else x0
        except Exception as exc:  # noqa: BLE001 — any failure inside scipy is a failed run
            status, message = "error", f"{type(exc).__name__}: {exc}"[:200]
    elapsed = time.perf_counter() - start
    residual = true_residual(problem, torch.as_tensor(np.asarray(x, dtype=np.float64)))
    calls = min(counted.calls, budget)
    return _record(problem, factor, "scipy", method, family, claimed, residual, calls,
                   elapsed, tol, status=status, message=message)


def _record(problem, factor, side, method, family, claimed, residual, calls, elapsed, tol,
            *, status, message) -> dict:
    good = residual <= 10 * tol
    return {"problem": problem.name, "n": problem.n, "factor": factor, "side": side,
            "method": method, "family": family, "solved": bool(claimed and good),
            "claimed": bool(claimed), "false_convergence": bool(claimed and not good),
            "calls": int(calls), "time_s": elapsed, "true_residual": residual,
            "status": status, "message": message}


def family_of(spec: str) -> str:
    return parse_selection(spec)[0]


def run_problems(problem_set: str = "standard", solvers: Sequence[str] = DEFAULT_SOLVERS, *,
                 tol: float = 1e-8, budget: int = 200, factor: float = 1.0,
                 out: Optional[Path] = None, plots: bool = True, argv=None,
                 console=None) -> dict:
    """Run the side-by-side comparison; write ``results.json`` (and ``problems.png``) to
    ``out`` when given; return the results dictionary."""
    from .runner import machine_info

    chosen = problem_sets.problem_set(problem_set)
    registry = get_registry()
    for spec in solvers:  # unknown names and bad options fail here, before any run
        name, options = parse_selection(spec)
        registry.make("solver", name, **options)
    families = sorted({family_of(s) for s in solvers if family_of(s) in SCIPY_METHODS})
    records = []
    for problem in chosen:
        for spec in solvers:
            records.append(run_ours(problem, spec, tol=tol, budget=budget, factor=factor))
        for family in families:
            records.append(run_scipy(problem, family, tol=tol, budget=budget, factor=factor))
        if console is not None:
            done = [r for r in records if r["problem"] == problem.name]
            console.print(f"{problem.name:28s} " + "  ".join(
                f"{r['method']}={'ok' if r['solved'] else 'x'}" for r in done))
    result = {
        "schema": SCHEMA,
        "machine": machine_info("cpu"),
        "config": {"tol": tol, "budget": budget, "factor": factor, "solvers": list(solvers),
                   "problems": [p.name for p in chosen], "argv": list(argv or [])},
        "records": records,
        "summary": summarize(records),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        if plots:
            plot(result, out / "problems.png")
    return result


def summarize(records: list[dict]) -> dict:
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for r in records:
        entry = summary.setdefault(r["family"], {}).setdefault(
            f"{r['side']}:{r['method']}", {"solved": 0, "of": 0, "false_convergences": 0})
        entry["of"] += 1
        entry["solved"] += r["solved"]
        entry["false_convergences"] += r["false_convergence"]
    return summary


def markdown(result: dict) -> str:
    """The README table: per family, problems solved, median calls and total time."""
    import statistics

    lines = ["| family | method | solved | false convergences | median calls (solved) | "
             "time (all problems) |", "|---|---|---|---|---|---|"]
    records = result["records"]
    for family, methods in result["summary"].items():
        for key, entry in methods.items():
            side, method = key.split(":", 1)
            mine = [r for r in records if r["family"] == family and r["side"] == side
                    and r["method"] == method]
            calls = [r["calls"] for r in mine if r["solved"]]
            median = f"{statistics.median(calls):.0f}" if calls else "-"
            label = f"scipy `{method}`" if side == "scipy" else f"implicit `{method}`"
            lines.append(f"| {family} | {label} | {entry['solved']} of {entry['of']} | "
                         f"{entry['false_convergences']} | {median} | "
                         f"{sum(r['time_s'] for r in mine):.2f} s |")
    return "\n".join(lines)


def table(result: dict):
    from rich.table import Table

    records = result["records"]
    methods = list(dict.fromkeys(f"{r['side']}:{r['method']}" for r in records))
    t = Table(title=f"standard problems: calls of F to ‖F‖ ≤ {result['config']['tol']:g} "
                    f"(budget {result['config']['budget']}; x: not solved, !: false "
                    "convergence)")
    t.add_column("problem")
    t.add_column("n", justify="right")
    for m in methods:
        t.add_column(m.replace("implicit:", "").replace("scipy:", "scipy "), justify="right")
    for name in dict.fromkeys(r["problem"] for r in records):
        row = {f"{r['side']}:{r['method']}": r for r in records if r["problem"] == name}
        cells = []
        for m in methods:
            r = row.get(m)
            cells.append("-" if r is None else str(r["calls"]) if r["solved"]
                         else "!" if r["false_convergence"] else "x")
        t.add_row(name, str(next(iter(row.values()))["n"]), *cells)
    return t


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = result["records"]
    methods = list(dict.fromkeys(f"{r['side']}:{r['method']}" for r in records))
    names = list(dict.fromkeys(r["problem"] for r in records))
    budget = result["config"]["budget"]
    grid = np.full((len(names), len(methods)), np.nan)
    for r in records:
        i, j = names.index(r["problem"]), methods.index(f"{r['side']}:{r['method']}")
        grid[i, j] = r["calls"] if r["solved"] else np.nan
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.34 * len(names) + 2.2),
                                      gridspec_kw={"width_ratios": [1.0, 1.6]})
    labels = [m.replace("implicit:", "").replace("scipy:", "scipy ") for m in methods]
    solved = [int(np.isfinite(grid[:, j]).sum()) for j in range(len(methods))]
    colours = ["tab:blue" if m.startswith("implicit:") else "tab:gray" for m in methods]
    left.barh(range(len(methods)), solved, color=colours)
    left.set_yticks(range(len(methods)), labels)
    left.invert_yaxis()
    left.set_xlim(0, len(names))
    left.set_xlabel(f"problems solved of {len(names)} (‖F‖₂ ≤ {result['config']['tol']:g}, "
                    f"≤ {budget} calls)")
    for j, k in enumerate(solved):
        left.text(k + 0.2, j, str(k), va="center")
    left.set_title("solved (blue: implicit, grey: scipy)")
    image = right.imshow(np.log10(grid), aspect="auto", cmap="viridis_r",
                         vmin=0, vmax=math.log10(budget))
    right.set_xticks(range(len(methods)), labels, rotation=35, ha="right")
    right.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(methods)):
            r = next(r for r in records if r["problem"] == names[i]
                     and f"{r['side']}:{r['method']}" == methods[j])
            text = (str(r["calls"]) if r["solved"] else "FALSE" if r["false_convergence"]
                    else "×")
            right.text(j, i, text, ha="center", va="center", fontsize=7,
                       color="white" if r["solved"] and r["calls"] > 15 else "black")
    right.set_title("calls of F to solve (× not solved)")
    fig.colorbar(image, ax=right, label="log10 calls", fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
