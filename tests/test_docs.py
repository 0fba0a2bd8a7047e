"""The documentation site: every Python block of every page runs as written, in page order,
and the site builds strictly (a warning — a broken cross-reference included — is an error)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def python_blocks(page: Path) -> list[str]:
    """The page's ```python fenced blocks (not ``{eval-rst}`` or other languages)."""
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for i, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page.relative_to(DOCS)} block {i + 1}", "exec"), namespace)


def test_site_builds_strictly(tmp_path):
    try:
        import myst_parser  # noqa: F401
        import sphinx  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the docs build needs the 'docs' extra (pip install -e '.[docs]'): {exc}")
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-n", "-q", "-b", "html",
         str(DOCS), str(tmp_path / "html")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "html" / "index.html").exists()
