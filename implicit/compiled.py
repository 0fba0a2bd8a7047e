"""The compiled solve path: the solver loop compiled, as one ``torch.while_loop`` or in blocks.

On a small state (tanh d=256, batch 64) the eager loop's per-step bookkeeping — Anderson's
history writes, Gram update, small solve, mix, the loop's norms and masks — is many small
operations and costs several cell calls (``benchmarks/results/cpu-solvers``). A solver with
``compile=True`` runs through :func:`iterate_compiled` instead, with every per-sample rule of
:func:`implicit.iterate` written as tensor operations (masks instead of host checks):

* ``block=None`` (default): the whole solve, its first call of f included, is one compiled
  function around a ``torch.while_loop`` that steps while any sample is active and the budget
  has calls left (``_whole``). One call into compiled code and one host synchronisation
  per solve, exactly the eager loop's calls. (The eager loop's checks of f — its shape, no
  writes into its iterate — hold here by construction: such a map cannot be traced into the
  loop, and the solve then makes its first call eagerly, through those checks.)
* ``block=k``: compiled blocks of ``k`` steps, the "all stopped?" test (one host
  synchronisation) between blocks. Each step's call of f runs under ``torch.cond`` on "is any
  sample still active", so the steps of a block after every sample stopped make no call; the
  budget is counted in whole blocks and its last ``max_iter − 1 mod k`` steps run eagerly, one
  at a time, through the same step code.

A ``DEQ`` whose solver is compiled whole makes its forward without grad (inference, or any
forward under ``torch.no_grad``) one compiled call: :func:`solve_fused` traces the cell's
injection of ``x`` into the same function as the solve (the initial state is made before the
call and passed in: zeros made inside it slowed the ResNet cell's steps), so the layer's
own Python (problem, state structure, backward dispatch) and the eager injection call are not
paid per forward. The layer takes this path once a general forward has shown the map
traceable, with a strategy that only solves when there is no graph (``ift``, ``phantom``),
and falls back to the general path where the fused call cannot be made (the record is the
same, with ``stats["fused"]``).

A map that dynamo cannot trace whole (a graph break in it, e.g. a VJP through autograd) can run
neither in a ``torch.while_loop`` nor in a ``torch.cond`` branch: it runs in blocks (of
:data:`FALLBACK_BLOCK` steps when ``block=None``) that make every call, and ``n_calls`` counts
those (``stats["loop"]`` and ``stats["skipping_blocks"]`` say which path ran).

What keeps the compiled graph fixed:

* the solver's state has one shape for the whole solve. A solver opts in with ``static = True``
  and :meth:`~implicit.Solver.static_init` / :meth:`~implicit.Solver.static_step` (which must
  not write into the state it is given: a ``torch.while_loop`` body may not); Anderson keeps
  its ``m`` history slots as a ring (slot ``count mod m`` written) with the unfilled slots
  masked out of its least squares, so nothing changes shape, and no Python number changes
  value, as the history fills;
* without grad, the whole-solve loop holds the tensors a solver names in ``static_inplace``
  (Anderson's two (B, m, n) histories) outside its carry, and the step writes its new slot
  into them (:func:`holds_in_place`): a ``torch.while_loop`` body may write into tensors it
  closes over when grad is off. Carried, each history is rebuilt whole at every step. A map
  that cannot be compiled that way (a ``torch.func`` transform inside it, as in the compiled
  adjoint) is compiled again carrying them, and remembered;
* between blocks, the loop's per-sample numbers and flags travel packed in four tensors (every
  tensor argument of a compiled function is checked by its guards on every call); the
  whole-solve loop packs its numbers and flags too, so that a step makes fewer new buffers
  (see ``_pack_whole``);
* ``f`` is an argument of the compiled function (guarded on its code, not on the closure
  object a new batch makes), so a DEQ's per-batch map does not recompile;
* shapes: the first call compiles for its shapes; a call with another batch size recompiles
  once with that dimension dynamic (torch's automatic dynamic shapes), and later sizes reuse
  it. Compiled functions are cached per solver (its options), block length and device type,
  at most :data:`CACHE_SIZE` of them.

Semantics are those of :func:`implicit.iterate` (per-sample stopping, best iterate, held
non-finite and diverged samples, truthful ``nfe`` / ``n_calls``, status and policy). No
step-size safeguard (a cut needs a host check per step), no row compaction, no trace.
"""

from __future__ import annotations

import functools
import itertools
import types
import warnings
from typing import Any, Callable

import torch

from .registry import PluginError
from .solution import Solution, Status, apply_policy
from .solver import Evaluator, FlatResult, _norms  # _norms: the eager loop's residual norms
from .state import StateSpec

#: numbers the compiled functions' code names: dynamo's automatic dynamic shapes keep their
#: record per code *name*, so two solvers' functions of one name would make the second one's
#: options (tol, max_iter) symbolic, which a ``torch.while_loop`` cannot take in
_SERIAL = itertools.count()

#: sets of compiled functions kept (one per solver options × block length × device type ×
#: whether they hold tensors in place)
CACHE_SIZE = 32

#: maps (by code object) whose calls could not be traced into a ``torch.while_loop`` body or a
#: ``torch.cond`` branch
_TRACEABLE: dict = {}


class CompiledFallbackWarning(UserWarning):
    """A ``compile=True`` solve could not trace its map into a ``torch.while_loop`` body (or
    the ``torch.cond`` that skips calls) and runs in compiled blocks that make every call."""


class FusedUnavailable(RuntimeError):
    """:func:`solve_fused` could not compile or run its call (the cause is chained)."""


def short_reason(exc: BaseException) -> str:
    """The first two non-empty lines of ``exc``'s message, at most 300 characters (dynamo's
    first line is often a header only), for a one-line warning."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300]


def _untraceable(fn: Callable, exc: Exception, instead: str) -> None:
    """Remember that ``fn``'s code cannot be traced whole, and say so once per code object."""
    first = _TRACEABLE.get(fn.__code__, True)
    _TRACEABLE[fn.__code__] = False
    if first:
        reason = short_reason(exc)
        name = getattr(fn, "__qualname__", type(fn).__name__)
        warnings.warn(
            f"compile=True: the map {name} cannot be traced whole ({type(exc).__name__}: "
            f"{reason}); {instead}. A graph break in the map (a host read, a VJP through "
            "autograd, an untraceable call) causes this; torch._dynamo.explain(fn)(z) shows it. "
            "The record is the same; stats['loop'] says which loop ran",
            CompiledFallbackWarning, stacklevel=4)


def _meets(solver, metric: torch.Tensor, scale: torch.Tensor):
    """``(met, imprecise)`` of the eager loop's rule (:func:`implicit.solver._meets`), both as
    tensors: the compiled carry has no room for its ``None``."""
    from .solver import _meets as meets

    met, imprecise = meets(metric, scale, float(solver.tol), solver.stop)
    return met, torch.zeros_like(met) if imprecise is None else imprecise


#: the per-sample numbers and flags of the carry, each packed into one tensor: every tensor
#: argument of a compiled function costs guard checks on every call, and on a small state a
#: block's fixed cost was mostly those (measured: 16 carry tensors → 4 cut it by about 40 µs)
_NUMBERS = ("best_abs", "best_rel", "scale", "limit", "size_limit")
_FLAGS = ("converged", "nonfinite", "diverged", "imprecise", "held", "active")


def _unpack(carry: tuple) -> dict:
    """The packed carry ``(states, numbers, flags, nfe)`` as a dict of per-sample tensors."""
    states, numbers, flags, nfe = carry
    c = {"z": states[0], "fz": states[1], "best_z": states[2], "nfe": nfe}
    c.update(zip(_NUMBERS, numbers.unbind(1)))
    c.update(zip(_FLAGS, flags.unbind(1)))
    return c


def _pack(c: dict) -> tuple:
    return (torch.stack([c["z"], c["fz"], c["best_z"]]),
            torch.stack([c[k] for k in _NUMBERS], dim=1),
            torch.stack([c[k] for k in _FLAGS], dim=1), c["nfe"])


def _start(solver, z: torch.Tensor, fz: torch.Tensor) -> dict:
    """The carry (unpacked) after the first call ``fz = f(z)``: the loop's rules for
    ``f(z0)``."""
    g = fz - z
    abs_res, rel_res, scale = _norms(g, fz)
    metric = abs_res if solver.stop == "abs" else rel_res
    finite = torch.isfinite(abs_res)
    met, imprecise = _meets(solver, metric, scale)
    inf = torch.full_like(abs_res, float("inf"))
    factor = float(solver.divergence_factor)
    start_abs = torch.where(finite, abs_res, inf)
    start_size = torch.where(finite, torch.maximum(scale, abs_res), inf)
    return {
        "z": z, "fz": fz, "best_z": z, "best_abs": abs_res, "best_rel": rel_res,
        "scale": scale, "nfe": torch.ones(z.shape[0], dtype=torch.int64, device=z.device),
        "converged": finite & met, "nonfinite": ~finite,
        "diverged": torch.zeros_like(finite), "imprecise": finite & imprecise,
        "held": ~finite, "active": finite & ~met,
        "limit": factor * start_abs if factor > 0 else inf,
        "size_limit": factor * start_size if factor > 0 else inf,
    }


