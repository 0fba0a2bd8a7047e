"""Sphinx configuration of the implicit-layers documentation.

Sphinx because the docstrings are written in reStructuredText with Sphinx's Python roles
(``:func:``, ``:class:``, ``:mod:``), as PyTorch's are: autodoc turns them into links without
rewriting a line. Pages are Markdown (MyST), like the README they grew out of. Built strictly
by the test suite (``tests/test_docs.py``: warnings, broken cross-references included, are
errors), which also runs every Python code block of every page.
"""

from __future__ import annotations

import importlib.metadata

project = "implicit-layers"
author = "the implicit-layers developers"
release = importlib.metadata.version("implicit-layers")
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"implicit-layers {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

# offline builds: no inventories are fetched, so external names are not linked (and not
# reported as broken either, see nitpick_ignore_regex)
intersphinx_mapping: dict = {}
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|np|numpy|scipy|attrs|pluggy|hypothesis|pytest|rich|matplotlib)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|Callable|Optional|Union|Any|Sequence|Iterable|Mapping|ClassVar"
               r"|Path|State|FlatFn|MapWith|Generator|Literal|Iterator|dtype|device)"),
    (r"py:class", r"(typing|collections\.abc|abc|pathlib|argparse|enum|builtins|nn)\..*"),
]
