"""Which combinations the benchmark runs: everything registered that declares it can work together."""

from __future__ import annotations

from typing import Optional, Sequence

import ast

import attrs

from ..registry import Registry
from .measure import Combination


def build_matrix(
    registry: Registry,
    *,
    solvers: Optional[Sequence[str]] = None,
    cells: Optional[Sequence[str]] = None,
    backwards: Optional[Sequence[str]] = None,
    workloads: Optional[Sequence[str]] = None,
    quick: bool = False,
    device: str = "cpu",
    template: Combination,
    compiled: bool = False,
) -> list[Combination]:
    """Combinations of the selected (default: all) solvers × cell workloads × backwards.

    Left out: ``linear_only`` solvers (they solve affine maps only), plugins that do not run on
    ``device``, and pairs where one plugin ``requires`` a capability the other lacks. With
    ``quick``, only workloads marked quick, and only every solver with the primary backward plus
    every backward with the primary solver. Unknown names are errors (with a did-you-mean).
    A selection may carry options: ``"phantom:k=1"`` (see :func:`parse_selection`). With
    ``compiled``, every selected solver that has a fixed-shape step (``static``) also runs with
    ``compile=True``, next to its eager self.
    """
    device_type = device.split(":")[0]

    def pick(kind: str, names: Optional[Sequence[str]]):
        """(entry, options) per selection; ``name:key=value:key=value`` gives options."""
        chosen = [parse_selection(n) for n in names] if names else [
            (e.name, {}) for e in registry.entries(kind)]
        out = []
        for name, options in chosen:
            entry = registry.get(kind, name)
            if options:
                registry.make(kind, name, **options)  # unknown/invalid options fail here
            if device_type in entry.spec.devices:
                out.append((entry, options))
        return out

    solver_entries = [
        (e, o) for e, o in pick("solver", solvers) if "linear_only" not in e.spec.capabilities
    ]
    if compiled:
        solver_entries = [pair for e, o in solver_entries for pair in (
            [(e, o), (e, {**o, "compile": True})]
            if getattr(e.spec.factory, "static", False) and not o.get("compile") else [(e, o)])]
    cell_entries = [e for e, _ in pick("cell", cells)]
    if workloads:
        known = {w.name for e in cell_entries for w in e.spec.workloads}
        unknown = sorted(set(workloads) - known)
        if unknown:
            raise ValueError(f"unknown workloads {unknown} for the selected cells; known: "
                             f"{sorted(known)}")
    backward_entries = pick("backward", backwards)
    # The primary pair: the first exact backward and the first unrollable solver (by name, from
    # declared capabilities). The float64 gradient reference uses the primary solver; --quick
    # prunes the product to "every solver with the primary backward" plus "every backward with
    # the primary solver".
    primary_backward = next((e.name for e in registry.entries("backward")
                             if "exact" in e.spec.capabilities), None)
    primary_solver = next((e.name for e in registry.entries("solver")
                           if "unrollable" in e.spec.capabilities), None)
    combos = []
    for cell in cell_entries:
        for workload in cell.spec.workloads:
            if quick and not workload.quick or workloads and workload.name not in workloads:
                continue
            for solver, solver_options in solver_entries:
                if not solver.spec.requires <= cell.spec.capabilities:
                    continue
                for backward, backward_options in backward_entries:
                    if not backward.spec.requires <= solver.spec.capabilities:
                        continue
                    if quick and not (backward.name == primary_backward
                                      or solver.name == primary_solver):
                        continue
                    combos.append(
                        attrs.evolve(
                            template,
                            solver=solver.name,
                            solver_options=dict(solver_options),
                            cell=cell.name,
                            workload=workload.name,
                            backward=backward.name,
                            backward_options=dict(backward_options),
                            reference_solver=template.reference_solver or primary_solver or "",
                        )
                    )
    return combos


def parse_selection(text: str) -> tuple[str, dict]:
    """``"phantom:k=1:lam=0.5"`` → ``("phantom", {"k": 1, "lam": 0.5})`` (Python literals)."""
    name, *pairs = text.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"bad option {pair!r} in {text!r}: write name:key=value")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a bare word, e.g. solver=anderson
    return name.strip(), options
