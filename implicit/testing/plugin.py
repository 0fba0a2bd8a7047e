"""Opt-in pytest plugin running the contract suite: ``pytest -p implicit.testing.plugin``.

It parametrises :mod:`implicit.testing.suite` over the registry (test ids = plugin names). Used
as ``-p implicit.testing.plugin`` it reads the installed entry points; ``implicit verify`` passes
a :class:`ContractsPlugin` with a registry and a selection instead.
"""

from __future__ import annotations

from typing import Iterable, Optional

import pytest

from ..registry import Registry
from .checks import matrix


class ContractsPlugin:
    def __init__(self, registry: Optional[Registry] = None, only: Iterable[str] = ()) -> None:
        self._registry = registry
        self.only = tuple(only)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.from_entry_points()
        return self._registry

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        cases = None
        for kind, argument in CASE_ARGUMENTS.items():
            if argument in metafunc.fixturenames:
                if cases is None:
                    cases = matrix(self.registry, self.only)
                found = cases[kind]
                if not found:  # say why instead of pytest's bare "empty parameter set"
                    where = ", ".join(self.only) if self.only else "the installed plugins"
                    found = [pytest.param(None, marks=pytest.mark.skip(
                        reason=f"no {kind.replace('_', ' ')} case for {where}: "
                               f"{EMPTY_REASONS[kind]}"))]
                    metafunc.parametrize(argument, found, ids=["none"])
                    continue
                metafunc.parametrize(argument, found, ids=[str(c) for c in found])


#: the suite's case arguments, by :func:`matrix` kind
CASE_ARGUMENTS = {kind: f"contract_{kind}_case"
                  for kind in ("solver", "fault", "batch_rows", "efficacy", "gradient",
                               "adjoint", "leak", "loop", "compaction", "step", "safeguard")}


#: why a contract has no case, by kind (see :func:`~implicit.testing.checks.matrix`)
EMPTY_REASONS = {
    "solver": "it needs a solver and a cell with an example strategy (a linear_only solver: "
              "none, it runs on the suite's affine problem)",
    "fault": "it needs a solver and a cell with an example strategy (a linear_only solver: "
             "none, it runs on the suite's affine problem)",
    "batch_rows": "it needs a solver and a batch_independent cell (or a linear_only solver)",
    "efficacy": "no selected solver declares a Guarantee (SolverSpec.guarantees)",
    "gradient": "it needs a backward, an unrollable solver and a cell",
    "adjoint": "no selected backward takes an adjoint solver (capability adjoint_solver)",
    "leak": "it needs a backward, an unrollable solver and a cell",
    "loop": "it needs a solver (one that requires no cell capability)",
    "compaction": "it needs a solver and a batch_independent cell of contract_cost cheap",
    "step": "no selected solver declares a step_formula (SolverSpec.step_formula)",
    "safeguard": "no selected solver has the safeguard's options (safeguard, growth, max_cuts)",
}


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("implicit-contracts"):
        config.pluginmanager.register(ContractsPlugin(), "implicit-contracts")
