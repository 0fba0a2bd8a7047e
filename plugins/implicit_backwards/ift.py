"""Implicit-function-theorem backward (Bai et al. 2019; DEQ slides, ../shared/seeds/000).

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

**Damping in training.** In real DEQ training the solves stop at their cap, where the spectral
radius of ``J`` is close to 1 and the exact adjoint ``(I − Jᵀ)⁻¹ y`` amplifies the directions
with eigenvalues near 1 by ``1/(1 − λ)`` — the directions in which an inexact ``z*`` is least
accurate. In training mode (``Problem.training``: the layer's ``self.training``) the adjoint
solved is therefore the damped one, ``w = (1 − δ) Jᵀ w + y`` with ``δ = damping`` (default
0.1): the exact gradient of ``(1 − δ)``-shrunk Jacobians, amplification at most ``1/δ``, a
contraction ``(1 − δ)ρ(J)`` that Anderson solves in fewer VJPs. ``δ = 0`` is the exact IFT
gradient, ``δ → 1`` the Jacobian-free one (Fung et al. 2022: ``w = y``). The tutorial's code
(../shared/seeds/001) damps its adjoint too, by accident: its absolute Anderson ridge 1e-4
dominates the Gram matrix of a mean-reduced loss's tiny gradients and turns the mix into an
average. Measured on MNIST-1D (``benchmarks/training_parity.py``, README "Training parity"):
the exact adjoint trains 1–2 points worse there after 10 epochs, in the tutorial's code as in
ours; δ = 0.2 trained best there but lost a point on digits, where the exact adjoint did best;
δ = 0.1 matches or beats the tutorial on both (3 seeds each, README). Outside training
(``eval()`` layers, contract checks) the adjoint is exact whatever ``damping`` says, and so it
is in training for each sample whose ``z*`` has a relative residual at or below
``exact_below`` (1e-8): the damping corrects for an inexact ``z*``, and a layer whose solves
converge tightly must give the true derivative (``torch.autograd.gradcheck`` on a fresh,
training-mode layer passes).

**Higher derivatives are exact too.** Under ``create_graph=True`` the backward is itself built
from differentiable pieces: ``z*`` is this layer's saved output (so its dependence on θ is
known), partial derivatives are taken through fresh views (so they follow only the direct
path), and the adjoint ``w`` is returned by the same implicit-layer function applied to the
linear map ``w ↦ Jᵀ w + y`` — its own backward is another adjoint solve, ``v = J v + u``, whose
products ``J v`` come from double backward through the VJP. ``gradgradcheck`` passes.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import attrs
import torch
from attrs import validators as v

import implicit
from implicit.registry import get_registry
from implicit.validators import (nonnegative_number, number_in, one_of,
                                 optional_nonnegative_number, optional_positive_int)

MapWith = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]
DAMPING = 0.1  # the default in training (see "Damping" above; measured in benchmarks/)
#: the forward relative residual at or below which the training adjoint is exact (float64
#: gradient checks solve to ~1e-10; a float32 solve cannot get below ~1e-7)
EXACT_BELOW = 1e-8
#: ``training_adjoint``'s values, and the relaxation of ``"relaxed"`` (measured on the near
#: variant of the parity recipe: benchmarks/results/cpu-training-family/causes.json)
TRAINING_ADJOINTS: tuple[str, ...] = ("damped", "relaxed")
RELAXATION = 1 / 3


def _solver_or_name(instance, attribute, value):
    if value is not None and not isinstance(value, (str, implicit.Solver)):
        raise TypeError(
            f"solver must be None, a registered solver name or an implicit.Solver, got "
            f"{type(value).__name__}"
        )
    if isinstance(value, str):  # a misspelt name fails here, not at the first backward
        get_registry().get("solver", value)


def _compile_option(instance, attribute, value):
    if value is not None and not isinstance(value, (bool, str)):
        raise TypeError(f"compile must be None, True, False or a torch.compile backend name, "
                        f"got {type(value).__name__}")


@attrs.frozen(kw_only=True)
class ImplicitBackward(implicit.BackwardStrategy):
    """Gradient by the implicit function theorem (adjoint w = J^T w + y), any order; in training
    the adjoint is damped, w = (1 - damping) J^T w + y (damping=0: exact there too)."""

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
    damping: float = attrs.field(default=DAMPING, validator=number_in(0, 1, high_open=True))
    #: a sample whose forward solution has a relative residual ``‖f(z*) − z*‖ / ‖f(z*)‖`` at
    #: or below this gets the exact adjoint in training too: the damping regularises the
    #: gradient at an inexact ``z*`` and has nothing to correct at an exact one, so a layer
    #: whose solves converge tightly (``torch.autograd.gradcheck`` in float64) gives the true
    #: derivative in either mode. 0: damp every sample in training. The backward record says
    #: how many samples were damped (``layer.backward_solution.stats["damped"]``)
    exact_below: float = attrs.field(default=EXACT_BELOW, validator=nonnegative_number)
    #: the adjoint formed in training for a batch whose ``z*`` is inexact (some sample above
    #: :attr:`exact_below`): ``"damped"`` solves ``w = (1 − damping) Jᵀ w + y`` with the
    #: adjoint solver; ``"relaxed"`` takes ``max_iter`` steps of the relaxed fixed-point
    #: iteration ``w ← (1 − relaxation) w + relaxation (Jᵀ w + y)`` from ``w = y`` and keeps
    #: the last iterate (a truncated series in ``Jᵀ`` whose terms keep their sign; the exact
    #: adjoint once it converges; ``damping`` does not apply). A relaxed adjoint that stops at
    #: its cap is what it is meant to be: its solve does not warn (its record says MAX_ITER)
    training_adjoint: str = attrs.field(default="damped", validator=one_of(*TRAINING_ADJOINTS))
    #: the relaxation ``β`` of ``training_adjoint="relaxed"``
    relaxation: float = attrs.field(default=RELAXATION, validator=number_in(0, 1, low_open=True))
    #: the adjoint solve compiled (:mod:`implicit.compiled`): None (default) only when
    #: ``solver`` is a compiled solver; True (inductor) or a torch.compile backend name: the
    #: adjoint solver with that ``compile`` (forward iteration, Anderson); False: never. A
    #: compiled adjoint takes its products ``Jᵀ w`` by ``torch.func.vjp``, re-evaluating the
    #: cell at ``z*`` in each (one more cell call per product), so the whole adjoint solve is
    #: one ``torch.while_loop``; on a small state that beats the eager loop (tanh d=256:
    #: training steps 1.5–2.3× faster with both solves compiled), on a large one (the ResNet
    #: cell) the extra cell call costs more than it saves (``implicit bench --compile``, docs
    #: "Compiled solves")
    compile: Union[None, bool, str] = attrs.field(default=None, validator=_compile_option)

    @property
    def regularises_in_training(self) -> bool:
        return self.damping > 0 or self.training_adjoint == "relaxed"

    def relaxed_solver(self, adjoint_solver: implicit.Solver) -> implicit.Solver:
        """``training_adjoint="relaxed"``'s solver: forward iteration with ``beta =
        relaxation`` returning its last iterate, with the adjoint's stop, tol and cap."""
        return get_registry().make(
            "solver", "forward", beta=float(self.relaxation), returns="last", stop="abs",
            tol=adjoint_solver.tol, max_iter=adjoint_solver.max_iter, policy="ignore")

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
        if (problem.training and self.training_adjoint == "relaxed"
                and not bool((result.solution.rel_residual <= self.exact_below).all())):
            adjoint_solver, gain = self.relaxed_solver(adjoint_solver), 1.0
        context = _Context(
            map_with=problem.fn_with,
            solver=adjoint_solver,
            on_record=problem.on_backward_solution,
            what="IFT adjoint solve",
            gain=gain,
            rows=problem.fn_rows is not None,
        )
        z = _FixedPoint.apply(z_star, context, *problem.inputs)
        return attrs.evolve(result, z=z)


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
        result = implicit.iterate(ctx.solver, adjoint_map, y_hat, what=ctx.what,
                                  fn_rows=adjoint_rows)
    record = attrs.evolve(result.solution, nvjp=result.solution.n_calls)
    damped = (int((gain != 1).sum()) if isinstance(gain, torch.Tensor)
              else (y.shape[0] if gain != 1 else 0))
    record.stats.update(damped=damped, gain=float(gain.min()) if isinstance(gain, torch.Tensor)
                        else float(gain))
    if ctx.on_record is not None:
        ctx.on_record(record)
    return (result.z * scale).detach()


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


def _options():
    from hypothesis import strategies as st

    # outside training (where the contracts run) the adjoint is exact for every damping
    return st.fixed_dictionaries({"damping": st.sampled_from([DAMPING, 0.0, 0.5]),
                                  "exact_below": st.sampled_from([EXACT_BELOW, 1e-6]),
                                  "training_adjoint": st.sampled_from(TRAINING_ADJOINTS)})


@implicit.hookimpl
def implicit_register_backwards(register):
    register(
        implicit.BackwardSpec(
            name="ift",
            factory=ImplicitBackward,
            capabilities={"exact", "second_order", "adjoint_solver"},
            option_strategy=_options,
            equivalents={"torchdeq": {"ift": True}},
        )
    )
