"""`implicit verify` on the example plugin packages, registered on a fresh manager."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import implicit
from implicit.cli import verify

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(package_dir: str, module: str, monkeypatch):
    path = EXAMPLES / package_dir / module / "__init__.py"
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module, mod)
    spec.loader.exec_module(mod)
    return mod


def _registry_with(plugin, name):
    # a fresh manager: the example plugin plus one first-party cell and the exact backward
    import implicit_backwards.ift
    import implicit_cells.tanh

    registry = implicit.Registry()
    registry.register_plugin(implicit_cells.tanh, name="implicit_cells.tanh")
    registry.register_plugin(implicit_backwards.ift, name="implicit_backwards.ift")
    registry.register_plugin(plugin, name=name)
    return registry


def test_verify_passes_on_the_example_plugin(monkeypatch, capsys):
    plugin = _load("implicit-example-solver", "implicit_example_solver", monkeypatch)
    registry = _registry_with(plugin, "example_solver")
    assert verify(only=["example_solver"], registry=registry, max_examples=5) == 0
    out = capsys.readouterr().out
    assert "passed" in out and "failed" not in out


def test_verify_rejects_the_broken_plugin_readably(monkeypatch, capsys):
    plugin = _load("implicit-example-broken", "implicit_example_broken", monkeypatch)
    registry = _registry_with(plugin, "example_broken")
    code = verify(only=["example_broken"], registry=registry, max_examples=5)
    out = capsys.readouterr().out
    assert code != 0
    assert "in_place: the caller's z0 was modified in place" in out
    assert "Failing test case" in out or "Falsifying example" in out  # Hypothesis's report
    assert "contract_solver_case=('in_place', 'tanh')" in out


def test_verify_with_an_unknown_selection_says_so(capsys):
    assert verify(only=["no_such_plugin"], max_examples=1) == 2
    assert "no contract case matches" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["implicit-example-solver", "implicit-example-broken"])
def test_example_packages_declare_the_entry_point_group(name):
    text = (EXAMPLES / name / "pyproject.toml").read_text()
    assert "[project.entry-points.implicit_layers]" in text
