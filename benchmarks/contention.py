"""Solver speed on a shared CPU: each solver's forward solve idle, then with a concurrent
CPU-bound process that this script starts and stops itself.

Issue 21 found Newton–Krylov (torch backend) 80× to more than 400× slower on the ResNet quick
workload while another CPU-bound process ran on the 2-core machine, with torch's default
thread count; forward iteration kept its speed. This measures every solver the same way::

    python benchmarks/contention.py                       # ResNet quick workload, all solvers
    python benchmarks/contention.py --solvers newton_krylov --load-threads 2 --out DIR
    python benchmarks/contention.py --cell-calls --out DIR   # the cell alone, 2 and 1 threads

The load is a separate Python process multiplying 512×512 matrices in a loop with torch's
default thread count (a training job next door), started after the idle timings and killed
after the loaded ones (and in any case after ``--load-seconds``). ``--rounds`` alternates idle
and loaded phases (the machine's own load drifts; medians are over all rounds). Each timed
solve is bounded by ``--limit`` seconds (SIGALRM): a solve that takes longer is reported as
"> limit".

How much a solve slows with the load depends on the machine as much as on the solver — on the
2-core machine of issue 21 forward iteration, which is cell calls only, measured 2× to 7× from
run to run — so beside each slowdown the script prints it relative to forward iteration's in
the same rounds: 1 means "slows like a solve of cell calls".

``--cell-calls`` times no solver: bursts of calls of the cell alone (the floor of every
solver) at a few batch sizes, idle and loaded, with torch's thread count and with one thread
(``torch.set_num_threads(1)`` in this process), each against the idle time with torch's
thread count — what any solver's slowdown is bounded by.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import implicit

# (it also stops when this script is gone: a killed script's load must not run on)
LOAD = """
import os, sys, time, torch
parent = os.getppid()
if {threads}: torch.set_num_threads({threads})
a = torch.randn(512, 512)
end = time.time() + {seconds}
while time.time() < end and os.getppid() == parent:
    a = torch.tanh(a @ a / 512)
