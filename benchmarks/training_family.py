"""Training across a family of setups: does a layer's default hold beyond the recipe it was tuned on?

One recipe is a finding, not a default. This script trains the layers of
``training_parity.py`` (the tutorial's chapter-4 code, torchdeq, the library's ``DEQ`` with its
defaults, and any variant spelled as there) on a family of setups that differ in what users
change around a DEQ layer: the data (MNIST-1D sequences, digits images), the width (16/32/48
channels), the norm of the stem and head (BatchNorm or GroupNorm), the head (a flatten of every
position or an adaptive pool to four) and the learning rate. Every (setup, seed) trains its
variants in lockstep in one process (same weights, same batches, each step timed on its own),
one thread per process; ``--jobs 2`` runs two such processes side by side on the 2-core
machine (their accuracy is unaffected; their time ratios are still taken within one process).

Runs are cached one JSON each in ``--runs`` (reused, so the family can be run in pieces)::

    python benchmarks/training_family.py --setups mnist1d-c32-group-pool --seeds 0 1 2
    python benchmarks/training_family.py --out benchmarks/results/cpu-training-family

``--out`` writes ``results.json`` (mean ± std per setup and variant, and the ratio of training
time to the tutorial's), ``family.png`` (every setup at a glance) and prints the table the docs
show. Setups without every requested (variant, seed) run yet are reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import training_parity as tp  # noqa: E402

#: the family: name -> (data, model axes, learning rate). The first is the parity benchmark's
#: own model; "mnist1d-c32-group-pool" is the near variant users met (GroupNorm stem and head,
#: a pooled head, 4 groups, a 5-wide stem); the rest span the axes without the full product.
FAMILY: dict[str, dict] = {
    "mnist1d-c48-batch-flatten": dict(data="mnist1d", channels=48, norm="batch", head="flatten",
                                      groups=8, stem_kernel=3, lr=2e-3),
    "mnist1d-c32-group-pool": dict(data="mnist1d", channels=32, norm="group", head="pool",
                                   groups=4, stem_kernel=5, lr=2e-3),
    "mnist1d-c16-batch-pool": dict(data="mnist1d", channels=16, norm="batch", head="pool",
                                   groups=4, stem_kernel=3, lr=2e-3),
    "mnist1d-c32-group-flatten-lr1e-3": dict(data="mnist1d", channels=32, norm="group",
                                             head="flatten", groups=4, stem_kernel=5, lr=1e-3),
    "mnist1d-c48-group-pool-lr1e-3": dict(data="mnist1d", channels=48, norm="group",
                                          head="pool", groups=8, stem_kernel=3, lr=1e-3),
    "digits-c16-batch-flatten": dict(data="digits", channels=16, norm="batch", head="flatten",
                                     groups=4, stem_kernel=3, lr=2e-3),
    "digits-c32-group-pool": dict(data="digits", channels=32, norm="group", head="pool",
                                  groups=4, stem_kernel=3, lr=2e-3),
    "digits-c48-group-flatten-lr1e-3": dict(data="digits", channels=48, norm="group",
                                            head="flatten", groups=8, stem_kernel=3, lr=1e-3),
}
INNER_CHANNELS = 64
DEFAULT_VARIANTS = ["tutorial", "torchdeq", "implicit"]
#: how the table and the plot name a variant (the spelling of training_parity.py otherwise)
LABELS = {
    "implicit": "implicit (defaults)",
    # ift(training_adjoint="damped"), δ = 0.1: the default before "calibrated"
    "implicit:backward.training_adjoint=damped": "implicit, damped training adjoint",
    # ift(training_adjoint="relaxed"), spelled with the benchmark's options
    "implicit:adjoint_beta=0.333,backward.damping=0,adjoint_returns=last":
        "implicit, relaxed training adjoint",
    # ift(training_adjoint="averaged") with its default ridge
    "implicit:backward.training_adjoint=averaged,backward.ridge=30":
        "implicit, averaged training adjoint",
    # the library's forward solve inside torchdeq's layer: its output f(z*) and its adjoint
    "torchdeq:forward=implicit": "torchdeq's output and adjoint on the library's forward",
}


def label(variant: str) -> str:
    return LABELS.get(variant, variant)


def run_path(runs: Path, setup: str, variant: str, epochs: int, seed: int) -> Path:
    return runs / f"{setup}-{tp.slug(variant)}-e{epochs}-seed{seed}.json"


def train_piece(setup: str, seed: int, variants: list[str], epochs: int, runs: Path) -> str:
    """Train the variants of one (setup, seed) that are not cached yet, in a process of its own
    (one thread), and cache each run."""
    todo = [v for v in variants if not run_path(runs, setup, v, epochs, seed).exists()]
    if not todo:
        return f"{setup} seed {seed}: cached"
    command = [sys.executable, str(Path(__file__).resolve()), "--piece", setup, str(seed),
               str(epochs), str(runs), *todo]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"{setup} seed {seed} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"{setup} {seed}"


def _piece(setup: str, seed: int, epochs: int, runs: Path, variants: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    options = dict(FAMILY[setup])
    data, lr = options.pop("data"), options.pop("lr")
    found = tp.train_together(variants, data=data, epochs=epochs, seed=seed, lr=lr,
                              inner_channels=INNER_CHANNELS, log=lambda *a: None, **options)
    runs.mkdir(parents=True, exist_ok=True)
    for run in found:
        run["setup"] = setup
        run_path(runs, setup, run["variant"], epochs, seed).write_text(json.dumps(run, indent=1))
    print(f"{setup} seed {seed}: " + ", ".join(
        f"{r['variant']} {100 * r['test_accuracy']:.1f}% {r['train_seconds']:.0f}s" for r in found))


def collect(runs: Path, setups: list[str], variants: list[str], epochs: int,
            seeds: list[int]) -> dict:
    """Per setup and variant: accuracies and times over the seeds found, and the time ratio to
    the tutorial's per seed (both from the same lockstep process)."""
    out = {}
    for setup in setups:
        rows = {}
        for variant in variants:
            found = {s: run_path(runs, setup, variant, epochs, s) for s in seeds}
            found = {s: json.loads(p.read_text()) for s, p in found.items() if p.exists()}
            if not found:
                continue
            acc = [100 * r["test_accuracy"] for r in found.values()]
            row = {"seeds": sorted(found), "accuracy": acc,
                   "accuracy_mean": statistics.fmean(acc),
                   "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                   "train_seconds": [r["train_seconds"] for r in found.values()]}
            ref = {s: run_path(runs, setup, "tutorial", epochs, s) for s in found}
            if variant != "tutorial" and all(p.exists() for p in ref.values()):
                ratios = [found[s]["train_seconds"] / json.loads(ref[s].read_text())["train_seconds"]
                          for s in found]
                row["time_ratio_to_tutorial"] = statistics.fmean(ratios)
            rows[variant] = row
        out[setup] = rows
    return out


def table(results: dict, variants: list[str]) -> str:
    head = "| setup | " + " | ".join(label(v) for v in variants) + " | defaults − tutorial | " \
           "defaults − torchdeq | time ÷ tutorial |"
    lines = [head, "|" + "---|" * (len(variants) + 4)]
    ours = "implicit" if "implicit" in variants else variants[-1]
    for setup, rows in results.items():
        cells = []
        for v in variants:
            r = rows.get(v)
            cells.append(f"{r['accuracy_mean']:.1f} ± {r['accuracy_std']:.1f} ({len(r['seeds'])})"
                         if r else "—")
        gaps = []
        for peer in ("tutorial", "torchdeq"):
            if ours in rows and peer in rows:
                gaps.append(f"{rows[ours]['accuracy_mean'] - rows[peer]['accuracy_mean']:+.1f}")
            else:
                gaps.append("—")
        ratio = rows.get(ours, {}).get("time_ratio_to_tutorial")
        lines.append(f"| {setup} | " + " | ".join(cells) + f" | {gaps[0]} | {gaps[1]} | "
                     + (f"{ratio:.2f}" if ratio is not None else "—") + " |")
    return "\n".join(lines)


def plot(results: dict, variants: list[str], path: Path, title: str) -> None:
    """One row per setup: each seed's test accuracy as a dot, each variant's mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(results)
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(setups) + 1.6), dpi=120)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # one colour per layer across every figure: the labelled layers in their order, then the
    # others in the order given
    known = ["tutorial", "torchdeq", *LABELS]
    order = known + [v for v in variants if v not in known]
    colors = [cycle[order.index(v) % len(cycle)] for v in variants]
    step = 0.8 / max(1, len(variants))
    for j, variant in enumerate(variants):
        labelled = False  # the legend names a layer at its first setup with runs
        for i, setup in enumerate(setups):
            r = results[setup].get(variant)
            if not r:
                continue
            y = i - 0.4 + step * (j + 0.5)
            ax.scatter(r["accuracy"], [y] * len(r["accuracy"]), s=14, color=colors[j],
                       alpha=0.7, label=None if labelled else label(variant), zorder=3)
            labelled = True
            ax.plot([r["accuracy_mean"]] * 2, [y - step / 2.2, y + step / 2.2],
                    color=colors[j], lw=2.5, zorder=4)
    ax.set_yticks(range(len(setups)), setups, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%) — dots: seeds, bars: means")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#: the cause analysis on the near variant (training_parity.py runs, one change at a time):
#: variant -> what it changes from the tutorial's code or from the library's defaults
CAUSES = {
    "tutorial": "the tutorial's code: its Anderson (absolute ridge 1e-4) in both solves, the "
                "batch's residual as the stop, the last iterate, f(z*) read out",
    "implicit:backward.training_adjoint=damped":
        "the library's damped training adjoint (δ = 0.1, by Anderson; the default before "
        "\"calibrated\"): Anderson per sample, best iterate, z* read out",
    "tutorial:forward=implicit": "half swap: the tutorial's layer with the library's forward "
                                 "solve (its backward kept)",
    "implicit:backward.training_adjoint=damped,forward=tutorial":
        "half swap: the library's layer from the tutorial's z* (its backward kept)",
    "implicit:backward.damping=0": "exact adjoint (δ = 0)",
    "implicit:backward.damping=0.3": "adjoint damped more (δ = 0.3)",
    "implicit:backward.damping=0.5": "adjoint damped more (δ = 0.5)",
    "implicit:backward.training_adjoint=damped,adjoint_solver=forward":
        "damped adjoint by plain fixed-point iteration (a Neumann series) instead of Anderson",
    "implicit:adjoint_solver=forward,backward.damping=0": "undamped Neumann series, 30 terms",
    "implicit:backward=phantom": "phantom gradient (k = 5, λ = 0.8) instead of ift",
    "implicit:adjoint_beta=0.333,backward.damping=0": "undamped adjoint by relaxed iteration "
                                                      "w ← (2w + Jᵀw + y)/3, best iterate",
    "implicit:adjoint_beta=0.5,backward.damping=0": "the same with relaxation 1/2",
    "implicit:adjoint_beta=0.333,backward.damping=0,solver.returns=last":
        "relaxation 1/3, and the forward's last iterate",
    "implicit:adjoint_beta=0.25,backward.damping=0,adjoint_returns=last":
        "relaxation 1/4, the adjoint's last iterate",
    "implicit:adjoint_beta=0.333,backward.damping=0,adjoint_returns=last":
        "relaxation 1/3, the adjoint's last iterate (the tutorial's averaging, nearly)",
    "implicit:adjoint_beta=0.5,backward.damping=0,adjoint_returns=last":
        "relaxation 1/2, the adjoint's last iterate",
}


#: the probes on the two setups where the defaults trail most (family runs, one change at a
#: time): variant -> what it changes. The first two are the references.
PROBES = {
    "tutorial": "the tutorial's code",
    "torchdeq": "torchdeq 0.1.0: its Anderson in both solves (absolute ridge 1e-4), the "
                "lowest-residual image",
    "implicit": "the library's defaults: best iterate forward; the calibrated training adjoint",
    "implicit:backward.training_adjoint=damped":
        "the library's damped training adjoint (δ = 0.1, by Anderson; the default before "
        "\"calibrated\"), best iterate forward",
    "torchdeq:backward=implicit,backward.training_adjoint=damped":
        "half swap: torchdeq's forward solve, the library's output and (damped) gradient",
    "torchdeq:forward=implicit": "half swap: the library's forward solve, torchdeq's output and "
                                 "gradient",
    "implicit:backward.training_adjoint=damped,solver.returns=last":
        "damped, and the forward's last iterate instead of its best",
    "implicit:backward.training_adjoint=damped,solver.safeguard=false":
        "damped, and the forward without the safeguard",
    "implicit:backward.training_adjoint=damped,tol=1e-6":
        "damped, and the forward to 1e-6 (to the cap, in practice)",
    "torchdeq:forward=implicit,solver.returns=last": "the library's forward (last iterate), "
                                                     "torchdeq's gradient",
    "torchdeq:forward=implicit,solver.returns=last,adjoint.return_final=true":
        "the same, torchdeq's adjoint returning its last image",
    "torchdeq:forward=implicit,solver.returns=last,adjoint.lam=1e-10":
        "the same, torchdeq's adjoint without its ridge (Anderson proper)",
    "torchdeq:forward=implicit,solver.returns=last,adjoint.stop_mode=abs":
        "the same, torchdeq's adjoint keeping its lowest absolute residual",
    "implicit:adjoint_beta=0.333,backward.damping=0,adjoint_returns=last":
        "training_adjoint=\"relaxed\" (β = 1/3, last iterate)",
    "implicit:solver.returns=last,adjoint_beta=0.333,backward.damping=0,adjoint_returns=last":
        "relaxed, and the forward's last iterate",
    "implicit:backward.training_adjoint=averaged,backward.ridge=none":
        "training_adjoint=\"averaged\", plain average of the window (5), last image",
    "implicit:backward.training_adjoint=averaged,backward.ridge=none,solver.returns=last":
        "the same, and the forward's last iterate",
    "implicit:backward.training_adjoint=averaged,backward.ridge=30":
        "averaged with Anderson weights regularised by 30 × the batch's mean ‖y‖² (torchdeq's "
        "absolute ridge at initialisation, made scale-free)",
    "implicit:backward.training_adjoint=averaged,backward.ridge=300": "the same with 300",
    "implicit:backward.training_adjoint=averaged,backward.ridge=30,backward.window=6":
        "ridge 30, window 6 (torchdeq's history)",
    "implicit:backward.training_adjoint=averaged,backward.ridge=30,readout=step":
        "ridge 30, and f(z*) read out (torchdeq's and the tutorial's output)",
    "torchdeq:forward=implicit,adjoint.solver=library,adjoint.ridge=30":
        "torchdeq's gradient structure (output f(z*), adjoint at it) on the library's "
        "forward, its adjoint by the library's averaged iteration, ridge 30",
    "implicit:adjoint.lam=100,adjoint.m=6,backward.damping=0":
        "undamped adjoint by Anderson (m = 6) with a relative ridge of 100, best iterate",
    "implicit:adjoint.lam=100,adjoint.m=6,backward.damping=0,adjoint_returns=last":
        "the same, last iterate",
}
PROBE_SETUPS = ("mnist1d-c16-batch-pool", "mnist1d-c32-group-pool")


def write_probes(folders: list[Path], out: Path, command: str) -> None:
    """``probes.json``: per probe of :data:`PROBES` and setup of :data:`PROBE_SETUPS`, the
    10-epoch test accuracy per seed found in ``folders`` (training_family run files)."""
    rows, seeds = [], set()
    for variant, description in PROBES.items():
        accuracy = {}
        for setup in PROBE_SETUPS:
            found = {}
            for folder in folders:
                for path in folder.glob(f"{setup}-{tp.slug(variant)}-e10-seed*.json"):
                    run = json.loads(path.read_text())
                    if run["variant"] == variant:
                        found[str(run["seed"])] = 100 * run["test_accuracy"]
            seeds |= {int(k) for k in found}
            accuracy[setup] = found
        if any(accuracy.values()):
            rows.append({"variant": variant, "description": description, "accuracy": accuracy})
    out.write_text(json.dumps({"setups": list(PROBE_SETUPS), "seeds": sorted(seeds),
                               "command": command, "rows": rows}, indent=1))


def write_causes(folder: Path, out: Path, command: str) -> None:
    """``causes.json``: the cause-analysis runs found in ``folder`` (training_parity.py run
    files), one row per variant of :data:`CAUSES` with its accuracy per seed."""
    rows, seeds = [], set()
    for variant, description in CAUSES.items():
        found = {}
        for path in sorted(folder.glob(f"*-{tp.slug(variant)}-e10-seed*.json")):
            run = json.loads(path.read_text())
            if run["variant"] == variant:
                found[run["seed"]] = run
        if not found:
            continue
        seeds |= set(found)
        rows.append({"variant": variant, "description": description,
                     "accuracy": {str(s): 100 * r["test_accuracy"] for s, r in found.items()},
                     "train_loss": [found[s]["history"][-1]["train_loss"] for s in sorted(found)]})
    m = next(iter(found.values()))["model"] if rows else {}
    model = (f"{m.get('channels')} channels (inner {m.get('inner_channels')}), "
             f"{m.get('norm')} norm ({m.get('groups')} groups) in stem and head, "
             f"{m.get('head')} head, stem kernel {m.get('stem_kernel')}") if m else "?"
    out.write_text(json.dumps({
        "what": f"MNIST-1D, 10 epochs, the near variant: {model}, lr 2e-3; test accuracy "
                "(%) per seed, one change per row.",
        "command": command, "seeds": sorted(seeds), "rows": rows}, indent=1))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--piece"]:
        setup, seed, epochs, runs, *variants = argv[1:]
        _piece(setup, int(seed), int(epochs), Path(runs), variants)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(FAMILY), choices=list(FAMILY))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--jobs", type=int, default=1, help="pieces trained at once")
    parser.add_argument("--runs", type=Path,
                        default=HERE / "results" / "cpu-training-family" / "runs")
    parser.add_argument("--out", type=Path, help="write results.json and family.png here")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing; report what the cache holds")
    parser.add_argument("--causes", type=Path, metavar="DIR",
                        help="write DIR/../causes.json from the cause-analysis runs in DIR "
                        "and stop")
    parser.add_argument("--probes", type=Path, metavar="DIR",
                        help="write DIR/../probes.json from the probe runs in DIR and the "
                        "family's runs, and stop")
    args = parser.parse_args(argv)
    if args.probes:
        write_probes([args.probes, args.runs], args.probes.parent / "probes.json",
                     "python benchmarks/training_family.py --setups " + " ".join(PROBE_SETUPS)
                     + " --seeds S --variants VARIANT ... --runs " + str(args.probes))
        return 0
    if args.causes:
        write_causes(args.causes, args.causes.parent / "causes.json",
                     "python benchmarks/training_parity.py --channels 32 --inner-channels 64 "
                     "--norm group --head pool --groups 4 --stem-kernel 5 --epochs 10 --seeds "
                     "S --diagnose-every 40 --variants VARIANT ... --runs " + str(args.causes))
        return 0
    for spec in args.variants:
        tp.parse_variant(spec)
    if not args.report_only:
        # seed by seed, so that a family cut short has every setup at its first seeds
        pieces = [(s, seed) for seed in args.seeds for s in args.setups]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for line in pool.map(lambda p: train_piece(p[0], p[1], args.variants, args.epochs,
                                                       args.runs), pieces):
                print(line, flush=True)
    results = collect(args.runs, args.setups, args.variants, args.epochs, args.seeds)
    print(table(results, args.variants))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/training_family.py " + " ".join(argv)
        (args.out / "results.json").write_text(json.dumps(
            {"command": command, "epochs": args.epochs, "variants": args.variants,
             "family": {s: FAMILY[s] for s in args.setups}, "results": results}, indent=1))
        plot(results, args.variants, args.out / "family.png",
             f"{args.epochs} epoch(s), seeds asked {args.seeds} (dots: the seeds run so far), "
             "one thread per run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
