"""Plain fixed-point iteration ``z ← (1 − β) z + β f(z)`` (Picard / Krasnosel'skii–Mann).

Converges linearly for a contraction (rate ``‖J‖`` for β = 1); damping ``β < 1`` can rescue maps
whose Jacobian has eigenvalues near −1 (Kolter, Duvenaud & Johnson, "Deep Implicit Layers",
ch. 4). It is the reference solver and the cheapest step: one evaluation of f per iteration.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import attrs
import torch

import implicit
from implicit.validators import number_in


@attrs.frozen(kw_only=True)
class ForwardIteration(implicit.Solver):
    """Fixed-point iteration with optional damping beta (z <- (1-beta) z + beta f(z))."""

    name: ClassVar[str] = "forward"
    selectable: ClassVar[bool] = True
    static: ClassVar[bool] = True

    beta: float = attrs.field(default=1.0, validator=number_in(0, 2, low_open=True))

    def step(self, fn, z: torch.Tensor, fz: torch.Tensor, state: Any):
        z_next = fz if self.beta == 1 else torch.lerp(z, fz, float(self.beta))
        return z_next, fn(z_next), state

    def select(self, state: Any, keep: torch.Tensor) -> Any:
        return state  # no state

    def static_step(self, fn, z, fz, g, state, active):
        z_next = fz if self.beta == 1 else torch.lerp(z, fz, float(self.beta))
        fz_next = fn(z_next)
        return z_next, fz_next, fz_next - z_next, state


def contraction_calls(solver: ForwardIteration, inst: implicit.Instance) -> Optional[int]:
    """Banach's a-priori bound. The step ``z ↦ (1 − β) z + β f(z)`` has Lipschitz constant
    ``q = |1 − β| + β L``; when ``q < 1`` the residual ``‖f(z_k) − z_k‖`` shrinks at least by
    ``q`` per step, so it is below ``tol`` after ``⌈log(tol / r0) / log q⌉`` steps, one call of
    f each after ``f(z0)``. Finite precision: the residual cannot be resolved below about
    ``eps · ‖f‖ / (1 − q)``; below ``100×`` that the bound is not claimed (``None``)."""
    beta = float(solver.beta)
    q = abs(1 - beta) + beta * inst.lipschitz
    if q >= 1:
        return None
    floor = 100 * torch.finfo(inst.dtype).eps * max(1.0, inst.scale) / (1 - q)
    if inst.tol < floor:
        return None
    needed = math.ceil(math.log(inst.tol / inst.r0) / math.log(q)) if inst.r0 > inst.tol else 0
    return needed + 1


def forward_step(solver: ForwardIteration, zs: torch.Tensor, fzs: torch.Tensor) -> torch.Tensor:
    """The documented step ``z ← (1 − β) z + β f(z)`` (the contract suite's reference)."""
    beta = float(solver.beta)
    return (1 - beta) * zs[-1] + beta * fzs[-1]


def _options():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({"beta": st.sampled_from([1.0, 0.9, 0.6, 0.3, 1.2])})


@implicit.hookimpl
def implicit_register_solvers(register):
    register(
        implicit.SolverSpec(
            name="forward",
            factory=ForwardIteration,
            capabilities={"unrollable", "contraction_convergent"},
            equivalents={"torchdeq": "fixed_point_iter"},
            option_strategy=_options,
            step_formula=implicit.StepFormula(
                step=forward_step, statement="z_next = (1 - beta) z + beta f(z)"),
            guarantees={
                "contraction": implicit.Guarantee(
                    problem="contraction", calls=contraction_calls,
                    statement="Banach: on an L-contraction the damped step contracts by "
                              "q = |1 - beta| + beta L, so the residual is below tol after "
                              "ceil(log(tol/r0)/log q) steps (+1 call for f(z0)); claimed only "
                              "for q < 1 and tol above 100 eps |f| / (1 - q)"),
            },
        )
    )
