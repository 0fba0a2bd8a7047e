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

    @pytest.fixture(scope="session")
    def contract_registry(self) -> Registry:
        return self.registry

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        cases = None
        if "contract_solver_case" in metafunc.fixturenames:
            cases = matrix(self.registry, self.only)["solver"]
            metafunc.parametrize("contract_solver_case", cases,
                                 ids=[f"{s}-{c}" for s, c in cases])
        if "contract_gradient_case" in metafunc.fixturenames:
            cases = matrix(self.registry, self.only)["gradient"]
            metafunc.parametrize("contract_gradient_case", cases,
                                 ids=[f"{b}-{s}-{c}" for b, s, c in cases])


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("implicit-contracts"):
        config.pluginmanager.register(ContractsPlugin(), "implicit-contracts")
