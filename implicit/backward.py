"""The `BackwardStrategy` interface: how a DEQ layer makes its fixed point differentiable.

A strategy receives the problem and a solver and returns a differentiable ``z*``. It decides
*how* the solver runs (under ``no_grad`` with an implicit gradient attached, under autograd for
unrolling, …) but never inspects *which* solver it is (optimistix's ``ImplicitAdjoint`` idea).
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, Optional, Sequence

import attrs
import torch

from .solution import Solution
from .solver import FlatFn, FlatResult, Solver, iterate
from .state import StateSpec


@attrs.frozen(kw_only=True, eq=False)
class Problem:
    """A fixed-point problem ``z = fn(z)`` on flat ``(B, n)`` states.

    Attributes:
        fn: the cell with its input injection bound; differentiable with respect to the cell's
            parameters and the injection (so to ``x``) when called with grad enabled.
        z0: the detached initial iterate.
        inputs: the tensors ``fn`` depends on that require grad (injection tensors, then the
            cell's parameters); empty when the layer runs without grad (``torch.no_grad``,
            inference), where nothing is differentiated.
        fn_with: ``fn_with(z, new_inputs)`` evaluates the map with ``inputs`` replaced (same
            order) — what higher-order implicit differentiation needs to take partials. When
            ``fn_rows`` is given it also takes ``fn_with(z_rows, new_inputs, rows)``: the map
            on those samples only (an adjoint solve can then skip stopped samples too).
        spec: the structure of the state (to unflatten records); ``None`` for flat problems.
        what: names the solve in warnings and errors.
        on_backward_solution: called with the record of any solve made during backward
            (e.g. the IFT adjoint solve), so the layer can expose it.
        training: the layer is in training mode. A strategy may then form a regularised
            gradient that it documents (``ift``'s ``damping``); outside training it forms the
            gradient its name promises.
        memory: a dict the layer keeps across its forwards and saves in its ``state_dict``,
            for what a strategy fixes once per layer and must keep on resume (``ift``'s
            calibrated ridge unit): a strategy keeps its entries under its own name. None
            outside a layer (the strategy then keeps them itself).
    """

    fn: FlatFn
    z0: torch.Tensor
    inputs: tuple[torch.Tensor, ...] = ()
    fn_with: Optional[Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]] = None
    spec: Optional[StateSpec] = None
    what: str = "DEQ forward solve"
    on_backward_solution: Optional[Callable[[Solution], None]] = None
    training: bool = False
    #: ``fn`` on a subset of the samples, ``fn_rows(z_rows, rows)``, for batch-independent
    #: cells (the loop then skips stopped samples; see :func:`implicit.iterate`); or None
    fn_rows: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    memory: Optional[dict] = None

    @property
    def requires_grad(self) -> bool:
        """Whether anything ``fn`` depends on requires grad (parameters or ``x``)."""
        return bool(self.inputs)

    @property
    def needs_graph(self) -> bool:
        """True when the caller wants a differentiable result (grad mode on and something
        requires grad)."""
        return torch.is_grad_enabled() and self.requires_grad


@attrs.frozen(kw_only=True)
class BackwardStrategy(abc.ABC):
    """Base class of backward strategies (``@attrs.frozen(kw_only=True)`` subclasses)."""

    name: ClassVar[str] = "backward"
    #: whether, when no graph is needed (``problem.needs_graph`` false: ``torch.no_grad``,
    #: inference), ``__call__`` makes the forward solve and nothing else, exactly as
    #: :meth:`solve_without_graph` does (``ift``, ``phantom``). A layer may then make that
    #: solve its own way: a ``DEQ`` with a compiled solver runs the cell's injection and the
    #: solve as one compiled call. Default False: the layer always calls the strategy.
    solves_only_without_graph: ClassVar[bool] = False

    @property
    def regularises_in_training(self) -> bool:
        """Whether, in training, this strategy forms a regularised gradient instead of the one
        its capabilities promise (``ift`` with ``damping > 0``); default False."""
        return False

    @staticmethod
    def solve_without_graph(problem: Problem, solver: Solver) -> FlatResult:
        """The forward solve under ``no_grad`` (the record and a detached ``z*``): the first
        step of every strategy that attaches its gradient afterwards (ift, phantom)."""
        with torch.no_grad():
            result = iterate(solver, problem.fn, problem.z0, spec=problem.spec, what=problem.what,
                             fn_rows=problem.fn_rows)
        return FlatResult(z=result.z.detach(), solution=result.solution)

    @abc.abstractmethod
    def __call__(self, problem: Problem, solver: Solver) -> FlatResult:
        """Solve ``problem`` with ``solver`` and return a result whose ``z`` is differentiable
        (when ``problem.needs_graph``) and whose ``solution`` is the forward record."""
