"""The shared solver loop: per-sample stopping, masking, telemetry, status and failure policy."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings

import attrs
import pytest
import torch

import implicit
from implicit import ConvergenceError, ConvergenceWarning, Status
from implicit import solver as solver_module


def contraction(batch: int = 5, n: int = 4, rates=None, dtype=torch.float64):
    """An affine contraction z -> diag(rate_i) z + c with per-sample rates (known fixed point)."""
    gen = torch.Generator().manual_seed(0)
    rates = torch.linspace(0.1, 0.8, batch, dtype=dtype) if rates is None else rates
    batch = rates.shape[0]
    c = torch.randn(batch, n, generator=gen, dtype=dtype)
    fixed = c / (1 - rates[:, None])
    return (lambda z: rates[:, None] * z + c), fixed


def test_forward_converges_per_sample_with_masking():
    fn, fixed = contraction()
    sol = implicit.solve(fn, torch.zeros_like(fixed), solver="forward", tol=1e-10, stop="abs",
                         max_iter=500)
    assert sol.status is Status.CONVERGED and sol.converged.all()
    torch.testing.assert_close(sol.z, fixed, rtol=0, atol=1e-9)
    # faster contracting samples stop earlier; the batch runs as long as the slowest one
    assert (sol.nfe[:-1] <= sol.nfe[1:]).all() and sol.nfe[0] < sol.nfe[-1]
    assert sol.n_calls == int(sol.nfe.max())


def test_converged_sample_record_stops_changing():
    """A converged sample goes on being iterated with the batch (no masking copies), but its
    record is the one of the step where it converged."""
    calls = []

    def step(z):
        return torch.stack([0.5 * z[0] + 1, 0.9 * z[1] + 1])

    def fn(z):
        calls.append(z.clone())
        return step(z)

    z0 = torch.zeros(2, 3, dtype=torch.float64)
    sol = implicit.solve(fn, z0, solver="forward", tol=1e-6, stop="abs", max_iter=300)
    first, last = sol.nfe.tolist()
    assert first < last == sol.n_calls == len(calls)
    # the returned iterate of sample 0 is the one f was called on when it converged ...
    assert torch.equal(sol.z[0], calls[first - 1][0])
    assert float(sol.abs_residual[0]) == float(torch.linalg.vector_norm(step(sol.z)[0] - sol.z[0]))
    # ... although the batch went on iterating it afterwards
    assert not torch.equal(calls[-1][0], calls[first - 1][0])


def test_nonfinite_sample_is_held_and_f_never_sees_it_again(solver_name):
    seen = []

    def fn(z):
        seen.append(z.clone())
        out = 0.5 * z + 1
        # sample 1 goes non-finite from its third call on
        bad = torch.full_like(out[1], float("nan")) if len(seen) >= 3 else out[1]
        return torch.stack([out[0], bad, out[2]])

    sol = implicit.solve(fn, torch.zeros(3, 2, dtype=torch.float64), solver=solver_name,
                         tol=1e-10, stop="abs", max_iter=60, policy="ignore")
    assert Status.from_code(int(sol.sample_status[1])) is Status.NONFINITE
    # held at its last finite iterate: the solver's later proposals for it come from there
    assert all(torch.isfinite(z).all() for z in seen)  # so no NaN ever went back into f


@pytest.mark.parametrize("bad, bad_from", [("nan", 1), ("nan", 3), ("huge", 3)])
def test_held_sample_gets_its_held_iterate_whatever_the_solver_proposes(solver_name, bad,
                                                                         bad_from):
    """Solvers keep a held sample's bad values in their state (Anderson's history, Broyden's
    updates, GMRES's Krylov basis); f must still get the held iterate for it — z0 when f(z0)
    itself was bad."""
    if bad == "huge" and solver_name == "newton_krylov":
        pytest.skip("a map jumping by 1e15 has a zero Jacobian there: no Newton step to hold")
    seen = []

    def fn(z):
        seen.append(z.clone())
        out = 0.5 * z + 1
        row = out[1]
        if len(seen) >= bad_from:
            row = torch.full_like(out[1], float("nan")) if bad == "nan" else z[1] + 1e15
        # sample 0 has no fixed point (a constant residual): the solve runs to max_iter
        return torch.stack([z[0] + 1, row, out[2]])

    z0 = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    solver = implicit.make_solver(solver_name, tol=1e-10, stop="abs", max_iter=60,
                                  policy="ignore")
    # a safeguard or line search would cut a huge step back before it becomes an iterate
    fields = attrs.fields_dict(type(solver))
    solver = attrs.evolve(solver, **{name: False for name in ("safeguard", "line_search")
                                     if name in fields})
    sol = implicit.solve(fn, z0, solver=solver)
    status = Status.from_code(int(sol.sample_status[1]))
    assert status is (Status.NONFINITE if bad == "nan" else Status.DIVERGED)
    stop = int(sol.nfe[1])
    held = seen[stop - 2][1] if stop > 1 else z0[1]
    assert len(seen) > stop + 5
    for z in seen[stop:]:
        assert torch.allclose(z[1], held, rtol=0, atol=1e-6 * (1 + float(held.norm())))


def test_converged_sample_that_blows_up_afterwards_is_held():
    """A map that changes under a converged sample (here: with the call count) must not feed
    f a huge iterate: a cell mixing samples would spread it to the active ones."""
    seen = []

    def fn(z):
        seen.append(z.clone())
        row0 = torch.zeros_like(z[0]) if len(seen) < 4 else 1e12 * (z[0] + 1)
        return torch.stack([row0, 0.9 * z[1] + 1])

    sol = implicit.solve(fn, torch.zeros(2, 3, dtype=torch.float64), solver="forward",
                         tol=1e-6, stop="abs", max_iter=300)
    assert sol.converged.all() and sol.nfe.tolist()[0] == 1
    assert len(seen) > 5 and all(torch.equal(z[0], torch.zeros(3, dtype=z.dtype)) for z in seen)


@pytest.mark.parametrize("max_iter", [1, 3, 20])
def test_record_is_truthful_and_budget_bounded(solver_name, max_iter):
    fn, fixed = contraction(rates=torch.tensor([0.2, 0.99, 0.5], dtype=torch.float64))
    sol = implicit.solve(lambda z: torch.tanh(fn(z)), torch.zeros_like(fixed), solver=solver_name,
                         tol=1e-12, stop="abs", max_iter=max_iter, policy="ignore")
    assert sol.n_calls <= max_iter and (sol.nfe <= max_iter).all()
    recomputed = torch.linalg.vector_norm(torch.tanh(fn(sol.z)) - sol.z, dim=1)
    torch.testing.assert_close(sol.abs_residual, recomputed)
    assert torch.equal(sol.converged, recomputed <= 1e-12)
    assert (sol.status is Status.CONVERGED) == bool(sol.converged.all())


def test_max_iter_is_reported_and_warned():
    fn, fixed = contraction(rates=torch.tensor([0.2, 0.99, 0.5], dtype=torch.float64))
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        sol = implicit.solve(fn, torch.zeros_like(fixed), solver="forward", tol=1e-12,
                             stop="abs", max_iter=20)
    assert sol.status is Status.MAX_ITER and sol.converged.tolist() == [True, False, False]


def test_divergent_map_is_never_converged():
    z0 = torch.zeros(3, 2)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        sol = implicit.solve(lambda z: 3 * z + 1, z0, solver="forward")
    assert not sol.converged.any()
    assert sol.status in (Status.DIVERGED, Status.MAX_ITER)
    with pytest.raises(ConvergenceError) as info:
        implicit.solve(lambda z: 3 * z + 1, z0, solver="forward", policy="raise")
    message = str(info.value)
    assert info.value.solution.status.message in message
    assert "tol" in message and "residual" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        implicit.solve(lambda z: 3 * z + 1, z0, solver="forward", policy="ignore")


@pytest.mark.parametrize("stop", ["abs", "rel"])
def test_divergent_map_diverges_without_divergence_detection_too(stop):
    sol = implicit.solve(lambda z: 3 * z + 1, torch.zeros(2, 2, dtype=torch.float64),
                         solver=implicit.make_solver("forward", divergence_factor=0),
                         stop=stop, max_iter=30, policy="ignore")
    assert sol.status is Status.MAX_ITER and not sol.converged.any()


def test_nonfinite_is_reported_never_converged(solver_name):
    def fn(z):
        out = 0.5 * z + 1
        return torch.where(torch.arange(z.shape[0])[:, None] == 1, out / 0.0 * 0.0, out)

    with pytest.warns(ConvergenceWarning, match="non-finite"):
        sol = implicit.solve(fn, torch.zeros(3, 2), solver=solver_name, tol=1e-5, stop="abs",
                             max_iter=100)
    assert sol.converged.tolist() == [True, False, True]
    assert Status.from_code(int(sol.sample_status[1])) is Status.NONFINITE
    assert sol.status is Status.NONFINITE


def test_caller_tensors_are_not_mutated_and_no_graph(solver_name):
    fn, fixed = contraction()
    z0 = torch.randn_like(fixed).requires_grad_()
    before = z0.detach().clone()
    sol = implicit.solve(fn, z0, solver=solver_name, tol=1e-8, stop="abs", max_iter=200)
    assert torch.equal(z0.detach(), before)
    assert not sol.z.requires_grad and sol.z.grad_fn is None


def test_map_writing_into_its_iterate_is_a_clear_error(solver_name):
    # solvers keep earlier iterates by reference: an in-place update would corrupt them silently
    def fn(z):
        z.mul_(0.5)
        return z + 1

    with pytest.raises(ValueError, match="wrote in place into the iterate it was given"):
        implicit.solve(fn, torch.zeros(2, 3, dtype=torch.float64), solver=solver_name,
                       max_iter=20, policy="ignore")


def test_map_reusing_an_output_buffer_is_a_clear_error():
    buffer = torch.zeros(2, 3, dtype=torch.float64)

    def fn(z):  # Broyden never hands f's value back as the next iterate: the second check
        return torch.mul(z, 0.5, out=buffer).add_(1)

    with pytest.raises(ValueError, match="returned on an earlier call"):
        implicit.solve(fn, torch.zeros(2, 3, dtype=torch.float64), solver="broyden",
                       max_iter=20, policy="ignore")
    # inference-mode tensors have no version counter: the checks stand aside, the solve runs
    with torch.inference_mode():
        sol = implicit.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64),
                             solver="anderson", tol=1e-10, stop="abs", max_iter=50)
    assert sol.all_converged


def test_tuple_state_solves():
    a = torch.tensor(0.5, dtype=torch.float64)

    def fn(state):
        p, q = state
        return (a * q.mean(dim=2) + 1, a * p[:, :, None].expand(-1, -1, 2) - 1)

    z0 = (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, 2, dtype=torch.float64))
    sol = implicit.solve(fn, z0, solver="forward", tol=1e-12, stop="abs", max_iter=200)
    assert isinstance(sol.z, tuple) and [t.shape for t in sol.z] == [t.shape for t in z0]
    fz = fn(sol.z)
    for got, want in zip(sol.z, fz):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_shape_changing_map_is_an_error_naming_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        implicit.solve(lambda z: torch.cat([z, z[:, :1]], dim=1), torch.zeros(2, 3),
                       solver="forward")


def test_trace_records_residual_per_step():
    fn, fixed = contraction()
    solver = implicit.make_solver("forward", trace=True, tol=1e-6, stop="abs", max_iter=100)
    sol = implicit.solve(fn, torch.zeros_like(fixed), solver=solver)
    assert sol.trace.shape == (sol.n_calls, fixed.shape[0])
    assert torch.equal(sol.trace[-1], sol.abs_residual)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="floating point"):
        implicit.solve(lambda z: z, torch.zeros(2, 3, dtype=torch.int64), solver="forward")
    with pytest.raises(ValueError, match="batch"):
        implicit.solve(lambda z: z, (torch.zeros(2, 3), torch.zeros(3, 3)), solver="forward")
    with pytest.raises(ValueError, match="policy"):
        implicit.solve(lambda z: z, torch.zeros(2, 3), solver="forward", policy="loud")
    with pytest.raises(ValueError, match="max_iter"):
        implicit.make_solver("forward", max_iter=0)


class _RowMap:
    """z ↦ tanh(r_i W z + b_i) + d_i z per sample: rates spread so samples stop at different
    steps, the last sample's map pushed off (d = 1.5: plain iteration diverges there). Knows
    its rows (``on_rows``) and records the batch sizes it is called with."""

    def __init__(self, batch: int = 12, n: int = 5):
        gen = torch.Generator().manual_seed(4)
        self.W = torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5
        self.b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
        self.r = torch.linspace(0.05, 0.95, batch, dtype=torch.float64)[:, None]
        self.d = torch.zeros(batch, 1, dtype=torch.float64)
        self.d[-1] = 1.5
        self.sizes: list[int] = []

    def on_rows(self, z, rows):
        self.sizes.append(z.shape[0])
        return torch.tanh(self.r[rows] * (z @ self.W.T) + self.b[rows]) + self.d[rows] * z

    def __call__(self, z):
        return self.on_rows(z, torch.arange(z.shape[0]))


@pytest.mark.parametrize("name", ["forward", "anderson", "broyden"])
def test_stopped_samples_leave_the_solve_with_the_same_record(name, monkeypatch):
    """With ``fn_rows`` a selectable solver's loop drops stopped samples from its state once
    they are a quarter of it: later calls see fewer rows, and the record (iterates, residuals,
    nfe, statuses, solver counts) is that of the whole-batch solve."""
    selected = []
    select = type(implicit.make_solver(name)).select
    monkeypatch.setattr(type(implicit.make_solver(name)), "select",
                        lambda self, state, keep: selected.append(keep.numel())
                        or select(self, state, keep))
    out = {}
    for use_rows in (False, True):
        f = _RowMap()
        solver = implicit.make_solver(name, tol=1e-11, stop="abs", max_iter=60,
                                      policy="ignore", divergence_factor=1e3)
        result = implicit.iterate(solver, f, torch.zeros(12, 5, dtype=torch.float64),
                                  fn_rows=f.on_rows if use_rows else None)
        out[use_rows] = (result.solution, f.sizes)
    (full, full_sizes), (cut, cut_sizes) = out[False], out[True]
    assert set(full_sizes) == {12} and min(cut_sizes) < 12 and selected  # it happened
    assert sorted(cut_sizes, reverse=True) == cut_sizes  # rows only ever leave
    assert len(set(full.nfe.tolist())) > 3  # samples stopped at different steps
    if name == "forward":  # and one diverged (held, then dropped)
        assert full.sample_status[-1] == Status.DIVERGED.code
    torch.testing.assert_close(cut.z, full.z, rtol=0, atol=1e-12)
    torch.testing.assert_close(cut.abs_residual, full.abs_residual, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(cut.rel_residual, full.rel_residual, rtol=1e-6, atol=1e-12)
    for name in ("nfe", "sample_status", "converged"):
        assert torch.equal(getattr(cut, name), getattr(full, name)), name
    assert cut.n_calls == full.n_calls and cut.status is full.status
    assert {k: v for k, v in cut.stats.items()} == full.stats


def test_a_solver_that_cannot_cut_its_state_says_so():
    solver = implicit.make_solver("newton_krylov")
    assert not solver.selectable
    with pytest.raises(NotImplementedError, match="newton_krylov.*cannot drop samples"):
        solver.select(None, torch.arange(2))


@pytest.mark.parametrize("name, count", [("anderson", "fallbacks"), ("broyden", "skipped_updates")])
def test_cutting_a_state_keeps_the_dropped_samples_counts(name, count):
    solver = implicit.make_solver(name)
    z = torch.zeros(3, 4, dtype=torch.float64)
    state = solver.init(z, z + 1)
    field = "fallbacks" if name == "anderson" else "skipped"
    setattr(state, field, torch.tensor([1, 2, 3]))
    cut = solver.select(state, torch.tensor([0, 2]))
    assert getattr(cut, field).tolist() == [1, 3]
    assert solver.stats(cut)[count] == 6
    assert (cut.G if name == "anderson" else cut.A).shape[0] == 2
    solver.release(cut)


@pytest.fixture
def two_threads():
    """torch at two intra-op threads for the test, whatever the machine has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("solver", ["forward", "anderson", "broyden", "newton_krylov"])
