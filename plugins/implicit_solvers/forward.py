"""Plain fixed-point iteration ``z ← (1 − β) z + β f(z)`` (Picard / Krasnosel'skii–Mann).

Converges linearly for a contraction (rate ``‖J‖`` for β = 1); damping ``β < 1`` can rescue maps
whose Jacobian has eigenvalues near −1 (Kolter, Duvenaud & Johnson, "Deep Implicit Layers",
ch. 4). It is the reference solver and the cheapest step: one evaluation of f per iteration.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

import implicit
from implicit.validators import number_in


@attrs.frozen(kw_only=True)
class ForwardIteration(implicit.Solver):
    """Fixed-point iteration with optional damping beta (z <- (1-beta) z + beta f(z))."""

    name: ClassVar[str] = "forward"

    beta: float = attrs.field(default=1.0, validator=number_in(0, 2, low_open=True))

    def step(self, fn, z: torch.Tensor, fz: torch.Tensor, state: Any):
        z_next = fz if self.beta == 1 else torch.lerp(z, fz, float(self.beta))
        return z_next, fn(z_next), state


@implicit.hookimpl
def implicit_register_solvers(register):
    register(
        implicit.SolverSpec(
            name="forward",
            factory=ForwardIteration,
            capabilities={"unrollable", "contraction_convergent"},
            equivalents={"torchdeq": "fixed_point_iter"},
        )
    )
