"""`implicit bench`: the matrix, the measurements, the outputs and the CLI's errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import ClassVar

import attrs
import pytest
import torch

import implicit
from implicit.bench import BenchConfig, Combination, build_matrix, run_bench
from implicit.bench.report import SCHEMA

pytest.importorskip("rich")
pytest.importorskip("matplotlib")


def _quick_config(tmp_path, **kw):
    defaults = dict(quick=True, repeat=1, batch=4, out=tmp_path, isolate=False)
    return BenchConfig(**{**defaults, **kw})


def test_in_process_run_writes_schema_table_and_plots(tmp_path, registry, capsys):
    result = run_bench(_quick_config(tmp_path, cells=("tanh",)), registry=registry)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["schema"] == SCHEMA
    assert {"torch", "device", "cpu_count", "tf32_matmul"} <= set(payload["machine"])
    combos = {(r["combination"]["solver"], r["combination"]["backward"])
              for r in payload["records"]}
    solvers = [e for e in registry.entries("solver") if "linear_only" not in e.spec.capabilities]
    primary_b = next(e.name for e in registry.entries("backward") if "exact" in e.spec.capabilities)
    primary_s = next(e.name for e in solvers if "unrollable" in e.spec.capabilities)
    # --quick: every solver with the primary backward, every backward with the primary solver
    assert combos == {(s.name, b.name) for s in solvers for b in registry.entries("backward")
                      if b.spec.requires <= s.spec.capabilities
                      and (b.name == primary_b or s.name == primary_s)}
    for record in payload["records"]:
        assert record["error"] is None, record.get("traceback")
        fwd = record["forward"]
        assert fwd["n_calls"] >= 1 and fwd["time_s"] > 0 and record["floor_ratio"] > 0
        # the floor: the fastest forward against bursts of the solve's own number of calls
        assert f"bursts of n_calls={fwd['n_calls']} calls" in record["cell_eval_method"]
        assert record["floor_ratio"] == pytest.approx(
            min(fwd["times_s"]) / (fwd["n_calls"] * record["cell_eval_time_s"]))
        assert sum(fwd["status_counts"].values()) == 4
        if fwd["status"] == "converged":
            assert fwd["true_rel_residual_max"] <= 1e-4 * 1.01
        assert record["reference"]["status"] == "converged"
        if fwd["status"] == "converged" and "exact" in registry.get(
                "backward", record["combination"]["backward"]).spec.capabilities:
            if record["backward_regularised"]:  # ift's damped training adjoint
                assert 0.9 < record["grad_cosine"] and record["grad_rel_error"] < 0.5
            else:
                assert record["grad_rel_error"] < 1e-2
    for name in ("residuals.png", "time_nfe.png", "matrix.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "implicit bench" in out and "tanh_d256" in out
    assert len(result["files"]) == 4
    # stdout is not a terminal here: one line per finished combination, as it finishes
    n = len(payload["records"])
    assert all(f"[{i}/{n}] " in out for i in range(1, n + 1))
    assert "load_average_1min" in payload["machine"]


def test_a_busy_machine_is_warned_about_and_recorded(tmp_path, registry, capsys, monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (3.0 * (os.cpu_count() or 1), 0.0, 0.0))
    run_bench(_quick_config(tmp_path, cells=("tanh",), solvers=("forward",),
                            backwards=("ift",), plots=False), registry=registry)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert "machine is busy" in payload["machine"]["warning"]
    assert "warning: the machine is busy" in capsys.readouterr().out


def test_isolated_worker_measures_peak_memory(tmp_path):
    combo = Combination(solver="forward", cell="tanh", workload="tanh_d256", backward="ift",
                        batch=8, repeat=1)
    result = tmp_path / "r.json"
    subprocess.run([sys.executable, "-m", "implicit.bench.worker", str(result)],
                   input=json.dumps(attrs.asdict(combo)), text=True, check=True)
    record = json.loads(result.read_text())
    assert record["error"] is None
    assert record["peak_memory_bytes"] > 0 and "isolated process" in record["peak_memory_method"]


def test_matrix_respects_capabilities_and_requirements():
    @attrs.frozen(kw_only=True)
    class LinearOnly(implicit.Solver):
        name: ClassVar[str] = "linear"

        def step(self, fn, z, fz, state):
            return fz, fn(fz), state

    class Needy(implicit.BackwardStrategy):
        def __call__(self, problem, solver):
            raise NotImplementedError

    class Plugin:
        @implicit.hookimpl
        def implicit_register_solvers(self, register):
            register(implicit.SolverSpec(name="linear", factory=LinearOnly,
                                         capabilities={"linear_only"}))
            register(implicit.SolverSpec(name="plain", factory=LinearOnly))
            register(implicit.SolverSpec(name="cpu_only", factory=LinearOnly, devices={"cpu"},
                                         capabilities={"unrollable"}))

        @implicit.hookimpl
        def implicit_register_backwards(self, register):
            register(implicit.BackwardSpec(name="needy", factory=Needy,
                                           requires={"unrollable"}))

    registry = implicit.Registry.from_entry_points()
    registry.register_plugin(Plugin(), name="plugin")
    template = Combination(solver="", cell="", workload="", backward="")
    combos = build_matrix(registry, quick=True, template=template)
    pairs = {(c.solver, c.backward) for c in combos}
    assert not any(s == "linear" for s, _ in pairs)
    assert ("plain", "needy") not in pairs and ("cpu_only", "needy") in pairs
    cuda = build_matrix(registry, quick=True, device="cuda", template=template)
    assert not any(c.solver == "cpu_only" for c in cuda)


def test_workloads_select_within_the_cells(registry):
    template = Combination(solver="", cell="", workload="", backward="")
    combos = build_matrix(registry, cells=["resnet", "tanh"], solvers=["anderson"],
                          backwards=["ift"], workloads=["resnet_c48", "tanh_d256"],
                          template=template)
    assert {c.workload for c in combos} == {"resnet_c48", "tanh_d256"}
    with pytest.raises(ValueError, match="unknown workloads \\['resnet_c64'\\]"):
        build_matrix(registry, cells=["resnet"], workloads=["resnet_c64"], template=template)


def test_compare_without_torchdeq_says_so_and_leaves_columns_out(tmp_path, registry,
                                                                 monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # import torchdeq -> ImportError
    run_bench(_quick_config(tmp_path, compare="torchdeq", plots=False, cells=("tanh",),
                            solvers=("forward",), backwards=("ift",)), registry=registry)
    out = capsys.readouterr().out
    assert "torchdeq is not importable" in out and "torchdeq fwd" not in out
    payload = json.loads((tmp_path / "results.json").read_text())
    assert all("compare" not in r for r in payload["records"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--solvers", "forwrd"], "did you mean 'forward'"),
        pytest.param(["--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="this machine has CUDA")),
        (["--cells", "tanh", "--solvers", "forward", "--backwards", "ift", "--max-iter", "0"],
         "must be >= 1"),
    ],
)
def test_cli_errors_are_clear(argv, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "implicit.cli", "bench", "--quick", "--out", str(tmp_path), *argv],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_a_compiled_solver_is_timed_side_by_side_with_its_eager_twin():
    """``--compile`` rows carry their eager twin's times from the same rounds, and the speed-up
    and payback come from those, not from a combination measured minutes apart."""
    from implicit.bench.measure import measure
    from implicit.bench.report import payback_steps, speedups

    combo = Combination(solver="anderson", cell="tanh", workload="tanh_d256", backward="ift",
                        solver_options={"compile": "eager"}, batch=8, repeat=3)
    record = measure(combo)
    assert record["error"] is None, record.get("traceback")
    twin = record["eager_side_by_side"]
    assert twin["n_calls"] == record["forward"]["n_calls"]  # the same solve, not compiled
    assert len(twin["forward_times_s"]) == len(twin["train_step_times_s"]) == 3
    assert len(record["forward"]["times_s"]) == len(record["train_step_times_s"]) == 3
    fwd, train = speedups(record, [record])
    assert fwd == pytest.approx(twin["forward_time_s"] / record["forward"]["time_s"])
    assert train == pytest.approx(twin["train_step_time_s"] / record["train_step_time_s"])
    # a separate eager record of the same combination does not override the paired times
    slow = {"combination": {**record["combination"], "solver_options": {}}, "error": None,
            "forward": {"time_s": 1e3}, "train_step_time_s": 1e3}
    assert speedups(record, [slow, record]) == (fwd, train)
    faster = dict(record, compile_s=10.0, train_step_time_s=1.0,
                  eager_side_by_side={**twin, "train_step_time_s": 1.5})
    assert payback_steps(faster, [slow, faster]) == 20  # 10 s / (1.5 - 1.0) s per step
    assert payback_steps(dict(faster, eager_side_by_side=None), [slow, faster]) == 1
    assert measure(attrs.evolve(combo, solver_options={}))["eager_side_by_side"] is None


def test_every_timed_forward_and_burst_follows_an_untimed_one(monkeypatch):
    """A call right after other work runs slower than in a loop of its own (a compiled forward
    6-14 % after an eager one or after idle time: benchmarks/preceding_work.py), so each timed
    call follows at least WARM_S of untimed calls of the same: the work before it is then the
    same for every layer."""
    import importlib

    measure_module = importlib.import_module("implicit.bench.measure")  # (not the function)
    calls = []

    def spy(fn, device, repeat, warmup=1, warm_s=0.0):
        calls.append((warmup, repeat, warm_s))
        return timed(fn, device, repeat, warmup, warm_s)

    timed = measure_module.timed
    monkeypatch.setattr(measure_module, "timed", spy)
    combo = Combination(solver="anderson", cell="tanh", workload="tanh_d256", backward="ift",
                        solver_options={"compile": "eager"}, batch=8, repeat=3)
    record = measure_module.measure(combo)
    assert record["error"] is None, record.get("traceback")
    assert record["forward_time_method"] == measure_module.FORWARD_TIME_METHOD
    # a first warm-up of the cell's kernels, then per round the burst, the compiled layer and
    # its eager twin, each timed once after an untimed call
    warm = (1, 1, measure_module.WARM_S)
    assert len(calls) == 1 + 3 * 3 and all(c == warm for c in calls[1:]), calls
    assert measure_module.WARM_S >= 0.002


def test_timed_warms_up_for_as_long_as_asked():
    from implicit.bench.measure import timed

    made = []
    assert len(timed(lambda: made.append(time.perf_counter()), torch.device("cpu"), 2,
                     warmup=1, warm_s=0.01)) == 2
    assert made[-2] - made[0] >= 0.01 and len(made) >= 4  # untimed for 10 ms, then 2 timed
    made.clear()
    timed(lambda: made.append(1), torch.device("cpu"), 3, warmup=2)
    assert len(made) == 5


def test_the_compile_environment_recorded_is_what_the_user_set():
    """``import torch._dynamo`` sets TORCHINDUCTOR_CACHE_DIR to its default itself: not a setting
    of the run. What the user set (e.g. cold caches) is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from implicit.bench.runner import compile_environment

    env = {"TORCHINDUCTOR_CACHE_DIR": default_cache_dir(), "PATH": "/bin",
           "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    assert compile_environment(env) == {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    moved = {"TORCHINDUCTOR_CACHE_DIR": "/scratch/inductor"}
    assert compile_environment(moved) == moved
