"""The figures of the README and the docs, generated from the committed benchmark JSON.

A page marks each generated region::

    <!-- figures: training-parity -->
    ...generated text...
    <!-- /figures -->

``python benchmarks/figures.py`` rewrites every region of ``README.md`` and ``docs/**/*.md``
from ``benchmarks/results/``; ``--check`` only compares and exits 1 naming the regions that
disagree (``tests/test_figures.py`` runs it, so a hand-edited figure or a re-run benchmark
whose text was not regenerated fails the suite). Unknown region names are errors.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REGION = re.compile(r"(<!-- figures: ([\w:./-]+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / name / "results.json").read_text())


def _parity_module():
    spec = importlib.util.spec_from_file_location("training_parity",
                                                  ROOT / "benchmarks" / "training_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_parity() -> str:
    data = _load("cpu-training-parity")
    parity = _parity_module()
    summary = data["summary"]
    ours, ref = summary["implicit"], summary["tutorial"]
    ratios = [a / b for a, b in zip(ours["train_seconds"], ref["train_seconds"])]
    schedule = data["runs"][0].get("schedule", "paired processes")
    return (parity.markdown(summary) + "\n\n"
            f"MNIST-1D, 30 epochs, seeds {ours['seeds']}, one thread, schedule: {schedule}; "
            f"time ratio implicit ÷ tutorial {statistics.fmean(ratios):.2f}. Command: "
            f"`{data['command']}`.\n")


def training_parity_digits(name: str = "cpu-training-parity-digits") -> str:
    """Lockstep runs: accuracy and the time ratio, as for MNIST-1D."""
    data = _load(name)
    schedule = data["runs"][0].get("schedule", "paired processes")
    return (_parity_module().markdown(data["summary"]) + "\n\n"
            f"digits, 20 epochs, one thread, schedule: {schedule}. Command: "
            f"`{data['command']}`.\n")


def training_parity_ablation() -> str:
    """The one-change-at-a-time runs of the parity write-up (test accuracy %, train loss)."""
    data = _load("cpu-training-parity-ablation")
    seeds = sorted({s for r in data["rows"] for s in r["seeds"]})
    lines = ["| layer (one change from the tutorial or the row above) | "
             + " | ".join(f"seed {s}" for s in seeds) + " | final train loss |",
             "|---|" + "---|" * len(seeds) + "---|"]
    for r in data["rows"]:
        acc = dict(zip(r["seeds"], r["test_accuracy"]))
        cells = " | ".join(f"{100 * acc[s]:.1f}" if s in acc else "—" for s in seeds)
        loss = ", ".join(f"{v:.3f}" for v in r["final_train_loss"])
        lines.append(f"| {r['description']} (`{r['variant']}`) | {cells} | {loss} |")
    return ("\n".join(lines) + f"\n\n{data['what']}; {data['timing_note']}. Command: "
            f"`{data['command']}`.\n")


def _family_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("training_family",
                                                  ROOT / "benchmarks" / "training_family.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_family(folder: str = "cpu-training-family") -> str:
    """The family of setups (``benchmarks/training_family.py --out``): mean ± std (seeds) per
    setup and layer, the gaps of ours to the peers, and its time ratio to the tutorial."""
    data = _load(folder)
    family = _family_module()
    axes = "; ".join(f"`{name}`: {spec['data']}, {spec['channels']} channels, "
                     f"{spec['norm']} norm, {spec['head']} head, lr {spec['lr']:g}"
                     for name, spec in data["family"].items())
    return (family.table(data["results"], data["variants"]) + "\n\n"
            f"Test accuracy (%) after {data['epochs']} epochs, mean ± std over the seeds run "
            f"(count in brackets); time ÷ tutorial from the same lockstep processes. "
            f"Setups: {axes}. Command: `{data['command']}`.\n")


def training_causes() -> str:
    """The half swaps and adjoint variants on the near-variant setup (``causes.json``)."""
    data = json.loads((RESULTS / "cpu-training-family" / "causes.json").read_text())
    seeds = data["seeds"]
    lines = ["| layer | what changes | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | final train loss |", "|---|---|" + "---|" * len(seeds) + "---|---|"]
    for row in data["rows"]:
        acc = [row["accuracy"].get(str(s)) for s in seeds]
        shown = " | ".join(f"{a:.1f}" if a is not None else "—" for a in acc)
        found = [a for a in acc if a is not None]
        mean = f"{statistics.fmean(found):.1f}" if found else "—"
        loss = ", ".join(f"{v:.3f}" for v in row["train_loss"])
        lines.append(f"| `{row['variant']}` | {row['description']} | {shown} | {mean} | {loss} |")
    return "\n".join(lines) + f"\n\n{data['what']} Command: `{data['command']}`.\n"


def training_probes() -> str:
    """The probes on the two setups where the defaults trail most (``probes.json``)."""
    data = json.loads((RESULTS / "cpu-training-family" / "probes.json").read_text())
    setups = data["setups"]
    lines = ["| layer | what changes | " + " | ".join(f"{s} (seeds)" for s in setups)
             + " | " + " | ".join(f"{s} mean" for s in setups) + " |",
             "|---|---|" + "---|" * (2 * len(setups))]
    for row in data["rows"]:
        seeds, means = [], []
        for setup in setups:
            found = row["accuracy"].get(setup, {})
            seeds.append(", ".join(f"{found[k]:.1f}" for k in sorted(found, key=int)) or "—")
            means.append(f"{statistics.fmean(found.values()):.1f}" if found else "—")
        lines.append(f"| `{row['variant']}` | {row['description']} | " + " | ".join(seeds)
                     + " | " + " | ".join(means) + " |")
    return ("\n".join(lines) + "\n\nTest accuracy (%) after 10 epochs per seed (seeds "
            + ", ".join(map(str, data["seeds"])) + " where run, in order), one change per row. "
            f"Command: `{data['command']}`.\n")


def digits() -> str:
    """The digits run's last epoch, from its committed log (``benchmarks/digits.py --out``)."""
    lines = (RESULTS / "cpu-digits" / "log.txt").read_text().splitlines()
    last = dict(item.split("=", 1) for item in
                next(line for line in reversed(lines) if line.startswith("epoch=")).split())
    final = next(line for line in reversed(lines) if line.startswith("digits:"))
    return (f"| epochs | test accuracy | forward NFE per sample | backward NFE per sample |\n"
            f"|---|---|---|---|\n"
            f"| {int(last['epoch']) + 1} | {100 * float(last['test_accuracy']):.2f} % | "
            f"{float(last['fwd_nfe']):.1f} | {float(last['bwd_nfe']):.1f} |\n\n"
            f"Last epoch of `benchmarks/results/cpu-digits/log.txt` ({final}).\n")


