"""Shared test set-up: Hypothesis profiles and parametrisation over the plugin registry.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default; derandomised, no database, no deadline),
``dev`` (random, more examples) and ``nightly`` (many examples).

Any test taking ``solver_name``, ``cell_name`` or ``backward_name`` runs once per registered
plugin of that kind (ids = plugin names), so a plugin is tested the moment it is registered.
The registry is built fresh from the installed entry points, not the process-wide one.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from implicit import Registry

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    max_examples=20,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50, print_blob=True)
settings.register_profile("nightly", deadline=None, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

REGISTRY = Registry.from_entry_points()
_AXES = {"solver_name": "solver", "cell_name": "cell", "backward_name": "backward"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture, kind in _AXES.items():
        if fixture in metafunc.fixturenames:
            names = REGISTRY.names(kind)
            if kind == "solver":  # nonlinear fixed points: linear-only solvers do not apply
                names = [n for n in names
                         if "linear_only" not in REGISTRY.get("solver", n).spec.capabilities]
            metafunc.parametrize(fixture, names, ids=names)
    if "adjoint_solver_name" in metafunc.fixturenames:
        names = REGISTRY.names("solver")  # the IFT adjoint is affine: every solver applies
        metafunc.parametrize("adjoint_solver_name", names, ids=names)
    if "exact_pair" in metafunc.fixturenames:
        # (solver, backward) pairs whose gradient is exact up to tolerances, where the backward's
        # requirements are met by the solver's declared capabilities
        pairs = [
            (s.name, b.name)
            for s in REGISTRY.entries("solver")
            for b in REGISTRY.entries("backward")
            if "exact" in b.spec.capabilities and b.spec.requires <= s.spec.capabilities
            and "linear_only" not in s.spec.capabilities
        ]
        metafunc.parametrize("exact_pair", pairs, ids=[f"{s}-{b}" for s, b in pairs])
    if "exact_backward_name" in metafunc.fixturenames:
        names = [e.name for e in REGISTRY.entries("backward") if "exact" in e.spec.capabilities]
        metafunc.parametrize("exact_backward_name", names, ids=names)
    if "cell_with_strategy" in metafunc.fixturenames:
        # cells whose plugin ships a Hypothesis strategy of contractive instances
        names = [e.name for e in REGISTRY.entries("cell") if e.spec.strategy is not None]
        metafunc.parametrize("cell_with_strategy", names, ids=names)


@pytest.fixture(scope="session")
def registry() -> Registry:
    return REGISTRY


@pytest.fixture(autouse=True)
def _use_test_registry():
    """Name lookups (make_solver, DEQ(..., solver="forward")) use the fresh test registry."""
    from implicit import use_registry

    with use_registry(REGISTRY):
        yield
