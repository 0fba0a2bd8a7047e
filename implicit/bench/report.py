"""Outputs of ``implicit bench``: the rich table, ``results.json`` and the PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

SCHEMA = "implicit-bench/1"


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale, spec)


def _label(combination: dict, kind: str) -> str:
    from .measure import plugin_label

    return plugin_label(combination[kind], combination.get(f"{kind}_options") or {})


def table(records: list[dict[str, Any]], title: str):
    """A rich Table of the records (one row per combination)."""
    from rich.table import Table

    has_compare = any(r.get("compare") for r in records)
    t = Table(title=title, show_lines=False)
    for name, justify in [
        ("solver", "left"), ("workload", "left"), ("backward", "left"), ("fwd status", "left"),
        ("fwd calls", "right"), ("nfe mean/max", "right"), ("fwd ms", "right"),
        ("floor ×", "right"), ("bwd calls", "right"), ("bwd ms", "right"), ("train ms", "right"),
        ("peak MiB", "right"), ("true rel res", "right"), ("grad rel err", "right"),
        ("grad cos", "right"),
    ]:
        t.add_column(name, justify=justify)
    if has_compare:
        t.add_column("torchdeq fwd ×", justify="right")
        t.add_column("torchdeq train ×", justify="right")
    has_compiled = any(r.get("compile_s") is not None for r in records)
    if has_compiled:
        t.add_column("compile s", justify="right")
        t.add_column("× eager fwd/train", justify="right")
        t.add_column("paid back after", justify="right")
    for r in records:
        c = r["combination"]
        if r.get("error"):
            row = [_label(c, "solver"), c["workload"], _label(c, "backward"),
                   f"[red]error: {r['error']}[/red]"]
            row += [""] * (len(t.columns) - len(row))
            t.add_row(*row)
            continue
        f, b = r["forward"], r["backward"]
        n = sum(f["status_counts"].values())
        status = f"{f['status_counts']['converged']}/{n} conv"
        if f["status"] != "converged":
            status = f"[yellow]{status} ({f['status']})[/yellow]"
        row = [
            _label(c, "solver"), c["workload"], _label(c, "backward"), status,
            str(f["n_calls"]), f"{f['nfe_mean']:.1f}/{f['nfe_max']}",
            _fmt(f["time_s"], ".2f", 1e3), _fmt(r["floor_ratio"], ".2f"),
            str(b["n_calls"]) if b else "-", _fmt(r.get("backward_time_s"), ".2f", 1e3),
            _fmt(r["train_step_time_s"], ".2f", 1e3),
            _fmt(r["peak_memory_bytes"], ".1f", 1 / 2**20),
            _fmt(f["true_rel_residual_max"], ".1e"), _fmt(r["grad_rel_error"], ".1e"),
            _fmt(r.get("grad_cosine"), ".4f"),
        ]
        if has_compare:
            cmp = r.get("compare") or {}
            row += [_fmt(cmp.get("forward_time_ratio"), ".2f"),
                    _fmt(cmp.get("train_step_time_ratio"), ".2f")]
        if has_compiled:
            steps, faster = payback_steps(r, records), speedups(r, records)
            row += [_fmt(r.get("compile_s"), ".1f"),
                    "-" if faster is None else f"{faster[0]:.2f}/{faster[1]:.2f}",
                    "-" if r.get("compile_s") is None else
                    ("never" if steps is None else f"{steps} steps")]
        t.add_row(*row)
    return t


def _plain_log_ticks(axis) -> None:
    """Ticks of a log axis at 1, 2 and 5 × 10ᵏ labelled as plain numbers ("20", not
    "2 × 10¹"), none on the minor ticks: matplotlib's default labels every minor tick on an
    axis spanning less than a decade, and they overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def eager_twin(record: dict, records: list[dict]) -> Optional[dict]:
    """The record of the same combination with nothing compiled (neither the solver nor the
    backward's own solves)."""
    def eager(options: dict) -> dict:
        return {k: v for k, v in options.items() if k != "compile"}

    c = record["combination"]
    plain = ("solver_options", "backward_options")
    for r in records:
        o = r["combination"]
        if (r is not record and not r.get("error")
                and all(o.get(k, {}) == eager(c.get(k, {})) for k in plain)
                and all(o.get(k) == c.get(k) for k in c if k not in plain)):
            return r
    return None


