"""The README's code runs as written."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import implicit

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs(capsys):
    exec(compile(_python_blocks()[0], "README quick start", "exec"), {})
    assert "CONVERGED" in capsys.readouterr().out


def test_third_party_plugin_example_registers_and_solves(tmp_path, monkeypatch):
    source = _python_blocks()[1]
    path = tmp_path / "readme_solvers.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("readme_solvers", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "readme_solvers", module)
    spec.loader.exec_module(module)
    registry = implicit.Registry()
    registry.register_plugin(module, name="my_solvers")
    with implicit.use_registry(registry):
        import torch

        sol = implicit.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 2), solver="halving")
    assert sol.all_converged and sol.solver == "halving"


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", README.read_text())
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci
