"""How much a DEQ forward's time depends on the work that ran just before it, on CPU.

``implicit bench`` interleaves the layers it compares (and the cell bursts of the floor) so
that drift in machine load hits them alike; this script measures what that interleaving costs
the call that comes after another one. One cell, one input, three layers (compiled and eager
Anderson, compiled forward iteration), and before each timed forward one of:

* ``itself``: an untimed forward of the same layer (the call in a loop of its own);
* ``eager twin``: a forward of an eager Anderson layer on the same cell;
* ``python``: pure Python arithmetic, about as long as an eager forward (no torch at all);
* ``sleep``: ``time.sleep`` of as long (the machine idle);
* ``eager twin, then W ms``: the twin's forward, then untimed forwards of the layer itself for
  at least W ms (at least one): how long the layer takes to get back to its own pace.

Every (layer, work before) pair is timed once per round, in an order that rotates from round
to round, in one process; the script prints the median and fastest forward of each pair and
the fastest ÷ the fastest after ``itself``::

    python benchmarks/preceding_work.py                 # tanh d=256 b=64, 200 rounds
    python benchmarks/preceding_work.py --out DIR       # also DIR/output.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import implicit
from implicit.bench.measure import timed
from implicit.bench.transcript import Transcript

CPU = torch.device("cpu")

#: the untimed warm-up after the twin, in ms (0: one call)
WARM_MS = (0, 2, 5, 10)
BEFORE = ("itself", "eager twin", "python", "sleep") + tuple(
    f"eager twin, then {ms} ms" for ms in WARM_MS)


def _python(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", type=Path, help="also write the output to DIR/output.txt")
    args = parser.parse_args(argv)
    if args.rounds < len(BEFORE):
        parser.error(f"--rounds must be at least {len(BEFORE)} (the order rotates)")
    transcript = Transcript("preceding_work.py", argv)
    torch.manual_seed(0)
    cell = implicit.make_cell("tanh", features=256, in_features=256)
    x = torch.randn(64, 256)

    def layer(name, compile):
        return implicit.DEQ(cell, solver=implicit.make_solver(
            name, compile=compile, tol=1e-4, max_iter=50), backward="ift").eval()

    layers = {"anderson(compile=True)": layer("anderson", True),
              "anderson (eager)": layer("anderson", False),
              "forward(compile=True)": layer("forward", True)}
    twin = layer("anderson", False)
    with torch.no_grad():
        for each in (*layers.values(), twin):
            for _ in range(3):  # compiles; the compiled layers decide to fuse
                each(x)
        # the python and sleep work last about as long as the twin's forward
        twin_s = min(_timed(lambda: twin(x)) for _ in range(20))
        start = time.perf_counter()
        _python(100_000)
        per_iteration = (time.perf_counter() - start) / 100_000
        spin = max(1, round(twin_s / per_iteration))
        transcript.say(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tanh "
                       f"d=256 b=64, tol 1e-4; ms per forward without grad, {args.rounds} "
                       f"rounds; the twin's forward {twin_s * 1e3:.2f} ms, python and sleep as "
                       "long")
        # what runs before a timed forward of `layer_`
        before = {"itself": lambda layer_: layer_(x), "eager twin": lambda layer_: twin(x),
                  "python": lambda layer_: _python(spin),
                  "sleep": lambda layer_: time.sleep(twin_s)}
        for ms in WARM_MS:
            before[f"eager twin, then {ms} ms"] = (  # (timed with repeat 0: the warm-up only)
                lambda layer_, ms=ms: (twin(x), timed(lambda: layer_(x), CPU, 0, warm_s=ms / 1e3)))
        pairs = [(name, work) for name in layers for work in BEFORE]
        times: dict = {pair: [] for pair in pairs}
        for i in range(args.rounds):
            shift = i % len(pairs)
            for name, work in pairs[shift:] + pairs[:shift]:
                before[work](layers[name])
                times[name, work].append(_timed(lambda: layers[name](x)))
        for name in layers:
            calls = layers[name].solution.n_calls
            alone = min(times[name, "itself"])
            transcript.say(f"{name} ({calls} calls)")
            for work in BEFORE:
                got = times[name, work]
                transcript.say(f"  after {work:24s} median {statistics.median(got) * 1e3:6.2f} "
                               f"fastest {min(got) * 1e3:6.2f}   fastest ÷ after itself "
                               f"{min(got) / alone:.3f}")
    transcript.save(args.out)
    return 0


def _timed(fn) -> float:
    return timed(fn, CPU, 1, warmup=0)[0]


if __name__ == "__main__":
    raise SystemExit(main())
