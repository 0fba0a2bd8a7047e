"""Which combinations the benchmark runs: everything registered that declares it can work together."""

from __future__ import annotations

from typing import Optional, Sequence

import attrs

from ..registry import Registry
from .measure import Combination


def build_matrix(
    registry: Registry,
    *,
    solvers: Optional[Sequence[str]] = None,
    cells: Optional[Sequence[str]] = None,
    backwards: Optional[Sequence[str]] = None,
    quick: bool = False,
    device: str = "cpu",
    template: Combination,
) -> list[Combination]:
    """Combinations of the selected (default: all) solvers × cell workloads × backwards.

    Left out: ``linear_only`` solvers (they solve affine maps only), plugins that do not run on
    ``device``, and pairs where one plugin ``requires`` a capability the other lacks. With
    ``quick``, only workloads marked quick. Unknown names are errors (with a did-you-mean).
    """
    device_type = device.split(":")[0]

    def pick(kind: str, names: Optional[Sequence[str]]):
        entries = [registry.get(kind, n) for n in names] if names else registry.entries(kind)
        return [e for e in entries if device_type in e.spec.devices]

    solver_entries = [
        e for e in pick("solver", solvers) if "linear_only" not in e.spec.capabilities
    ]
    cell_entries = pick("cell", cells)
    backward_entries = pick("backward", backwards)
    combos = []
    for cell in cell_entries:
        for workload in cell.spec.workloads:
            if quick and not workload.quick:
                continue
            for solver in solver_entries:
                if not solver.spec.requires <= cell.spec.capabilities:
                    continue
                for backward in backward_entries:
                    if not backward.spec.requires <= solver.spec.capabilities:
                        continue
                    combos.append(
                        attrs.evolve(
                            template,
                            solver=solver.name,
                            cell=cell.name,
                            workload=workload.name,
                            backward=backward.name,
                        )
                    )
    return combos