def _eager_times(record: dict, records: list[dict]) -> Optional[dict]:
    """The eager twin's times for a compiled record: those measured in the same rounds
    (``eager_side_by_side``) where the record has them, else the twin combination's record."""
    if record.get("eager_side_by_side"):
        return record["eager_side_by_side"]
    twin = eager_twin(record, records)
    return None if twin is None else {"forward_time_s": twin["forward"]["time_s"],
                                      "train_step_time_s": twin["train_step_time_s"]}


def speedups(record: dict, records: list[dict]) -> Optional[tuple[float, float]]:
    """``(forward, training step)``: the eager twin's median time ÷ the compiled one's."""
    eager = _eager_times(record, records)
    if record.get("compile_s") is None or eager is None:
        return None
    return (eager["forward_time_s"] / record["forward"]["time_s"],
            eager["train_step_time_s"] / record["train_step_time_s"])


def payback_steps(record: dict, records: list[dict]) -> Optional[int]:
    """Training steps after which a compiled solver's compile time is repaid by its faster
    steps (against its eager twin, timed side by side where the record has it); None when it
    is not faster."""
    eager = _eager_times(record, records)
    if record.get("compile_s") is None or eager is None:
        return None
    saved = eager["train_step_time_s"] - record["train_step_time_s"]
    return math.ceil(record["compile_s"] / saved) if saved > 0 else None


def write_json(path: Path, machine: dict, config: dict, records: list[dict]) -> None:
    payload = {"schema": SCHEMA, "machine": machine, "config": config, "records": records}
    path.write_text(json.dumps(payload, indent=1))


