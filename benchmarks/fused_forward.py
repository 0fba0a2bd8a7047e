"""A compiled DEQ's forward without grad as one compiled call, against the same layer's general
path (:func:`implicit.compiled.solve_fused` vs the problem built in Python, an eager injection
call, then the compiled solve).

Two layers with one cell and one solver (``compile=True``); fusing is switched off on the
second (its internal ``_fuse`` switch, which the layer otherwise decides after its first
forward). Their forwards are timed interleaved in one process, order alternating, and the
script prints the median and fastest times and the general path's time ÷ the fused one's::

    python benchmarks/fused_forward.py                     # tanh d=256 b=64 and ResNet
    python benchmarks/fused_forward.py --out DIR           # also DIR/output.txt
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import implicit
from implicit.bench.transcript import Transcript


def workloads():
    torch.manual_seed(0)
    yield ("tanh d=256 b=64", implicit.make_cell("tanh", features=256, in_features=256),
           torch.randn(64, 256))
    yield ("resnet 48/64 16x16 b=4", implicit.make_cell("resnet", channels=48,
                                                          inner_channels=64),
           torch.randn(4, 48, 16, 16))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=40, help="forwards of each layer")
    parser.add_argument("--solvers", default="forward,anderson")
    parser.add_argument("--out", type=Path, help="also write the output to DIR/output.txt")
    args = parser.parse_args(argv)
    if args.repeat < 2:
        parser.error("--repeat must be at least 2 (the two layers alternate who goes first)")
    transcript = Transcript("fused_forward.py", argv)
    transcript.say(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per "
                   f"forward without grad, {args.repeat} interleaved rounds")
    with torch.no_grad():
        for label, cell, x in workloads():
            for name in args.solvers.split(","):
                layers = {}
                for path in ("fused", "general"):
                    layer = implicit.DEQ(copy.deepcopy(cell), solver=implicit.make_solver(
                        name, compile=True, tol=1e-4, max_iter=50), backward="ift").eval()
                    if path == "general":
                        layer._fuse = False
                    for _ in range(3):  # compiles; the fused layer decides to fuse
                        layer(x)
                    layers[path] = layer
                fused = layers["fused"].solution
                general = layers["general"].solution
                if not fused.stats.get("fused") or "fused" in general.stats:
                    raise SystemExit(f"{label}, {name}: the layers did not take the paths "
                                     f"compared (stats {fused.stats} / {general.stats})")
                if fused.n_calls != general.n_calls:
                    raise SystemExit(f"{label}, {name}: the two paths made {fused.n_calls} "
                                     f"and {general.n_calls} calls; they must solve alike")
                times = {path: [] for path in layers}
                for i in range(args.repeat):
                    for path in (("fused", "general") if i % 2 else ("general", "fused")):
                        start = time.perf_counter()
                        layers[path](x)
                        times[path].append(time.perf_counter() - start)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                best = {k: min(v) * 1e3 for k, v in times.items()}
                line = (f"{label:24s} {name:9s} {fused.n_calls:3d} calls   fused "
                        f"{med['fused']:7.2f} (fastest {best['fused']:7.2f})   general "
                        f"{med['general']:7.2f} (fastest {best['general']:7.2f})   general ÷ "
                        f"fused {med['general'] / med['fused']:.2f} (fastest "
                        f"{best['general'] / best['fused']:.2f})")
                transcript.say(line)
                torch._dynamo.reset()
    transcript.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
