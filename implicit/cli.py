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


def _names(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of plugin names")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from .bench import BenchConfig, run_bench
    except ImportError as exc:  # rich / matplotlib missing
        print(f"implicit bench needs the 'bench' extra: pip install 'implicit-layers[bench]' "
              f"({exc})", file=sys.stderr)
        return 2
    if args.problems:
        return _bench_problems(args)
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 5)
    config = BenchConfig(
        solvers=args.solvers, cells=args.cells, backwards=args.backwards, device=args.device,
        workloads=args.workloads,
        dtype=args.dtype, batch=args.batch, tol=1e-4 if args.tol is None else args.tol,
        stop=args.stop, max_iter=50 if args.max_iter is None else args.max_iter,
        repeat=repeat, seed=args.seed, quick=args.quick, out=args.out,
        isolate=args.isolate, plots=not args.no_plots, compare=args.compare,
        malloc=args.malloc, compile=args.compile,
    )
    try:
        result = run_bench(config)
    except (ValueError, LookupError) as exc:
        print(f"implicit bench: {exc}", file=sys.stderr)
        return 2
    return 1 if any(r.get("error") for r in result["records"]) else 0


def _bench_problems(args: argparse.Namespace) -> int:
    """``implicit bench --problems SET``: ours and scipy's solvers on the test problems."""
    from rich.console import Console

    from .bench.problems import DEFAULT_SOLVERS, markdown, run_problems, table

    console = Console()
    try:
        result = run_problems(
            args.problems, args.solvers or DEFAULT_SOLVERS,
            tol=1e-8 if args.tol is None else args.tol,
            budget=200 if args.max_iter is None else args.max_iter,
            factor=args.factor, out=args.out, plots=not args.no_plots, argv=sys.argv,
            console=console)
    except (ValueError, LookupError) as exc:
        print(f"implicit bench: {exc}", file=sys.stderr)
        return 2
    console.print(table(result))
    console.print(markdown(result), markup=False, highlight=False)
    if args.out:
        console.print(f"wrote {args.out}/results.json")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    extra = ("-k", args.keyword) if args.keyword else ()
    return verify(only=args.plugins, max_examples=args.max_examples, report=args.report,
                  extra_args=extra, shrink=False if args.no_shrink else None)


def _coverage_notes(registry, only) -> list[str]:
    """What the suite cannot certify for the selected plugins, said in the report."""
    from .testing.checks import guarantees_of

    keep = set(only or ())
    notes = []
    for entry in registry.entries():
        if keep and not {entry.name, entry.plugin, entry.distribution} & keep:
            continue
        if entry.kind == "solver" and not guarantees_of(entry.spec):
            notes.append(f"solver {entry.name} declares no guarantee: its contracts certify "
                         "honest records and budgets, not that it ever converges")
        if (entry.kind != "cell" and entry.spec.option_strategy is None
                and entry.spec.option_schema):
            notes.append(f"{entry.kind} {entry.name} declares no option_strategy: only its "
                         "default options are exercised")
    return notes


def verify(only=(), *, registry=None, max_examples=None, extra_args=(), report=None,
           shrink=None) -> int:
    """Run the contract suite (pytest + Hypothesis); 0 when every contract holds.

    ``report`` (a folder): also write ``report.json`` and ``report.md`` there — per case and
    contract, the claims made over the drawn examples and why the others were not — and print
    the table."""
    import importlib
    import os
    import tempfile
    from pathlib import Path

    if max_examples is not None:
        os.environ["IMPLICIT_VERIFY_MAX_EXAMPLES"] = str(max_examples)
    if shrink is not None:  # None: as IMPLICIT_VERIFY_SHRINK says (default: shrink)
        os.environ["IMPLICIT_VERIFY_SHRINK"] = "1" if shrink else "0"
    try:
        import pytest

        from .testing import suite
        from .testing.plugin import ContractsPlugin
    except ImportError as exc:
        print(f"implicit verify needs pytest and hypothesis (pip install "
              f"'implicit-layers[test]'): {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bad IMPLICIT_VERIFY_* setting
        print(f"implicit verify: {exc}", file=sys.stderr)
        return 2
    if suite.MAX_EXAMPLES != suite.max_examples() or suite.SHRINK != suite.shrink():
        suite = importlib.reload(suite)  # the example count is fixed when the suite is built
    from .testing.checks import matrix

    plugin = ContractsPlugin(registry=registry, only=only)
    cases = matrix(plugin.registry, only)
    if not any(cases.values()):
        print("implicit verify: no contract case matches the selection "
              f"{list(only) or 'all'} (see `implicit plugins`)", file=sys.stderr)
        return 2
    print("implicit verify: contract cases: " + ", ".join(
        f"{len(found)} {kind.replace('_', ' ')}" for kind, found in cases.items()))
    # -rfEs: failures, errors and each skipped contract with its reason in the summary
    argv = [suite.__file__, "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts=",
            "-W", "ignore::implicit.ConvergenceWarning", *extra_args]
    if report is None:
        return int(pytest.main(argv, plugins=[plugin]))
    from .testing.claims import REPORT_ENV, format_report, read_report

    folder = Path(report)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "tallies.jsonl"
        previous = os.environ.get(REPORT_ENV)
        os.environ[REPORT_ENV] = str(lines)
        try:
            code = int(pytest.main(argv, plugins=[plugin]))
        finally:
            if previous is None:
                os.environ.pop(REPORT_ENV, None)
            else:
                os.environ[REPORT_ENV] = previous
        rows = read_report(lines)
    notes = _coverage_notes(plugin.registry, only)
    (folder / "report.json").write_text(json.dumps(
        {"exit_code": code, "cases": rows, "notes": notes}, indent=1) + "\n")
    table = format_report(rows, notes)
    (folder / "report.md").write_text(table)
    print(table)
    return code


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _nonnegative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0 (e.g. 1e-4), got {value!r}") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="implicit", description="implicit-layers: deep equilibrium layers for PyTorch"
    )
    import torch

    from . import __version__

    parser.add_argument("--version", action="version",
                        version=f"implicit-layers {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list registered solvers, cells and backwards")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--kind", choices=KINDS, help="only this kind")
    plugins.set_defaults(func=cmd_plugins)

    bench = sub.add_parser(
        "bench",
        help="benchmark the solver x cell x backward matrix",
        description="Measure every compatible registered solver x cell workload x backward: "
        "NFE, time to tolerance, training-step time, floor ratio, peak memory, true residual, "
        "gradient error vs a tight float64 reference. Writes results.json and PNG plots.",
    )
    bench.add_argument("--solvers", type=_names,
                       help="comma-separated solver names (default all); options as "
                       "name:key=value, e.g. anderson:m=10")
    bench.add_argument("--cells", type=_names, help="comma-separated cell names (default all)")
    bench.add_argument("--workloads", type=_names,
                       help="comma-separated workload names of those cells (default all), "
                       "e.g. resnet_c48,tanh_d256")
    bench.add_argument("--backwards", type=_names,
                       help="comma-separated backward names (default all); options as "
                       "name:key=value, e.g. phantom:k=1,phantom:k=20,jfb,ift")
    bench.add_argument("--device", default="cpu", help="torch device (default cpu)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    bench.add_argument("--batch", type=_positive_int, help="override every workload's batch")
    bench.add_argument("--tol", type=_nonnegative_float, default=None,
                       help="forward tolerance (0: always run max-iter calls; default 1e-4, "
                       "with --problems 1e-8 absolute)")
    bench.add_argument("--stop", choices=["abs", "rel"], default="rel", help="residual to stop on")
    bench.add_argument("--max-iter", type=_positive_int, default=None,
                       help="forward budget (calls; default 50, with --problems 200)")
    bench.add_argument("--problems", metavar="SET",
                       help="instead of the matrix: our solvers (--solvers, default anderson, "
                       "broyden, newton_krylov, newton_krylov:backend=torch) and scipy's "
                       "same-family methods on the nonlinear test problems of "
                       "implicit.problems ('standard', or comma-separated names), float64")
    bench.add_argument("--factor", type=float, default=1.0,
                       help="with --problems: start from factor x the standard start "
                       "(Moré-Garbow-Hillstrom use 1, 10, 100)")
    bench.add_argument("--repeat", type=_positive_int, help="timed repeats (default 5; 2 quick)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--quick", action="store_true",
                       help="pruned matrix (quick workloads, every solver with the primary "
                       "backward and every backward with the primary solver, 2 repeats): "
                       "< 2 min on 2 CPU cores")
    bench.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    bench.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                       help="a fresh process per combination (default: on for CPU)")
    bench.add_argument("--compare", choices=["torchdeq"],
                       help="also run the workloads through torchdeq (if importable)")
    bench.add_argument("--compile", action="store_true",
                       help="also run every solver that has a fixed-shape step with "
                       "compile=True (the solve as one torch.compile'd while loop), next to its "
                       "eager self; the first training step's compile time is reported apart "
                       "and each compiled row is timed against its eager twin in the same "
                       "rounds (add --backwards ift,ift:compile=True for compiled adjoints)")
    bench.add_argument("--malloc", choices=["tuned", "system"], default="tuned",
                       help="C allocator settings for CPU timings: 'tuned' (default) keeps freed "
                       "memory instead of returning it and faulting it back in every step (as "
                       "PyTorch's CPU launcher does with jemalloc); 'system' keeps glibc's")
    bench.set_defaults(func=cmd_bench)

    verify_parser = sub.add_parser(
        "verify",
        help="run the contract suite on the installed plugins (or the named ones)",
        description="Property-based contract checks (Hypothesis) of every registered solver x "
        "cell and backward x cell allowed by declared capabilities; exits non-zero on a "
        "violation and prints the falsifying example.",
    )
    verify_parser.add_argument("plugins", nargs="*",
                               help="plugin names, entry-point names or distributions")
    verify_parser.add_argument("--max-examples", type=_positive_int,
                               help="Hypothesis examples per solver case (default 10)")
    verify_parser.add_argument("--no-shrink", action="store_true",
                               help="report the first failing example, not a minimal one "
                               "(faster on a broken plugin)")
    verify_parser.add_argument("-k", dest="keyword", metavar="EXPRESSION",
                               help="only the contract cases matching this pytest -k "
                               "expression, e.g. -k 'efficacy or fault'")
    verify_parser.add_argument("--report", metavar="DIR",
                               help="write report.json and report.md to DIR (claims made / "
                               "examples per case and contract, reasons for no claim) and "
                               "print the table")
    verify_parser.set_defaults(func=cmd_verify)
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
