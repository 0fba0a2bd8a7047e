"""`DEQ`, the implicit layer, and `solve`, the plain fixed-point solve (Bai et al. 2019).

``layer = DEQ(cell, solver="forward", backward="ift")``; ``z_star = layer(x)`` solves
``z* = f(z*, x)`` and makes ``z*`` differentiable the way the backward strategy says;
``layer.solution`` is the record of the last forward solve.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import attrs
import torch
from torch import nn

from .backward import BackwardStrategy, Problem
from .cell import Cell, check_cell, init_state_of, injection_of, update_of
from .registry import get_registry
from .solution import Solution
from .solver import Solver, iterate
from .state import State, StateSpec

_LOOP_OPTIONS = ("tol", "max_iter", "stop", "policy")


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


def _any_requires_grad(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, (tuple, list)):
        return any(_any_requires_grad(o) for o in obj)
    if isinstance(obj, Mapping):
        return any(_any_requires_grad(o) for o in obj.values())
    return False


def _has_init_state(cell: nn.Module) -> bool:
    return isinstance(cell, Cell) or callable(getattr(cell, "init_state", None))


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


class DEQ(nn.Module):
    """A deep equilibrium layer: returns z* with ``z* = cell(z*, x)``.

    Args:
        cell: an :class:`implicit.Cell` or any module with ``forward(z, x)`` returning z.
        solver: a registered solver name or an :class:`implicit.Solver` instance.
        backward: a registered backward name or an :class:`implicit.BackwardStrategy`.
        tol, max_iter, stop, policy: override the solver's stopping rule and failure policy
            (``policy``: ``"warn"``, ``"raise"`` or ``"ignore"``).
        eval_tol, eval_max_iter: stopping rule in eval mode (default: the training one).
        solver_options, backward_options: options for plugins given by name.

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
        solver: str | Solver,
        backward: str | BackwardStrategy,
        *,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        stop: Optional[str] = None,
        policy: Optional[str] = None,
        eval_tol: Optional[float] = None,
        eval_max_iter: Optional[int] = None,
        solver_options: Optional[Mapping[str, Any]] = None,
        backward_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_cell(cell)
        self.cell = cell
        self.solver = resolve_solver(
            solver, solver_options, tol=tol, max_iter=max_iter, stop=stop, policy=policy
        )
        self.eval_solver = resolve_solver(self.solver, tol=eval_tol, max_iter=eval_max_iter)
        self.backward = resolve_backward(backward, backward_options)
        self.solution: Optional[Solution] = None
        self.backward_solution: Optional[Solution] = None

    def _record_backward(self, solution: Solution) -> None:
        self.backward_solution = solution

    def forward(self, x: Any, z0: Optional[State] = None) -> State:
        cell = self.cell
        u = injection_of(cell, x)
        expected = init_state_of(cell, x) if z0 is None or _has_init_state(cell) else None
        if z0 is None:
            z0 = expected
        spec = StateSpec.of(z0, what="z0")
        if expected is not None and expected is not z0:
            spec.parts(
                expected,
                what=f"the cell's state ({type(cell).__name__}.init_state(x))",
                hint="pass a z0 shaped like the cell's state",
            )

        def fn(z: State) -> State:
            return update_of(cell, z, u)

        problem = Problem(
            fn=flat_map(fn, spec),
            z0=spec.flatten(z0, what="z0").detach(),
            spec=spec,
            requires_grad=_any_requires_grad(u)
            or any(p.requires_grad for p in cell.parameters()),
            on_backward_solution=self._record_backward,
        )
        solver = self.solver if self.training else self.eval_solver
        result = self.backward(problem, solver)
        self.solution = result.solution
        return spec.unflatten(result.z)

    def extra_repr(self) -> str:
        return f"solver={self.solver!r},\nbackward={self.backward!r}"
