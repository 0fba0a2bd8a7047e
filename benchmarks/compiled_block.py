"""Where the time of a compiled solve goes (``compile=True``, :mod:`implicit.compiled`).

``implicit bench --compile`` gives a compiled solve's floor ratio: forward time ÷ (``n_calls`` ×
one *eager* cell call). This takes one ``DEQ`` forward apart, timed interleaved in one process
(minimum over ``--repeat`` rounds; noise on a shared machine only adds time):

* one eager cell call (the floor's unit, timed as ``implicit bench`` times it: a burst of the
  solve's ``n_calls`` calls back to back, per call) and the cell compiled alone, timed the same
  way;
* the compiled solve's cost, split by timing runs of 1 and ``--steps`` steps into a fixed part
  (the call into compiled code: guards, wrappers, allocation; with ``--block 0``, the default,
  one ``torch.while_loop`` per solve, its first call of f, start and finish included) and a
  part per step; with ``--block k``, the same for one block of the block loop;
* the solve's other parts: for blocks, the checked eager first call of f, ``start`` and
  ``finish``; and what the DEQ forward adds around the solve (injection, state spec, record,
  policy);

and prints how much of the floor ratio each part accounts for::

    python benchmarks/compiled_block.py                       # tanh d=256 b=64 and ResNet
    python benchmarks/compiled_block.py --solvers anderson --out DIR   # DIR/output.txt
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch

import implicit
from implicit import compiled
from implicit.bench.transcript import Transcript
from implicit.cell import init_state_of, injection_of, update_of
from implicit.solver import Evaluator


def workloads(device: torch.device):
    torch.manual_seed(0)
    tanh = implicit.make_cell("tanh", features=256, in_features=256).to(device)
    yield "tanh d=256 b=64", tanh, torch.randn(64, 256, device=device)
    resnet = implicit.make_cell("resnet", channels=48, inner_channels=64).to(device)
    yield "resnet 48/64 16x16 b=4", resnet, torch.randn(4, 48, 16, 16, device=device)


def interleaved(cands: dict, repeat: int, device: torch.device, runs: dict) -> dict:
    """The fastest of ``repeat`` rounds of each candidate, the rounds interleaved; in each
    round a candidate runs ``runs.get(name, 1)`` times back to back, each timed."""
    best = {k: float("inf") for k in cands}
    for _ in range(repeat):
        for k, fn in cands.items():
            for _ in range(runs.get(k, 1)):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best[k] = min(best[k], time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8,
                        help="the long run's steps (the per-step cost is the difference of 1 "
                        "and --steps steps)")
    parser.add_argument("--block", type=int, default=0,
                        help="0 (default): the solve as one compiled while loop (block=None); "
                        "k: compiled blocks of k steps")
    parser.add_argument("--repeat", type=int, default=60)
    parser.add_argument("--solvers", default="forward,anderson")
    parser.add_argument("--out", type=Path, help="also write the output to DIR/output.txt")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.block < 0 or args.repeat < 1:
        parser.error("--steps must be at least 2 (the per-step cost is the difference of a "
                     "1-step and a --steps run), --block at least 0 and --repeat at least 1")
    device = torch.device(args.device)
    block = args.block or None
    transcript = Transcript("compiled_block.py", argv)
    say = transcript.say
    say(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; "
        f"times in µs, fastest of {args.repeat} interleaved rounds")

    with torch.no_grad():
        for label, cell, x in workloads(device):
            u = injection_of(cell, x)
            z_state = init_state_of(cell, x)
            shape = z_state.shape

            def fn(z, cell=cell, u=u, shape=shape):
                return update_of(cell, z.view(shape), u).reshape(shape[0], -1)

            z0 = z_state.reshape(shape[0], -1).contiguous()
            fz0 = fn(z0)
            alone = torch.compile(lambda z: fn(z))
            alone(z0)
            for name in args.solvers.split(","):
                options = dict(tol=1e-4, max_iter=50, compile=True, block=block)
                layer = implicit.DEQ(cell, solver=implicit.make_solver(name, **options),
                                     backward="ift").eval()
                layer(x)
                calls = layer.solution.n_calls
                stats = layer.solution.stats
                # tol 0: every step of the timed runs is active (nothing skipped)
                if block is None:
                    # whole solves of 1 and --steps steps after the first call
                    runs = {k: functools.partial(compiled.compiled_parts(implicit.make_solver(
                        name, tol=0.0, max_iter=k + 1, compile=True), compiled.FALLBACK_BLOCK,
                        device.type).whole, fn, z0) for k in (1, args.steps)}
                    unit = "solve"
                else:
                    parts = {k: compiled.compiled_parts(implicit.make_solver(
                        name, block=k, tol=0.0, max_iter=50, compile=True), k, device.type)
                        for k in (1, args.steps)}
                    solver1 = implicit.make_solver(name, block=1, tol=0.0, max_iter=50,
                                                   compile=True)
                    carry, _ = parts[1].start(z0, fz0)
                    runs = {k: (lambda p=p: p.block(fn, carry, solver1.static_init(
                        z0, fz0, fz0 - z0))) for k, p in parts.items()}
                    part = compiled.compiled_parts(layer.solver, args.block, device.type)
                    unit = "block"
                for run in runs.values():
                    run()
                def burst(call, z, calls=calls):
                    for _ in range(calls):
                        call(z)

                # the cell as ``implicit bench`` times its floor: the cell's own update on the
                # state's shape (not the solve's flat map around it), in a burst of the solve's
                # calls (on this shared machine one call of a tenth of a millisecond finds a
                # quiet moment far more often than a solve of ten calls does)
                cands = {
                    "cell": functools.partial(burst, functools.partial(update_of, cell, u=u),
                                              z_state),
                    "cell compiled": functools.partial(burst, alone, z0),
                    f"{unit} 1": runs[1],
                    f"{unit} {args.steps}": runs[args.steps],
                    "solve": lambda: implicit.iterate(layer.solver, fn, z0),
                    "DEQ forward": lambda: layer(x),
                }
                if block is not None:
                    cands["first call"] = lambda: Evaluator(fn, budget=1)(z0)
                    cands["start"] = lambda: part.start(z0, fz0)
                    cands["finish"] = lambda: part.finish(carry)
                t = interleaved(cands, args.repeat, device, runs={})
                t["cell"] /= calls
                t["cell compiled"] /= calls
                us = {k: v * 1e6 for k, v in t.items()}
                per_step = (us[f"{unit} {args.steps}"] - us[f"{unit} 1"]) / (args.steps - 1)
                fixed = us[f"{unit} 1"] - per_step
                floor = calls * us["cell"]
                accounted = {}
                if block is None:
                    # the first call is inside the compiled solve: part of its fixed cost
                    head = f"{calls} calls, one compiled while loop"
                    accounted[f"{calls - 1} compiled steps that call f"] = (calls - 1) * per_step
                    accounted["the first call and the loop's fixed cost"] = fixed
                else:
                    accounted["first call (eager, checked)"] = us["first call"]
                    accounted[f"{calls - 1} compiled steps that call f"] = (calls - 1) * per_step
                    steps_run = stats["loop_steps"]
                    blocks = stats["compiled_blocks"]
                    skipped = steps_run - (calls - 1)
                    head = (f"block {args.block}: {calls} calls, {steps_run} steps, "
                            f"{blocks} blocks")
                    accounted[f"{skipped} steps skipped inside a block"] = skipped * max(
                        per_step - us["cell compiled"], 0.0)
                    accounted[f"{blocks} blocks' fixed cost"] = blocks * fixed
                    accounted["start + finish"] = us["start"] + us["finish"]
                rest = us["DEQ forward"] - sum(accounted.values())
                say(f"\n{label}, {name} ({head})")
                say(f"  eager cell call {us['cell']:8.1f}   the cell compiled alone "
                    f"{us['cell compiled']:8.1f}   compiled step {per_step:8.1f}   "
                    f"{unit} fixed cost {fixed:8.1f}")
                say(f"  DEQ forward {us['DEQ forward']:8.1f} = floor ratio "
                    f"{us['DEQ forward'] / floor:.2f} (floor {calls} × eager cell = "
                    f"{floor:.1f}); the solve alone {us['solve'] / floor:.2f}")
                for what, value in {**accounted,
                                    "the DEQ around the solve, and the rest": rest}.items():
                    say(f"    {what:48s} {value:8.1f}   {value / floor:5.2f} of the floor")
                torch._dynamo.reset()
    transcript.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
