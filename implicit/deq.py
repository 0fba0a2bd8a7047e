"""`DEQ`, the implicit layer, and `solve`, the plain fixed-point solve (Bai et al. 2019).

``layer = DEQ(cell, solver="forward", backward="ift")``; ``z_star = layer(x)`` solves
``z* = f(z*, x)`` and makes ``z*`` differentiable the way the backward strategy says;
``layer.solution`` is the record of the last forward solve.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import contextlib
import copy
import warnings

import attrs
import torch
from torch import nn

from .backward import BackwardStrategy, Problem
from .cell import Cell, check_cell, init_state_of, injection_of, rows_of_batched, update_of
from .compiled import CompiledFallbackWarning, FusedUnavailable, short_reason, solve_fused
from .registry import get_registry
from .solution import Solution, Status
from .solver import Solver, iterate
from .stability import (PROBES, hold_parametrized, hook_based_spectral_norm,
                        _has_parametrizations, jacobian_frobenius, jacobian_spectral_norm,
                        parametrized_tensors)
from .state import State, StateSpec
from .validators import (check_value, nonnegative_int, nonnegative_number, number_in, one_of,
                         positive_int)

_LOOP_OPTIONS = ("tol", "max_iter", "stop", "policy")
READOUTS = ("state", "step")


def resolve_solver(solver: str | Solver, options: Optional[Mapping[str, Any]] = None,
                   **overrides: Any) -> Solver:
    """A solver instance from a registered name (built with ``options``) or an instance;
    ``overrides`` that are not ``None`` replace the instance's fields."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(solver, str):
        return get_registry().make("solver", solver, **{**(options or {}), **overrides})
    if isinstance(solver, Solver):
        if options:
            raise TypeError("solver_options are only for a solver given by name")
        return attrs.evolve(solver, **overrides) if overrides else solver
    raise TypeError(
        f"solver must be a registered solver name or an implicit.Solver, got "
        f"{type(solver).__name__}"
    )


def resolve_backward(backward: str | BackwardStrategy,
                     options: Optional[Mapping[str, Any]] = None) -> BackwardStrategy:
    """A backward strategy from a registered name (built with ``options``) or an instance."""
    if isinstance(backward, str):
        return get_registry().make("backward", backward, **(options or {}))
    if isinstance(backward, BackwardStrategy):
        if options:
            raise TypeError("backward_options are only for a backward given by name")
        return backward
    raise TypeError(
        f"backward must be a registered backward name or an implicit.BackwardStrategy, got "
        f"{type(backward).__name__}"
    )


def _explain_input_mismatch(cell: nn.Module, x: Any, exc: Exception) -> None:
    """Called when the cell's injection raised on ``x``: if ``x`` is on another device than
    the cell's parameters, or of another dtype (integer, or float64 into a float32 cell),
    raise that as a clear error (chained to torch's); otherwise return and let it propagate.
    Checked only after a failure, so a cell that takes integer inputs (token ids) is fine."""
    param = next(iter(cell.parameters()), None)
    if param is None:
        return
    leaves, _ = _tensor_leaves(x)
    amp = _autocast_of(x) is not None
    for t in leaves:
        if t.device != param.device:
            raise ValueError(
                f"x is on {t.device} but the cell's parameters are on {param.device}; move "
                f"one of them (x.to({str(param.device)!r}) or layer.to({str(t.device)!r}))"
            ) from exc
        if t.dtype != param.dtype and not amp:
            kind = "" if t.is_floating_point() else " (an integer tensor)"
            raise TypeError(
                f"x has dtype {t.dtype}{kind} but the cell's parameters are {param.dtype}; "
                f"make them the same (x.to({param.dtype})"
                + (f" or layer.to({t.dtype}))" if t.is_floating_point() else ")")) from exc


def _default_extra_state(module, state_dict, prefix, *args) -> None:
    """A ``state_dict`` saved before the layer had extra state loads with an empty memory."""
    state_dict.setdefault(prefix + "_extra_state", {"backward_memory": {}})