"""


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


def build(workload: str, cell_name: str, seed: int = 0):
    registry = implicit.get_registry()
    spec = registry.get("cell", cell_name).spec
    w = next(w for w in spec.workloads if w.name == workload)
    torch.manual_seed(seed)
    cell = registry.make("cell", cell_name, **w.cell_options)
    x = torch.randn(w.batch, *w.input_shape, generator=torch.Generator().manual_seed(seed + 1))
    return cell, x


def time_solve(layer, x, repeat: int, limit: float) -> dict:
    """Median wall time of ``repeat`` forward solves (no graph), each bounded by ``limit``."""
    times, used, timed_out = [], [], False
    with torch.no_grad():
        for _ in range(repeat):
            signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, limit)
            start = time.perf_counter()
            try:
                layer(x)
            except Timeout:
                timed_out = True
                break
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            times.append(time.perf_counter() - start)
            # the thread count the solve ran at (a solver with a threads option records it)
            used.append(layer.solution.stats.get("threads"))
    sol = layer.solution
    return {"median_s": statistics.median(times) if times else None, "times_s": times,
            "threads_used": used, "timed_out": timed_out,
            "n_calls": sol.n_calls if sol is not None and not timed_out else None,
            "njvp": sol.njvp if sol is not None and not timed_out else None}


def count_ops(layer, x) -> int:
    """Tensor operations (``aten::`` calls, nested ones included) of one forward solve, by
    ``torch.profiler``: on a shared CPU each one of state size is a parallel region that may
    wait for a descheduled thread."""
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        layer(x)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


@contextlib.contextmanager
def load_process(args, settle: float):
    """The load running for the block: started, given ``settle`` seconds to get going, and
    killed at the end (also when the block raises)."""
    load = subprocess.Popen([sys.executable, "-c", LOAD.format(
        threads=args.load_threads, seconds=args.load_seconds)])
    try:
        time.sleep(settle)
        yield
    finally:
        load.kill()
        load.wait()


def _batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(
            f"--batches takes positive batch sizes, comma-separated (e.g. 4,16); got {text!r}")
    return batches


def cell_calls(args) -> list[str]:
    """The cell alone, idle and under the load: bursts of ``--burst`` calls at each batch size
    of ``--batches``, with torch's thread count and with one thread; median per call over
    ``--repeat`` bursts and ``--rounds`` idle/loaded phase pairs."""
    from implicit.cell import init_state_of, injection_of, update_of

    default_threads = torch.get_num_threads()
    thread_counts = [default_threads] + ([1] if default_threads > 1 else [])
    calls = {}
    cell, x = build(args.workload, args.cell)
    noise = torch.Generator().manual_seed(2)
    for batch in args.batches:
        xb = x[:1].expand(batch, *x.shape[1:]) + 0.01 * torch.randn(
            batch, *x.shape[1:], generator=noise)
        with torch.no_grad():
            u, z = injection_of(cell, xb), init_state_of(cell, xb)
            z = update_of(cell, z, u)  # a state off zero
        calls[batch] = (lambda z=z, u=u: update_of(cell, z, u))

    def phase() -> dict:
        times = {}
        try:
            with torch.no_grad():
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    for batch, call in calls.items():
                        call()
                        bursts = []
                        for _ in range(args.repeat):
                            start = time.perf_counter()
                            for _ in range(args.burst):
                                call()
                            bursts.append((time.perf_counter() - start) / args.burst)
                        times.setdefault((threads, batch), []).extend(bursts)
        finally:
            torch.set_num_threads(default_threads)
        return times

    idle: dict = {}
    loaded: dict = {}
    for _ in range(args.rounds):
        for key, value in phase().items():
            idle.setdefault(key, []).extend(value)
        with load_process(args, settle=5.0):  # importing torch takes seconds
            for key, value in phase().items():
                loaded.setdefault(key, []).extend(value)
    lines = [f"$ python benchmarks/contention.py {' '.join(args.argv)}",
             f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.workload}: calls of the "
             f"cell alone, median ms per call over {args.rounds} x {args.repeat} bursts of "
             f"{args.burst}; the load: {args.load_threads or 'default'} threads",
             f"{'threads':>7s} {'batch':>5s} {'idle':>8s} {'loaded':>8s} {'loaded/idle':>11s} "
             f"{'loaded / idle with ' + str(default_threads) + ' threads':>30s}"]
    for threads, batch in idle:
        i = statistics.median(idle[threads, batch])
        lo = statistics.median(loaded[threads, batch])
        base = statistics.median(idle[default_threads, batch])
        lines.append(f"{threads:7d} {batch:5d} {i * 1e3:8.2f} {lo * 1e3:8.2f} {lo / i:11.2f} "
                     f"{lo / base:30.2f}")
    return lines


def merge(runs: list[dict]) -> dict:
    """One phase's timings over all rounds: the median of every timed solve."""
    times = [t for run in runs for t in run["times_s"]]
    timed_out = any(run["timed_out"] for run in runs)
    last = runs[-1]
    return {"median_s": statistics.median(times) if times and not timed_out else None,
            "times_s": times, "threads_used": [n for run in runs for n in run["threads_used"]],
            "timed_out": timed_out, "n_calls": last["n_calls"], "njvp": last["njvp"]}


def counts(used: list) -> str:
    """``threads_used`` as "2 ×5, 1 ×1" (empty where the solver kept torch's setting)."""
    tally = collections.Counter(n for n in used if n is not None)
    return ", ".join(f"{n} ×{k}" for n, k in sorted(tally.items(), reverse=True))


