"""Implicit-function-theorem backward (Bai et al. 2019; DEQ slides, ../shared/seeds/000).

At ``z* = f(z*, x)`` the implicit function theorem gives, for an upstream gradient ``y``,
``dL/dθ = gᵀ ∂f/∂θ`` where ``g`` solves the adjoint fixed point ``g = Jᵀ g + y`` with
``J = ∂f/∂z (z*)``. The pattern:

* the forward solve runs under ``no_grad`` — no graph, O(1) memory in depth;
* one re-engaged call ``f(z*, x)`` carries the graph to ``x`` and the parameters;
* during backward, a VJP graph is built on a detached copy of ``z*``, the adjoint is solved
  with a registered solver (one VJP per call), and the graph is freed when backward returns.

The adjoint is solved per sample for ``ĝ = g / ‖y‖`` with an absolute tolerance, i.e. the
tolerance is relative to the size of the incoming gradient, so a loss-scaled gradient stops at
the same point. Second derivatives are not supported yet and raise inside backward.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, Union

import attrs
import torch
from attrs import validators as v

import implicit
from implicit.registry import get_registry

SECOND_ORDER_MESSAGE = (
    "the 'ift' backward does not support second derivatives yet (create_graph=True, "
    "torch.autograd.grad of a gradient, gradgradcheck, force-matching losses): refusing rather "
    "than returning a wrong value. Differentiate once, or use a backward strategy that declares "
    "the 'second_order' capability (see `implicit plugins`)."
)


def _solver_or_name(instance, attribute, value):
    if value is not None and not isinstance(value, (str, implicit.Solver)):
        raise TypeError(
            f"solver must be None, a registered solver name or an implicit.Solver, got "
            f"{type(value).__name__}"
        )


def _optional_number(instance, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{attribute.name} must be None or a number >= 0, got {value!r}")


def _optional_positive_int(instance, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be None or an int >= 1, got {value!r}")


@attrs.frozen(kw_only=True)
class ImplicitBackward(implicit.BackwardStrategy):
    """Exact gradient by the implicit function theorem (adjoint g = J^T g + y)."""

    name: ClassVar[str] = "ift"

    solver: Union[str, implicit.Solver, None] = attrs.field(
        default=None, validator=_solver_or_name
    )
    tol: Optional[float] = attrs.field(default=None, validator=_optional_number)
    max_iter: Optional[int] = attrs.field(default=None, validator=_optional_positive_int)
    policy: Optional[str] = attrs.field(
        default=None, validator=v.optional(v.in_(("warn", "raise", "ignore")))
    )

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
        return attrs.evolve(base, **overrides)

    def __call__(self, problem: implicit.Problem, solver: implicit.Solver) -> implicit.FlatResult:
        with torch.no_grad():
            result = implicit.iterate(
                solver, problem.fn, problem.z0, spec=problem.spec, what=problem.what
            )
        if not problem.needs_graph:
            return attrs.evolve(result, z=result.z.detach())
        z_star = result.z.detach()
        fz = problem.fn(z_star)  # the one re-engaged call: graph to x and the parameters
        fz = _ImplicitAdjoint.apply(
            fz, z_star, problem.fn, self.adjoint_solver(solver), problem.on_backward_solution
        )
        # Value exactly z* (the record's iterate); gradient through f's graph and the adjoint.
        return attrs.evolve(result, z=z_star + (fz - fz.detach()))


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity on ``f(z*)`` whose backward maps ``y`` to ``g = (I − Jᵀ)⁻¹ y``."""

    @staticmethod
    def forward(ctx, fz, z_star, fn, solver, on_record):
        ctx.save_for_backward(z_star)
        ctx.fn = fn
        ctx.solver = solver
        ctx.on_record = on_record
        return fz.clone()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_ORDER_MESSAGE)
        (z_star,) = ctx.saved_tensors
        fn: Callable = ctx.fn
        with torch.enable_grad():
            z = z_star.detach().requires_grad_()
            fz = fn(z)
        scale = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = grad / scale

        def adjoint_map(g: torch.Tensor) -> torch.Tensor:
            if not fz.requires_grad:  # f does not depend on z at all: J = 0
                return y
            (vjp,) = torch.autograd.grad(fz, z, g, retain_graph=True, allow_unused=True)
            return y if vjp is None else vjp + y

        result = implicit.iterate(ctx.solver, adjoint_map, y, what="IFT adjoint solve")
        record = attrs.evolve(result.solution, nvjp=result.solution.n_calls)
        if ctx.on_record is not None:
            ctx.on_record(record)
        del fz, z
        return result.z * scale, None, None, None, None


@implicit.hookimpl
def implicit_register_backwards(register):
    register(
        implicit.BackwardSpec(
            name="ift",
            factory=ImplicitBackward,
            capabilities={"exact"},
            equivalents={"torchdeq": {"ift": True}},
        )
    )
