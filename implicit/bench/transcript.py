"""What a script under ``benchmarks/`` prints, kept to be written to ``DIR/output.txt`` with
``--out DIR``: the committed outputs under ``benchmarks/results/``, which
``benchmarks/figures.py`` puts into the docs verbatim. (In the package, not beside the scripts,
so that a script imported by path, as the tests do, finds it.)"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence


class Transcript:
    """Lines printed as they come; the first is the command that ran (``$ python
    benchmarks/SCRIPT ARGS``, ``ARGS`` from ``argv``, else the command line)."""

    def __init__(self, script: str, argv: Optional[Sequence[str]] = None) -> None:
        self.lines: list[str] = []
        self.say(f"$ python benchmarks/{script} {' '.join(argv or sys.argv[1:])}")

    def say(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    def save(self, out: Optional[Path]) -> None:
        """Write the lines to ``out/output.txt`` (nothing if ``out`` is None)."""
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "output.txt").write_text("\n".join(self.lines) + "\n")