def verify_cases() -> str:
    """The committed ``implicit verify --report`` run: cases per contract, and how many passed."""
    from collections import Counter

    data = json.loads((RESULTS / "verify-report" / "report.json").read_text())
    cases = data["cases"]
    per = Counter(c["contract"] for c in cases)
    failed = sum(c["failed"] for c in cases)
    vacuous = sum(not any(c["claims"].values()) for c in cases if c["claims"])
    listed = ", ".join(f"{n} {contract}" for contract, n in sorted(per.items()))
    return (f"On the built-ins that is {len(cases)} cases ({listed}); the committed run "
            f"(`implicit verify --report benchmarks/results/verify-report`, exit code "
            f"{data['exit_code']}) has {failed} failed and {vacuous} without a single claim "
            f"checked.\n")


def _median_calls(data: dict, side: str, method: str) -> str:
    calls = [r["calls"] for r in data["records"]
             if r["side"] == side and r["method"] == method and r["solved"]]
    return f"{statistics.median(calls):g}" if calls else "—"


def problems(calls: bool = False) -> str:
    """Solved / of (false convergences) per method, ours beside scipy's same family; with
    ``calls``, the median calls of F on the problems each method solved."""
    data = _load("cpu-problems")
    extra = " median calls |" if calls else ""
    lines = [f"| family | ours | solved |{extra} scipy | solved |{extra}",
             "|---|---|---|" + "---|" * (4 if calls else 2)]

    def cells(side: str, name: str, s: dict) -> str:
        method = name.split(":", 1)[1]
        text = f"`{method}` | {s['solved']}/{s['of']} ({s['false_convergences']} false) |"
        return text + (f" {_median_calls(data, side, method)} |" if calls else "")

    for family, sides in data["summary"].items():
        ours = [(k, v) for k, v in sides.items() if k.startswith("implicit:")]
        theirs = [(k, v) for k, v in sides.items() if k.startswith("scipy:")]
        for i, (name, s) in enumerate(ours):
            row = f"| {family if i == 0 else ''} | " + cells("implicit", name, s)
            if i == 0 and theirs:
                row += " " + cells("scipy", *theirs[0])
            else:
                row += " |" * (3 if calls else 2)
            lines.append(row)
    argv = " ".join(data["config"]["argv"][1:])
    return "\n".join(lines) + f"\n\nCommand: `implicit {argv}`.\n"