def _unchanged(z: torch.Tensor) -> torch.Tensor:
    return z.clone()  # a torch.cond branch may not return its input itself


def _step(solver, fn: Callable, c: dict, state: Any, inplace: bool = False):
    """One step of the loop on the unpacked carry ``c``: the solver's fixed-shape step (one
    call of ``fn``; ``inplace``: it writes into the state's tensors under the solver's
    ``static_inplace`` keys), then the loop's per-sample rules as masks. Returns ``(c,
    state)``."""
    keep_last = solver.returns == "last"
    stop_abs = solver.stop == "abs"
    active = c["active"]
    # (inplace is passed only when true: a solver without in-place keys need not take it)
    z_new, fz_new, g_new, state = solver.static_step(
        fn, c["z"], c["fz"], c["fz"] - c["z"], state, active,
        **({"inplace": True} if inplace else {}))
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
    return {
        "z": torch.where(keep[:, None], z_new, c["z"]),
        "fz": torch.where(keep[:, None], fz_new, c["fz"]),
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
    }, state


def _steps(solver, steps: int, fn: Callable, carry: tuple, state: Any, skip: bool = False):
    """``steps`` steps of the loop on the packed carry (:func:`_step`). Returns ``(carry,
    state, flags)``, ``flags`` a ``(2,)`` int64 tensor ``[any sample still active, calls of f
    made]`` that the host reads between blocks (one synchronisation per block).

    ``skip``: each step's call of ``fn`` runs under ``torch.cond`` on "any sample active", so
    the steps of a block after every sample stopped cost the bookkeeping only, not a call
    (where ``fn`` can be traced into a branch: no graph break inside it)."""
    c = _unpack(carry)
    made = torch.zeros((), dtype=torch.int64, device=c["nfe"].device)
    for _ in range(steps):
        if skip:
            anyone = c["active"].any()
            made = made + anyone.long()

            def step_fn(z, anyone=anyone):
                return torch.cond(anyone, fn, _unchanged, (z,))
        else:
            made = made + 1
            step_fn = fn
        c, state = _step(solver, step_fn, c, state)
    return _pack(c), state, torch.stack([c["active"].any().long(), made])


def _finish(c: dict):
    """``(best_z, best_abs, best_rel, converged, codes, summary)`` from the final carry, each
    its own tensor (not a view into the packed carry): per-sample status codes and the
    float64 ``summary = [worst code, samples below attainable precision, their largest
    ‖f(z)‖]``, read by the host in one transfer."""
    codes = torch.full_like(c["nfe"], Status.MAX_ITER.code)
    codes = torch.where(c["diverged"], Status.DIVERGED.code, codes)
    codes = torch.where(c["nonfinite"], Status.NONFINITE.code, codes)
    codes = torch.where(c["converged"], Status.CONVERGED.code, codes).to(torch.int8)
    below = c["imprecise"] & ~c["converged"]
    # a zero in front of each maximum: an empty batch is CONVERGED, with nothing below precision
    pad = torch.zeros(1, dtype=torch.float64, device=codes.device)
    summary = torch.stack([
        torch.cat([pad, codes.double()]).max(),
        below.sum().double(),
        torch.cat([pad, torch.where(below, c["scale"].detach(), 0).double()]).max(),
    ])
    return (c["best_z"].clone(), c["best_abs"].clone(), c["best_rel"].clone(),
            c["converged"].clone(), codes, summary)


