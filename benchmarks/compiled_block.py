"""Eager vs ``torch.compile``-d fixed-iteration blocks of solver steps (``compile_block``).

The per-step bookkeeping of a solver is many small tensor operations; on a cheap cell it costs
more than the cell (the tanh floor ratios in the README). A compiled block of ``k`` steps fuses
them. This prints, per solver and cell, the time of ``k`` steps eager and compiled and ``k``
bare cell evaluations (the floor), on whatever device is given::

    python benchmarks/compiled_block.py                   # CPU, inductor
    python benchmarks/compiled_block.py --device cuda --steps 8
"""

from __future__ import annotations

import argparse
import time

import torch

import implicit
from implicit.cell import injection_of, update_of
from implicit.solver import compile_block, step_block


def timed(fn, device: torch.device, repeat: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def problems(device: torch.device):
    torch.manual_seed(0)
    tanh = implicit.make_cell("tanh", features=256).to(device)
    x = torch.randn(64, 256, device=device)
    u = injection_of(tanh, x)
    yield "tanh d=256 b=64", (lambda z: update_of(tanh, z, u)), torch.zeros(64, 256, device=device)
    resnet = implicit.make_cell("resnet", channels=48, inner_channels=64).to(device)
    x = torch.randn(4, 48, 16, 16, device=device)
    u = injection_of(resnet, x)
    yield ("resnet 48/64 16x16 b=4",
           (lambda z: update_of(resnet, z.view(4, 48, 16, 16), u).reshape(4, -1)),
           torch.zeros(4, 48 * 256, device=device))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--solvers", default="forward,anderson")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {args.steps} steps per block")
    with torch.no_grad():
        for label, fn, z in problems(device):
            fz = fn(z)

            def floor():
                w = z
                for _ in range(args.steps):
                    w = fn(w)

            t_floor = timed(floor, device, args.repeat)
            for name in args.solvers.split(","):
                solver = implicit.make_solver(name)
                state0 = solver.init(z, fz)
                eager = timed(lambda: step_block(solver, fn, z, fz, solver.init(z, fz),
                                                 args.steps), device, args.repeat)
                block = compile_block(solver, fn, args.steps)
                block(z, fz, state0)  # compile
                compiled = timed(lambda: block(z, fz, solver.init(z, fz)), device, args.repeat)
                print(f"{label:24s} {name:9s} floor {t_floor * 1e3:7.2f} ms  eager "
                      f"{eager * 1e3:7.2f} ms ({eager / t_floor:4.2f}x)  compiled "
                      f"{compiled * 1e3:7.2f} ms ({compiled / t_floor:4.2f}x)  speed-up "
                      f"{eager / compiled:4.2f}x")
                torch._dynamo.reset()


if __name__ == "__main__":
    main()
