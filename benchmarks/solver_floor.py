"""How far above the cell-evaluation floor can a solver get on this machine?

``implicit bench``'s floor ratio divides a solve's time by ``n_calls`` × the fastest single
evaluation of the cell (same input, hot caches). This script measures, interleaved in one
process on one workload (default: the ch.4 ResNet cell at batch 16), the ratios of

* ``chained cell``: ``z ← f(z)`` repeated, nothing else: what calling the cell on a new state
  each time costs by itself (cache and allocator effects included);
* ``least passes``: after each evaluation of a chained run, only the passes over memory that
  an exact Anderson step cannot avoid, each by the fastest kernel torch has for it: the residual
  ``f(z) − z`` and one pure read (``sum``) of each of the two ``m``-row histories (the Gram row
  and the mix read one each). Its ratio, ``1 + time outside f / cell``, bounds what any
  implementation of Anderson ``m`` can reach on this machine with this cell: it measures in
  place what the cell's evaluation in between leaves of the caches;
* ``tutorial-style``: Anderson ``m`` with the structure of the tutorial's chapter 4 code
  (histories of iterates and f-values, the residual Gram matrix formed anew each step, the
  bordered system, both histories mixed, a ``.item()`` residual each step), for comparison;
* ``bare anderson``: the least work an Anderson step with history ``m`` must do, written
  inline with no stopping test, masking, telemetry or best-iterate tracking: the residual into
  the history, the f(x) row, one Gram row, the ``m × m`` solve and the mix. It reads the two
  ``m``-row histories once each per step; with a state of several MiB they come from DRAM, so
  this is bounded below by ``2 m × state bytes`` / bandwidth per step, printed as well;
* the library's ``forward``, ``anderson`` and ``broyden`` solvers through ``DEQ``, as the bench
  times them, and their time per step spent outside ``f``.

Usage::

    python benchmarks/solver_floor.py                       # resnet_c48_b16, 17 steps, m = 5
    python benchmarks/solver_floor.py --workload resnet_c48 --malloc system
"""

from __future__ import annotations

import argparse
import time

import torch

import implicit
import implicit.solver as solver_module
from implicit.bench.allocator import MALLOC_MODES, configure
from implicit.bench.measure import Combination, build_problem
from implicit.cell import init_state_of, injection_of, update_of
from implicit.state import StateSpec
from implicit_solvers.anderson import anderson_weights
from implicit_solvers.rows import combine, dots