#: what the whole-solve loop carries from step to step: the iterates and ``nfe`` each in a
#: tensor of its own, the per-sample numbers and flags packed into one tensor each (every
#: carried tensor is a new buffer at every step; packed, a 10-call Anderson solve of tanh
#: d=256 batch 64 measured 1.37 of the floor against 1.40–1.46, forward iteration 1.08–1.09
#: against 1.11–1.12, the ResNet cell's no slower; ``docs/results/compiled.md``). The
#: iterates stay apart: stacked, each step copies them, which slowed the ResNet cell's step by
#: a fifth. ``limit`` and ``size_limit`` do not change: they enter the loop's body as
#: constants, since a carried value that a step returns unchanged would alias its input, which
#: ``torch.while_loop`` refuses
_WHOLE_ITERATES = ("z", "fz", "best_z", "nfe")
_WHOLE_NUMBERS = ("best_abs", "best_rel", "scale")


def _pack_whole(c: dict) -> tuple:
    """The whole-solve loop's carry from the unpacked carry ``c``: the iterates and ``nfe``,
    then the ``(B, 3)`` numbers and the ``(B, 6)`` flags."""
    return (*[c[k] for k in _WHOLE_ITERATES],
            torch.stack([c[k] for k in _WHOLE_NUMBERS], dim=1),
            torch.stack([c[k] for k in _FLAGS], dim=1))


def _unpack_whole(carried) -> dict:
    """:func:`_pack_whole`'s inverse (views into the packed tensors)."""
    *iterates, numbers, flags = carried
    c = dict(zip(_WHOLE_ITERATES, iterates))
    c.update(zip(_WHOLE_NUMBERS, numbers.unbind(1)))
    c.update(zip(_FLAGS, flags.unbind(1)))
    return c


#: how many tensors :func:`_pack_whole` makes (the flags last), and the flags' column of
#: ``active``, which the loop's condition reads
_WHOLE_CARRIED = len(_WHOLE_ITERATES) + 2
_WHOLE_ACTIVE = _FLAGS.index("active")


def _whole(solver, fn: Callable, z: torch.Tensor, fz: torch.Tensor, hold: bool = True):
    """The whole solve after the first call ``fz = f(z)``, as one ``torch.while_loop``: steps
    while any sample is active and the budget has calls left, so the loop makes exactly the
    eager loop's calls, with no host synchronisation until it is over. Returns ``_finish``'s
    tuple with ``summary`` extended by the calls made (the first one included), then ``nfe``
    and the solver's final state. ``hold``: whether the loop may hold the solver's in-place
    tensors (:func:`holds_in_place`)."""
    from torch._higher_order_ops.while_loop import while_loop

    c = _start(solver, z, fz)
    constants = {"limit": c["limit"], "size_limit": c["size_limit"]}
    state = solver.static_init(z, fz, fz - z)
    # the tensors the step writes into (held by the body, not carried: see `holds_in_place`)
    held = {k: state.pop(k) for k in holds_in_place(solver, hold)}
    leaves, tree = torch.utils._pytree.tree_flatten(state)
    n = _WHOLE_CARRIED
    budget = int(solver.max_iter)

    def more(calls, *carried):
        flags = carried[n - 1]
        return flags[:, _WHOLE_ACTIVE].any() & (calls < budget)

    def step(calls, *carried):
        c = {**_unpack_whole(carried[:n]), **constants}
        state = torch.utils._pytree.tree_unflatten(list(carried[n:]), tree)
        c, state = _step(solver, fn, c, {**state, **held}, inplace=bool(held))
        state = {k: v for k, v in state.items() if k not in held} if held else state
        return (calls + 1, *_pack_whole(c), *torch.utils._pytree.tree_flatten(state)[0])

    # each carried tensor its own (z is also best_z at the start: inputs may not alias)
    calls, *carried = while_loop(more, step, (
        torch.ones((), dtype=torch.int64, device=z.device),
        *[t.clone() for t in _pack_whole(c)], *[t.clone() for t in leaves]))
    final = {**_unpack_whole(carried[:n]), **constants}
    *outputs, summary = _finish(final)
    state = torch.utils._pytree.tree_unflatten(carried[n:], tree)
    return (*outputs, torch.cat([summary, calls.double().reshape(1)]), final["nfe"],
            {**state, **held} if held else state)


def holds_in_place(solver, hold: bool = True) -> tuple:
    """The keys of ``solver``'s static state that the whole-solve loop holds outside its
    carry and the step writes into (``static_step(..., inplace=True)``): the solver's
    ``static_inplace`` keys when ``hold`` and grad is off, else none. A ``torch.while_loop``
    body may write into tensors it closes over only without grad (dynamo refuses it under
    grad); carried, Anderson's (B, m, n) histories are rebuilt whole at every step, where held,
    one slot of each is written (``docs/results/compiled.md``). The compiled function is
    guarded on the grad mode, so each mode has its own graph."""
    return tuple(type(solver).static_inplace) if hold and not torch.is_grad_enabled() else ()


