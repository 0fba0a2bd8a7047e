"""Subprocess entry of ``implicit bench``: measure one combination in a fresh process.

``python -m implicit.bench.worker RESULT.json`` reads a :class:`Combination` as JSON on stdin
and writes the measured record to ``RESULT.json``; a fresh process per combination makes the
peak resident memory (``ru_maxrss``) that combination's own.
"""

from __future__ import annotations

import json
import sys

from .measure import Combination, measure


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m implicit.bench.worker RESULT.json < combination.json",
              file=sys.stderr)
        return 2
    combo = Combination(**json.load(sys.stdin))
    record = measure(combo)
    with open(argv[0], "w") as handle:
        json.dump(record, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
