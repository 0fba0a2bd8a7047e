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
                metafunc.parametrize(argument, cases[kind], ids=[str(c) for c in cases[kind]])


#: the suite's case arguments, by :func:`matrix` kind
CASE_ARGUMENTS = {kind: f"contract_{kind}_case"
                  for kind in ("solver", "fault", "batch_rows", "efficacy", "gradient",
                               "adjoint", "leak")}


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("implicit-contracts"):
        config.pluginmanager.register(ContractsPlugin(), "implicit-contracts")
