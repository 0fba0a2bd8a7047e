"""The ``implicit`` command line: ``implicit plugins`` lists what is registered."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .registry import KINDS, PluginError, get_registry


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_plugins(args: argparse.Namespace) -> int:
    entries = get_registry().entries(args.kind)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    rows = [
        [
            e.kind,
            e.name,
            f"{e.distribution or '-'} {e.version or ''}".strip(),
            e.plugin,
            ",".join(sorted(e.spec.capabilities)) or "-",
            e.spec.description,
        ]
        for e in entries
    ]
    header = ["kind", "name", "distribution", "plugin", "capabilities", "summary"]
    print(_table(rows, header) if rows else "no plugins registered")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="implicit", description="implicit-layers: deep equilibrium layers for PyTorch"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list registered solvers, cells and backwards")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--kind", choices=KINDS, help="only this kind")
    plugins.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PluginError as exc:
        print(f"implicit: plugin error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
