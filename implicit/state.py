"""Structured states: a tensor or a tuple/list of tensors, seen by solvers as one flat batch.

Solvers work on a single ``(B, n)`` tensor. A :class:`StateSpec` remembers the structure of a
state (container type, per-part shapes, dtype, device) so the layer can flatten once per solve
and unflatten on return. Dimension 0 is the batch dimension of every part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import attrs
import torch

State = Union[torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor]]


def describe_shapes(state: object) -> str:
    """A short, human description of a state's shapes for error messages."""
    if isinstance(state, torch.Tensor):
        return str(tuple(state.shape))
    if isinstance(state, (tuple, list)):
        return "(" + ", ".join(describe_shapes(part) for part in state) + ")"
    return f"<{type(state).__name__}>"


@attrs.frozen(kw_only=True)
class StateSpec:
    """Structure of a state: ``container`` is ``None`` for a single tensor, else tuple/list."""

    container: type | None
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, state: State, *, what: str = "state") -> StateSpec:
        """Read the structure of ``state``; raise ``TypeError``/``ValueError`` on bad input."""
        if type(state) is torch.Tensor and state.dim() > 0 and state.dtype.is_floating_point:
            # the common case, read directly (a DEQ reads its state's structure every forward)
            return cls(container=None, shapes=(tuple(state.shape),), dtype=state.dtype,
                       device=state.device)
        if isinstance(state, torch.Tensor):
            container, parts = None, (state,)
        elif isinstance(state, (tuple, list)) and state:
            container, parts = type(state), tuple(state)
            if container not in (tuple, list):  # namedtuples and friends: rebuild as plain tuple
                container = tuple
        else:
            raise TypeError(
                f"{what} must be a tensor or a non-empty tuple/list of tensors, "
                f"got {type(state).__name__}"
            )
        for i, part in enumerate(parts):
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"{what}[{i}] must be a tensor, got {type(part).__name__}")
            if part.dim() < 1:
                raise ValueError(
                    f"{what} parts need a batch dimension (dim 0); part {i} is a 0-d tensor. "
                    "Add one with .unsqueeze(0)."
                )
        batch = {p.shape[0] for p in parts}
        if len(batch) != 1:
            raise ValueError(
                f"all parts of {what} must share the batch size (dim 0); got shapes "
                f"{describe_shapes(state)}"
            )
        dtypes = {p.dtype for p in parts}
        devices = {p.device for p in parts}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"all parts of {what} must share one dtype and device; got "
                f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}"
            )
        dtype = parts[0].dtype
        if not dtype.is_floating_point:
            raise TypeError(f"{what} must be floating point, got {dtype}")
        return cls(
            container=container,
            shapes=tuple(tuple(p.shape) for p in parts),
            dtype=dtype,
            device=parts[0].device,
        )

    @property
    def batch_size(self) -> int:
        return self.shapes[0][0]

    def with_batch(self, batch: int) -> StateSpec:
        """This structure for ``batch`` samples (a subset of the rows, say)."""
        return attrs.evolve(self, shapes=tuple((batch, *s[1:]) for s in self.shapes))

    @property
    def part_sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s[1:]) for s in self.shapes)

    @property
    def numel_per_sample(self) -> int:
        return sum(self.part_sizes)

    def describe(self) -> str:
        if self.container is None:
            return str(self.shapes[0])
        return "(" + ", ".join(str(s) for s in self.shapes) + ")"

    def parts(
        self,
        state: State,
        *,
        what: str,
        hint: str = "a cell must return a state of the same structure and shape as the one "
        "it is given (check z0 or the cell's init_state)",
    ) -> Sequence[torch.Tensor]:
        """The tensors of ``state``, checked against this structure (error names both shapes)."""
        if self.container is None:
            ok = isinstance(state, torch.Tensor) and tuple(state.shape) == self.shapes[0]
            parts: Sequence[torch.Tensor] = (state,)  # type: ignore[assignment]
        else:
            ok = (
                isinstance(state, (tuple, list))
                and len(state) == len(self.shapes)
                and all(
                    isinstance(p, torch.Tensor) and tuple(p.shape) == s
                    for p, s in zip(state, self.shapes)
                )
            )
            parts = state  # type: ignore[assignment]
        if ok and any(p.dtype != self.dtype for p in parts):
            got = sorted({str(p.dtype) for p in parts})
            raise TypeError(
                f"{what} has dtype {', '.join(got)} but the state z0 is {self.dtype}; "
                "make z0 and the cell's parameters the same dtype (e.g. cell.to(z0.dtype))"
            )
        if not ok:
            raise ValueError(
                f"{what} has shape {describe_shapes(state)} but the state z0 has shape "
                f"{self.describe()}; {hint}"
            )
        return parts

    def flatten(self, state: State, *, what: str = "state") -> torch.Tensor:
        """Concatenate the parts of ``state`` into one ``(B, n)`` tensor (differentiable)."""
        parts = self.parts(state, what=what)
        if self.container is None:
            return parts[0].reshape(self.batch_size, -1)
        return torch.cat([p.reshape(self.batch_size, -1) for p in parts], dim=1)

    def unflatten(self, flat: torch.Tensor) -> State:
        """Inverse of :meth:`flatten`; parts are views of ``flat`` where possible."""
        if self.container is None:
            return flat.reshape(self.shapes[0])
        chunks = torch.split(flat, self.part_sizes, dim=1)
        parts = [c.reshape(s) for c, s in zip(chunks, self.shapes)]
        return self.container(parts)