def bandwidth_gbs(mib: int = 256, repeat: int = 5) -> float:
    """Read bandwidth of a large ``sum`` (all threads), GB/s."""
    big = torch.ones(mib * 2**20 // 4)
    best = min(_time(big.sum) for _ in range(repeat))
    return mib * 2**20 / best / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="resnet_c48_b16")
    parser.add_argument("--cell", default="resnet")
    parser.add_argument("--steps", type=int, default=17, help="cell calls per bare solve")
    parser.add_argument("--m", type=int, default=5, help="Anderson history")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--malloc", choices=MALLOC_MODES, default="tuned")
    args = parser.parse_args()
    allocator = configure(args.malloc)

    registry = implicit.get_registry()
    combo = Combination(solver="forward", cell=args.cell, workload=args.workload, backward="ift")
    cell, x, _ = build_problem(registry, combo)
    with torch.no_grad():
        u = injection_of(cell, x)
        z0 = init_state_of(cell, x)
    spec = StateSpec.of(z0)
    b, n = spec.batch_size, spec.numel_per_sample

    def f(z: torch.Tensor) -> torch.Tensor:
        return spec.flatten(update_of(cell, spec.unflatten(z), u))

    flat0 = spec.flatten(z0)
    m, steps = args.m, args.steps
    Y: list = [None] * m
    G = flat0.new_empty(b, m, n)
    H = flat0.new_empty(b, m, n)  # a second m-row history for `passes`
    gram = flat0.new_zeros(b, m, m)

    def chained() -> None:
        z = flat0
        for _ in range(steps):
            z = f(z)

    X_hist = flat0.new_zeros(b, m, n)
    F_hist = flat0.new_zeros(b, m, n)
    kkt = flat0.new_zeros(b, m + 1, m + 1)
    kkt[:, 0, 1:] = 1
    kkt[:, 1:, 0] = 1
    rhs = flat0.new_zeros(b, m + 1, 1)
    rhs[:, 0] = 1

    def tutorial_anderson() -> None:
        """Anderson as the tutorial's chapter 4 writes it (our own code, same structure): the
        iterates and f-values in two m-row histories, the residuals and their whole Gram matrix
        formed anew each step, the bordered system with an absolute ridge, both histories mixed
        by ``bmm`` whatever β, and the whole-batch residual read back with ``.item()`` each step."""
        X_hist[:, 0], F_hist[:, 0] = flat0, f(flat0)
        X_hist[:, 1], F_hist[:, 1] = F_hist[:, 0], f(F_hist[:, 0])
        beta, lam = 1.0, 1e-4
        for k in range(2, steps):
            used = min(k, m)
            res_rows = F_hist[:, :used] - X_hist[:, :used]
            eye = torch.eye(used, dtype=flat0.dtype)[None]
            gram_rows = torch.bmm(res_rows, res_rows.transpose(1, 2))
            kkt[:, 1:used + 1, 1:used + 1] = gram_rows + lam * eye
            alpha = torch.linalg.solve(kkt[:, :used + 1, :used + 1], rhs[:, :used + 1])[:, 1:, 0]
            mix = alpha[:, None]
            X_hist[:, k % m] = (beta * torch.bmm(mix, F_hist[:, :used])[:, 0]
                                + (1 - beta) * torch.bmm(mix, X_hist[:, :used])[:, 0])
            F_hist[:, k % m] = f(X_hist[:, k % m])
            residual = ((F_hist[:, k % m] - X_hist[:, k % m]).norm().item()
                        / (1e-5 + F_hist[:, k % m].norm().item()))
            assert residual == residual  # read, as the tutorial's stopping test does

    def bare_anderson() -> None:
        z = flat0
        fz = f(z)
        for k in range(steps - 1):
            slot = k % m
            g = torch.sub(fz, z, out=G[:, slot])
            Y[slot] = fz  # by reference, as the library keeps it
            used = min(k + 1, m)
            row = dots(g, G[:, :used])
            gram[:, slot, :used] = row
            gram[:, :used, slot] = row
            alpha, _ = anderson_weights(gram[:, :used, :used], 1e-4, newest=slot)
            z = combine(alpha, Y[:used])
            fz = f(z)

    def passes() -> float:
        """Per step of a chained-cell run, the time of only the passes over memory an exact
        Anderson step cannot avoid, each with the fastest kernel torch has for it: the residual
        ``f(z) − z`` (every solver's stopping test needs it), then one pure read of each m-row
        history (a ``sum`` over its rows: the Gram row and the mix each read one history
        at least once). Returns the mean time per step outside f."""
        z, spent = flat0, 0.0
        for k in range(steps):
            fz = f(z)
            start = time.perf_counter()
            torch.sub(fz, z, out=G[:, k % m])
            G.sum(dim=1)
            H.sum(dim=1)
            spent += time.perf_counter() - start
            z = fz
        return spent / steps

    layers = {}
    for name in ("forward", "anderson", "broyden"):
        solver = registry.make("solver", name, tol=1e-4, stop="rel", max_iter=50, policy="ignore")
        layers[name] = implicit.DEQ(cell, solver=solver, backward="ift")

    inside = [0.0]
    evaluate = solver_module.Evaluator.__call__

    def counted_call(self, z):  # time spent inside f during the library's solves
        start = time.perf_counter()
        out = evaluate(self, z)
        inside[0] += time.perf_counter() - start
        return out

    times: dict[str, list[float]] = {"cell": [], "chained cell": [], "bare anderson": [],
                                     "tutorial-style": []}
    outside: dict[str, list[float]] = {}
    calls: dict[str, int] = {"chained cell": steps, "bare anderson": steps,
                             "tutorial-style": steps}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            f(flat0)
            chained()
            bare_anderson()
            tutorial_anderson()
            passes()
            for layer in layers.values():
                layer(x)
        for _ in range(args.repeat):
            times["cell"] += [_time(lambda: f(flat0)) for _ in range(5)]
            times["chained cell"].append(_time(chained))
            times["bare anderson"].append(_time(bare_anderson))
            times["tutorial-style"].append(_time(tutorial_anderson))
            outside.setdefault("least passes", []).append(passes())
            for name, layer in layers.items():
                inside[0] = 0.0
                solver_module.Evaluator.__call__ = counted_call
                try:
                    elapsed = _time(lambda: layer(x))
                finally:
                    solver_module.Evaluator.__call__ = evaluate
                n_calls = layer.solution.n_calls
                times.setdefault(name, []).append(elapsed)
                outside.setdefault(name, []).append((elapsed - inside[0]) / n_calls)
                calls[name] = n_calls

    cell_s = min(times["cell"])
    state_bytes = b * n * flat0.element_size()
    bw = bandwidth_gbs()
    bound = 1 + 2 * m * state_bytes / (bw * 1e9) / cell_s
    print(f"workload {args.workload}: state {b} x {n} ({state_bytes / 2**20:.1f} MiB), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: {allocator}")
    print(f"fastest cell evaluation {cell_s * 1e3:.2f} ms; read bandwidth {bw:.1f} GB/s; "
          f"Anderson m={m} history read per step {2 * m * state_bytes / 2**20:.0f} MiB "
          f"-> bandwidth bound on its ratio {bound:.3f}")
    print(f"{'':16s} {'calls':>5s} {'floor ratio':>11s} {'ms/step outside f':>18s}")
    times["least passes"] = [(cell_s + min(outside["least passes"])) * steps]
    calls["least passes"] = steps
    for name in ("chained cell", "least passes", "bare anderson", "tutorial-style", "forward",
                 "anderson", "broyden"):
        ratio = min(times[name]) / (calls[name] * cell_s)
        extra = f"{min(outside[name]) * 1e3:18.2f}" if name in outside else f"{'':18s}"
        print(f"{name:16s} {calls[name]:5d} {ratio:11.3f} {extra}")


if __name__ == "__main__":
    main()