#: maps (by code object; a fused solve by its cell's type) whose whole solve could not be
#: compiled with the solver's tensors held in place, and could without: a map that runs a
#: ``torch.func`` transform (the compiled adjoint's ``vjp``) breaks functionalization there
_NO_HOLD: dict = {}


@functools.lru_cache(maxsize=CACHE_SIZE)
def check_inplace_keys(solver, dtype: torch.dtype = torch.float32, device_type: str = "cpu"):
    """Raise :class:`~implicit.registry.PluginError` unless every key that ``solver`` names in
    ``static_inplace`` is a tensor of the dict its ``static_init`` returns (probed eagerly, on
    a two-sample state, once per solver options, dtype and device type). Checked before the
    whole solve is compiled to hold them: a wrong name would otherwise fail inside the
    compiled loop, where it looks like a map that cannot be held in place, and the solve
    would run carrying its state instead, slower, with nothing said."""
    names = tuple(type(solver).static_inplace)
    if not names:
        return
    z = torch.zeros(2, 3, dtype=dtype, device=device_type)
    state = solver.static_init(z, z, z)
    keys = sorted(state) if isinstance(state, dict) else None
    wrong = [k for k in names
             if keys is None or k not in state or not isinstance(state[k], torch.Tensor)]
    if wrong:
        have = (f"its static_init returns a dict with keys {keys}" if keys is not None
                else f"its static_init returns a {type(state).__name__}, not a dict")
        raise PluginError(
            f"solver {solver.name!r} ({type(solver).__qualname__}) names {wrong} in "
            f"static_inplace, but {have}: static_inplace must name tensors of static_init's "
            "dict (or be empty)")


def _whole_call(solver, steps: int, device_type: str, key: Any, call: Callable,
                dtype: torch.dtype = torch.float32):
    """``call(parts)`` with the compiled functions (:func:`compiled_parts`) of a whole solve:
    first those that hold the solver's in-place tensors (:func:`holds_in_place`; their
    declaration checked first, :func:`check_inplace_keys`), where they would hold any and
    have not failed for ``key`` before; if they fail, those that do not (and ``key`` is
    remembered if these work). Returns ``(result, held)``; raises what the last try
    raised."""
    if holds_in_place(solver) and _NO_HOLD.get(key, True):
        check_inplace_keys(solver, dtype, device_type)
        try:
            return call(compiled_parts(solver, steps, device_type, hold=True)), True
        except Exception:
            result = call(compiled_parts(solver, steps, device_type, hold=False))
            _NO_HOLD[key] = False
            return result, False
    return call(compiled_parts(solver, steps, device_type, hold=False)), False


def _in_place_stats(solver, held: bool) -> dict:
    """``{"in_place": held}`` for a whole solve by a solver with in-place keys: whether its
    loop held them."""
    return {"in_place": held} if type(solver).static_inplace else {}


#: block length of the fallback for maps that cannot be traced into a ``torch.while_loop``
FALLBACK_BLOCK = 4


