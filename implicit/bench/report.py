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
            steps = payback_steps(r, records)
            row += [_fmt(r.get("compile_s"), ".1f"),
                    "-" if r.get("compile_s") is None else
                    ("never" if steps is None else f"{steps} steps")]
        t.add_row(*row)
    return t


def eager_twin(record: dict, records: list[dict]) -> Optional[dict]:
    """The record of the same combination with the solver not compiled."""
    c = record["combination"]
    options = {k: v for k, v in c.get("solver_options", {}).items() if k != "compile"}
    for r in records:
        o = r["combination"]
        if (not r.get("error") and o.get("solver_options", {}) == options
                and all(o.get(k) == c.get(k) for k in c if k != "solver_options")):
            return r
    return None


def payback_steps(record: dict, records: list[dict]) -> Optional[int]:
    """Training steps after which a compiled solver's compile time is repaid by its faster
    steps (against its eager twin); None when it is not faster."""
    twin = eager_twin(record, records)
    if record.get("compile_s") is None or twin is None:
        return None
    saved = twin["train_step_time_s"] - record["train_step_time_s"]
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
    by_workload: dict[str, dict[str, list]] = defaultdict(dict)
    for r in ok:
        c = r["combination"]
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

    # 2. forward time, training-step time and NFE per combination
    labels = [f"{_label(r['combination'], 'solver')}\n{r['combination']['workload']}\n"
              f"{_label(r['combination'], 'backward')}" for r in ok]
    fwd_ms = [r["forward"]["time_s"] * 1e3 for r in ok]
    train_ms = [r["train_step_time_s"] * 1e3 for r in ok]
    fwd_calls = [r["forward"]["n_calls"] for r in ok]
    bwd_calls = [r["backward"]["n_calls"] if r["backward"] else 0 for r in ok]
    width = 0.38
    xs = range(len(ok))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(ok) + 4), 4.8))
    ax1.bar([x - width / 2 for x in xs], fwd_ms, width, label="forward (time to tol)")
    ax1.bar([x + width / 2 for x in xs], train_ms, width, label="training step")
    ax1.set_ylabel("median time (ms)")
    ax1.set_title("Time")
    ax2.bar([x - width / 2 for x in xs], fwd_calls, width, label="forward calls of f")
    ax2.bar([x + width / 2 for x in xs], bwd_calls, width, label="backward calls (adjoint)")
    ax2.set_ylabel("calls on the batch")
    ax2.set_title("Function evaluations")
    for ax in (ax1, ax2):
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "time_nfe.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths
