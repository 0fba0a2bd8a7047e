"""Implicit-function-theorem backward (Bai, Kolter & Koltun, "Deep Equilibrium Models", 2019).

At ``z* = f(z*, θ)`` the implicit function theorem gives, for an upstream gradient ``y``,
``dL/dθ = wᵀ ∂f/∂θ`` where ``w`` solves the adjoint fixed point ``w = Jᵀ w + y`` with
``J = ∂f/∂z (z*)``. The pattern:

* the forward solve runs under ``no_grad`` — no graph, O(1) memory in depth;
* during backward, ``f`` is re-evaluated once on a detached copy of ``z*``; the adjoint is solved
  with a registered solver (one VJP per call) and one more VJP gives the gradients of ``x`` and
  the parameters; the graph is freed when backward returns.

The adjoint is solved per sample for ``w / ‖y‖`` with an absolute tolerance, i.e. the
tolerance is relative to the size of the incoming gradient, so a loss-scaled gradient stops at
the same point.

**Exact outside training.** In ``eval()`` (``Problem.training`` false: contract checks,
evaluation) the adjoint is the exact one, solved to the adjoint's tolerance. So it is in
training for every sample whose ``z*`` has a relative residual at or below ``exact_below``
(1e-8): a layer whose solves converge tightly gives the true derivative in either mode
(``torch.autograd.gradcheck`` on a fresh, training-mode layer passes).

**The training adjoint** (``training_adjoint``). In real DEQ training the forward solve stops at
its cap, where ``ρ(J)`` is near or above 1 and the exact adjoint ``(I − Jᵀ)⁻¹ y`` amplifies, or
flips, the directions in which an inexact ``z*`` is least accurate. For a batch with an inexact
``z*`` the layer forms, in training:

* ``"calibrated"`` (default): the layer returns one more step ``f(z*)`` with the graph of that
  step, and ``w`` is a windowed averaged iteration with the Jacobian at ``f(z*)`` (the gradient
  structure of torchdeq; Geng & Kolter, "TorchDEQ", 2023), its mixing ridge fixed once in units
  of the first training batch's mean ``‖y‖²`` so that scaling the loss does not change it;
* ``"damped"``: ``w = (1 − δ) Jᵀ w + y`` solved by the adjoint solver (``δ = damping``), the
  exact gradient of ``(1 − δ)``-shrunk Jacobians;
* ``"relaxed"`` and ``"averaged"``: truncated iterations returning their last iterate.

The default is chosen on a family of eight training setups (two datasets, widths 16/32/48,
batch/group norm, flatten/pooled heads, two learning rates; docs/results/training-family.md).

**Higher derivatives.** Under ``create_graph=True`` the backward is itself built from
differentiable pieces: ``z*`` is this layer's saved output (so its dependence on θ is known),
partial derivatives are taken through fresh views (so they follow only the direct path), and
the adjoint ``w`` is returned by the same implicit-layer function applied to the linear map
``w ↦ Jᵀ w + y`` — its own backward is another adjoint solve, ``v = J v + u``, whose products
``J v`` come from double backward through the VJP. Exact (``gradgradcheck`` passes) wherever
the first-order adjoint is. ``"calibrated"`` is first order only (a clear error under
``create_graph=True``); a tightly solved ``z*`` gets the exact adjoint, of any order.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import attrs
import torch
from attrs import validators as v

import implicit
from implicit.registry import get_registry
from implicit.validators import (nonnegative_number, number_in, one_of,
                                 optional_nonnegative_number, optional_positive_int,
                                 positive_int)

MapWith = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]
DAMPING = 0.1  # training_adjoint="damped"'s δ
#: the forward relative residual at or below which the training adjoint is exact (float64
#: gradient checks solve to ~1e-10; a float32 solve cannot get below ~1e-7)
EXACT_BELOW = 1e-8
#: ``training_adjoint``'s values, and the relaxation of ``"relaxed"`` (measured on the near
#: variant of the parity recipe: benchmarks/results/cpu-training-family/causes.json)
TRAINING_ADJOINTS: tuple[str, ...] = ("damped", "relaxed", "averaged", "calibrated")
RELAXATION = 1 / 3
#: the window of ``training_adjoint="calibrated"`` (torchdeq's Anderson history) and of
#: ``"averaged"`` (the tutorial's), when ``window`` is None
WINDOW = {"calibrated": 6, "averaged": 5}
RIDGE = 30.0


def _solver_or_name(instance, attribute, value):
    if value is not None and not isinstance(value, (str, implicit.Solver)):
        raise TypeError(
            f"solver must be None, a registered solver name or an implicit.Solver, got "
            f"{type(value).__name__}"
        )
    if isinstance(value, str):  # a misspelt name fails here, not at the first backward
        get_registry().get("solver", value)


def _optional_positive(instance, attribute, value):
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and 0 < value < float("inf")):
        raise ValueError(f"{attribute.name} must be None (the plain average) or a positive "
                         f"number (a ridge of 0 can leave the mixing system singular), got "
                         f"{value!r}")


def _compile_option(instance, attribute, value):
    if value is not None and not isinstance(value, (bool, str)):
        raise TypeError(f"compile must be None, True, False or a torch.compile backend name, "
                        f"got {type(value).__name__}")


@attrs.frozen(kw_only=True)
class ImplicitBackward(implicit.BackwardStrategy):
    """Gradient by the implicit function theorem (adjoint ``w = Jᵀ w + y``), any order; exact
    outside training, and in training for a tightly solved ``z*``; otherwise the training
    adjoint ``training_adjoint`` (default ``"calibrated"``, see the module docstring)."""

    name: ClassVar[str] = "ift"
    solves_only_without_graph: ClassVar[bool] = True  # no graph: the solve alone

    solver: Union[str, implicit.Solver, None] = attrs.field(
        default=None, validator=_solver_or_name
    )
    tol: Optional[float] = attrs.field(default=None, validator=optional_nonnegative_number)
    max_iter: Optional[int] = attrs.field(default=None, validator=optional_positive_int)
    policy: Optional[str] = attrs.field(
        default=None, validator=v.optional(one_of("warn", "raise", "ignore"))
    )
    #: ``training_adjoint="damped"``'s ``δ``: the adjoint solved is ``w = (1 − δ) Jᵀ w + y``
    #: (default 0.1). Given without ``training_adjoint``, it selects ``"damped"``: ``damping=0``
    #: is the exact adjoint in training too, as it was when ``"damped"`` was the default
    damping: Optional[float] = attrs.field(
        default=None, validator=v.optional(number_in(0, 1, high_open=True)))
    #: a sample whose forward solution has a relative residual ``‖f(z*) − z*‖ / ‖f(z*)‖`` at
    #: or below this gets the exact adjoint in training too: the training adjoint corrects for
    #: an inexact ``z*`` and has nothing to correct at an exact one, so a layer whose solves
    #: converge tightly (``torch.autograd.gradcheck`` in float64) gives the true derivative in
    #: either mode. 0: every batch gets the training adjoint. The backward record says how many
    #: samples were damped (``layer.backward_solution.stats["damped"]``, ``"damped"`` mode)
    exact_below: float = attrs.field(default=EXACT_BELOW, validator=nonnegative_number)
    #: the adjoint formed in training for a batch whose ``z*`` is inexact (some sample above
    #: :attr:`exact_below`):
    #:
    #: - ``"calibrated"`` (default): the layer returns one more step ``f(z*)`` with the
    #:   autograd graph of that step (its gradient to the parameters ``(∂f/∂θ at z*)ᵀ w``),
    #:   and ``w`` is the averaged iteration (below) with the Jacobian at ``f(z*)``, its ridge
    #:   fixed once in units of the mean ``‖y‖²`` of the layer's first training batch (so
    #:   the mix averages more as the gradients shrink over training, while a loss
    #:   scaled by a constant trains the same), returning each sample's image of lowest
    #:   relative residual from the second call on. The unit is the layer's: it is saved in
    #:   the layer's ``state_dict`` and kept on resume, and layers sharing one strategy each
    #:   keep their own;
    #: - ``"damped"``: ``w = (1 − damping) Jᵀ w + y`` solved by the adjoint solver;
    #: - ``"relaxed"``: ``max_iter`` steps of ``w ← (1 − relaxation) w + relaxation (Jᵀ w +
    #:   y)`` from ``w = y``, the last iterate;
    #: - ``"averaged"``: from ``u = 0`` each of at most ``max_iter`` calls maps the mix of the
    #:   last ``window`` images, ``F ← Jᵀ mix(F) + y`` (Anderson weights regularised by
    #:   :attr:`ridge` in units of the batch's mean ``‖y‖²``), the last image.
    #:
    #: The truncated modes (all but ``"damped"``) stop at their cap by design: their records
    #: say MAX_ITER and they do not warn. Results per mode: docs/results/training-family.md
    #: None: ``"calibrated"``, or ``"damped"`` when ``damping`` is given
    training_adjoint: Optional[str] = attrs.field(
        default=None, validator=v.optional(one_of(*TRAINING_ADJOINTS)))
    #: the relaxation ``β`` of ``training_adjoint="relaxed"``
    relaxation: float = attrs.field(default=RELAXATION, validator=number_in(0, 1, low_open=True))
    #: the number of images the calibrated and averaged adjoints mix; None: 6 for
    #: ``"calibrated"`` (torchdeq's history), 5 for ``"averaged"`` (the tutorial's)
    window: Optional[int] = attrs.field(default=None, validator=v.optional(positive_int))
    #: the mixing of the calibrated and averaged adjoints: Anderson weights over the window
    #: with, for every sample ``b``, the ridge ``ridge · unit / ‖y_b‖²`` on its own scale —
    #: samples with large gradients against the unit are mixed by Anderson's
    #: residual-minimising weights, those with small ones averaged. None: the plain average
    ridge: Optional[float] = attrs.field(default=RIDGE, validator=_optional_positive)
    #: the adjoint solve compiled (:mod:`implicit.compiled`; the exact and damped adjoints,
    #: which are solves — the calibrated, averaged and relaxed training adjoints run their own
    #: eager loops): None (default) only when
    #: ``solver`` is a compiled solver; True (inductor) or a torch.compile backend name: the
    #: adjoint solver with that ``compile`` (forward iteration, Anderson); False: never. A
    #: compiled adjoint takes its products ``Jᵀ w`` by ``torch.func.vjp``, re-evaluating the
    #: cell at ``z*`` in each (one more cell call per product), so the whole adjoint solve is
    #: one ``torch.while_loop``; on a small state that beats the eager loop (tanh d=256:
    #: training steps 1.5–2.3× faster with both solves compiled), on a large one (the ResNet
    #: cell) the extra cell call costs more than it saves (``implicit bench --compile``, docs
    #: "Compiled solves")
    compile: Union[None, bool, str] = attrs.field(default=None, validator=_compile_option)
    #: ``training_adjoint="calibrated"``'s unit of ridge for problems without a layer's
    #: memory (``Problem.memory``; a ``DEQ`` keeps the unit in its own state_dict), set by the
    #: first training backward (``{"mean_square": mean ‖y‖²}``); not copied by ``attrs.evolve``
    _calibration: dict = attrs.field(factory=dict, init=False, eq=False, repr=False)

    @property
    def regularises_in_training(self) -> bool:
        return self.damping > 0 or self.training_adjoint != "damped"

    def __attrs_post_init__(self) -> None:
        # resolved once, so that repr, equality and attrs.evolve see the values in force
        if self.training_adjoint is None:
            mode = "calibrated" if self.damping is None else "damped"
            object.__setattr__(self, "training_adjoint", mode)
        if self.damping is None:
            object.__setattr__(self, "damping", DAMPING)

    @property
    def mix_window(self) -> int:
        """The window the calibrated or averaged adjoint mixes (``window``, or its default)."""
        if self.window is not None:
            return int(self.window)
        return WINDOW.get(self.training_adjoint, WINDOW["calibrated"])

    def relaxed_solver(self, adjoint_solver: implicit.Solver) -> implicit.Solver:
        """``training_adjoint="relaxed"``'s solver: forward iteration with ``beta =
        relaxation`` returning its last iterate, with the adjoint's stop, tol and cap."""
        # the first-party class itself, not the registry's "forward": the mode must not
        # depend on which solvers a registry holds
        from implicit_solvers.forward import ForwardIteration

        return ForwardIteration(beta=float(self.relaxation), returns="last", stop="abs",
                                tol=adjoint_solver.tol, max_iter=adjoint_solver.max_iter,
                                policy="ignore")

    def gain(self, forward: implicit.Solution, z_star: torch.Tensor) -> Union[float, torch.Tensor]:
        """``1 − damping`` for the samples the training adjoint damps (those whose forward
        relative residual is above :attr:`exact_below`), 1 for the others: a float when it is
        the same for every sample, else a ``(B, 1)`` tensor."""
        if self.damping == 0 or self.training_adjoint != "damped":
            return 1.0
        inexact = ~(forward.rel_residual <= self.exact_below)  # NaN counts as inexact
        count = int(inexact.sum())
        if count == inexact.numel():
            return 1.0 - float(self.damping)
        if count == 0:
            return 1.0
        damped = torch.full_like(forward.rel_residual, 1.0 - float(self.damping))
        return torch.where(inexact, damped, torch.ones_like(damped)).to(z_star)[:, None]

    def adjoint_solver(self, forward_solver: implicit.Solver) -> implicit.Solver:
        """The solver of the adjoint: ours (by name or instance) or the forward one, with the
        adjoint's tol/max_iter/policy (defaults: the forward solver's) and an abs stop."""
        if self.solver is None:
            base = forward_solver
        elif isinstance(self.solver, str):
            base = get_registry().make("solver", self.solver)
        else:
            base = self.solver
        overrides: dict[str, Any] = {
            "stop": "abs",
            "tol": forward_solver.tol if self.tol is None else self.tol,
            "max_iter": forward_solver.max_iter if self.max_iter is None else self.max_iter,
            "policy": forward_solver.policy if self.policy is None else self.policy,
        }
        if self.compile is not None:
            overrides["compile"] = self.compile
        elif self.solver is None and forward_solver.compile:
            # a compiled adjoint re-evaluates the cell in every product (see `compile`): on a
            # convolutional cell that costs more than the loop it saves, so a compiled forward
            # solver's adjoint runs eagerly unless asked (compile=True, or a compiled solver)
            overrides["compile"] = False
        if overrides.get("compile") and getattr(base, "threads", None) is not None:
            # the forward's thread count is for its eager loop; compiled kernels fix their own
            overrides["threads"] = None
        try:
            return attrs.evolve(base, **overrides)
        except (TypeError, ValueError) as exc:
            if "compile" not in overrides or not overrides["compile"]:
                raise
            raise type(exc)(f"ift(compile={self.compile!r}): the adjoint solver "
                            f"{base.name!r} cannot be compiled: {exc}") from exc

    def __call__(self, problem: implicit.Problem, solver: implicit.Solver) -> implicit.FlatResult:
        result = self.solve_without_graph(problem, solver)
        if not problem.needs_graph:
            return result
        z_star = result.z
        gain = self.gain(result.solution, z_star) if problem.training else 1.0
        adjoint_solver = self.adjoint_solver(solver)
        averaged = None
        if (problem.training and self.training_adjoint != "damped"
                and not bool((result.solution.rel_residual <= self.exact_below).all())):
            if self.training_adjoint == "relaxed":
                adjoint_solver = self.relaxed_solver(adjoint_solver)
            elif self.training_adjoint == "calibrated":
                # the unit is the layer's (saved with it) where the problem comes from a layer
                calibration = (self._calibration if problem.memory is None
                               else problem.memory.setdefault("ift:calibrated", {}))
                averaged = _Averaged(window=self.mix_window, ridge=self.ridge,
                                     calibration=calibration, lowest=True)
            else:
                averaged = _Averaged(window=self.mix_window, ridge=self.ridge)
            gain = 1.0
        context = _Context(
            map_with=problem.fn_with,
            solver=adjoint_solver,
            on_record=problem.on_backward_solution,
            what="IFT adjoint solve",
            gain=gain,
            rows=problem.fn_rows is not None,
            averaged=averaged,
        )
        if averaged is not None and averaged.calibration is not None:
            # torchdeq's structure: one more step with its graph, the adjoint taken there
            with torch.enable_grad():
                stepped = problem.fn_with(z_star.detach(), problem.inputs)
            z = _AdjointAtOutput.apply(stepped, context, *problem.inputs)
            return attrs.evolve(result, z=z)
        z = _FixedPoint.apply(z_star, context, *problem.inputs)
        return attrs.evolve(result, z=z)


@attrs.frozen
class _Averaged:
    """The averaged training adjoint's settings: its window, its ridge (None: the plain
    average) in units of the batch's mean ``‖y‖²`` — or, with ``calibration``, of the first
    batch's (stored there) — and whether the lowest-residual image is returned (else the
    last)."""

    window: int
    ridge: Optional[float]
    calibration: Optional[dict] = attrs.field(default=None, eq=False)
    lowest: bool = False


class _AdjointAtOutput(torch.autograd.Function):
    """``training_adjoint="calibrated"``: the layer's output is ``f(z*)`` (``stepped``, with the
    graph of that step); its backward replaces the upstream ``y`` by the adjoint ``w`` solved
    with the Jacobian at ``f(z*)``, which the step's graph then carries to the inputs. First
    order only: the step is taken from a detached ``z*``, so a second derivative would miss
    every term through ``z*``; under ``create_graph=True`` it raises instead."""

    @staticmethod
    def forward(ctx, stepped, context, *inputs):
        ctx.context = context
        ctx.save_for_backward(stepped.detach(), *inputs)
        return stepped.clone()

    @staticmethod
    def backward(ctx, y):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ift(training_adjoint='calibrated') differentiates once: backward with "
                "create_graph=True (a gradient penalty, force matching, a Hessian) through a "
                "layer in training whose forward solve is above exact_below needs "
                "make_backward('ift', training_adjoint='damped'), or the layer in eval()")
        at, *inputs = ctx.saved_tensors
        context: _Context = ctx.context
        with torch.enable_grad():
            z = at.detach().requires_grad_()
            fz = context.map_with(z, [t.detach() for t in inputs])
        w = _solve_adjoint(context, _vjp_fn(fz, z), y)
        return (w, None, *[None for _ in inputs])