def test_threads_option_sets_the_count_for_the_solve_and_gives_it_back(solver, two_threads):
    fn, fixed = contraction()
    z0 = torch.zeros_like(fixed)
    seen = []

    def counting(z):
        seen.append(torch.get_num_threads())
        return fn(z)

    plain = implicit.solve(fn, z0, solver=solver, tol=1e-10, max_iter=200)
    one = implicit.solve(counting, z0, solver=solver, tol=1e-10, max_iter=200, threads=1)
    assert seen and set(seen) == {1}  # every call of f, Newton–Krylov's products included
    assert torch.get_num_threads() == 2
    assert one.n_calls == plain.n_calls >= 2 and bool(one.converged.all())
    torch.testing.assert_close(one.z, plain.z, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(one.z, fixed, rtol=1e-8, atol=1e-9)

    def failing(z):
        raise RuntimeError("the cell failed")

    with pytest.raises(RuntimeError, match="the cell failed"):
        implicit.solve(failing, z0, solver=solver, threads=1)
    assert torch.get_num_threads() == 2  # given back when the solve raises too


def test_auto_threads_leave_the_cpus_that_other_processes_hold(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    for busy, default, expected in [(0, 2, min(2, cpus)), (cpus - 1, 2, 1), (cpus + 3, 2, 1),
                                    (0, 1, 1), (1, cpus, max(1, cpus - 1))]:
        monkeypatch.setattr(solver_module, "runnable_elsewhere", lambda busy=busy: busy)
        assert solver_module.auto_thread_count(default) == expected, (busy, default)
    monkeypatch.setattr(solver_module, "runnable_elsewhere", lambda: None)  # /proc unreadable
    assert solver_module.auto_thread_count(3) == 3


@pytest.mark.parametrize("busy", [0, 1])
def test_auto_threads_pick_the_count_of_each_solve(busy, two_threads, monkeypatch):
    # two CPUs, `busy` of them held by other processes: the solve runs on 2 - busy threads
    monkeypatch.setattr(solver_module.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(solver_module, "runnable_elsewhere", lambda: busy)
    fn, fixed = contraction()
    seen = []

    def counting(z):
        seen.append(torch.get_num_threads())
        return fn(z)

    z0 = torch.zeros_like(fixed)
    sol = implicit.solve(counting, z0, solver="anderson", tol=1e-10, max_iter=200,
                         threads="auto")
    assert bool(sol.converged.all()) and set(seen) == {2 - busy}
    assert sol.stats["threads"] == 2 - busy  # the record says which count the solve ran at
    assert torch.get_num_threads() == 2
    # Newton–Krylov's default
    assert implicit.make_solver("newton_krylov").threads == "auto"
    seen.clear()
    implicit.solve(counting, z0, solver="newton_krylov", tol=1e-10, max_iter=200)
    assert set(seen) == {2 - busy} and torch.get_num_threads() == 2


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="reads Linux's /proc")
def test_runnable_elsewhere_sees_a_busy_process_and_not_this_ones_threads():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert max(solver_module.runnable_elsewhere() for _ in range(20)) >= 1
    finally:
        busy.kill()
        busy.wait()
    # this process's own busy threads are not "elsewhere" (a thread in a matrix product holds
    # no GIL and stays runnable, and so do torch's worker threads)
    stop = threading.Event()
    a = torch.randn(400, 400)

    def spin():
        while not stop.is_set():
            a @ a

    worker = threading.Thread(target=spin, daemon=True)
    worker.start()
    try:
        time.sleep(0.1)
        assert min(solver_module.runnable_elsewhere() for _ in range(40)) == 0
    finally:
        stop.set()
        worker.join()


def test_threads_option_is_checked():
    for bad, error in [(0, "at least 1"), (True, "positive int"), (1.5, "positive int"),
                       ("two", "'auto' or a positive int")]:
        with pytest.raises(implicit.OptionError, match=error):
            implicit.make_solver("forward", threads=bad)
    with pytest.raises(implicit.OptionError, match="eager loop"):
        implicit.make_solver("anderson", threads=1, compile=True)
    # "auto" is a policy, not a count: a compiled solve ignores it (its kernels fix their own)
    assert implicit.make_solver("anderson", threads="auto", compile=True).threads == "auto"