def plot(records: list[dict[str, Any]], out: Path, tol: Optional[float],
         stop: str = "rel") -> list[Path]:
    """Residual-vs-step per solver for each workload, and forward time / NFE bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if not r.get("error")]
    if not ok:
        return []
    paths = []

    # 1. residual vs solver step, one panel per workload, one line per solver
    # (a compiled solve has no trace of its own: its record's trace is the eager loop's, so it
    # is drawn once, under the eager twin's name, when that twin ran too)
    by_workload: dict[str, dict[str, list]] = defaultdict(dict)
    for r in ok:
        c = r["combination"]
        if r.get("compile_s") is not None and eager_twin(r, ok) is not None:
            continue
        by_workload[c["workload"]].setdefault(_label(c, "solver"), r["forward"]["trace"])
    n = len(by_workload)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    for ax, (workload, traces) in zip(axes[0], sorted(by_workload.items())):
        for solver, trace in sorted(traces.items()):
            ys = [y if y is not None and y > 0 else float("nan") for y in trace]
            ax.semilogy(range(len(ys)), ys, marker=".", label=solver)
        if tol:
            ax.axhline(tol, color="grey", linestyle="--", linewidth=1, label=f"tol {tol:g}")
        ax.set_title(workload)
        ax.set_xlabel("solver step")
        ax.set_ylabel(f"median {stop} residual over the batch")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Forward solve: residual vs step")
    fig.tight_layout()
    path = out / "residuals.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    paths.append(_plot_time_nfe(ok, out, plt))
    matrix = _plot_matrix(records, out, plt)
    if matrix is not None:
        paths.append(matrix)
    return paths


def _plot_time_nfe(ok: list[dict], out: Path, plt) -> Path:
    """Small multiples: one row per workload; times on a log axis (left), calls of f (right),
    one horizontal bar pair per solver × backward. A backward without an adjoint solve
    (phantom, jfb, unrolled) has no backward-calls bar, and says so."""
    by_workload: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        by_workload[r["combination"]["workload"]].append(r)
    heights = [max(2, len(rs)) for rs in by_workload.values()]
    fig, axes = plt.subplots(len(by_workload), 2, squeeze=False,
                             figsize=(11, 0.34 * sum(heights) + 1.1 * len(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (workload, rs) in enumerate(sorted(by_workload.items())):
        ax_t, ax_n = axes[row]
        labels = [f"{_label(r['combination'], 'solver')} · "
                  f"{_label(r['combination'], 'backward')}" for r in rs]
        ys = list(range(len(rs)))
        h = 0.38
        ax_t.barh([y - h / 2 for y in ys], [r["forward"]["time_s"] * 1e3 for r in rs], h,
                  color=colors[0], label="forward solve (to tol)")
        ax_t.barh([y + h / 2 for y in ys], [r["train_step_time_s"] * 1e3 for r in rs], h,
                  color=colors[1], label="training step (forward + backward)")
        ax_t.set_xscale("log")
        _plain_log_ticks(ax_t.xaxis)
        low = min(min(r["forward"]["time_s"], r["train_step_time_s"]) for r in rs) * 1e3
        ax_t.set_xlim(left=low / 3)
        ax_n.barh([y - h / 2 for y in ys], [r["forward"]["n_calls"] for r in rs], h,
                  color=colors[0], label="forward solve (to tol)")
        labelled = False
        for y, r in zip(ys, rs):
            if r["backward"]:
                ax_n.barh(y + h / 2, r["backward"]["n_calls"], h, color=colors[2],
                          label=None if labelled else "adjoint solve (backward)")
                labelled = True
            else:
                ax_n.text(0.5, y + h / 2, "no adjoint solve", va="center", fontsize=8,
                          color="dimgrey")
        for ax in (ax_t, ax_n):
            ax.set_yticks(ys)
            ax.set_yticklabels(labels if ax is ax_t else [""] * len(ys), fontsize=9)
            ax.invert_yaxis()
            ax.grid(True, axis="x", which="both", alpha=0.3)
        ax_t.set_ylabel(workload, fontsize=10, fontweight="bold")
        if row == len(by_workload) - 1:
            ax_t.set_xlabel("ms")
            ax_n.set_xlabel("calls")
        if row == 0:
            ax_t.set_title("median time (ms, log scale)", fontsize=10)
            ax_n.set_title("calls of f on the batch", fontsize=10)
            handles, names = [], []
            for ax in (ax_t, ax_n):
                for handle, name in zip(*ax.get_legend_handles_labels()):
                    if name not in names:
                        handles.append(handle)
                        names.append(name)
            fig.legend(handles, names, loc="upper center", ncol=4, fontsize=9,
                       frameon=False, bbox_to_anchor=(0.5, 1.0))
    # the legend's strip above the panels: a fixed height, not a fraction of the figure's
    # (on a one-workload figure 3 % of its height was too little, and it overlapped the titles)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path = out / "time_nfe.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_matrix(records: list[dict], out: Path, plt) -> Optional[Path]:
    """The solver × workload matrix as a heat map of forward time to tolerance (ms, log
    colour scale), for the most common backward; a cell that failed or did not converge says
    so instead of a time."""
    import matplotlib.colors as mcolors

    if not records:
        return None
    backwards = [r["combination"]["backward"] for r in records]
    backward = max(set(backwards), key=backwards.count)
    chosen = {}
    for r in records:
        c = r["combination"]
        if c["backward"] == backward:
            chosen.setdefault((_label(c, "solver"), c["workload"]), r)
    solvers = sorted({k[0] for k in chosen})
    workloads = sorted({k[1] for k in chosen})
    if len(solvers) < 2 and len(workloads) < 2:
        return None  # one cell: a heat map of it says nothing the table does not
    grid = [[float("nan")] * len(workloads) for _ in solvers]
    notes = [[""] * len(workloads) for _ in solvers]
    for (solver, workload), r in chosen.items():
        i, j = solvers.index(solver), workloads.index(workload)
        if r.get("error"):
            notes[i][j] = "error"
            continue
        f = r["forward"]
        grid[i][j] = f["time_s"] * 1e3
        notes[i][j] = f"{f['time_s'] * 1e3:.3g} ms\n{f['n_calls']} calls"
        if f["status"] != "converged":
            n = sum(f["status_counts"].values())
            notes[i][j] += f"\n{f['status_counts']['converged']}/{n} conv"
    values = [v for row in grid for v in row if v == v]
    fig, ax = plt.subplots(figsize=(1.9 * len(workloads) + 2.6, 0.62 * len(solvers) + 1.6))
    cmap = plt.get_cmap("viridis_r").copy()
    cmap.set_bad("lightgrey")
    norm = (mcolors.LogNorm(vmin=min(values), vmax=max(values))
            if values and min(values) > 0 and max(values) > min(values) else None)
    import numpy as np

    image = ax.imshow(np.ma.masked_invalid(np.array(grid)), cmap=cmap, norm=norm,
                      aspect="auto")
    for i in range(len(solvers)):
        for j in range(len(workloads)):
            dark = grid[i][j] == grid[i][j] and norm is not None and norm(grid[i][j]) > 0.6
            ax.text(j, i, notes[i][j] or "—", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, fontsize=9, rotation=20, ha="right")
    ax.set_yticks(range(len(solvers)))
    ax.set_yticklabels(solvers, fontsize=9)
    ax.set_title(f"forward time to tolerance, backward {backward} (grey: no run or error)",
                 fontsize=10)
    bar = fig.colorbar(image, ax=ax, label="ms (log scale)")
    _plain_log_ticks(bar.ax.yaxis)
    fig.tight_layout()
    path = out / "matrix.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
