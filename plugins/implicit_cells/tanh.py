"""The canonical DEQ cell ``z ← tanh(W z + U x + b)``.

From the DEQ slides (../shared/seeds/000) and "Deep Implicit Layers" ch. 1/4: a single
weight-tied layer with input injection ``U x + b``, computed once per solve. ``tanh`` is
1-Lipschitz, so ``‖W‖₂ < 1`` makes the map a contraction with a unique fixed point.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

import implicit
from implicit.cell import check_input


class TanhCell(implicit.Cell):
    """z <- tanh(W z + U x + b) on states of shape (..., features)."""

    batch_independent = True  # sample i of f depends on sample i only

    def __init__(
        self,
        features: int = 64,
        in_features: Optional[int] = None,
        bias: bool = True,
        init_scale: float = 0.4,
    ) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be an int >= 1, got {features!r}")
        in_features = features if in_features is None else in_features
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        self.features = features
        self.in_features = in_features
        self.W = nn.Linear(features, features, bias=False)
        self.U = nn.Linear(in_features, features, bias=bias)
        # A square Gaussian matrix with entries N(0, s²/n) has ‖W‖₂ ≈ 2s: s = 0.4 gives ≈ 0.8.
        nn.init.normal_(self.W.weight, std=init_scale / math.sqrt(features))

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, cell="tanh", layout=f"(..., in_features={self.in_features})",
                    size=self.in_features)
        return self.U(x)

    def update(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + u)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.features)

    def extra_repr(self) -> str:
        return f"features={self.features}, in_features={self.in_features}"


def examples(dtype: torch.dtype = torch.float64):
    """Hypothesis strategy of contractive tanh cells (‖W‖₂ = ρ ≤ 0.9) with inputs."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw):
        features = draw(st.integers(1, 8))
        in_features = draw(st.integers(1, 6))
        batch = draw(st.integers(1, 5))
        rho = draw(st.floats(0.05, 0.9))
        seed = draw(st.integers(0, 2**31 - 1))
        with implicit.seeded(seed) as gen:
            cell = TanhCell(features, in_features).to(dtype)
            with torch.no_grad():
                w = torch.randn(features, features, generator=gen, dtype=dtype)
                w *= rho / torch.linalg.matrix_norm(w, ord=2).clamp_min(1e-12)
                cell.W.weight.copy_(w)
                cell.U.weight.copy_(torch.randn(features, in_features, generator=gen, dtype=dtype))
                cell.U.bias.copy_(torch.randn(features, generator=gen, dtype=dtype))
            x = torch.randn(batch, in_features, generator=gen, dtype=dtype)
        return implicit.CellExample(cell=cell, x=x, lipschitz=rho)

    return draw()


@implicit.hookimpl
def implicit_register_cells(register):
    register(
        implicit.CellSpec(
            name="tanh",
            factory=TanhCell,
            capabilities={"batch_independent", "forward_ad", "lipschitz_bounded"},
            strategy=examples,
            workloads=[
                implicit.Workload(
                    name="tanh_d256",
                    cell_options={"features": 256, "in_features": 256},
                    input_shape=(256,),
                    batch=64,
                    description="z <- tanh(Wz + Ux + b), d=256, batch 64",
                ),
                implicit.Workload(
                    name="tanh_d1024",
                    cell_options={"features": 1024, "in_features": 1024, "init_scale": 0.45},
                    input_shape=(1024,),
                    batch=128,
                    quick=False,
                    description="wider tanh cell, d=1024, batch 128, ‖W‖₂ ≈ 0.9",
                ),
            ],
        )
    )