def _bench_rows(records: list[dict], *, compiled_columns: bool = False) -> list[str]:
    from implicit.bench.measure import plugin_label
    from implicit.bench.report import payback_steps, speedups

    header = "| solver | workload | backward | fwd calls | fwd ms | floor × | train step ms |"
    rule = "|---|---|---|---|---|---|---|"
    if compiled_columns:
        header += " compile s | × eager fwd / train | paid back after |"
        rule += "---|---|---|"
    rows = [header, rule]
    for r in records:
        c = r["combination"]
        if r.get("error"):
            rows.append(f"| {plugin_label(c['solver'], c['solver_options'])} | {c['workload']} "
                        f"| {c['backward']} | error | | | |")
            continue
        row = (f"| `{plugin_label(c['solver'], c['solver_options'])}` | {c['workload']} | "
               f"{plugin_label(c['backward'], c['backward_options'])} | "
               f"{r['forward']['n_calls']} | {1e3 * r['forward']['time_s']:.2f} | "
               f"{r['floor_ratio']:.2f} | {1e3 * r['train_step_time_s']:.2f} |")
        if compiled_columns:
            steps, faster = payback_steps(r, records), speedups(r, records)
            ratio = "—" if faster is None else f"{faster[0]:.2f} / {faster[1]:.2f}"
            row += (" — | — | — |" if r.get("compile_s") is None else
                    f" {r['compile_s']:.1f} | {ratio} | "
                    f"{'never' if steps is None else f'{steps} steps'} |")
        rows.append(row)
    return rows


def _bench_note(data: dict) -> str:
    m = data["machine"]
    load = m.get("load_average_1min")
    busy = f", 1-min load average {load:.2f}" if load is not None else ""
    argv = " ".join(data["config"]["argv"][1:])
    from implicit.bench.runner import compile_environment

    env = "".join(f"{k}={v} " for k, v in compile_environment(m.get("compile_env") or {}).items())
    return (f"{m['processor']}, {m['cpu_count']} CPUs{busy}, torch {m['torch']}. "
            f"Command: `{env}implicit {argv}`.")


def bench_quick() -> str:
    return bench("cpu-quick")


def bench(name: str) -> str:
    """Any committed ``implicit bench`` run's table (``bench:DIR``), with the torchdeq ratios
    where the run compared against it (``--compare torchdeq``)."""
    data = _load(name)
    rows = _bench_rows(data["records"])
    if any(r.get("compare") for r in data["records"]):
        rows[0] += " torchdeq fwd ÷ ours | torchdeq train ÷ ours |"
        rows[1] += "---|---|"
        for i, r in enumerate(data["records"], start=2):
            c = r.get("compare") or {}
            fwd, train = c.get("forward_time_ratio"), c.get("train_step_time_ratio")
            rows[i] += (f" {fwd:.2f} | {train:.2f} |" if fwd is not None and train is not None
                        else " — | — |")
    return "\n".join(rows) + "\n\n" + _bench_note(data) + "\n"