class EquilibriumWarning(UserWarning):
    """A cell contains modules that change on every call in training (they move the fixed
    point)."""


def _warn_stateful_modules(cell: nn.Module) -> None:
    offenders = []
    for name, module in cell.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            offenders.append(f"{name or type(cell).__name__} ({type(module).__name__}: running "
                             "statistics update on every call, and batch statistics couple "
                             "the samples)")
        elif isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            offenders.append(f"{name or type(cell).__name__} ({type(module).__name__}: a new "
                             "mask on every call)")
    offenders += [f"{name} (torch.nn.utils.spectral_norm: a power-iteration step on every call; "
                  "use torch.nn.utils.parametrizations.spectral_norm, which DEQ holds fixed "
                  "for a whole solve)" for name in hook_based_spectral_norm(cell)]
    if offenders:
        warnings.warn(
            "this DEQ cell contains modules whose state changes on every call in training, "
            "which moves the fixed point between iterations: " + "; ".join(offenders)
            + ". Use GroupNorm/LayerNorm and variational dropout (one mask per solve, drawn in "
            "the cell's injection) instead.",
            EquilibriumWarning,
            stacklevel=3,
        )


def check_compatible(solver: Solver, backward: BackwardStrategy) -> None:
    """Raise if the registry says ``backward`` requires capabilities ``solver`` lacks."""
    registry = get_registry()
    try:
        needs = registry.get("backward", backward.name).spec.requires
        has = registry.get("solver", solver.name).spec.capabilities
    except LookupError:  # not registered under these names: nothing declared to check
        return
    missing = sorted(needs - has)
    if missing:
        raise ValueError(
            f"backward {backward.name!r} needs a solver with the capabilities {missing}, and "
            f"solver {solver.name!r} does not declare them; pick another solver (see "
            "`implicit plugins`) or another backward"
        )


