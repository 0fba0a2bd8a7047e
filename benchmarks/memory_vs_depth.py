"""Peak memory of one training step vs the forward budget, per backward strategy.

``ift`` and ``phantom`` keep no graph of the forward iterations, so their peak should not
depend on ``max_iter``; ``unrolled`` keeps the whole trajectory and grows with it. Each
configuration runs in a fresh process (``implicit.bench.worker``), ``tol=0`` so every run uses
exactly ``max_iter`` calls; on CPU the peak is the growth of the resident high-water mark over
one training step (VmHWM reset first), on CUDA the allocator's peak.

Each point is the median of ``--runs`` fresh processes (RSS measurements move by ~10% between
runs at the tens-of-MiB scale).

Run: ``.venv/bin/python benchmarks/memory_vs_depth.py [--device cpu] [--workload resnet_c48]
[--out DIR]`` (``--out``: the printed table, with the command, in ``DIR/output.txt``)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from implicit.bench.measure import Combination
from implicit.bench.runner import _run_isolated
from implicit.bench.transcript import Transcript


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cell", default="resnet")
    parser.add_argument("--workload", default="resnet_c48")
    parser.add_argument("--depths", default="10,100")
    parser.add_argument("--backwards", default="ift,phantom,unrolled")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per point; median")
    parser.add_argument("--out", type=Path, help="also write the table to DIR/output.txt")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    transcript = Transcript("memory_vs_depth.py")
    transcript.say(f"{'backward':<10} " + " ".join(f"{'max_iter ' + str(d):>14}" for d in depths)
                   + f" {'ratio':>8}   method")
    for backward in args.backwards.split(","):
        peaks, method = [], ""
        for depth in depths:
            combo = Combination(solver="forward", cell=args.cell, workload=args.workload,
                                backward=backward, device=args.device, tol=0.0,
                                max_iter=depth, repeat=1, memory_only=True)
            runs = []
            for _ in range(args.runs):
                record = _run_isolated(combo)
                if record.get("error"):
                    raise SystemExit(f"{backward} at max_iter {depth}: {record['error']}")
                assert record["train_forward"]["n_calls"] == depth
                runs.append(record["peak_memory_bytes"])
            peaks.append(statistics.median(runs))
            method = record["peak_memory_method"]
        cells = " ".join(f"{p / 2**20:>10.1f} MiB" for p in peaks)
        transcript.say(f"{backward:<10} {cells} {peaks[-1] / max(peaks[0], 1):>8.2f}   "
                       f"{method}")
    transcript.save(args.out)


if __name__ == "__main__":
    main()