@attrs.frozen(eq=False)
class _Context:
    """What the implicit function needs besides tensors: the map, the adjoint solver, a sink for
    the adjoint record. ``map_with(z, inputs)`` evaluates the map with the given inputs."""

    map_with: MapWith
    solver: implicit.Solver
    on_record: Optional[Callable[[implicit.Solution], None]]
    what: str
    # 1 − damping: the adjoint solved is w = gain · Jᵀ w + y; a (B, 1) tensor when the
    # samples differ (see ImplicitBackward.gain)
    gain: Union[float, torch.Tensor] = 1.0
    rows: bool = False  # map_with takes a row subset (the cell is batch-independent)
    # training_adjoint="averaged" or "calibrated": the averaged iteration (None: the solver)
    averaged: Optional[_Averaged] = None


#: an adjoint restricted to a subset S of the samples rebuilds its graph on the active rows
#: once they are at most this share of S (each rebuild is one cell call on those rows)
REBUILD_BELOW = 0.75


def _vjp_rows_fn(map_with: MapWith, z_star: torch.Tensor, inputs: Sequence[torch.Tensor]):
    """``vjp_rows(w_rows, rows)``: ``Jᵀ w`` on the samples ``rows`` only, through a graph of f
    on a superset ``S`` of them (rebuilt on ``rows`` once they are at most REBUILD_BELOW of
    ``S``; the active rows only shrink, so ``rows ⊆ S`` always)."""
    cache: dict = {}

    def vjp_rows(w_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        subset = cache.get("rows")
        if subset is None or rows.numel() <= REBUILD_BELOW * subset.numel():
            with torch.enable_grad():
                z = z_star.index_select(0, rows).detach().requires_grad_()
                cache.update(rows=rows, z=z, fz=map_with(z, inputs, rows))
            subset = rows
        z, fz = cache["z"], cache["fz"]
        if not fz.requires_grad:
            return torch.zeros_like(w_rows)
        if rows.numel() == subset.numel():  # rows ⊆ S of the same size: rows is S
            (out,) = torch.autograd.grad(fz, z, w_rows, retain_graph=True, allow_unused=True)
            return torch.zeros_like(w_rows) if out is None else out
        where = torch.searchsorted(subset, rows)
        w = w_rows.new_zeros(subset.numel(), w_rows.shape[1]).index_copy_(0, where, w_rows)
        (out,) = torch.autograd.grad(fz, z, w, retain_graph=True, allow_unused=True)
        return torch.zeros_like(w_rows) if out is None else out.index_select(0, where)

    return vjp_rows


def _solve_adjoint(ctx: _Context, vjp: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor,
                   vjp_rows: Optional[Callable] = None):
    """``w = vjp(w) + y`` per sample, relative to ‖y‖ (solved for w/‖y‖), without a graph;
    ``vjp_rows`` (see :func:`_vjp_rows_fn`) lets the loop skip samples that have stopped."""
    scale = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y_hat = (y / scale).detach()
    with torch.no_grad():
        gain = ctx.gain
        if isinstance(gain, torch.Tensor):  # per sample
            adjoint_map = lambda w: torch.addcmul(y_hat, gain, vjp(w))  # noqa: E731
        elif gain == 1:
            adjoint_map = lambda w: vjp(w) + y_hat  # noqa: E731
        elif ctx.solver.compile:
            # not torch.add(..., alpha=gain): inductor (torch 2.13) drops the alpha of an add
            # whose operand comes out of a torch.func.vjp pullback (measured: the damped
            # adjoint solved undamped, gradients 4% off)
            adjoint_map = lambda w: y_hat + gain * vjp(w)  # noqa: E731
        else:
            adjoint_map = lambda w: torch.add(y_hat, vjp(w), alpha=gain)  # noqa: E731
        adjoint_rows = None
        if vjp_rows is not None:
            def adjoint_rows(w_rows, rows):
                if isinstance(gain, torch.Tensor):
                    return torch.addcmul(y_hat.index_select(0, rows), gain.index_select(0, rows),
                                         vjp_rows(w_rows, rows))
                return torch.add(y_hat.index_select(0, rows), vjp_rows(w_rows, rows),
                                 alpha=gain)
        if ctx.averaged is not None:
            settings = ctx.averaged
            ridge = settings.ridge
            if ridge is not None:  # per sample, in units of its own ‖y‖² (= 1 here)
                squares = scale.squeeze(1) ** 2
                unit = squares.mean()
                if settings.calibration is not None:  # the first training batch's, kept
                    if "mean_square" not in settings.calibration:
                        settings.calibration["mean_square"] = float(unit)
                    unit = settings.calibration["mean_square"]
                ridge = (ridge * unit / squares)[:, None]
            w_hat, record = _averaged(adjoint_map, y_hat, settings.window, ridge, ctx.solver,
                                      lowest=settings.lowest)
        else:
            result = implicit.iterate(ctx.solver, adjoint_map, y_hat, what=ctx.what,
                                      fn_rows=adjoint_rows)
            w_hat, record = result.z, result.solution
    record = attrs.evolve(record, nvjp=record.n_calls)
    damped = (int((gain != 1).sum()) if isinstance(gain, torch.Tensor)
              else (y.shape[0] if gain != 1 else 0))
    record.stats.update(damped=damped, gain=float(gain.min()) if isinstance(gain, torch.Tensor)
                        else float(gain))
    if ctx.on_record is not None:
        ctx.on_record(record)
    return (w_hat * scale).detach()


def _averaged(adjoint_map: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor,
              window: int, ridge: Optional[torch.Tensor], solver: implicit.Solver,
              lowest: bool = False) -> tuple[torch.Tensor, implicit.Solution]:
    """``training_adjoint="averaged"``: from ``u = 0`` (whose image is ``y``, no call), each
    call maps the mix of the last ``window`` images, ``F ← adjoint_map(Σ α_i F_i)``, for at
    most ``solver.max_iter`` calls; returns the last image of each sample and its record. The
    weights ``α ∝ (GGᵀ + ridge_b I)⁻¹ 1`` come from the residuals ``G_i = F_i − u_i`` of the
    window (``ridge``: ``(B, 1)``, per sample), or are uniform (``ridge=None``). ``lowest``:
    each sample's image of lowest relative residual ``‖F − u‖ / ‖F‖`` from the second call on
    is returned instead (torchdeq's Anderson's).

    A sample stops (its image is kept) once ``‖F − u‖ ≤ solver.tol`` (``y`` is normalised, so
    this is relative to ‖y‖); the solve ends when every sample has stopped or at the cap. For
    ``ρ(J) < 1`` the plain average converges to the exact adjoint; capped, it is a polynomial
    in ``Jᵀ`` whose growth along an eigenvalue ``λ > 1`` is slower than ``λ`` per call (for
    ``window = 5``, ``λ = 1.5``: about 1.15 per call)."""
    batch = y.shape[0]
    # the window as ring buffers: images F, residuals G = F − u, and the Gram matrix GGᵀ, of
    # which each call computes one new row (the weights do not depend on the slots' order)
    images = y.new_zeros(batch, window, y.shape[1])
    residuals = torch.zeros_like(images) if ridge is not None else None
    gram = y.new_zeros(batch, window, window) if ridge is not None else None
    ones = y.new_ones(batch, window, 1)  # the right-hand side of every mix's small system
    images[:, 0] = y
    if ridge is not None:
        residuals[:, 0] = y  # u = 0
        gram[:, 0, 0] = (y * y).sum(dim=1)
    filled = 1
    w = y
    active = torch.ones(batch, dtype=torch.bool, device=y.device)
    nfe = torch.zeros(batch, dtype=torch.int64, device=y.device)
    abs_res = torch.full((batch,), float("inf"), dtype=y.dtype, device=y.device)
    rel_res = abs_res.clone()
    calls = 0
    tol = float(solver.tol)
    tiny = torch.finfo(y.dtype).tiny
    while calls < solver.max_iter and bool(active.any()):
        k = min(filled, window)
        if k == 1:  # the latest image: y, or every image when window = 1
            u = images[:, (filled - 1) % window]
        elif ridge is None:
            u = images[:, :k].mean(dim=1)
        else:
            system = gram[:, :k, :k].clone()
            system.diagonal(dim1=-2, dim2=-1).add_(ridge)  # (B, 1): per sample
            # symmetric positive definite (ridge > 0): a Cholesky solve, half LU's cost here
            factor, _ = torch.linalg.cholesky_ex(system)
            weights = torch.cholesky_solve(ones[:, :k], factor)
            weights = weights / weights.sum(dim=1, keepdim=True)
            u = torch.bmm(weights.transpose(1, 2), images[:, :k]).squeeze(1)
        image = adjoint_map(u)
        calls += 1
        nfe += active
        residual = image - u
        diff = torch.linalg.vector_norm(residual, dim=1)
        rel = diff / torch.linalg.vector_norm(image, dim=1).clamp_min(tiny)
        keep = active if not lowest else active & ((rel < rel_res) | (calls <= 2))
        abs_res = torch.where(keep, diff, abs_res)
        rel_res = torch.where(keep, rel, rel_res)
        w = torch.where(keep[:, None], image, w)
        active = active & ~(diff <= tol)
        slot = filled % window
        filled += 1
        images[:, slot] = image
        if ridge is not None:
            residuals[:, slot] = residual
            k = min(filled, window)
            # (B, 1, n) @ (B, n, k): the fast layout for a batched row (3× (B, k, n) @ (B, n, 1))
            row = torch.bmm(residual.unsqueeze(1), residuals[:, :k].transpose(1, 2)).squeeze(1)
            gram[:, slot, :k] = row
            gram[:, :k, slot] = row
    finite = torch.isfinite(abs_res)
    converged = finite & (abs_res <= tol)
    codes = torch.where(converged, implicit.Status.CONVERGED.code,
                        torch.where(finite, implicit.Status.MAX_ITER.code,
                                    implicit.Status.NONFINITE.code)).to(torch.int8)
    status = implicit.Status.from_code(int(codes.max()))
    record = implicit.Solution(
        z=w.detach(), nfe=nfe, abs_residual=abs_res, rel_residual=rel_res, converged=converged,
        sample_status=codes, n_calls=calls, status=status, tol=tol, stop="abs",
        solver=f"averaged(window={window})", stats={"loop_steps": calls})
    return w, record


def _vjp_fn(fz: torch.Tensor, z: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def vjp(w: torch.Tensor) -> torch.Tensor:
        if not fz.requires_grad:  # the map does not depend on z: J = 0
            return torch.zeros_like(w)
        (out,) = torch.autograd.grad(fz, z, w, retain_graph=True, allow_unused=True)
        return torch.zeros_like(w) if out is None else out

    return vjp


def _traceable_vjp(map_with: MapWith, z_star: torch.Tensor,
                   inputs: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``Jᵀ w`` at ``z*`` by ``torch.func.vjp``, the map re-evaluated in every call: nothing
    crosses calls but tensors, so a compiled adjoint solve traces it into its loop (the
    autograd-graph product of :func:`_vjp_fn` is a graph break)."""

    def vjp(w: torch.Tensor) -> torch.Tensor:
        _, pullback = torch.func.vjp(lambda z: map_with(z, inputs), z_star)
        return pullback(w)[0]

    return vjp


def _views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # Fresh views: autograd.grad with respect to them follows only the paths through them,
    # which is how we take a *partial* derivative while keeping the graph of what they alias.
    return [t.view_as(t) for t in tensors]


class _FixedPoint(torch.autograd.Function):
    """``z*`` (a fixed point of ``map_with(·, inputs)``) as a differentiable function of the
    inputs: backward solves ``w = Jᵀ w + y`` and returns ``wᵀ ∂map/∂inputs``."""

    @staticmethod
    def forward(ctx, z_star, context, *inputs):
        out = z_star.clone()
        ctx.context = context
        ctx.save_for_backward(out, *inputs)
        return out

    @staticmethod
    def backward(ctx, y):
        z_saved, *inputs = ctx.saved_tensors
        context: _Context = ctx.context
        needs = ctx.needs_input_grad[2:]
        if not torch.is_grad_enabled():
            # First order: one evaluation of the map on a detached copy of z*. Non-leaf inputs
            # (the injection) are detached too, so the gradients below are partials: a
            # parameter that also feeds the injection gets that path from autograd, once.
            with torch.enable_grad():
                z = z_saved.detach().requires_grad_()
                partial = [t if t.grad_fn is None else t.detach().requires_grad_(t.requires_grad)
                           for t in inputs]
                fz = context.map_with(z, partial)
            if context.solver.compile:
                # products that dynamo can trace (no autograd graph across calls): the adjoint
                # solve is one compiled while loop; no row compaction in compiled solves
                vjp, vjp_rows = _traceable_vjp(context.map_with, z_saved.detach(), partial), None
            else:
                vjp = _vjp_fn(fz, z)
                vjp_rows = (_vjp_rows_fn(context.map_with, z_saved, partial) if context.rows
                            else None)
            w = _solve_adjoint(context, vjp, y, vjp_rows)
            wanted = [t for t, need in zip(partial, needs) if need]
            grads = iter(
                torch.autograd.grad(fz, wanted, w, allow_unused=True) if wanted else ()
            )
            return (None, None, *[next(grads) if need else None for need in needs])

        # Higher order: every step below is differentiable. z_saved is our own output, so
        # through it the result depends on the inputs the way z* does.
        z_view, in_views = z_saved.view_as(z_saved), _views(inputs)
        fz = context.map_with(z_view, in_views)
        w_star = _solve_adjoint(context, _vjp_fn(fz, z_view), y)
        adjoint = _Context(
            map_with=_adjoint_map(context.map_with, context.gain),
            solver=context.solver,
            on_record=None,
            what=context.what + " (differentiated)",
        )  # the damping is inside this map already
        w = _FixedPoint.apply(w_star, adjoint, y, z_saved, *inputs)
        grads = torch.autograd.grad(fz, in_views, w, create_graph=True, allow_unused=True)
        return (None, None, *[g if need else None for g, need in zip(grads, needs)])


def _adjoint_map(map_with: MapWith, gain: float = 1.0) -> MapWith:
    """The adjoint's map ``w ↦ gain · J(z, inputs)ᵀ w + y`` as a function of
    ``(w, (y, z, *inputs))``, differentiable in every argument (its VJP in ``w`` is a JVP of
    the original map)."""

    def adjoint_with(w: torch.Tensor, args: Sequence[torch.Tensor]) -> torch.Tensor:
        y, z, *inputs = args
        z_view, in_views = z.view_as(z), _views(inputs)
        fz = map_with(z_view, in_views)
        if not fz.requires_grad:
            return y + 0 * w
        (vjp,) = torch.autograd.grad(fz, z_view, w, create_graph=True, allow_unused=True)
        return y + (0 * w if vjp is None else gain * vjp)

    return adjoint_with


def training_adjoint(strategy: ImplicitBackward):
    """The training adjoint's dense formula (the contract suite's reference): a strategy whose
    adjoint solve runs to machine precision (damped) or to its full budget (relaxed, averaged,
    calibrated), and ``formula(J, y)`` for a batch whose ``z*`` is inexact, ``J`` taken at the
    strategy's output (``z*``; ``f(z*)`` for ``"calibrated"``)."""
    if strategy.training_adjoint == "damped":
        pinned = attrs.evolve(strategy, tol=1e-13, max_iter=400)
        gain = 1.0 - strategy.damping

        def damped(jac: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            eye = torch.eye(jac.shape[-1], dtype=jac.dtype).expand_as(jac)
            return torch.linalg.solve(eye - gain * jac.transpose(1, 2), y)

        return pinned, damped
    pinned = attrs.evolve(strategy, tol=0.0, max_iter=6)
    if strategy.training_adjoint == "relaxed":
        beta = strategy.relaxation

        def relaxed(jac: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # max_iter − 1 steps from w = y (the solve's first call evaluates its start)
            w = y.clone()
            for _ in range(pinned.max_iter - 1):
                w = (1 - beta) * w + beta * (torch.einsum("bji,bj->bi", jac, w) + y)
            return w

        return pinned, relaxed

    def averaged(jac: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(y)
        squares = (y * y).sum(dim=1)
        for i in range(y.shape[0]):  # sample by sample, each in units of its own ‖y‖
            size = squares[i].sqrt()
            target = y[i] / size
            images, points = [target], [torch.zeros_like(target)]
            kept, kept_rel = None, math.inf
            for call in range(1, pinned.max_iter + 1):
                last = -strategy.mix_window
                F, U = torch.stack(images[last:]), torch.stack(points[last:])
                if strategy.ridge is None:
                    weights = torch.full((len(F),), 1.0 / len(F), dtype=y.dtype)
                else:
                    G = F - U
                    c = strategy.ridge * squares.mean() / squares[i]
                    weights = torch.linalg.solve(G @ G.T + c * torch.eye(len(F), dtype=y.dtype),
                                                 torch.ones(len(F), dtype=y.dtype))
                    weights = weights / weights.sum()
                u = weights @ F
                points.append(u)
                images.append(jac[i].T @ u + target)
                # "calibrated": the image of lowest ‖F − u‖ / ‖F‖ from the second call on
                rel = float(torch.linalg.vector_norm(images[-1] - u)
                            / torch.linalg.vector_norm(images[-1]))
                if call <= 2 or rel < kept_rel:
                    kept, kept_rel = images[-1], rel
            last = kept if strategy.training_adjoint == "calibrated" else images[-1]
            out[i] = last * size
        return out

    return pinned, averaged


def _options():
    from hypothesis import strategies as st

    # outside training (where the contracts run) the adjoint is exact for every damping
    return st.fixed_dictionaries({"damping": st.sampled_from([DAMPING, 0.0, 0.5]),
                                  "exact_below": st.sampled_from([EXACT_BELOW, 1e-6]),
                                  "training_adjoint": st.sampled_from(TRAINING_ADJOINTS),
                                  "window": st.sampled_from([None, 2]),
                                  "ridge": st.sampled_from([RIDGE, None])})


@implicit.hookimpl
def implicit_register_backwards(register):
    register(
        implicit.BackwardSpec(
            name="ift",
            factory=ImplicitBackward,
            capabilities={"exact", "second_order", "adjoint_solver"},
            option_strategy=_options,
            training_adjoint=training_adjoint,
            equivalents={"torchdeq": {"ift": True}},
        )
    )
