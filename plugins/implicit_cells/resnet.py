"""The ResNet cell of "Deep Implicit Layers" ch. 4 (../shared/seeds/001; Bai et al. 2019):

    f(z, x) = norm₃(ReLU(z + norm₂(x + W₂ * norm₁(ReLU(W₁ * z)))))

with GroupNorm for every norm, 3×3 convolutions initialised N(0, 0.01) and a bottleneck: the
equilibrium state has ``channels`` channels while the hidden layer inside the cell has
``inner_channels`` (``channels < inner_channels``: a small state, many parameters). The input
``x`` is the (already embedded) image with ``channels`` channels; the state has its shape.
GroupNorm normalises each sample on its own, so the cell is batch-independent. ``dims=1`` makes
the same cell on sequences ``(B, channels, L)`` (``Conv1d``), e.g. for MNIST-1D.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import implicit
from implicit.cell import check_input


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class ResNetCell(implicit.Cell):
    """Tutorial ch.4 ResNet cell: norm(ReLU(z + norm(x + W2 * norm(ReLU(W1 * z)))))."""

    batch_independent = True  # sample i of f depends on sample i only

    def __init__(
        self,
        channels: int = 48,
        inner_channels: int = 64,
        kernel_size: int = 3,
        num_groups: int = 8,
        init_std: float = 0.01,
        dims: int = 2,
    ) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("inner_channels", inner_channels),
                            ("kernel_size", kernel_size), ("num_groups", num_groups)):
            _positive_int(name, value)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size padding), got {kernel_size}")
        for name, value in (("channels", channels), ("inner_channels", inner_channels)):
            if value % num_groups:
                raise ValueError(f"{name}={value} must be divisible by num_groups={num_groups}")
        if dims not in (1, 2) or isinstance(dims, bool):
            raise ValueError(f"dims must be 1 (sequences, Conv1d) or 2 (images, Conv2d), got "
                             f"{dims!r}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.channels = channels
        self.inner_channels = inner_channels
        self.dims = dims
        pad = kernel_size // 2
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv1 = conv(channels, inner_channels, kernel_size, padding=pad, bias=False)
        self.conv2 = conv(inner_channels, channels, kernel_size, padding=pad, bias=False)
        self.norm1 = nn.GroupNorm(num_groups, inner_channels)
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.norm3 = nn.GroupNorm(num_groups, channels)
        nn.init.normal_(self.conv1.weight, 0.0, init_std)
        nn.init.normal_(self.conv2.weight, 0.0, init_std)

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        layout = "L" if self.dims == 1 else "H, W"
        check_input(x, cell="resnet", layout=f"(B, channels={self.channels}, {layout})",
                    ndim=self.dims + 2, dim=1, size=self.channels)
        return x

    def update(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        y = self.norm1(F.relu(self.conv1(z)))
        return self.norm3(F.relu(z + self.norm2(u + self.conv2(y))))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, inner_channels={self.inner_channels}, "
                f"dims={self.dims}")


def examples(dtype: torch.dtype = torch.float64):
    """Hypothesis strategy of tiny ResNet cells with small weights (fast, stable solves)."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw):
        groups = draw(st.sampled_from([1, 2]))
        channels = groups * draw(st.integers(1, 2))
        inner = groups * draw(st.integers(1, 3))
        size = draw(st.integers(2, 5))
        batch = draw(st.integers(1, 3))
        seed = draw(st.integers(0, 2**31 - 1))
        kernel_size = draw(st.sampled_from([1, 3]))
        with implicit.seeded(seed) as gen:
            cell = ResNetCell(channels, inner, kernel_size=kernel_size,
                              num_groups=groups).to(dtype)
            x = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
        return implicit.CellExample(cell=cell, x=x, lipschitz=None)

    return draw()


@implicit.hookimpl
def implicit_register_cells(register):
    register(
        implicit.CellSpec(
            name="resnet",
            factory=ResNetCell,
            contract_cost="costly",  # the gradient matrix runs it with the primary solver only
            capabilities={"batch_independent"},
            strategy=examples,
            workloads=[
                implicit.Workload(
                    name="resnet_c48_s16",
                    cell_options={"channels": 48, "inner_channels": 64},
                    input_shape=(48, 16, 16),
                    batch=4,
                    description="tutorial ch.4 ResNet cell, 48/64 channels, 16x16, batch 4 "
                    "(the quick variant)",
                ),
                implicit.Workload(
                    name="resnet_c48",
                    cell_options={"channels": 48, "inner_channels": 64},
                    input_shape=(48, 32, 32),
                    batch=4,
                    quick=False,
                    description="tutorial ch.4 ResNet cell, 48/64 channels, 32x32, batch 4",
                ),
                implicit.Workload(
                    name="resnet_c48_b16",
                    cell_options={"channels": 48, "inner_channels": 64},
                    input_shape=(48, 32, 32),
                    batch=16,
                    quick=False,
                    description="tutorial ch.4 ResNet cell, 48/64 channels, 32x32, batch 16",
                ),
            ],
        )
    )
