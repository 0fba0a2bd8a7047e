"""MDEQ-style multiscale cell (Bai et al. 2020): several resolutions solved jointly.

The state is a tuple of feature maps, one per resolution (each half the size of the previous).
Each branch applies a residual block with its input injection; then the branches are fused —
every branch receives the sum of all others, resampled to its resolution (strided 3×3
convolutions downwards, 1×1 convolution and nearest upsampling upwards) — and normalised:

    y_i = GN(ReLU(z_i + GN(conv(ReLU(GN(conv(z_i)))) + u_i)))
    f(z, x)_i = GN(ReLU(y_i + Σ_{j≠i} resample_{j→i}(y_j)))

"One implicit layer is all you need" ("Deep Implicit Layers" ch. 4, ../shared/seeds/001): the
whole multi-resolution network is a single equilibrium. GroupNorm keeps it batch-independent.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

import implicit
from implicit.cell import check_input


def _gn(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class MultiscaleCell(implicit.Cell):
    """MDEQ cell: per-resolution residual blocks with injection, fused across resolutions."""

    batch_independent = True  # sample i of f depends on sample i only

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (16, 32),
        num_groups: int = 4,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}")
        if any(c % min(num_groups, c) for c in channels):
            raise ValueError(f"every channel count in {channels} must be divisible by num_groups")
        self.in_channels, self.channels = in_channels, channels
        n = len(channels)
        self.inject = nn.ModuleList(
            nn.Conv2d(in_channels, c, 3, stride=2**i, padding=1) for i, c in enumerate(channels))
        self.conv1 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for c in channels)
        self.conv2 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for c in channels)
        self.gn1 = nn.ModuleList(_gn(c, num_groups) for c in channels)
        self.gn2 = nn.ModuleList(_gn(c, num_groups) for c in channels)
        self.gn3 = nn.ModuleList(_gn(c, num_groups) for c in channels)
        self.gn_out = nn.ModuleList(_gn(c, num_groups) for c in channels)
        # fuse[i][j]: branch j resampled to branch i
        self.fuse = nn.ModuleList(
            nn.ModuleList(self._resampler(channels[j], channels[i], j - i) if j != i
                          else nn.Identity() for j in range(n))
            for i in range(n))
        for conv in [*self.conv1, *self.conv2]:
            nn.init.normal_(conv.weight, 0.0, init_std)

    @staticmethod
    def _resampler(c_in: int, c_out: int, levels: int) -> nn.Module:
        if levels > 0:  # coarser j to finer i: 1x1 conv, then upsample
            return nn.Conv2d(c_in, c_out, 1, bias=False)
        layers, c = [], c_in
        for k in range(-levels):  # finer j to coarser i: strided 3x3 convs
            nxt = c_out if k == -levels - 1 else c_in
            layers.append(nn.Conv2d(c, nxt, 3, stride=2, padding=1, bias=False))
            c = nxt
        return nn.Sequential(*layers)

    def injection(self, x: torch.Tensor):
        check_input(x, cell="multiscale", layout=f"(B, in_channels={self.in_channels}, H, W)",
                    ndim=4, dim=1, size=self.in_channels)
        coarsest = 2 ** (len(self.channels) - 1)
        if min(x.shape[-2:]) < 2 * coarsest:
            raise ValueError(
                f"multiscale cell with {len(self.channels)} resolutions needs images of at least "
                f"{2 * coarsest}x{2 * coarsest} (the coarsest level must keep 2x2 pixels for "
                f"GroupNorm), got {tuple(x.shape[-2:])}"
            )
        return tuple(conv(x) for conv in self.inject)

    def init_state(self, x: torch.Tensor):
        with torch.no_grad():
            return tuple(torch.zeros_like(u) for u in self.injection(x))

    def update(self, z, u):
        ys = []
        for i, (zi, ui) in enumerate(zip(z, u)):
            h = self.gn1[i](F.relu(self.conv1[i](zi)))
            ys.append(self.gn3[i](F.relu(zi + self.gn2[i](self.conv2[i](h) + ui))))
        out = []
        for i, yi in enumerate(ys):
            total = yi
            for j, yj in enumerate(ys):
                if j == i:
                    continue
                r = self.fuse[i][j](yj)
                if j > i:
                    r = F.interpolate(r, size=yi.shape[-2:], mode="nearest")
                total = total + r
            out.append(self.gn_out[i](F.relu(total)))
        return tuple(out)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}"


def examples(dtype: torch.dtype = torch.float64):
    """Tiny two- or three-resolution cells on 4×4 to 8×8 images."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw):
        n = draw(st.integers(1, 3))
        channels = tuple(draw(st.sampled_from([2, 4])) for _ in range(n))
        size = draw(st.sampled_from([4, 8] if n < 3 else [8]))
        batch = draw(st.integers(1, 2))
        seed = draw(st.integers(0, 2**31 - 1))
        with implicit.seeded(seed) as gen:
            cell = MultiscaleCell(in_channels=2, channels=channels, num_groups=2).to(dtype)
            x = torch.randn(batch, 2, size, size, generator=gen, dtype=dtype)
        return implicit.CellExample(cell=cell, x=x, lipschitz=None)

    return draw()


@implicit.hookimpl
def implicit_register_cells(register):
    register(
        implicit.CellSpec(
            name="multiscale",
            factory=MultiscaleCell,
            contract_cost="costly",  # the gradient matrix runs it with the primary solver only
            capabilities={"batch_independent", "tuple_state"},
            strategy=examples,
            workloads=[
                implicit.Workload(
                    name="multiscale_32",
                    cell_options={"in_channels": 3, "channels": (16, 32)},
                    input_shape=(3, 32, 32),
                    batch=8,
                    quick=False,
                    description="MDEQ cell, 2 resolutions (16@32x32, 32@16x16), batch 8",
                )
            ],
        )
    )
