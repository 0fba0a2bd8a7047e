"""Phantom gradients (Geng et al. 2021) and Jacobian-free backprop (Fung et al. 2022).

After the forward solve (under ``no_grad``), take ``k`` damped steps from ``z*`` with autograd on,

    z ← (1 − λ) z + λ f(z, x)

and backpropagate through them: memory O(k) cell graphs, no adjoint solve. The gradient is an
approximation of the implicit one. With ``M = (1 − λ) I + λ J`` (``J = ∂f/∂z`` at ``z*``), the
phantom adjoint is ``λ Σ_{j<k} (Mᵀ)ʲ y`` while the exact one is ``w = (I − Jᵀ)⁻¹ y``; their
difference is ``(Mᵀ)ᵏ w``, so for ``0 < λ ≤ 1``

    ‖w_phantom − w‖ ≤ (1 − λ (1 − ‖J‖₂))ᵏ ‖w‖.

It shrinks geometrically in ``k`` for a contraction (``‖J‖₂ < 1``). ``jfb`` is ``k = 1, λ = 1``:
the gradient of one application of f at the fixed point. The returned value is the state after
the ``k`` steps (within the solver tolerance of ``z*``).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import implicit
from implicit.validators import number_in, positive_int


@attrs.frozen(kw_only=True)
class Phantom(implicit.BackwardStrategy):
    """Phantom gradient: backprop through k damped steps z <- (1-lam) z + lam f(z) from z*."""

    name: ClassVar[str] = "phantom"
    solves_only_without_graph: ClassVar[bool] = True  # no graph: the solve alone

    k: int = attrs.field(default=5, validator=positive_int)
    lam: float = attrs.field(default=0.8, validator=number_in(0, 1, low_open=True))

    def __call__(self, problem: implicit.Problem, solver: implicit.Solver) -> implicit.FlatResult:
        result = self.solve_without_graph(problem, solver)
        if not problem.needs_graph:
            return result
        z = result.z
        lam = float(self.lam)
        for _ in range(self.k):
            fz = problem.fn(z)
            z = fz if lam == 1 else torch.lerp(z, fz, lam)
        return attrs.evolve(result, z=z)


def phantom_bound(strategy: Phantom, jacobian_norm: float) -> float:
    """The documented bound on ``‖w_phantom − w‖ / ‖w‖`` (module docstring)."""
    return (1 - strategy.lam * (1 - jacobian_norm)) ** strategy.k


def phantom_adjoint(strategy: Phantom, jac: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The documented implied adjoint ``λ Σ_{j<k} (Mᵀ)ʲ y``, ``M = (1 − λ) I + λ J``, from the
    dense Jacobian ``J`` (``(n, n)``) and upstream gradient ``y`` (``(n,)``)."""
    lam = float(strategy.lam)
    m_t = (1 - lam) * torch.eye(jac.shape[0], dtype=jac.dtype) + lam * jac.T
    term, total = y.clone(), torch.zeros_like(y)
    for _ in range(strategy.k):
        total += term
        term = m_t @ term
    return lam * total


def _options():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({"k": st.integers(1, 8),
                                  "lam": st.sampled_from([0.8, 1.0, 0.5, 0.3])})


def jfb() -> Phantom:
    """Jacobian-free backprop: the gradient of one step f(z*) (phantom with k=1, lam=1)."""
    return Phantom(k=1, lam=1.0)


@implicit.hookimpl
def implicit_register_backwards(register):
    register(
        implicit.BackwardSpec(
            name="phantom", factory=Phantom, adjoint_error_bound=phantom_bound,
            adjoint_formula=phantom_adjoint, option_strategy=_options,
            equivalents={"torchdeq": {"grad": 5, "tau": 0.8}},
        )
    )
    register(
        implicit.BackwardSpec(
            name="jfb", factory=jfb, adjoint_error_bound=phantom_bound,
            adjoint_formula=phantom_adjoint,
            equivalents={"torchdeq": {"grad": 1, "tau": 1.0}},
        )
    )
