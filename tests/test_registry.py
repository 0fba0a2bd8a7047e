"""The plugin system: entry points, fresh managers, validation, did-you-mean, env filters."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import pickle
import subprocess
import sys
from typing import ClassVar

import attrs
import pytest
import torch

import implicit
from implicit import Registry, use_registry
from implicit.registry import ENV_ALLOW, ENV_DISABLE

FIRST_PARTY = {("solver", "forward"), ("cell", "tanh"), ("backward", "ift")}


@attrs.frozen(kw_only=True)
class HalvingSolver(implicit.Solver):
    """Damped iteration with a fixed half step (a test plugin)."""

    name: ClassVar[str] = "halving"

    def step(self, fn, z, fz, state):
        z_next = 0.5 * (z + fz)
        return z_next, fn(z_next), state


class ScaleCell(implicit.Cell):
    """z <- a z + x (a test plugin)."""

    def __init__(self, a: float = 0.5):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(float(a)))

    def update(self, z, u):
        return self.a * z + u


class ExamplePlugin:
    """A third-party-style plugin object registered on a fresh manager."""

    @implicit.hookimpl
    def implicit_register_solvers(self, register):
        register(implicit.SolverSpec(name="halving", factory=HalvingSolver))

    @implicit.hookimpl
    def implicit_register_cells(self, register):
        register(implicit.CellSpec(name="scale", factory=ScaleCell))


def test_installed_entry_points_attribute_first_party_plugins():
    eps = importlib.metadata.entry_points(group="implicit_layers")
    dists = {ep.name: ep.dist.metadata["Name"] for ep in eps}
    assert {"implicit_solvers.forward", "implicit_cells.tanh", "implicit_backwards.ift"} <= set(
        dists
    )
    assert {dists[n] for n in dists if n.startswith("implicit_")} == {"implicit-layers"}
    registry = Registry.from_entry_points(allow=None, disable=set())
    listed = {(e.kind, e.name): e for e in registry.entries()}
    for key in FIRST_PARTY:
        assert listed[key].distribution == "implicit-layers"
        assert listed[key].version == importlib.metadata.version("implicit-layers")


def test_cli_plugins_json_lists_first_party_with_distribution():
    out = subprocess.run(
        [sys.executable, "-m", "implicit.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {(r["kind"], r["name"]): r for r in json.loads(out.stdout)}
    for key in FIRST_PARTY:
        assert rows[key]["distribution"] == "implicit-layers"
        assert rows[key]["version"]


def test_cli_plugins_table(capsys):
    from implicit.cli import main

    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "forward" in text and "tanh" in text and "ift" in text and "implicit-layers" in text


def test_fresh_manager_plugin_is_listed_and_usable_in_deq():
    registry = Registry()
    registry.register_plugin(ExamplePlugin(), name="example")
    names = {(e.kind, e.name, e.plugin) for e in registry.entries()}
    assert names == {("solver", "halving", "example"), ("cell", "scale", "example")}
    # the backward comes from the installed plugins; the solver and cell from the fresh one
    backward = Registry.from_entry_points().make("backward", "ift", damping=0.0)
    with use_registry(registry):
        assert {e.name for e in implicit.list_plugins()} == {"halving", "scale"}
        cell = implicit.make_cell("scale", a=0.25).double()
        layer = implicit.DEQ(cell, solver="halving", backward=backward, tol=1e-9, stop="abs",
                             max_iter=200)
        x = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
        z = layer(x)
    assert layer.solution.solver == "halving"
    torch.testing.assert_close(z, x.detach() / 0.75, rtol=0, atol=1e-8)
    z.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 0.75), rtol=1e-6, atol=1e-6)


def test_duplicate_names_fail_naming_both_plugins():
    registry = Registry()
    registry.register_plugin(ExamplePlugin(), name="first")
    with pytest.raises(implicit.PluginError, match="'second'.*'halving'.*'first'"):
        registry.register_plugin(ExamplePlugin(), name="second")


@pytest.mark.parametrize(
    "spec_kwargs, message",
    [
        ({"name": "Bad Name", "factory": HalvingSolver}, "lower_snake_case"),
        ({"name": "ok", "factory": 42}, "callable"),
        ({"name": "ok", "factory": HalvingSolver, "capabilities": {"unrolable"}}, "unknown"),
        ({"name": "ok", "factory": HalvingSolver, "devices": {"tpu"}}, "devices"),
        (
            {
                "name": "ok",
                "factory": HalvingSolver,
                "options": {"nope": implicit.OptionSpec(name="nope")},
            },
            "not accepted",
        ),
    ],
)
def test_malformed_specs_fail_at_registration_naming_the_plugin(spec_kwargs, message):
    class Broken:
        @implicit.hookimpl
        def implicit_register_solvers(self, register):
            register(implicit.SolverSpec(**spec_kwargs))

    with pytest.raises(implicit.PluginError, match=f"'broken'.*{message}"):
        Registry().register_plugin(Broken(), name="broken")


def test_wrong_record_type_fails_naming_the_plugin():
    class Confused:
        @implicit.hookimpl
        def implicit_register_cells(self, register):
            register(implicit.SolverSpec(name="x", factory=HalvingSolver))

    with pytest.raises(implicit.PluginError, match="'confused'.*CellSpec"):
        Registry().register_plugin(Confused(), name="confused")


def test_unknown_option_says_did_you_mean():
    with pytest.raises(implicit.OptionError, match="did you mean 'max_iter'"):
        implicit.make_solver("forward", max_iters=5)
    with pytest.raises(implicit.OptionError, match="did you mean 'features'"):
        implicit.make_cell("tanh", feature=5)


def test_bad_option_value_is_a_clear_error():
    with pytest.raises(implicit.OptionError, match="beta"):
        implicit.make_solver("forward", beta=-1.0)
    with pytest.raises(implicit.OptionError, match="stop"):
        implicit.make_solver("forward", stop="relative")


def test_unknown_name_lists_what_is_available():
    with pytest.raises(implicit.UnknownPluginError, match="did you mean 'forward'.*available"):
        implicit.make_solver("froward")


def test_environment_restricts_loaded_plugins(monkeypatch):
    monkeypatch.setenv(ENV_ALLOW, "implicit_cells.tanh")
    only_tanh = Registry.from_entry_points()
    assert [(e.kind, e.name) for e in only_tanh.entries()] == [("cell", "tanh")]
    monkeypatch.setenv(ENV_ALLOW, "")
    assert Registry.from_entry_points().entries() == []
    monkeypatch.delenv(ENV_ALLOW)
    monkeypatch.setenv(ENV_DISABLE, "implicit_solvers.forward")
    assert "forward" not in Registry.from_entry_points().names("solver")
    monkeypatch.setenv(ENV_DISABLE, "implicit-layers")  # by distribution name
    assert Registry.from_entry_points().entries() == []


def test_option_schema_is_listed(registry, solver_name):
    schema = registry.get("solver", solver_name).spec.option_schema
    assert {"tol", "max_iter", "stop", "policy"} <= set(schema)


def test_every_plugin_pickles_and_deepcopies(registry):
    for entry in registry.entries():
        built = registry.make(entry.kind, entry.name)
        for clone in (pickle.loads(pickle.dumps(built)), copy.deepcopy(built)):
            assert type(clone) is type(built)
            if attrs.has(type(built)):
                assert attrs.asdict(clone) == attrs.asdict(built)
            else:
                for (k, a), (_, b) in zip(
                    built.state_dict().items(), clone.state_dict().items()
                ):
                    torch.testing.assert_close(a, b, msg=k)