def _thread_variants(text: str) -> list:
    """``--threads``: each variant ``default`` (the solver's own default: torch's setting, or
    ``auto`` for Newton–Krylov), ``torch`` (``threads=None``), ``auto`` or a count."""
    variants = []
    for part in text.split(","):
        if part in ("default", "torch", "auto"):
            variants.append({"torch": None}.get(part, part))
        elif part.isdigit() and int(part) > 0:
            variants.append(int(part))
        else:
            raise argparse.ArgumentTypeError(
                f"--threads takes default, torch, auto or a positive count, comma-separated; "
                f"got {part!r}")
    return variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="resnet")
    parser.add_argument("--workload", default="resnet_c48_s16")
    parser.add_argument("--solvers", default="forward,anderson,broyden,newton_krylov")
    parser.add_argument("--repeat", type=int, default=3, help="timed solves per phase")
    parser.add_argument("--rounds", type=int, default=2,
                        help="idle/loaded phase pairs, alternated")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per timed solve")
    parser.add_argument("--load-threads", type=int, default=0,
                        help="threads of the load process (0: torch's default)")
    parser.add_argument("--load-seconds", type=float, default=600.0)
    parser.add_argument("--out", type=Path,
                        help="write results.json here (output.txt with --cell-calls)")
    parser.add_argument("--threads", type=_thread_variants, default=["default"],
                        help="the solvers' threads option, a comma list of variants each "
                        "timed: default (the solver's own), torch (threads=None: torch's "
                        "setting), auto, or a count (default: default)")
    parser.add_argument("--cell-calls", action="store_true",
                        help="time calls of the cell alone instead of solves (see above)")
    parser.add_argument("--batches", type=_batches, default=[4, 16],
                        help="--cell-calls: batch sizes (default 4,16)")
    parser.add_argument("--burst", type=int, default=20,
                        help="--cell-calls: calls per timed burst")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeat < 1 or args.burst < 1:
        parser.error(f"--rounds, --repeat and --burst must be at least 1, got {args.rounds}, "
                     f"{args.repeat} and {args.burst}")
    if args.cell_calls:
        args.argv = list(argv if argv is not None else sys.argv[1:])
        lines = cell_calls(args)
        print("\n".join(lines))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "output.txt").write_text("\n".join(lines) + "\n")
        return 0
    cell, x = build(args.workload, args.cell)
    layers = {}
    for variant in args.threads:
        for name in args.solvers.split(","):
            options = {} if variant == "default" else {"threads": variant}
            solver = implicit.make_solver(name, tol=1e-4, max_iter=50, policy="ignore",
                                          **options)
            label = name if variant == "default" else f"{name} threads={variant}"
            layers[label] = implicit.DEQ(cell, solver=solver, backward="ift").eval()
            with torch.no_grad():
                layers[label](x)  # warm up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} "
          f"CPUs; {args.workload}")
    ops = {name: count_ops(layer, x) for name, layer in layers.items()}
    idle: dict = {name: [] for name in layers}
    loaded: dict = {name: [] for name in layers}
    for _ in range(args.rounds):
        for name, layer in layers.items():
            idle[name].append(time_solve(layer, x, args.repeat, args.limit))
        with load_process(args, settle=2.0):
            for name, layer in layers.items():
                loaded[name].append(time_solve(layer, x, args.repeat, args.limit))
    idle = {name: merge(runs) for name, runs in idle.items()}
    loaded = {name: merge(runs) for name, runs in loaded.items()}
    ratios = {name: (loaded[name]["median_s"] / idle[name]["median_s"])
              if idle[name]["median_s"] and loaded[name]["median_s"] else None
              for name in layers}
    # forward iteration's slowdown with the same threads variant (the label's suffix)
    forward = {label[len(layer.solver.name):]: ratios[label] for label, layer in layers.items()
               if layer.solver.name == "forward"}
    rows = []
    for name in layers:
        a, b, ratio = idle[name], loaded[name], ratios[name]
        reference = forward.get(name[len(layers[name].solver.name):])
        relative = ratio / reference if ratio and reference else None
        # a threads variant's loaded time against the same solver's idle time with torch's
        # thread count (threads=None), where that was timed too
        plain = next((idle[other] for other, layer in layers.items()
                      if layer.solver.name == layers[name].solver.name
                      and layer.solver.threads is None), None)
        versus_default = (b["median_s"] / plain["median_s"]
                          if plain is not None and plain["median_s"] and b["median_s"] else None)
        shown = (f"> {args.limit:.0f} s" if b["timed_out"] else f"{b['median_s'] * 1e3:9.1f} ms")
        print(f"{name:28s} idle {a['median_s'] * 1e3:9.1f} ms   loaded {shown:>12s}   "
              + (f"x{ratio:.2f}" if ratio else "(timed out)")
              + (f" ({relative:.2f} of forward's)" if relative else "")
              + (f" (x{versus_default:.2f} of the default's idle)"
                 if versus_default and layers[name].solver.threads is not None else "")
              + f"   calls {a['n_calls']}  jvps {a['njvp']}  ops {ops[name]}"
              + (f"   threads idle {counts(a['threads_used'])}, loaded "
                 f"{counts(b['threads_used'])}" if counts(a["threads_used"]) else ""))
        rows.append({"solver": name, "threads": layers[name].solver.threads,
                     "idle": a, "loaded": b, "ratio": ratio,
                     "relative_to_forward": relative, "ratio_to_default_idle": versus_default,
                     "ops_per_solve": ops[name]})
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({
            "command": "python benchmarks/contention.py " + " ".join(argv or sys.argv[1:]),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "workload": args.workload, "rounds": args.rounds,
            "repeat": args.repeat, "limit_s": args.limit,
            "load": {"threads": args.load_threads or "default", "kind": "512x512 matmul loop"},
            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
