"""`implicit verify` on the example plugin packages, registered on a fresh manager."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
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
    assert "test_solver_contract[in_place-tanh]" in out


def test_verify_names_why_a_contract_was_skipped(capsys):
    """gmres (linear_only) has efficacy cases but no leak case: the skip says why."""
    assert verify(only=["gmres"], max_examples=1,
                  extra_args=["-k", "leak or efficacy"]) == 0
    out = capsys.readouterr().out
    assert "no leak case for gmres: it needs a backward, an unrollable solver" in out


def test_verify_with_an_unknown_selection_says_so(capsys):
    assert verify(only=["no_such_plugin"], max_examples=1) == 2
    assert "no contract case matches" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["implicit-example-solver", "implicit-example-broken"])
def test_example_packages_declare_the_entry_point_group(name):
    text = (EXAMPLES / name / "pyproject.toml").read_text()
    assert "[project.entry-points.implicit_layers]" in text


def _temporary_venv(tmp_path: Path) -> Path:
    """A venv that sees this environment's packages (torch, implicit-layers, pytest) through a
    .pth file but installs into its own site-packages, so nothing leaks back."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    ours = sysconfig.get_paths()["purelib"]
    Path(site.stdout.strip(), "parent_env.pth").write_text(
        f"import site; site.addsitedir({ours!r})\n")
    return python


def _install(python: Path, package: str, tmp_path: Path) -> None:
    source = tmp_path / package  # a copy: an in-tree build would write into examples/
    shutil.copytree(EXAMPLES / package, source)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-build-isolation", "--no-index", str(source)],
                   check=True, capture_output=True, text=True)


def _installed_names() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="implicit_layers")}


def test_example_packages_installed_in_a_temporary_venv_are_verified(tmp_path):
    python = _temporary_venv(tmp_path)
    _install(python, "implicit-example-solver", tmp_path)
    _install(python, "implicit-example-broken", tmp_path)
    listed = subprocess.run([str(python), "-m", "implicit", "plugins", "--json"],
                            capture_output=True, text=True, check=True)
    distributions = {p["name"]: p["distribution"] for p in json.loads(listed.stdout)}
    assert distributions["halving"] == "implicit-example-solver"
    assert distributions["in_place"] == "implicit-example-broken"

    # the examples' cases with one cheap first-party cell, backward and solver (the allow-list)
    env = {**os.environ, "IMPLICIT_LAYERS_PLUGINS": "implicit_solvers.forward,implicit_cells.tanh,"
           "implicit_backwards.ift,example_solver,example_broken"}
    good = subprocess.run([str(python), "-m", "implicit", "verify", "implicit-example-solver",
                           "--max-examples", "3"], capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    assert " passed" in good.stdout and "failed" not in good.stdout

    bad = subprocess.run([str(python), "-m", "implicit", "verify", "implicit-example-broken",
                          "--max-examples", "3", "--no-shrink"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode != 0
    assert "in_place: the caller's z0 was modified in place" in bad.stdout
    assert "Falsifying example" in bad.stdout or "Failing test case" in bad.stdout

    # nothing leaked into this environment
    assert not {"example_solver", "example_broken"} & _installed_names()


#: each plugin of the broken gallery, the contract case that must reject it and a phrase of
#: that contract's message (examples/implicit-example-gallery documents each bug)
GALLERY = {
    "sloppy_damped": ("test_solver_contract[sloppy_damped-tanh]", "the record is not truthful"),
    "lagged_anderson": ("test_efficacy[lagged_anderson-linear_termination]",
                        "breaks its guarantee 'linear_termination'"),
    "nan_to_num": ("test_fault_mid_solve[nan_to_num-tanh]", "not NONFINITE"),
    "batch_anderson": ("test_batch_rows_match_solving_alone[batch_anderson-tanh]",
                       "alone but its count in the batch"),
    "ift_transposed": ("test_gradient_contract[ift_transposed-forward-tanh]",
                       "off the exact one"),
    "short_phantom": ("test_gradient_contract[short_phantom-forward-tanh]",
                      "off its documented formula"),
    "sign_richardson": ("test_adjoint_solver_contract[ift[adjoint=sign_richardson]-forward-tanh]",
                        "vacuous adjoint contract"),
    "history_keeping": ("test_no_leak_over_50_steps[history_keeping-forward-tanh]",
                        "live tensors grew"),
}
GALLERY_PLUGINS = "implicit_solvers.forward,implicit_cells.tanh,implicit_backwards.ift,example_gallery"


def _section(output: str, test_id: str) -> str:
    """The traceback section pytest prints for ``test_id`` (empty if it did not fail)."""
    marker = f" {test_id} _"
    start = output.find(marker)
    if start < 0:
        return ""
    end = output.find("\n____", start + len(marker))
    return output[start:end if end >= 0 else None]


@pytest.fixture(scope="module")
def gallery_run(tmp_path_factory):
    """``implicit verify implicit-example-gallery --report`` in a temporary venv where the
    gallery is installed next to three first-party plugins (the allow-list variable)."""
    tmp_path = tmp_path_factory.mktemp("gallery")
    python = _temporary_venv(tmp_path)
    _install(python, "implicit-example-gallery", tmp_path)
    report = tmp_path / "report"
    env = {**os.environ, "IMPLICIT_LAYERS_PLUGINS": GALLERY_PLUGINS}
    run = subprocess.run([str(python), "-m", "implicit", "verify", "implicit-example-gallery",
                          "--max-examples", "3", "--no-shrink", "--report", str(report)],
                         capture_output=True, text=True, env=env)
    return run, report


def test_the_broken_gallery_is_rejected_as_a_whole(gallery_run):
    run, report = gallery_run
    assert run.returncode != 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((report / "report.json").read_text())
    assert data["exit_code"] != 0 and data["cases"]
    # the coverage notes name what the suite cannot certify
    assert any("nan_to_num declares no guarantee" in note for note in data["notes"])
    assert not {"example_gallery"} & _installed_names()  # nothing leaked here


@pytest.mark.parametrize("plugin", sorted(GALLERY))
def test_each_broken_gallery_plugin_is_rejected_by_its_contract(gallery_run, plugin):
    run, _ = gallery_run
    test_id, phrase = GALLERY[plugin]
    assert f"FAILED implicit/testing/suite.py::{test_id}" in run.stdout, run.stdout[:6000]
    assert phrase in _section(run.stdout, test_id), _section(run.stdout, test_id)[-3000:]