def _tensor_leaves(obj: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors inside ``obj`` (tensor, tuple/list/dict nests) and a function rebuilding
    ``obj`` with replacements for them, in the same order."""
    if isinstance(obj, torch.Tensor):
        return [obj], lambda new: new[0]
    if isinstance(obj, (tuple, list)) or isinstance(obj, Mapping):
        keys = list(obj.keys()) if isinstance(obj, Mapping) else list(range(len(obj)))
        parts = [_tensor_leaves(obj[k]) for k in keys]
        sizes = [len(p[0]) for p in parts]
        leaves = [t for p in parts for t in p[0]]

        def rebuild(new: list[torch.Tensor]) -> Any:
            out, start = [], 0
            for (_, build), size in zip(parts, sizes):
                out.append(build(new[start : start + size]))
                start += size
            if isinstance(obj, Mapping):
                return type(obj)(zip(keys, out)) if isinstance(obj, dict) else dict(zip(keys, out))
            return type(obj)(out) if type(obj) in (tuple, list) else tuple(out)

        return leaves, rebuild
    return [], lambda new: obj


class _CellUpdate(nn.Module):
    """``update_of(cell, z, u)`` as a module, for ``torch.func.functional_call``."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, z: State, u: Any) -> State:
        return update_of(self.cell, z, u)


def _autocast_of(x: Any) -> Optional[tuple[str, torch.dtype]]:
    """``(device_type, dtype)`` of the autocast active for ``x``'s device, or None."""
    if isinstance(x, torch.Tensor):
        device_type = x.device.type
    else:
        leaves, _ = _tensor_leaves(x)
        device_type = leaves[0].device.type if leaves else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


#: a context that does nothing (reusable; no allocation on the per-call path)
_NOTHING = contextlib.nullcontext()


def _cell_precision(amp: Optional[tuple[str, torch.dtype]]):
    if amp is None:
        return _NOTHING
    return torch.autocast(amp[0], dtype=amp[1])


def _solver_precision(amp: Optional[tuple[str, torch.dtype]]):
    if amp is None:
        return _NOTHING
    return torch.autocast(amp[0], enabled=False)


def _holding(cell: nn.Module, held: Mapping[str, torch.Tensor]):
    """:func:`hold_parametrized` for ``held``, or nothing to do when it is empty."""
    return hold_parametrized(cell, held) if held else _NOTHING


def _full_precision(z: State) -> State:
    if isinstance(z, torch.Tensor):
        return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return type(z)(_full_precision(t) for t in z)


def _cast_like(out: State, z: State) -> State:
    if isinstance(out, torch.Tensor) and isinstance(z, torch.Tensor):
        return out if out.dtype == z.dtype else out.to(z.dtype)
    if isinstance(out, (tuple, list)) and isinstance(z, (tuple, list)) and len(out) == len(z):
        return type(out)(_cast_like(o, r) for o, r in zip(out, z))
    return out


def _has_init_state(cell: nn.Module) -> bool:
    return isinstance(cell, Cell) or callable(getattr(cell, "init_state", None))


def _fused_problem(cell: nn.Module, x: Any, state0: torch.Tensor):
    """``(fn, z0, shape)`` of a DEQ's forward without grad, built inside the compiled call of
    :func:`implicit.compiled.solve_fused` (traced there, with the solve): the cell's map on
    flat ``(B, n)`` iterates with the injection of ``x`` bound, the flat initial state
    ``state0`` (made eagerly by the caller: an initial state of zeros made inside the traced
    call made every step of the ResNet cell's solve about 10 % slower, measured), and the
    state's shape. The map checks its output's shape, as the general path's
    ``StateSpec.flatten`` does (a wrong shape cannot be traced: the layer then takes its
    general path, which says what is wrong)."""
    u = injection_of(cell, x)
    shape = state0.shape
    batch = shape[0]

    def fn(z: torch.Tensor) -> torch.Tensor:
        state = z.view(shape)
        out = update_of(cell, state, u)
        if out.shape != shape:
            raise ValueError(f"f(z) has shape {tuple(out.shape)}, the state {tuple(shape)}")
        return _cast_like(out, state).reshape(batch, -1)

    return fn, state0.reshape(batch, -1), shape


#: the forward solve's name in warnings and errors (the general path's Problem says the same)
_FORWARD_SOLVE = "DEQ forward solve"


def flat_map(fn: Callable[[State], State], spec: StateSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` on structured states as a map of flat ``(B, n)`` tensors."""

    def flat(z: torch.Tensor) -> torch.Tensor:
        return spec.flatten(fn(spec.unflatten(z)), what="f(z)")

    return flat


def solve(
    fn: Callable[[State], State],
    z0: State,
    solver: str | Solver,
    *,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    stop: Optional[str] = None,
    policy: Optional[str] = None,
    **solver_options: Any,
) -> Solution:
    """Solve ``z = fn(z)`` from ``z0`` without building an autograd graph; return the record.

    ``z0`` is a tensor or tuple/list of tensors with the batch in dimension 0 (each sample is
    solved and judged on its own). ``solver`` is a registered name (``solver_options`` build it)
    or an :class:`implicit.Solver`. Example::

        sol = implicit.solve(lambda z: 0.5 * z + 1, torch.zeros(4, 3), solver="forward")
        sol.z, sol.converged, sol.status
    """
    spec = StateSpec.of(z0, what="z0")
    if isinstance(solver, Solver) and solver_options:
        raise TypeError("solver options are only for a solver given by name")
    algorithm = resolve_solver(
        solver, solver_options, tol=tol, max_iter=max_iter, stop=stop, policy=policy
    )
    with torch.no_grad():
        result = iterate(
            algorithm, flat_map(fn, spec), spec.flatten(z0, what="z0"), spec=spec, what="solve"
        )
    return result.solution


#: why the layer is a graph break under ``torch.compile`` (dynamo shows it with fullgraph=True)
COMPILE_BREAK_REASON = (
    "implicit.DEQ runs its solve eagerly (data-dependent stopping, per-sample records): it is a "
    "graph break under torch.compile, so compile the model with fullgraph=False (the default)")


def _eager_under_compile(method):
    """``method`` run eagerly inside a ``torch.compile``d model: the code around the layer is
    compiled, the solve and its autograd.Function backward run as they do in eager mode."""
    try:
        return torch.compiler.disable(method, reason=COMPILE_BREAK_REASON)
    except TypeError:  # a torch without the reason argument
        return torch.compiler.disable(method)


class DEQ(nn.Module):
    """A deep equilibrium layer: returns z* with ``z* = cell(z*, x)``.

    Args:
        cell: an :class:`implicit.Cell` or any module with ``forward(z, x)`` returning z.
        solver: a registered solver name or an :class:`implicit.Solver` instance; default
            ``"anderson"`` (m = 5), the fastest to tolerance on the bench's DEQ workloads
            (``implicit bench --quick``: 17 calls on the ResNet cell against forward
            iteration's 30, and the least time there).
        backward: a registered backward name or an :class:`implicit.BackwardStrategy`;
            default ``"ift"``, the implicit-function-theorem gradient: exact outside
            training and for tightly solved batches (to any order); for an inexact ``z*`` in
            training its ``training_adjoint`` (default ``"calibrated"``, see its docs).
        tol, max_iter, stop, policy: override the solver's stopping rule and failure policy
            (``policy``: ``"warn"``, ``"raise"`` or ``"ignore"``).
        eval_tol, eval_max_iter: stopping rule in eval mode (default: the training one).
        pretrain_steps, pretrain_backward: use ``pretrain_backward`` for the first
            ``pretrain_steps`` training-mode forwards, then ``backward`` (the deq repo's
            pre-training: e.g. ``pretrain_backward=make_backward("unrolled", depth=12)``).
        solver_options, backward_options: options for plugins given by name.
        jac_loss_weight, jac_loss_freq, jac_probes, jac_probe: Jacobian regularisation (Bai et
            al. 2021, the deq repo's ``jac_loss_weight``/``jac_loss_freq``): in training, with
            probability ``jac_loss_freq`` per forward, ``layer.jacobian_loss`` is
            ``jac_loss_weight`` × the batch mean of the Hutchinson estimate of
            ``‖J_f(z*)‖_F² / numel`` (:func:`implicit.stability.jacobian_frobenius`) — add it
            to your loss; otherwise it is a zero tensor. The per-sample estimate is in
            ``layer.solution.stats["jac_frobenius"]``.
        readout: what the layer returns: ``"state"``, the solver's ``z*`` (default), or
            ``"step"``, one more application of the cell to it, ``f(z*, x)``, evaluated with
            autograd on (the tutorial's ``DEQFixedPoint`` does this). At an exact fixed point
            the two agree; when a solve stops early ``f(z*)`` is one more step towards it,
            for the price of one cell call (and one VJP in backward). The gradient stays the
            backward strategy's: through ``f(z*(θ), θ)`` the IFT gives exactly
            ``(I − J)⁻¹ ∂f/∂θ`` again. ``"state"`` returns what the backward strategy returns,
            which is ``z*`` except where a strategy defines its training output otherwise:
            ``ift``'s default training adjoint (``"calibrated"``) returns ``f(z*)``, one more
            step with its graph, for a batch whose solve is inexact (``layer.solution.z`` is
            ``z*`` either way).
        compact: evaluate the cell only on the samples the forward solver still iterates,
            once at most 3/4 of the batch is (CPU; :func:`implicit.iterate`'s ``fn_rows``).
            ``None`` (default): when the cell declares ``batch_independent = True`` (the
            built-in cells do); ``True``: assert it for a cell that does not say;
            ``False``: never. Needs every tensor of the cell's injection batched in dim 0.
            In DEQ training most samples meet the tolerance well before the slowest one
            (MNIST-1D: mean 20 of 30 calls), and their share of each call is saved.
        spectral_iters: when > 0, every forward also reports ``‖J_f(z*)‖₂`` per sample in
            ``layer.solution.stats["jac_spectral_norm"]`` (power iteration on ``JᵀJ``, this
            many iterations at most; a contraction indicator).

    Under ``torch.autocast`` the cell runs in the autocast dtype and the solver in float32 (a
    low-precision state is promoted); samples that overflow are reported ``NONFINITE`` and their
    rows of ``z*`` are NaN, so a ``GradScaler`` skips the step.

    Cells whose weights are parametrized (``torch.nn.utils.parametrizations``, e.g. by
    :func:`implicit.stability.normalize_weights`) have every parametrized weight computed once
    per forward and held for the whole solve and its backward.

    ``layer(x, z0=None)`` solves from ``z0`` (warm start) or ``cell.init_state(x)`` (zeros
    shaped like ``x`` by default); ``layer.solution`` holds the last forward record and
    ``layer.backward_solution`` the last record a backward solve made (IFT adjoint).
    Example::

        layer = DEQ(make_cell("tanh", features=16), solver="forward", backward="ift")
        z = layer(torch.randn(8, 16)); z.sum().backward()
    """

    def __init__(
        self,
        cell: nn.Module,
        solver: str | Solver = "anderson",
        backward: str | BackwardStrategy = "ift",
        *,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        stop: Optional[str] = None,
        policy: Optional[str] = None,
        eval_tol: Optional[float] = None,
        eval_max_iter: Optional[int] = None,
        solver_options: Optional[Mapping[str, Any]] = None,
        backward_options: Optional[Mapping[str, Any]] = None,
        pretrain_steps: int = 0,
        pretrain_backward: str | BackwardStrategy | None = None,
        jac_loss_weight: float = 0.0,
        jac_loss_freq: float = 1.0,
        jac_probes: int = 1,
        jac_probe: str = "gaussian",
        spectral_iters: int = 0,
        readout: str = "state",
        compact: Optional[bool] = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            names = ", ".join(sorted(unknown))
            example = next(iter(sorted(unknown)))
            raise TypeError(
                f"DEQ got unexpected keyword argument(s) {names}. Solver and backward options "
                f"go in solver_options= / backward_options= (e.g. DEQ(cell, solver='anderson', "
                f"solver_options={{{example!r}: ...}})) or in the instances you pass "
                f"(solver=make_solver('anderson', {example}=...))")
        super().__init__()
        check_cell(cell)
        _warn_stateful_modules(cell)
        self.cell = cell
        self.solver = resolve_solver(
            solver, solver_options, tol=tol, max_iter=max_iter, stop=stop, policy=policy
        )
        self.eval_solver = resolve_solver(self.solver, tol=eval_tol, max_iter=eval_max_iter)
        self.backward = resolve_backward(backward, backward_options)
        check_compatible(self.solver, self.backward)
        check_value("pretrain_steps", pretrain_steps, nonnegative_int)
        if pretrain_steps and pretrain_backward is None:
            raise ValueError("pretrain_steps > 0 needs a pretrain_backward (e.g. 'unrolled')")
        self.pretrain_steps = pretrain_steps
        self.pretrain_backward = (
            resolve_backward(pretrain_backward) if pretrain_backward is not None else None
        )
        if self.pretrain_backward is not None:
            check_compatible(self.solver, self.pretrain_backward)
        self.jac_loss_weight = float(check_value("jac_loss_weight", jac_loss_weight,
                                                 nonnegative_number))
        self.jac_loss_freq = float(check_value("jac_loss_freq", jac_loss_freq, number_in(0, 1)))
        self.jac_probes = check_value("jac_probes", jac_probes, positive_int)
        self.jac_probe = check_value("jac_probe", jac_probe, one_of(*PROBES))
        self.spectral_iters = check_value("spectral_iters", spectral_iters, nonnegative_int)
        self.readout = check_value("readout", readout, one_of(*READOUTS))
        if compact not in (None, True, False):
            raise TypeError(f"compact must be None, True or False, got {compact!r}")
        self.compact = compact
        self.jacobian_loss: Optional[torch.Tensor] = None
        # training-mode forwards so far (a buffer: it survives state_dict round trips)
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.int64))
        # what a backward strategy fixes once for this layer (Problem.memory), saved in the
        # state_dict as extra state; a state_dict without it (older checkpoints) loads empty
        self._backward_memory: dict = {}
        self.register_load_state_dict_pre_hook(_default_extra_state)
        self.solution: Optional[Solution] = None
        self.backward_solution: Optional[Solution] = None
        # a compiled solver's forward without grad as one compiled call, injection included
        # (``_forward_fused``): None until a forward of that kind has taken the general path
        # and shown the cell's map traceable, False once the fused call failed where the
        # general path did not
        self._fuse: Optional[bool] = None

    def get_extra_state(self) -> dict:
        """What the backward strategy fixed once for this layer (``Problem.memory``)."""
        return {"backward_memory": copy.deepcopy(self._backward_memory)}

    def set_extra_state(self, state: dict) -> None:
        """Restore what :meth:`get_extra_state` saved."""
        self._backward_memory.clear()
        self._backward_memory.update(copy.deepcopy(state.get("backward_memory", {})))

    def _record_backward(self, solution: Solution) -> None:
        self.backward_solution = solution

    @_eager_under_compile
    def forward(self, x: Any, z0: Optional[State] = None) -> State:
        solver = self.solver if self.training else self.eval_solver
        backward = self.backward
        if self.training and self.pretrain_steps and int(self.train_steps) < self.pretrain_steps:
            backward = self.pretrain_backward
        fusable = (z0 is None and self._fuse is not False and not torch.is_grad_enabled()
                   and self._fusable(solver, backward, x))
        if fusable and self._fuse:
            try:
                return self._forward_fused(solver, x)
            except FusedUnavailable as exc:
                failure = exc
        else:
            failure = None
        z_star = self._forward(x, z0, solver, backward)
        if fusable:
            if failure is not None:  # the general path ran where the fused call could not
                self._fuse = False
                cause = failure.__cause__ or failure
                reason = short_reason(cause)
                warnings.warn(
                    "compile=True: this layer's forward without grad could not run the "
                    f"injection and the solve as one compiled call ({type(cause).__name__}: "
                    f"{reason}); its forwards run them apart (the same solve and record)",
                    CompiledFallbackWarning, stacklevel=3)
            else:
                # a single-tensor state whose map the compiled solve traced whole
                self._fuse = (isinstance(self.solution.z, torch.Tensor)
                              and self.solution.stats.get("loop") == "while")
        return z_star

    def _fusable(self, solver: Solver, backward: BackwardStrategy, x: Any) -> bool:
        """Whether a forward without grad can be one compiled call (``_forward_fused``): a
        solver compiled whole (``compile=True``, ``block=None``), a backward strategy that
        only solves when there is no graph, a tensor input, and nothing the layer does around
        the solve: no autocast, parametrizations, spectral telemetry or ``readout="step"``."""
        return (bool(solver.compile) and solver.block is None and type(solver).static
                and type(backward).solves_only_without_graph and isinstance(x, torch.Tensor)
                and self.readout == "state" and not self.spectral_iters
                and _autocast_of(x) is None and not _has_parametrizations(self.cell))

    def _forward_fused(self, solver: Solver, x: torch.Tensor) -> torch.Tensor:
        """The forward without grad as one compiled call: the injection, the initial state and
        the whole solve (:func:`implicit.compiled.solve_fused`); the same record as the
        general path's, with ``stats["fused"]``. Raises ``FusedUnavailable`` if the call
        cannot be made."""
        try:
            state0 = init_state_of(self.cell, x)
        except Exception as exc:  # bad input: the general path says what is wrong
            raise FusedUnavailable(str(exc)) from exc
        z, solution = solve_fused(solver, _fused_problem, self.cell, x, state0,
                                  x.device.type, what=_FORWARD_SOLVE)
        self.solution = solution
        if self.training:
            self.train_steps.add_(1)
        if self.jacobian_loss is not None:
            self.jacobian_loss = None
        return z

    def _forward(self, x: Any, z0: Optional[State], solver: Solver,
                 backward: BackwardStrategy) -> State:
        """The general forward: the problem built here, solved by the backward strategy."""
        cell = self.cell
        # parametrized weights (spectral/weight norm), computed once and held for the solve
        held = parametrized_tensors(cell)
        with _holding(cell, held):
            try:
                u = injection_of(cell, x)
            except RuntimeError as exc:  # a raw torch error deep in the cell: say what's wrong
                _explain_input_mismatch(cell, x, exc)
                raise
            expected = (init_state_of(cell, x) if z0 is None or _has_init_state(cell)
                        else None)
        if z0 is None:
            z0 = expected
        amp = _autocast_of(x)
        if amp is not None:  # the solver's state stays in full precision under autocast
            z0 = _full_precision(z0)
            expected = _full_precision(expected) if expected is not None else None
        spec = StateSpec.of(z0, what="z0")
        if expected is not None and expected is not z0:
            spec.parts(
                expected,
                what=f"the cell's state ({type(cell).__name__}.init_state(x))",
                hint="pass a z0 shaped like the cell's state",
            )

        u_leaves, rebuild_u = _tensor_leaves(u)
        if torch.is_grad_enabled():
            grad_u = [i for i, t in enumerate(u_leaves) if t.requires_grad]
            named = [(n, p) for n, p in cell.named_parameters()
                     if p.requires_grad and not (held and ".parametrizations." in f".{n}")]
            named += [(n, t) for n, t in held.items() if t.requires_grad]
        else:  # nothing is differentiated without grad: no inputs to take partials by
            grad_u, named = [], []
        inputs = tuple(u_leaves[i] for i in grad_u) + tuple(p for _, p in named)

        # under autocast the cell runs in low precision; its output is cast back to the state's
        # dtype so the solver's history, mixing and residuals stay in full precision

        if held or amp is not None:
            def fn(z: State) -> State:
                with _holding(cell, held), _cell_precision(amp):
                    return _cast_like(update_of(cell, z, u), z)
        else:  # the common case: no contexts to enter on every call
            def fn(z: State) -> State:
                return _cast_like(update_of(cell, z, u), z)

        def fn_with(z_flat: torch.Tensor, new_inputs,
                    rows: Optional[torch.Tensor] = None) -> torch.Tensor:
            # rows: the map on those samples only (z_flat holds their rows), for compaction
            leaves = list(u_leaves)
            for j, i in enumerate(grad_u):
                leaves[i] = new_inputs[j]
            new_params = new_inputs[len(grad_u):]
            state_spec = spec if rows is None else spec.with_batch(rows.numel())
            z = state_spec.unflatten(z_flat)
            current = dict(cell.named_parameters())  # may differ from forward time, e.g.
            # when the forward ran inside torch.func.functional_call
            values = {n: t for (n, _), t in zip(named, new_params)}
            with hold_parametrized(cell, {n: values.get(n, t) for n, t in held.items()}), \
                    _cell_precision(amp):
                u_new = rebuild_u(leaves) if rows is None else rows_of(rebuild_u(leaves), rows)
                if all(values[n] is current.get(n) for n in values if n not in held):
                    out = update_of(cell, z, u_new)
                else:
                    params = {f"cell.{n}": t for n, t in values.items() if n not in held}
                    out = torch.func.functional_call(_CellUpdate(cell), params, (z, u_new))
            return state_spec.flatten(_cast_like(out, z), what="f(z)")

        def fn_rows(z_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            sub = spec.with_batch(rows.numel())
            if rows_cache.get("rows") is not rows:  # the loop keeps one index while the
                # active set holds, so the injection's rows are gathered once per change
                rows_cache.update(rows=rows, u=rows_of(u, rows))
            z = sub.unflatten(z_rows)
            with _holding(cell, held), _cell_precision(amp):
                return sub.flatten(_cast_like(update_of(cell, z, rows_cache["u"]), z),
                                   what="f(z)")

        rows_cache: dict = {}
        compact = (getattr(cell, "batch_independent", False) if self.compact is None
                   else self.compact)
        # an implicit.Cell says how to take rows of its injection; a plain module's input x
        # is its injection, which must then be batched throughout
        rows_of = cell.injection_rows if isinstance(cell, Cell) else rows_of_batched
        batched_u = isinstance(cell, Cell) or all(
            t.dim() > 0 and t.shape[0] == spec.batch_size for t in u_leaves)
        if self.compact and not batched_u:
            raise ValueError(
                "DEQ(compact=True) evaluates the cell on subsets of the samples, which needs "
                "every tensor of its input batched in dimension 0; got shapes "
                f"{[tuple(t.shape) for t in u_leaves]} for a batch of {spec.batch_size}. "
                "Use compact=None (or False), or make the cell an implicit.Cell whose "
                "injection_rows says how to take rows")

        problem = Problem(
            fn_rows=fn_rows if compact and batched_u else None,
            fn=flat_map(fn, spec),
            z0=spec.flatten(z0, what="z0").detach(),
            inputs=inputs,
            fn_with=fn_with,
            spec=spec,
            on_backward_solution=self._record_backward,
            training=self.training,
            memory=self._backward_memory,
        )
        if self.training:
            self.train_steps.add_(1)  # (in place: no nn.Module.__setattr__ on every forward)
        with _solver_precision(amp):
            try:
                result = backward(problem, solver)
            except RuntimeError as exc:  # e.g. a plain module whose update meets x first
                _explain_input_mismatch(cell, x, exc)
                raise
        self.solution = result.solution
        self._stability_telemetry(problem, result.z)
        z_star = result.z
        if self.readout == "step":
            with _solver_precision(amp):
                z_star = problem.fn(z_star)
        if amp is not None:
            # an overflowing low-precision cell: the non-finite samples stay non-finite, so the
            # loss and gradients are too and a GradScaler skips the step (no exception)
            nonfinite = result.solution.sample_status == Status.NONFINITE.code
            if bool(nonfinite.any()):
                z_star = torch.where(nonfinite.to(z_star.device)[:, None],
                                     torch.full_like(z_star, float("nan")), z_star)
        return spec.unflatten(z_star)

    def _stability_telemetry(self, problem: Problem, z_star: torch.Tensor) -> None:
        """The Jacobian term and the spectral estimate at ``z*``, as the options ask."""
        stats = {}
        if self.jacobian_loss is not None:  # (nn.Module's __setattr__ is not free)
            self.jacobian_loss = None
        if self.training and self.jac_loss_weight > 0 and problem.needs_graph:
            draw = self.jac_loss_freq >= 1 or bool(torch.rand(()) < self.jac_loss_freq)
            if draw:
                estimate = jacobian_frobenius(problem.fn, z_star, probes=self.jac_probes,
                                              probe=self.jac_probe)
                self.jacobian_loss = self.jac_loss_weight * estimate.mean()
                stats["jac_frobenius"] = estimate.detach()
            else:
                self.jacobian_loss = z_star.new_zeros(())
        if self.spectral_iters:
            stats["jac_spectral_norm"] = jacobian_spectral_norm(
                problem.fn, z_star, iters=self.spectral_iters)
        if stats:
            self.solution = attrs.evolve(self.solution,
                                         stats={**self.solution.stats, **stats})

    def __getstate__(self) -> dict:
        # the Jacobian term carries a graph (not copyable or picklable); it is per-forward
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "jacobian_loss": None}

    def extra_repr(self) -> str:
        readout = f",\nreadout={self.readout!r}" if self.readout != "state" else ""
        return f"solver={self.solver!r},\nbackward={self.backward!r}{readout}"
