"""The compiled solve path: the solver loop as ``torch.compile``-d blocks of fixed-shape steps.

On a small state (tanh d=256, batch 64) the eager loop's per-step bookkeeping — Anderson's
history writes, Gram update, small solve, mix, the loop's norms and masks — is many small
operations and costs several cell calls (``benchmarks/results/cpu-solvers``). A solver with
``compile=True`` runs through :func:`iterate_compiled` instead: ``block`` steps at a time in one
compiled function, with every per-sample rule of :func:`implicit.iterate` written as tensor
operations inside it (masks instead of host checks), and the "all stopped?" test (one host
synchronisation) between blocks only.

What keeps the compiled graph fixed:

* the solver's state has one shape for the whole solve. A solver opts in with ``static = True``
  and :meth:`~implicit.Solver.static_init` / :meth:`~implicit.Solver.static_step`; Anderson
  keeps its ``m`` history slots as a shift register (newest last) with the unfilled slots
  masked out of its least squares, so nothing changes shape, and no Python number changes
  value, as the history fills;
* ``f`` is an argument of the compiled function (guarded on its code, not on the closure
  object a new batch makes), so a DEQ's per-batch map does not recompile;
* shapes: the first call compiles for its shapes; a call with another batch size recompiles
  once with that dimension dynamic (torch's automatic dynamic shapes), and later sizes reuse
  it. Compiled functions are cached per solver (its options) and block length, at most
  :data:`CACHE_SIZE` of them.

Semantics are those of :func:`implicit.iterate` (per-sample stopping, best iterate, held
non-finite and diverged samples, truthful ``nfe`` / ``n_calls``, status and policy), with two
differences that follow from blocks: a block runs all its ``block`` calls even when every
sample stops inside it (the calls are counted in ``n_calls``; each sample's record stops where
it stopped), and the last ``max_iter − 1 mod block`` calls run eagerly, one step at a time,
through the same step code. No step-size safeguard (a cut needs a host check per step), no
row compaction, no trace.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch

from .solution import Solution, Status, apply_policy
from .solver import _norms  # the eager loop's residual norms, shared
from .state import StateSpec

#: compiled block functions kept (one per solver options × block length)
CACHE_SIZE = 16


def _meets(solver, metric: torch.Tensor, scale: torch.Tensor):
    """``(met, imprecise)`` as in :func:`implicit.solver._meets`, as tensors."""
    from .solver import precision_floor

    tol = float(solver.tol)
    below = metric <= tol
    floor = precision_floor(solver.stop, scale)
    if solver.stop != "abs":
        return (below, torch.zeros_like(below)) if floor <= tol else (torch.zeros_like(below),
                                                                      below)
    precise = floor <= tol
    return below & precise, below & ~precise


def _steps(solver, steps: int, fn: Callable, c: dict, state: Any) -> tuple[dict, Any]:
    """``steps`` steps of the loop on the carry ``c`` (a dict of per-sample tensors): the
    solver's fixed-shape step, then the loop's per-sample rules as masks."""
    keep_last = solver.returns == "last"
    stop_abs = solver.stop == "abs"
    for _ in range(steps):
        active = c["active"]
        z_new, fz_new, g_new, state = solver.static_step(fn, c["z"], c["fz"], c["g"], state,
                                                         active)
        abs_new, rel_new, scale_new = _norms(g_new, fz_new)
        metric_new = abs_new if stop_abs else rel_new
        best_metric = c["best_abs"] if stop_abs else c["best_rel"]
        finite_new = torch.isfinite(abs_new)
        ok = active & finite_new
        improved = ok if keep_last else ok & (metric_new < best_metric)
        met_new, imprecise_new = _meets(solver, metric_new, scale_new)
        over = (abs_new > c["limit"]) | (scale_new > c["size_limit"])
        going = ok & ~met_new
        newly_diverged = going & over
        going = going & ~over
        held = c["held"] | ((~finite_new | over) & ~going)
        keep = ~held
        c = {
            "z": torch.where(keep[:, None], z_new, c["z"]),
            "fz": torch.where(keep[:, None], fz_new, c["fz"]),
            "g": torch.where(keep[:, None], g_new, c["g"]),
            "best_z": torch.where(improved[:, None], z_new, c["best_z"]),
            "best_abs": torch.where(improved, abs_new, c["best_abs"]),
            "best_rel": torch.where(improved, rel_new, c["best_rel"]),
            "scale": torch.where(held, c["scale"], scale_new),
            "nfe": c["nfe"] + active.long(),
            "converged": c["converged"] | (ok & met_new),
            "nonfinite": c["nonfinite"] | (active & ~finite_new),
            "diverged": c["diverged"] | newly_diverged,
            "imprecise": c["imprecise"] | (ok & imprecise_new),
            "held": held,
            "active": going,
            "limit": c["limit"],
            "size_limit": c["size_limit"],
        }
    return c, state


@functools.lru_cache(maxsize=CACHE_SIZE)
def compiled_block(solver, steps: int) -> Callable:
    """The compiled ``block(fn, carry, state) -> (carry, state)`` of ``steps`` loop steps for
    ``solver`` (cached by its options, the backend among them, and ``steps``).

    Dynamo keeps the graphs it compiles per *code object*, at most ``recompile_limit`` (8) of
    them, and then runs the function eagerly for good. Every solver's block would share one
    code object — a DEQ's forward, adjoint and eval solvers, each under its grad modes and
    batch sizes, exhausted it in a measured run — so each block gets a code object of its own
    (the same code, renamed)."""
    def block(fn, c, state):
        return _steps(solver, steps, fn, c, state)

    code = block.__code__.replace(co_name=f"implicit_block_{solver.name}_{steps}")
    block = types.FunctionType(code, block.__globals__, code.co_name, None, block.__closure__)
    backend = "inductor" if solver.compile is True else solver.compile
    return torch.compile(block, backend=backend)


def iterate_compiled(solver, fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
                     spec: StateSpec | None = None, what: str = "solve"):
    """:func:`implicit.iterate` for a ``compile=True`` solver (see the module docstring)."""
    from .solver import FlatResult

    if not type(solver).static:
        raise TypeError(f"solver {solver.name!r} has no fixed-shape step; compile=True works "
                        "with solvers that set static = True (forward, anderson)")
    from .solver import Evaluator

    z = z0
    # the first call eagerly, through the loop's own checks: f's shape, and that f does not
    # write into its iterate (in the compiled blocks such a write would be traced silently)
    fz = Evaluator(fn, budget=1)(z)
    calls = 1
    g = fz - z
    abs_res, rel_res, scale = _norms(g, fz)
    metric = abs_res if solver.stop == "abs" else rel_res
    finite = torch.isfinite(abs_res)
    met, imprecise = _meets(solver, metric, scale)
    inf = torch.full_like(abs_res, float("inf"))
    factor = float(solver.divergence_factor)
    start_abs = torch.where(finite, abs_res, inf)
    start_size = torch.where(finite, torch.maximum(scale, abs_res), inf)
    # no two entries of the carry may be one tensor: dynamo guards on such aliasing, and the
    # first block would compile a graph of its own
    c = {
        "z": z, "fz": fz, "g": g, "best_z": z.clone(), "best_abs": abs_res, "best_rel": rel_res,
        "scale": scale, "nfe": torch.ones(z.shape[0], dtype=torch.int64, device=z.device),
        "converged": finite & met, "nonfinite": ~finite,
        "diverged": torch.zeros_like(finite), "imprecise": finite & imprecise,
        "held": ~finite, "active": finite & ~met,
        "limit": factor * start_abs if factor > 0 else inf,
        "size_limit": factor * start_size if factor > 0 else inf.clone(),
    }
    state = solver.static_init(z, fz, g)
    block = compiled_block(solver, int(solver.block))
    blocks = 0
    while calls + solver.block <= solver.max_iter and bool(c["active"].any()):
        c, state = block(fn, c, state)
        calls += solver.block
        blocks += 1
    eager_steps = 0
    while calls < solver.max_iter and bool(c["active"].any()):
        c, state = _steps(solver, 1, fn, c, state)
        calls += 1
        eager_steps += 1

    codes = torch.full_like(c["nfe"], Status.MAX_ITER.code)
    codes = torch.where(c["diverged"], Status.DIVERGED.code, codes)
    codes = torch.where(c["nonfinite"], Status.NONFINITE.code, codes)
    codes = torch.where(c["converged"], Status.CONVERGED.code, codes).to(torch.int8)
    worst = Status.from_code(int(codes.max())) if codes.numel() else Status.CONVERGED
    stats = {**solver.static_stats(state), "loop_steps": calls - 1, "compiled_blocks": blocks,
             "eager_steps": eager_steps}
    below_precision = c["imprecise"] & ~c["converged"]
    if bool(below_precision.any()):
        stats["below_precision"] = int(below_precision.sum())
        stats["precision_scale"] = float(c["scale"].detach()[below_precision].max())
    best_z = c["best_z"]
    record = Solution(
        z=spec.unflatten(best_z.detach()) if spec is not None else best_z.detach(),
        nfe=c["nfe"],
        abs_residual=c["best_abs"].detach(),
        rel_residual=c["best_rel"].detach(),
        converged=c["converged"],
        sample_status=codes,
        n_calls=calls,
        status=worst,
        tol=float(solver.tol),
        stop=solver.stop,
        solver=solver.name,
        trace=None,
        stats=stats,
        njvp=0,
    )
    apply_policy(record, solver.policy, what=what)
    return FlatResult(z=best_z, solution=record)