@functools.lru_cache(maxsize=CACHE_SIZE)
def compiled_parts(solver, steps: int, device_type: str = "cpu", hold: bool = True):
    """The compiled functions of a solve with ``solver``, as attributes of a namespace:
    ``whole(fn, z)``, the whole solve, its first call of ``fn`` included (``_whole``);
    ``fused(prepare, cell, x, state0)``, the same solve of the map that ``prepare(cell, x,
    state0) -> (fn, z, shape)`` builds, in the same compiled call (see :func:`solve_fused`);
    for the block loop, ``start(z, fz) -> (carry, any_active)``; ``block(fn, carry, state)
    -> (carry, state, flags)``, ``steps`` loop steps that skip the calls of ``fn`` once no
    sample is active; ``plain``, the same without skipping (for maps that cannot be traced
    into a ``torch.cond`` branch, e.g. a VJP through autograd); and ``finish(carry)`` (see
    ``_finish``). ``hold``: whether ``whole`` and ``fused`` may hold the solver's in-place
    tensors (:func:`holds_in_place`). Cached by the solver's options, the backend among them,
    ``steps``, the device type and ``hold``.

    On CPU, inductor writes the code around its kernels in C++ (``cpp_wrapper``): in Python,
    allocating and checking every buffer of a step cost about 30 µs a step on a tanh d=256
    state (measured, ``benchmarks/compiled_block.py``), a third of the cell's call.

    Dynamo keeps the graphs it compiles per *code object*, at most ``recompile_limit`` (8) of
    them, and then runs the function eagerly for good. Every solver's block would share one
    code object — a DEQ's forward, adjoint and eval solvers, each under its grad modes and
    batch sizes, exhausted it in a measured run — so each function gets a code object of its
    own (the same code, renamed, with a serial number: see ``_SERIAL``)."""
    backend = "inductor" if solver.compile is True else solver.compile
    options = {"cpp_wrapper": True} if backend == "inductor" and device_type == "cpu" else None

    def own(function, name):
        code = function.__code__.replace(
            co_name=f"implicit_{name}_{solver.name}_{steps}_{next(_SERIAL)}")
        renamed = types.FunctionType(code, function.__globals__, code.co_name, None,
                                     function.__closure__)
        return torch.compile(renamed, backend=backend, options=options)

    def whole(fn, z):
        return _whole(solver, fn, z, fn(z), hold)

    def fused(prepare, cell, x, state0):
        fn, z, shape = prepare(cell, x, state0)
        best_z, *rest = _whole(solver, fn, z, fn(z), hold)
        return (best_z.view(shape), *rest)

    def start(z, fz):
        carry = _pack(_start(solver, z, fz))
        return carry, carry[2][:, _FLAGS.index("active")].any()

    def block(fn, carry, state):
        return _steps(solver, steps, fn, carry, state, skip=True)

    def plain(fn, carry, state):
        return _steps(solver, steps, fn, carry, state)

    def finish(carry):
        return _finish(_unpack(carry))

    return types.SimpleNamespace(whole=own(whole, "whole"), fused=own(fused, "fused"),
                                 start=own(start, "start"),
                                 block=own(block, "block"), plain=own(plain, "plain"),
                                 finish=own(finish, "finish"), steps=steps)


def _blocks(solver, parts, fn: Callable, z: torch.Tensor, fz: torch.Tensor, skipping: bool):
    """The block loop: compiled blocks of ``parts``' steps, "any sample active?" read between
    blocks, the budget's remainder in eager single steps. Returns ``(finish's tuple, nfe,
    state, calls, stats)``."""
    carry, any_active = parts.start(z, fz)
    state = solver.static_init(z, fz, fz - z)
    steps = parts.steps
    calls, blocks, eager_steps = 1, 0, 0
    budget_spent = 1  # calls a block may make, counted whole: the budget is never exceeded
    going = bool(any_active)
    block = parts.block if skipping else parts.plain
    while going and budget_spent + steps <= solver.max_iter:
        try:
            carry, state, flags = block(fn, carry, state)
        except Exception as exc:
            # a map that cannot run inside a torch.cond branch (a graph break in it): blocks
            # that make every call; a map that fails either way raises from the plain block
            if block is parts.plain:
                raise
            _untraceable(fn, exc, f"it runs in compiled blocks of {steps} steps that make "
                         "every call, also after every sample has stopped")
            block = parts.plain
            carry, state, flags = block(fn, carry, state)
        going, made = flags.tolist()
        calls += made
        budget_spent += steps
        blocks += 1
    while going and budget_spent < solver.max_iter:
        carry, state, flags = _steps(solver, 1, fn, carry, state)
        calls += 1
        budget_spent += 1
        eager_steps += 1
        going = bool(flags[0])
    *outputs, summary = parts.finish(carry)
    stats = {"loop": "blocks", "block": steps, "loop_steps": budget_spent - 1,
             "compiled_blocks": blocks, "skipping_blocks": block is parts.block,
             "eager_steps": eager_steps}
    return (*outputs, summary), carry[3], state, calls, stats


