"""DEQ-Transformer cell for sequences (Bai et al. 2019), with variational dropout.

States are ``(B, L, d)``. The input ``x`` (``(B, L, d_in)``) is projected once per solve
(``injection``); each application of f is a post-norm transformer block with input injection:

    h = LayerNorm(z + Drop(SelfAttention(z)) + U x)
    f(z, x) = LayerNorm(h + Drop(FFN(h)))

with an optional causal mask. **Variational dropout** (deq ``lib/optimization.py``): in training
mode one dropout mask per solve is drawn in ``injection`` (shared over the sequence positions)
and reused by every iteration and by the backward pass — ordinary dropout would move the fixed
point at every call. In eval mode there is no dropout.

Forward-mode AD does not go through CPU attention kernels, so this cell does not declare
``forward_ad``: Newton–Krylov falls back to finite-difference JVPs on it.
"""

from __future__ import annotations

import torch
from torch import nn

import implicit
from implicit.cell import check_input


class TransformerCell(implicit.Cell):
    """DEQ-Transformer block: LN(h + FFN(h)), h = LN(z + Attn(z) + Ux); variational dropout."""

    batch_independent = True  # sample i of f depends on sample i only

    def __init__(
        self,
        d_model: int = 64,
        in_features: int | None = None,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.0,
        causal: bool = False,
        init_scale: float = 0.5,
    ) -> None:
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be an int >= 1, got {d_model!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        in_features = d_model if in_features is None else in_features
        self.d_model, self.in_features = d_model, in_features
        self.dropout, self.causal = dropout, causal
        self.inject = nn.Linear(in_features, d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff or 2 * d_model), nn.ReLU(),
                                 nn.Linear(d_ff or 2 * d_model, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        with torch.no_grad():  # small block weights keep the map near a contraction
            self.attn.out_proj.weight.mul_(init_scale)
            self.ffn[2].weight.mul_(init_scale)

    def _mask(self, shape, like: torch.Tensor) -> torch.Tensor:
        keep = 1 - self.dropout
        return torch.bernoulli(like.new_full(shape, keep)) / keep

    def injection(self, x: torch.Tensor):
        check_input(x, cell="transformer", layout=f"(B, L, in_features={self.in_features})",
                    ndim=3, size=self.in_features)
        u = self.inject(x)
        batch, length = x.shape[:2]
        causal = (torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), 1)
                  if self.causal else None)
        if self.training and self.dropout > 0:  # one mask per solve, shared over positions
            masks = (self._mask((batch, 1, self.d_model), u), self._mask((batch, 1, self.d_model), u))
        else:
            masks = None
        return u, causal, masks

    def injection_rows(self, u, rows):
        inj, causal, masks = u  # the causal mask is shared by every sample
        masks = None if masks is None else tuple(m.index_select(0, rows) for m in masks)
        return inj.index_select(0, rows), causal, masks

    def update(self, z: torch.Tensor, u) -> torch.Tensor:
        inj, causal, masks = u
        a, _ = self.attn(z, z, z, attn_mask=causal, need_weights=False)
        if masks is not None:
            a = a * masks[0]
        h = self.norm1(z + a + inj)
        f = self.ffn(h)
        if masks is not None:
            f = f * masks[1]
        return self.norm2(h + f)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:2], self.d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, dropout={self.dropout}, causal={self.causal}"


def examples(dtype: torch.dtype = torch.float64):
    """Small transformer cells (d ≤ 8, L ≤ 4) with down-scaled block weights."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw):
        heads = draw(st.sampled_from([1, 2]))
        d_model = heads * draw(st.integers(2, 4))
        in_features = draw(st.integers(1, 4))
        length = draw(st.integers(1, 4))
        batch = draw(st.integers(1, 3))
        seed = draw(st.integers(0, 2**31 - 1))
        causal = draw(st.booleans())
        with implicit.seeded(seed) as gen:
            cell = TransformerCell(d_model, in_features, n_heads=heads, causal=causal,
                                   init_scale=0.2).to(dtype)
            x = torch.randn(batch, length, in_features, generator=gen, dtype=dtype)
        return implicit.CellExample(cell=cell, x=x, lipschitz=None)

    return draw()


@implicit.hookimpl
def implicit_register_cells(register):
    register(
        implicit.CellSpec(
            name="transformer",
            factory=TransformerCell,
            contract_cost="costly",  # the gradient matrix runs it with the primary solver only
            capabilities={"batch_independent", "stochastic"},
            strategy=examples,
            workloads=[
                implicit.Workload(
                    name="transformer_d64_l32",
                    cell_options={"d_model": 64, "in_features": 64, "n_heads": 4},
                    input_shape=(32, 64),
                    batch=16,
                    quick=False,
                    description="DEQ-Transformer block, d=64, 4 heads, length 32, batch 16",
                )
            ],
        )
    )
