"""Run the benchmark matrix: pick combinations, measure each, write the table, JSON and plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import attrs
import torch

from ..registry import Registry, get_registry
from .allocator import MALLOC_MODES
from .matrix import build_matrix
from .measure import DTYPES, Combination, measure
from .report import plot, table, write_json


@attrs.frozen(kw_only=True)
class BenchConfig:
    """Settings of one ``implicit bench`` run (the CLI's options)."""

    solvers: Optional[tuple[str, ...]] = None
    cells: Optional[tuple[str, ...]] = None
    workloads: Optional[tuple[str, ...]] = None  # workload names within the cells
    backwards: Optional[tuple[str, ...]] = None
    device: str = "cpu"
    dtype: str = attrs.field(default="float32", validator=attrs.validators.in_(tuple(DTYPES)))
    batch: Optional[int] = None
    tol: float = 1e-4
    stop: str = "rel"
    max_iter: int = 50
    repeat: int = 5
    seed: int = 0
    quick: bool = False
    out: Path = attrs.field(default=Path("bench-out"), converter=Path)
    isolate: Optional[bool] = None  # None: a subprocess per combination on CPU
    plots: bool = True
    compare: Optional[str] = None
    malloc: str = attrs.field(default="tuned", validator=attrs.validators.in_(MALLOC_MODES))
    compile: bool = False  # also run every static solver with compile=True

    @property
    def isolated(self) -> bool:
        return self.device.startswith("cpu") if self.isolate is None else self.isolate


def compile_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that change how torch.compile runs, less the inductor cache
    directory when it is torch's default (importing torch's compiler sets that one itself)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        default = default_cache_dir()
    except Exception:  # another torch layout: keep whatever is set
        default = None
    return {k: v for k, v in sorted(env.items())
            if k.startswith(("TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE"))
            and not (k == "TORCHINDUCTOR_CACHE_DIR" and v == default)}


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        # how torch.compile ran (e.g. TORCHINDUCTOR_FORCE_DISABLE_CACHES=1: cold compile times)
        "compile_env": compile_environment(os.environ),
    }
    try:
        from importlib.metadata import version

        info["implicit_layers"] = version("implicit-layers")
    except Exception:
        info["implicit_layers"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy_warning(load: Optional[float]) -> Optional[str]:
    """A warning when the machine runs more than it has cores: timings then measure the
    contention (two CPU-bound processes slow code of many small operations 10–400× here)."""
    cores = os.cpu_count() or 1
    if load is None or load <= cores:
        return None
    return (f"the machine is busy (1-minute load average {load:.2f} on {cores} CPUs): times "
            "and ratios of this run measure the contention, not the solvers")


def _progress_line(i: int, total: int, combo: Combination, record: dict,
                   elapsed: float) -> str:
    if record.get("error"):
        return f"[{i}/{total}] {combo.key}: error: {record['error']}  ({elapsed:.0f} s)"
    f = record["forward"]
    return (f"[{i}/{total}] {combo.key}: {f['status']}, {f['n_calls']} calls, forward "
            f"{1e3 * f['time_s']:.2f} ms, train step {1e3 * record['train_step_time_s']:.2f} ms"
            f"  ({elapsed:.0f} s)")


def _run_isolated(combo: Combination) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "record.json"
        env = dict(os.environ)
        if combo.memory_only:
            # glibc: serve every block over 64 KiB by mmap, so freed tensors leave the resident
            # set at once and the high-water mark tracks live tensors, not heap fragmentation
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        proc = subprocess.run(
            [sys.executable, "-m", "implicit.bench.worker", str(result)],
            input=json.dumps(attrs.asdict(combo)),
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {
                "combination": attrs.asdict(combo),
                "error": f"worker exited with {proc.returncode}: " + " | ".join(tail),
            }
        return json.loads(result.read_text())


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device here")


def run_bench(
    config: BenchConfig,
    *,
    registry: Optional[Registry] = None,
    console=None,
) -> dict[str, Any]:
    """Run the matrix; return ``{"machine", "config", "records", "files"}``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
            console = Console(width=200)
    registry = registry or get_registry()
    check_device(config.device)
    if config.isolated and registry is not get_registry():
        raise ValueError("isolated runs use the installed plugins; pass isolate=False with a "
                         "custom registry")
    template = Combination(
        solver="", cell="", workload="", backward="", device=config.device, dtype=config.dtype,
        batch=config.batch, tol=config.tol, stop=config.stop, max_iter=config.max_iter,
        repeat=config.repeat, seed=config.seed, malloc=config.malloc,
    )
    combos = build_matrix(
        registry, solvers=config.solvers, cells=config.cells, backwards=config.backwards,
        workloads=config.workloads,
        quick=config.quick, device=config.device, template=template,
        compiled=config.compile,
    )
    if not combos:
        raise ValueError(
            "the selection leaves no combination to run (check --solvers/--cells/--backwards "
            "and `implicit plugins`: cells need workloads, plugins must support the device)"
        )
    comparer = None
    if config.compare is not None:
        from .compare import make_comparer

        comparer = make_comparer(config.compare, console)

    records = []
    load_before = load_average()
    busy = _busy_warning(load_before)
    if busy:
        console.print(f"[yellow]warning: {busy}[/yellow]")
    # a live bar on a terminal; piped or logged (CI), one line per finished combination
    live = console.is_terminal
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=False, disable=not live,
    ) as progress:
        task = progress.add_task("bench", total=len(combos))
        for i, combo in enumerate(combos, 1):
            progress.update(task, description=combo.key)
            record = _run_isolated(combo) if config.isolated else measure(combo, registry)
            if comparer is not None and not record.get("error"):
                record["compare"] = comparer(combo, record, registry)
            records.append(record)
            progress.advance(task)
            if not live:
                print(_progress_line(i, len(combos), combo, record,
                                     time.perf_counter() - started), flush=True)

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(config.device)
    load_after = load_average()
    machine["load_average_1min"] = load_before
    machine["load_average_1min_after"] = load_after
    busy = busy or _busy_warning(load_after)
    if busy:
        machine["warning"] = busy
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in attrs.asdict(config).items()}
    config_dict["argv"] = sys.argv
    files = [out / "results.json"]
    write_json(files[0], machine, config_dict, records)
    if config.plots:
        files += plot(records, out, config.tol, config.stop)
    title = (f"implicit bench — {config.device} {config.dtype}, tol {config.tol:g} "
             f"({config.stop}), max_iter {config.max_iter}, median of {config.repeat}")
    console.print(table(records, title))
    for f in files:
        console.print(f"wrote {f}")
    failed = [r for r in records if r.get("error")]
    if failed:
        console.print(f"[red]{len(failed)} combination(s) failed; see 'error' in results.json")
    if busy:
        console.print(f"[yellow]warning: {busy}[/yellow]")
    return {"machine": machine, "config": config_dict, "records": records, "files": files}