def iterate_compiled(solver, fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
                     spec: StateSpec | None = None, what: str = "solve"):
    """:func:`implicit.iterate` for a ``compile=True`` solver (see the module docstring)."""
    if not type(solver).static:
        raise TypeError(f"solver {solver.name!r} has no fixed-shape step; compile=True works "
                        "with solvers that set static = True (forward, anderson)")
    steps = int(solver.block) if solver.block is not None else FALLBACK_BLOCK
    z = z0.contiguous()
    traceable = _TRACEABLE.get(fn.__code__, True)
    result = failure = None
    if solver.block is None and traceable:
        # the first call inside the compiled solve too. A map that the eager loop would refuse
        # cannot get through it: one that writes into its iterate cannot be traced into the
        # loop's body, and a wrong shape does not trace; either way the eager first call below
        # then says what is wrong
        try:
            result, held = _whole_call(solver, FALLBACK_BLOCK, z.device.type, fn.__code__,
                                       lambda parts: parts.whole(fn, z), z.dtype)
        except PluginError:
            raise
        except Exception as exc:
            failure = exc
    if result is not None:
        *outputs, summary, nfe, state = result
        summary = summary.tolist()
        calls = int(summary.pop())
        stats = {"loop": "while", "loop_steps": calls - 1, **_in_place_stats(solver, held)}
    else:
        # the first call eagerly, through the loop's own checks: f's shape, and that f does
        # not write into its iterate (in compiled code such a write would be traced silently)
        fz = Evaluator(fn, budget=1)(z).contiguous()
        if failure is not None:
            # f runs eagerly but cannot be traced into a torch.while_loop (a graph break in
            # it, e.g. a VJP through autograd): the block loop, whose blocks make every call
            _untraceable(fn, failure, f"it runs in compiled blocks of {FALLBACK_BLOCK} steps "
                         "instead of one torch.while_loop, with a host synchronisation per "
                         "block")
            traceable = False
        (*outputs, summary), nfe, state, calls, stats = _blocks(
            solver, compiled_parts(solver, steps, z.device.type), fn, z, fz,
            skipping=traceable)
        summary = summary.tolist()
    record = _record(solver, outputs, summary, nfe, state, calls, stats,
                     spec.unflatten(outputs[0].detach()) if spec is not None
                     else outputs[0].detach(), what)
    return FlatResult(z=outputs[0], solution=record)


def _record(solver, outputs, summary: list, nfe: torch.Tensor, state: Any, calls: int,
            stats: dict, z: Any, what: str) -> Solution:
    """The solve's record from a compiled solve's outputs (``_finish``'s tensors, the host's
    ``summary`` list, ``nfe``, the solver's final state) with ``z`` its solution as the caller
    returns it; the solver's policy applied."""
    _, best_abs, best_rel, converged, codes = outputs
    worst, below, precision_scale = summary
    stats = {**solver.static_stats(state), **stats}
    if below:
        stats["below_precision"] = int(below)
        stats["precision_scale"] = precision_scale
    record = Solution(
        z=z,
        nfe=nfe,
        abs_residual=best_abs.detach(),
        rel_residual=best_rel.detach(),
        converged=converged,
        sample_status=codes,
        n_calls=calls,
        status=Status.from_code(int(worst)),
        tol=float(solver.tol),
        stop=solver.stop,
        solver=solver.name,
        trace=None,
        stats=stats,
        njvp=0,
    )
    apply_policy(record, solver.policy, what=what)
    return record


def solve_fused(solver, prepare: Callable, cell: torch.nn.Module, x: Any,
                state0: torch.Tensor, device_type: str, *, what: str):
    """A whole compiled solve (``block=None``) whose map and start are built inside the same
    compiled call: ``prepare(cell, x, state0) -> (fn, z0, shape)`` gives the flat map, the
    flat ``(B, n)`` initial iterate (from ``state0``) and the state's shape (a DEQ's
    injection of ``x``: without grad, the layer's forward is then one call into compiled
    code, the injection's matrix product among its kernels). Returns ``(z, record)``, ``z``
    the solution in the state's shape. Raises :class:`FusedUnavailable` (from what went wrong)
    where the call could not be compiled or run: the caller then takes its general path,
    which makes the same solve and says clearly what is wrong, if anything is. A record whose
    status the solver's policy rejects raises as any solve's does."""
    try:
        (z, *outputs, summary, nfe, state), held = _whole_call(
            solver, FALLBACK_BLOCK, device_type, ("fused", type(cell)),
            lambda parts: parts.fused(prepare, cell, x, state0), state0.dtype)
    except PluginError:
        raise
    except Exception as exc:
        raise FusedUnavailable(str(exc)) from exc
    summary = summary.tolist()
    calls = int(summary.pop())
    stats = {"loop": "while", "loop_steps": calls - 1, "fused": True,
             **_in_place_stats(solver, held)}
    z = z.detach()
    return z, _record(solver, (z, *outputs), summary, nfe, state, calls, stats, z, what)
