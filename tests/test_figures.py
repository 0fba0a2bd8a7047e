"""The README's and the docs' figures are the committed benchmark JSON's (benchmarks/figures.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_region_matches_the_results(figures, capsys):
    assert figures.main(["--check"]) == 0, capsys.readouterr().err


def test_the_readme_and_docs_carry_generated_regions(figures):
    found = {m.group(2) for page in figures.pages() for m in figures.REGION.finditer(page.read_text())}
    assert {"training-parity", "problems", "bench-quick"} <= found


def test_a_hand_edited_figure_is_caught(figures):
    page = ROOT / "README.md"
    text = page.read_text()
    match = next(figures.REGION.finditer(text))
    edited = text[:match.start(3)] + match.group(3).replace("0", "9", 1) + text[match.end(3):]
    assert figures.render(edited, "README.md") != edited  # regenerating restores it
    assert figures.render(text, "README.md") == text


def test_unknown_region_names_are_errors(figures):
    with pytest.raises(SystemExit, match="unknown figures region 'nope'"):
        figures.render("<!-- figures: nope -->\nx\n<!-- /figures -->", "page.md")


def test_regions_with_a_results_folder(figures):
    """``bench:DIR`` renders that run's table with its command; a folder that is not there is
    an error naming it, not an empty table."""
    text = figures.render("<!-- figures: bench:cpu-quick -->\nx\n<!-- /figures -->", "page.md")
    assert "| `anderson` | resnet_c48_s16 |" in text and "--out benchmarks/results/cpu-quick" in text
    with pytest.raises(SystemExit, match="no folder benchmarks/results/nope"):
        figures.render("<!-- figures: bench:nope -->\nx\n<!-- /figures -->", "page.md")
    with pytest.raises(SystemExit, match="unknown figures region 'nope:cpu-quick'"):
        figures.render("<!-- figures: nope:cpu-quick -->\nx\n<!-- /figures -->", "page.md")
