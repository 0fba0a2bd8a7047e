"""Monotone operator equilibrium cell (Winston & Kolter 2020).

``W = (1 − m) I − AᵀA + B − Bᵀ`` with ``m > 0`` makes ``I − W`` strongly monotone, so the
equilibrium ``z = ReLU(W z + U x + b)`` exists and is unique. Plain iteration of that map can
diverge; the cell's update is the forward–backward splitting

    z ← ReLU((1 − α) z + α (W z + U x + b)),   0 < α < 2m / ‖I − W‖₂²,

which has the same fixed points for every such α (ReLU is the proximal map of z ≥ 0) and is a
contraction with factor ``√(1 − 2αm + α² ‖I − W‖₂²)``; ``alpha=None`` picks the α = m/‖I − W‖₂²
that minimises it. ``W``, α and the injection are computed once per solve (``injection``). This
is the guaranteed-convergent fixture of the property tests.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

import implicit
from implicit.cell import check_input


class MonotoneCell(implicit.Cell):
    """Monotone DEQ: z <- ReLU((1-a) z + a (W z + U x + b)), W = (1-m) I - A^T A + B - B^T."""

    batch_independent = True  # sample i of f depends on sample i only

    def __init__(
        self,
        features: int = 64,
        in_features: Optional[int] = None,
        m: float = 0.5,
        alpha: Optional[float] = None,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be an int >= 1, got {features!r}")
        in_features = features if in_features is None else in_features
        if not m > 0:
            raise ValueError(f"m must be > 0 (strong monotonicity), got {m!r}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be None or > 0, got {alpha!r}")
        self.features, self.in_features, self.m, self.alpha = features, in_features, m, alpha
        scale = init_scale / math.sqrt(features)
        self.A = nn.Parameter(torch.randn(features, features) * scale)
        self.B = nn.Parameter(torch.randn(features, features) * scale)
        self.U = nn.Linear(in_features, features)

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.features, dtype=self.A.dtype, device=self.A.device)
        return (1 - self.m) * eye - self.A.T @ self.A + self.B - self.B.T

    def step_size(self, W: torch.Tensor) -> float:
        """α: the given one (checked against the convergence bound) or m / ‖I − W‖₂²."""
        eye = torch.eye(self.features, dtype=W.dtype, device=W.device)
        lip = float(torch.linalg.matrix_norm((eye - W).detach(), ord=2))
        bound = 2 * self.m / lip**2
        if self.alpha is None:
            return self.m / lip**2
        if self.alpha >= bound:
            raise ValueError(
                f"monotone cell: alpha={self.alpha} does not satisfy alpha < 2m/||I - W||^2 = "
                f"{bound:.4g}; the splitting would not be a contraction (use alpha=None)"
            )
        return self.alpha

    def contraction(self) -> float:
        """Contraction factor √(1 − 2αm + α²‖I − W‖²) of the update (for the current weights)."""
        with torch.no_grad():
            W = self.weight()
            alpha = self.step_size(W)
            eye = torch.eye(self.features, dtype=W.dtype, device=W.device)
            lip = float(torch.linalg.matrix_norm(eye - W, ord=2))
        return math.sqrt(max(0.0, 1 - 2 * alpha * self.m + alpha**2 * lip**2))

    def injection(self, x: torch.Tensor):
        check_input(x, cell="monotone", layout=f"(..., in_features={self.in_features})",
                    size=self.in_features)
        W = self.weight()
        return self.U(x), W, self.step_size(W)

    def injection_rows(self, u, rows):
        ux, W, alpha = u  # W and alpha are the whole solve's, not per sample
        return ux.index_select(0, rows), W, alpha

    def update(self, z: torch.Tensor, u) -> torch.Tensor:
        ux, W, alpha = u
        return torch.relu((1 - alpha) * z + alpha * (z @ W.T + ux))

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.features)

    def extra_repr(self) -> str:
        return f"features={self.features}, in_features={self.in_features}, m={self.m}"


def examples(dtype: torch.dtype = torch.float64):
    """Monotone cells with small A, B (so ‖I − W‖ stays near m and solves stay short)."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw):
        features = draw(st.integers(1, 8))
        in_features = draw(st.integers(1, 5))
        batch = draw(st.integers(1, 4))
        m = draw(st.floats(0.5, 1.0))
        seed = draw(st.integers(0, 2**31 - 1))
        with implicit.seeded(seed) as gen:
            cell = MonotoneCell(features, in_features, m=m).to(dtype)
            with torch.no_grad():
                scale = 0.1 / math.sqrt(features)
                cell.A.copy_(torch.randn(features, features, generator=gen, dtype=dtype) * scale)
                cell.B.copy_(torch.randn(features, features, generator=gen, dtype=dtype) * scale)
                cell.U.weight.copy_(torch.randn(features, in_features, generator=gen, dtype=dtype))
                cell.U.bias.copy_(torch.randn(features, generator=gen, dtype=dtype))
            x = torch.randn(batch, in_features, generator=gen, dtype=dtype)
        return implicit.CellExample(cell=cell, x=x, lipschitz=cell.contraction())

    return draw()


@implicit.hookimpl
def implicit_register_cells(register):
    register(
        implicit.CellSpec(
            name="monotone",
            factory=MonotoneCell,
            capabilities={"batch_independent", "forward_ad", "lipschitz_bounded"},
            strategy=examples,
            workloads=[
                implicit.Workload(
                    name="monotone_d256",
                    cell_options={"features": 256, "in_features": 256},
                    input_shape=(256,),
                    batch=64,
                    quick=False,
                    description="monotone DEQ, d=256, batch 64, forward-backward splitting",
                )
            ],
        )
    )
