"""The `Cell` interface: the map f(z, x) whose fixed point a DEQ layer finds.

A cell splits f into an input injection computed once per solve and an update applied at every
iteration (Kolter, Duvenaud & Johnson, "Deep Implicit Layers", ch. 4: precompute ``Ux + b``)::

    u = cell.injection(x)          # once per forward; reused by the backward pass
    z_next = cell.update(z, u)     # every iteration
    cell(z, x) == cell.update(z, cell.injection(x))

States may be a tensor or a tuple/list of tensors (multiscale cells); dimension 0 is the batch.
An update returns new tensors: it must not write into its input ``z`` nor hand back a buffer it
reuses on the next call, because solvers keep earlier states and values of f by reference
(Anderson's history of f values, the best iterate so far); outside inference mode the solver
loop raises a ``ValueError`` when it sees either. Any plain ``nn.Module`` whose ``forward(z, x)`` returns the
next state is accepted by :class:`implicit.DEQ` too: its injection is ``x`` itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .state import State


class Cell(nn.Module):
    """Base class for DEQ cells. Override :meth:`update`; optionally :meth:`injection` and
    :meth:`init_state`.

    Example::

        class Tanh(Cell):
            def __init__(self, d):
                super().__init__()
                self.W, self.U = nn.Linear(d, d, bias=False), nn.Linear(d, d)
            def injection(self, x):
                return self.U(x)
            def update(self, z, u):
                return torch.tanh(self.W(z) + u)
    """

    #: True when sample i of ``update(z, u)`` depends on sample i of ``z`` and ``u`` only (no
    #: BatchNorm in training, no attention across the batch). A DEQ then evaluates f only on
    #: the samples its solver still iterates (``DEQ(..., compact=None)``, the default, follows
    #: this attribute), with :meth:`injection_rows`. The registered cells that declare the
    #: ``batch_independent`` capability set it.
    batch_independent: ClassVar[bool] = False

    def injection_rows(self, u: Any, rows: torch.Tensor) -> Any:
        """The injection of the samples ``rows`` (an int64 index) taken from the batch's
        ``u``. Default: every tensor in ``u`` (tuple/list/dict nests) indexed along dim 0;
        override when ``u`` also holds tensors that are not per sample (a weight matrix
        computed once per solve, a causal mask)."""
        return rows_of_batched(u, rows)

    def injection(self, x: Any) -> Any:
        """Precompute whatever of f depends on ``x`` alone (default: ``x`` itself)."""
        return x

    def update(self, z: State, u: Any) -> State:
        """One application of f given the precomputed injection ``u``."""
        raise NotImplementedError(f"{type(self).__name__} must implement update(z, u)")

    def init_state(self, x: Any) -> State:
        """The initial state z0 for input ``x`` (default: zeros shaped like ``x``).

        Override when the state's shape differs from the input's.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}.init_state cannot derive z0 from a "
                f"{type(x).__name__}; override init_state(x) or pass z0="
            )
        return torch.zeros_like(x)

    def forward(self, z: State, x: Any) -> State:
        return self.update(z, self.injection(x))


def rows_of_batched(u: Any, rows: torch.Tensor) -> Any:
    """Every tensor in ``u`` (tuple/list/dict nests) indexed by ``rows`` along dim 0."""
    if isinstance(u, torch.Tensor):
        return u.index_select(0, rows)
    if isinstance(u, (tuple, list)):
        return type(u)(rows_of_batched(part, rows) for part in u)
    if isinstance(u, dict):
        return {k: rows_of_batched(v, rows) for k, v in u.items()}
    return u


def check_input(x: Any, *, cell: str, layout: str, ndim: int | None = None,
                dim: int = -1, size: int | None = None) -> None:
    """Raise a ``ValueError`` naming the expected ``layout`` unless ``x`` is a tensor with
    ``ndim`` dimensions (at least one when ``None``) and ``size`` entries along ``dim``."""
    ok = isinstance(x, torch.Tensor) and (x.dim() == ndim if ndim is not None else x.dim() >= 1)
    ok = ok and (size is None or x.shape[dim] == size)
    if not ok:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{cell} cell expects inputs of shape {layout}, got {shape}")


def check_cell(cell: object) -> None:
    """Raise a clear error unless ``cell`` can serve as a DEQ cell."""
    if not isinstance(cell, nn.Module):
        raise TypeError(
            "a DEQ cell must be an nn.Module with forward(z, x) (or an implicit.Cell), "
            f"got {type(cell).__name__}"
        )


def injection_of(cell: nn.Module, x: Any) -> Any:
    """``cell.injection(x)`` for an :class:`Cell`; ``x`` itself for a plain module."""
    return cell.injection(x) if isinstance(cell, Cell) else x


def update_of(cell: nn.Module, z: State, u: Any) -> State:
    """One application of f: ``cell.update(z, u)``, or ``cell(z, u)`` for a plain module."""
    return cell.update(z, u) if isinstance(cell, Cell) else cell(z, u)


def init_state_of(cell: nn.Module, x: Any) -> State:
    """z0 from the cell's ``init_state(x)`` when it has one, else zeros shaped like ``x``."""
    init = getattr(cell, "init_state", None)
    if callable(init):
        return init(x)
    return Cell.init_state(cell, x)  # type: ignore[arg-type]