def gradients(name: str) -> str:
    """A backward-strategy run's gradients against its float64 reference (``gradients:DIR``)."""
    from implicit.bench.measure import plugin_label

    data = _load(name)
    records = [r for r in data["records"] if not r.get("error")]
    ift = next((r["backward_time_s"] for r in records
                if r["combination"]["backward"] == "ift"), None)
    lines = ["| backward | cosine similarity | relative error | backward ms | ÷ ift backward time |",
             "|---|---|---|---|---|"]
    for r in records:
        c = r["combination"]
        ratio = f"{r['backward_time_s'] / ift:.2f}" if ift else "—"
        lines.append(f"| `{plugin_label(c['backward'], c['backward_options'])}` | "
                     f"{r['grad_cosine']:.3f} | {r['grad_rel_error']:.1e} | "
                     f"{1e3 * r['backward_time_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n\n" + _bench_note(data) + "\n"


def output(name: str) -> str:
    """A committed script output, verbatim: ``output:DIR`` is ``DIR/output.txt``,
    ``output:DIR/FILE`` that file."""
    folder, _, file = name.partition("/")
    text = (RESULTS / folder / (file or "output.txt")).read_text().rstrip("\n")
    return f"```text\n{text}\n```\n"


def compiled() -> str:
    data = _load("cpu-compiled")
    return ("\n".join(_bench_rows(data["records"], compiled_columns=True)) + "\n\n"
            + _bench_note(data) + "\n")


def _threads_used(phase: dict, option, torch_threads: int) -> str:
    """The thread counts a phase's solves ran at: recorded per solve (``threads_used``, runs
    since ``threads="auto"``), else the fixed count of the row's option or torch's."""
    used = [n for n in phase.get("threads_used", []) if n is not None]
    if not used:
        return str(option if isinstance(option, int) else torch_threads)
    tally = sorted(collections.Counter(used).items(), reverse=True)
    return ", ".join(f"{n}" if k == len(used) else f"{n} ×{k}" for n, k in tally)


def contention() -> str:
    lines = ["| solver | run | tensor ops per solve | idle ms | with one CPU-bound process | "
             "slowdown | slowdown ÷ forward's | loaded ÷ idle with torch's threads | "
             "threads, idle / loaded |",
             "|---|---|---|---|---|---|---|---|---|"]
    commands = []
    paths = sorted((RESULTS / "cpu-contention").glob("*/results.json"),
                   key=lambda p: (p.parent.name.split("-")[0], "after" in p.parent.name))
    for path in paths:
        version = path.parent.name
        data = json.loads(path.read_text())
        commands.append(f"{version}: `{data['command']}`")
        for row in data["rows"]:
            loaded = row["loaded"]
            shown = (f"> {data.get('limit_s', 60):.0f} s (stopped)" if loaded["timed_out"]
                     else f"{1e3 * loaded['median_s']:.1f} ms")
            ratio = "—" if row["ratio"] is None else f"×{row['ratio']:.1f}"
            relative = row.get("relative_to_forward")
            if relative is None and row["ratio"] is not None:
                # runs 5 and 6 wrote none (their forward rows carry a threads suffix): forward
                # iteration's slowdown with the same threads variant, from the same run
                suffix = row["solver"].partition(" ")[2]
                forward = next((r["ratio"] for r in data["rows"]
                                if r["solver"] == " ".join(filter(None, ("forward", suffix)))),
                               None)
                relative = row["ratio"] / forward if forward else None
            relative = "—" if relative is None else f"{relative:.2f}"
            ops = row.get("ops_per_solve")
            ops = "—" if ops is None else f"{ops:,}"
            # a threads=k row against the same solver's idle time with torch's thread count
            versus = row.get("ratio_to_default_idle") if row.get("threads") else row["ratio"]
            versus = "—" if versus is None else f"×{versus:.1f}"
            threads = " / ".join(_threads_used(row[phase], row.get("threads"), data["threads"])
                                 for phase in ("idle", "loaded"))
            lines.append(f"| `{row['solver']}` | {version} | {ops} "
                         f"| {1e3 * row['idle']['median_s']:.1f} "
                         f"| {shown} | {ratio} | {relative} | {versus} | {threads} |")
    return "\n".join(lines) + "\n\n" + "; ".join(commands) + ".\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "training-parity": training_parity,
    "training-parity-digits": training_parity_digits,
    "problems": problems,
    "problems-calls": lambda: problems(calls=True),
    "digits": digits,
    "training-parity-ablation": training_parity_ablation,
    "training-family": training_family,
    "training-causes": training_causes,
    "training-probes": training_probes,
    "training-family-e30": lambda: training_family("cpu-training-family-e30"),
    "verify-cases": verify_cases,
    "bench-quick": bench_quick,
    "compiled": compiled,
    "contention": contention,
}


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md")
                                         if "_build" not in p.parts)


#: regions with an argument: ``bench:DIR``, ``gradients:DIR`` and ``output:DIR`` (a folder of
#: benchmarks/results)
PARAMETRIZED: dict[str, Callable[[str], str]] = {"bench": bench, "output": output,
                                                 "gradients": gradients}


def render(text: str, where: str) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(2)
        kind, _, arg = name.partition(":")
        if arg and kind in PARAMETRIZED:
            if not (RESULTS / arg.split("/")[0]).is_dir() or not (RESULTS / arg).exists():
                raise SystemExit(f"{where}: figures region {name!r}: no folder "
                                 f"benchmarks/results/{arg}")
            return match.group(1) + PARAMETRIZED[kind](arg) + match.group(4)
        if name not in GENERATORS:
            raise SystemExit(f"{where}: unknown figures region {name!r}; known: "
                             f"{sorted(GENERATORS)} and {sorted(PARAMETRIZED)} with ':DIR'")
        return match.group(1) + GENERATORS[name]() + match.group(4)

    return REGION.sub(replace, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare only; exit 1 naming the pages whose figures disagree")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text, str(page.relative_to(ROOT)))
        if new != text:
            stale.append(str(page.relative_to(ROOT)))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print("figures disagree with benchmarks/results/ in: " + ", ".join(stale)
              + " (run python benchmarks/figures.py)", file=sys.stderr)
        return 1
    if not args.check:
        print("rewrote: " + (", ".join(stale) or "nothing"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
