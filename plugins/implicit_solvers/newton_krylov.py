"""Newton–Krylov for ``g(z) = f(z) − z = 0``: scipy on CPU, Jacobian-free Newton–GMRES in torch.

``backend="auto"`` picks ``scipy`` for float64 CPU tensors and ``torch`` otherwise: on GPU
scipy does not apply, and on float32 cells scipy's solve stalls above typical tolerances —
measured on the MDEQ fixture: rel residual 1.5e-3 after 300 calls at tol 1e-4 — where the torch
backend's Newton–GMRES converges (the ``multiscale_32`` workload: 21 calls at tol 1e-4).

* **scipy** — a real :func:`scipy.optimize.newton_krylov` call *per sample* (a block-diagonal
  batch would couple the samples through its line search, its Krylov space and its max-norm
  stop), bridged in float64, with its finite-difference step ``rdiff`` set to √eps *of the
  cell's dtype* (numpy's float64 √eps on a float32 cell differentiates rounding noise). The
  per-sample solves run in lock step
  in threads: every evaluation round gathers the points all of them asked for and evaluates the
  cell once on the batch. ``NoConvergence`` (or any failure inside scipy) becomes our status,
  never an escaping exception; each sample returns the best point it evaluated.
* **torch** — Jacobian-free Newton–Krylov: each Newton step solves ``(I − J) d = g`` with the
  batched per-sample GMRES of :mod:`implicit_solvers.krylov` to a forcing tolerance (constant
  ``eta`` or Eisenstat–Walker), then a backtracking line search on ``‖g‖``. Products ``J v``
  are finite differences ``(f(z + h v) − f(z)) / h`` with ``h = √eps (1 + ‖z‖) / ‖v‖`` — one
  call of f on the batch, ``f(z)`` reused — or forward-mode AD (``torch.func.jvp``, exact).
  ``jvp="auto"`` takes forward AD in float64 (falling back to differences on the first failure,
  e.g. CPU attention or train-mode BatchNorm) and differences in lower precision. The reason is
  cost, measured on the ResNet quick workload (float32, 2 CPU cores): a forward-AD product
  through GroupNorm is ~1300 small operations and cost 7.1 ms against 0.85 ms for one call of
  the cell, and on a CPU shared with another process each of those operations waits at a
  thread barrier, so the solve slowed many times more than a solve of cell calls did (issue
  21). The difference's error (~5e-3 relative there: √eps of float32, and the ReLU kinks) is
  well inside what the inexact Newton steps ask of their inner solves: the solve needed fewer
  calls with it (9 against 13), and every registered workload converged with it at tol 1e-4.
  ``Solution.njvp`` counts the products; ``n_calls`` counts evaluations of f at iterates and
  line-search trials (the differences' calls are counted in ``njvp``).

``max_iter`` bounds the calls of f on the batch, as for every solver.

``threads="auto"`` is this solver's default (the others keep torch's setting unless asked):
each solve takes torch's thread count less the CPUs that other processes' runnable threads hold
at its start (:func:`implicit.solver.auto_thread_count`). With one busy process beside it on
the 2-core machine, the ResNet quick solve took 4.4–5.1× its idle time on torch's 2 threads —
as much as forward iteration's slowdown: the cell's own convolutions wait at their thread
barriers — and 2.0–2.1× with ``"auto"``, which ran it on 1 thread there and on 2 idle
(``benchmarks/results/cpu-contention``, runs 5 and 6). A solve here takes tens of
milliseconds or more, so the look at the machine (~40 µs) is free; ``threads=None`` keeps
torch's count.
"""

from __future__ import annotations

import math
import threading
from typing import Any, ClassVar, Mapping, Optional, Union

import attrs
import numpy as np
import torch
from attrs import validators as v

import implicit
from implicit.validators import number_in, one_of, positive_int

from .krylov import batched_gmres
from .linesearch import backtrack

SCIPY_METHODS = ("lgmres", "gmres", "bicgstab", "cgs", "minres", "tfqmr")
# Cap of the Eisenstat–Walker forcing term. Their 0.9 lets slow progress loosen the inner
# solves further, which slows progress more; on the MDEQ test cell it stalled at rel residual
# 0.3 for 300 calls, while 0.1 converges in under 20 Newton steps.
ETA_MAX = 0.1


#: a backtracked Newton step that leaves more than this fraction of ‖g‖ counts as stalled
STALL = 0.9


def _uncounted(fn):
    """f for directional derivatives, off the budget: the loop's evaluator keeps held samples
    at their held iterate there too (a stand-in without it: its plain map)."""
    return getattr(fn, "uncounted", None) or fn.fn


@attrs.define
class _TorchState:
    eta: torch.Tensor | None = None  # (B,) forcing term of the previous step
    g_norm: torch.Tensor | None = None  # (B,) ‖g‖ at the previous iterate
    jvp_mode: str = "auto"
    njvp: int = 0
    newton_steps: int = 0
    picard_steps: int = 0  # fixed-point steps taken where a Newton step stalled
    scipy_failures: int = 0


@attrs.frozen(kw_only=True)
class NewtonKrylov(implicit.Solver):
    """Newton-Krylov: scipy.optimize.newton_krylov per sample on CPU, JFNK-GMRES in torch."""

    name: ClassVar[str] = "newton_krylov"

    backend: str = attrs.field(default="auto", validator=one_of("auto", "scipy", "torch"))
    method: str = attrs.field(default="lgmres", validator=one_of(*SCIPY_METHODS))
    inner_m: int = attrs.field(default=30, validator=positive_int)
    inner_maxiter: int = attrs.field(default=30, validator=positive_int)
    forcing: str = attrs.field(default="eisenstat_walker",
                               validator=one_of("eisenstat_walker", "constant"))
    eta: float = attrs.field(default=1e-2, validator=number_in(0, 1, low_open=True, high_open=True))
    jvp: str = attrs.field(default="auto",
                           validator=one_of("auto", "forward_ad", "finite_difference"))
    line_search: bool = attrs.field(default=True, validator=v.instance_of(bool))
    #: ``"auto"`` here (see the module docstring); the option is the base class's
    threads: Union[None, int, str] = attrs.field(default=implicit.solver.AUTO_THREADS,
                                                 validator=implicit.solver.check_threads)

    def resolved_backend(self, z: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "scipy" if z.device.type == "cpu" and z.dtype == torch.float64 else "torch"

    def init(self, z, fz):
        # jvp="auto": forward AD in float64 (exact products keep Newton's quadratic phase down
        # to float64 tolerances; a cell without forward AD falls back on the first failure),
        # finite differences otherwise — see the module docstring for why
        mode = self.jvp
        if mode == "auto" and z.dtype != torch.float64:
            mode = "finite_difference"
        return _TorchState(jvp_mode=mode)

    def step(self, fn, z, fz, state: _TorchState):
        if self.resolved_backend(z) == "scipy":
            return self._scipy_solve(fn, z, fz, state)
        return self._newton_step(fn, z, fz, state)

    def stats(self, state: _TorchState) -> dict:
        return {"njvp": state.njvp, "newton_steps": state.newton_steps,
                "picard_steps": state.picard_steps,
                "jvp": state.jvp_mode, "scipy_failures": state.scipy_failures}

    # -- torch: one Newton step per loop step ----------------------------------------------
    def _newton_step(self, fn, z, fz, state: _TorchState):
        g = fz - z
        g_norm = torch.linalg.vector_norm(g, dim=1)
        eta = self._forcing(g_norm, state)

        z_size = 1 + torch.linalg.vector_norm(z, dim=1)  # of the differences' step, once

        def matvec(vec: torch.Tensor) -> torch.Tensor:
            return self._matvec(fn, z, fz, z_size, vec, state)

        result = batched_gmres(matvec, g, rtol=eta, restart=self.inner_m,
                               max_matvecs=self.inner_maxiter)
        state.newton_steps += 1
        direction = result.x
        z_next = z + direction
        fz_next = fn(z_next)
        if self.line_search:
            z_next, fz_next, _ = backtrack(fn, z, direction, z_next, fz_next, g_norm,
                                           halvings=4)
            # Newton crawls where the map is not smooth (ReLU kinks): a sample whose backtracked
            # step cut ‖g‖ by less than STALL also tries the fixed-point step z ← f(z) and keeps
            # whichever of the two ends with the smaller residual
            new_norm = torch.linalg.vector_norm(fz_next - z_next, dim=1)
            stalled = new_norm > STALL * g_norm
            if fn.remaining > 0 and bool(stalled.any()):
                f_picard = fn(fz)
                better = stalled & (torch.linalg.vector_norm(f_picard - fz, dim=1) < new_norm)
                state.picard_steps += int(better.sum())
                z_next = torch.where(better[:, None], fz, z_next)
                fz_next = torch.where(better[:, None], f_picard, fz_next)
        state.eta, state.g_norm = eta, g_norm
        return z_next, fz_next, state

    def _forcing(self, g_norm: torch.Tensor, state: _TorchState) -> torch.Tensor:
        if self.forcing == "constant" or state.eta is None:
            return torch.full_like(g_norm, float(self.eta))
        # Eisenstat & Walker (1996), choice 2 with gamma = 0.9, alpha = 2, and their safeguard
        ratio = g_norm / state.g_norm.clamp_min(torch.finfo(g_norm.dtype).tiny)
        eta = 0.9 * ratio.square()
        floor = 0.9 * state.eta.square()
        eta = torch.where(floor > 0.1, torch.maximum(eta, floor), eta)
        return eta.clamp(min=1e-10, max=ETA_MAX)

    def _matvec(self, fn, z, fz, z_size, vec, state: _TorchState) -> torch.Tensor:
        """``(I − J) v``. The difference form is four state-sized operations and a call of f:
        on a shared CPU each operation of that size waits at a thread barrier, so they are
        fused (``addcmul``, ``addcdiv``)."""
        state.njvp += 1
        if state.jvp_mode in ("auto", "forward_ad"):
            try:
                _, out = torch.func.jvp(_uncounted(fn), (z,), (vec,))
                if state.jvp_mode == "auto":
                    state.jvp_mode = "forward_ad"
                return vec - out
            except Exception:
                if self.jvp == "forward_ad":
                    raise
                state.jvp_mode = "finite_difference"
        eps = torch.finfo(z.dtype).eps
        v_norm = torch.linalg.vector_norm(vec, dim=1).clamp_min(torch.finfo(z.dtype).tiny)
        h = (math.sqrt(eps) * z_size / v_norm)[:, None]
        # v − (f(z + h v) − f(z)) / h
        return torch.addcdiv(vec, fz - _uncounted(fn)(torch.addcmul(z, h, vec)), h)

    # -- scipy: the whole solve in one loop step ----------------------------------------------
    def _scipy_solve(self, fn, z, fz, state: _TorchState):
        from scipy.optimize import newton_krylov
        from scipy.optimize import NoConvergence

        bsz = z.shape[0]
        res = torch.linalg.vector_norm(fz - z, dim=1)
        if self.stop == "abs":
            goal = torch.full_like(res, float(self.tol))
        else:
            goal = float(self.tol) * torch.linalg.vector_norm(fz, dim=1)
        # scipy stops on the max-norm of F; aim it so the 2-norm meets our criterion
        f_tol = (goal / math.sqrt(z.shape[1])).double().cpu().numpy()
        # the samples the loop still iterates: also one whose residual meets the goal only
        # below the dtype's resolution (the loop's precision rule keeps it active): scipy then
        # evaluates it once and returns, so the step calls f and the budget runs down
        active = fn.active if fn.active is not None else ~(res <= goal)
        todo = [i for i in range(bsz) if bool(active[i])]
        batch = _Lockstep(fn, z, fz, todo)
        # lgmres calls its Krylov size inner_m, and newton_krylov strips one "inner_" prefix
        inner = {"inner_inner_m": self.inner_m} if self.method == "lgmres" else {}
        # the finite-difference step must suit the cell's precision, not numpy's float64
        rdiff = math.sqrt(torch.finfo(z.dtype).eps)

        outer = [0] * bsz

        def solve_one(i: int) -> None:
            def count(x, f) -> None:
                outer[i] += 1

            try:
                newton_krylov(
                    lambda x: batch.residual(i, x), batch.start(i), method=self.method,
                    inner_maxiter=self.inner_maxiter, f_tol=float(f_tol[i]),
                    maxiter=10_000, line_search="armijo" if self.line_search else None,
                    verbose=False, rdiff=rdiff, callback=count, **inner,
                )
            except NoConvergence:
                pass
            except _BudgetSpent:
                pass
            except Exception:  # a failure inside scipy: the best point so far stands
                batch.failed(i)
            finally:
                batch.finish(i)

        threads = [threading.Thread(target=solve_one, args=(i,), daemon=True) for i in todo]
        for t in threads:
            t.start()
        batch.serve()
        for t in threads:
            t.join()
        state.scipy_failures += batch.failures
        state.newton_steps += max(outer, default=0)  # the slowest sample's outer iterations
        fn.sample_calls = batch.calls
        # a sample whose f turned NaN/Inf hands the loop that evaluation, which reports it
        # NONFINITE and stops it (the loop keeps its best finite iterate); otherwise scipy
        # would be restarted on it at every loop step until the budget ran out, as MAX_ITER
        bad = batch.nonfinite[:, None]
        return (torch.where(bad, batch.bad_z, batch.best_z),
                torch.where(bad, batch.bad_fz, batch.best_fz), state)


class _BudgetSpent(Exception):
    """Raised inside a scipy solve when the loop's max_iter budget is used up."""


class _Lockstep:
    """Per-sample scipy solves in threads; each round evaluates every pending point at once."""

    def __init__(self, fn, z: torch.Tensor, fz: torch.Tensor, todo: list[int]) -> None:
        self.fn = fn
        self.base = z.clone()
        self.best_z, self.best_fz = z.clone(), fz.clone()
        self.best_res = torch.linalg.vector_norm(fz - z, dim=1)
        self.cv = threading.Condition()
        self.pending: dict[int, np.ndarray] = {}
        self.results: dict[int, object] = {}
        self.running = set(todo)
        self.calls = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
        self.failures = 0
        # the first non-finite evaluation of each sample, if any
        self.nonfinite = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        self.bad_z, self.bad_fz = z.clone(), fz.clone()

    def start(self, i: int) -> np.ndarray:
        return self.base[i].detach().double().cpu().numpy()

    def residual(self, i: int, x: np.ndarray) -> np.ndarray:
        with self.cv:
            self.pending[i] = np.array(x, dtype=np.float64)
            self.cv.notify_all()
            while i not in self.results:
                self.cv.wait()
            out = self.results.pop(i)
        if isinstance(out, Exception):
            raise out
        return out

    def failed(self, i: int) -> None:
        with self.cv:
            self.failures += 1

    def finish(self, i: int) -> None:
        with self.cv:
            self.running.discard(i)
            self.cv.notify_all()

    def serve(self) -> None:
        while True:
            with self.cv:
                while self.running and set(self.pending) != self.running:
                    self.cv.wait()
                if not self.running:
                    break
                batch, self.pending = self.pending, {}
            if self.fn.remaining <= 0:
                with self.cv:
                    for i in batch:
                        self.results[i] = _BudgetSpent()
                    self.cv.notify_all()
                continue
            rows = list(batch)
            z = self.best_z.clone()
            index = torch.tensor(rows, device=z.device)
            z[index] = torch.from_numpy(np.stack([batch[i] for i in rows])).to(z)
            fz = self.fn(z)
            self.calls[index] += 1
            res = torch.linalg.vector_norm(fz - z, dim=1)
            first_bad = torch.zeros_like(self.nonfinite)
            first_bad[index] = ~torch.isfinite(res[index]) & ~self.nonfinite[index]
            self.bad_z = torch.where(first_bad[:, None], z, self.bad_z)
            self.bad_fz = torch.where(first_bad[:, None], fz, self.bad_fz)
            self.nonfinite |= first_bad
            better = torch.zeros_like(res, dtype=torch.bool)
            better[index] = res[index] < self.best_res[index]
            self.best_z = torch.where(better[:, None], z, self.best_z)
            self.best_fz = torch.where(better[:, None], fz, self.best_fz)
            self.best_res = torch.where(better, res, self.best_res)
            g = (fz - z)[index].double().cpu().numpy()
            with self.cv:
                for k, i in enumerate(rows):
                    self.results[i] = g[k]
                self.cv.notify_all()


def linear_termination_calls(solver: NewtonKrylov, inst: implicit.Instance) -> Optional[int]:
    """Newton's method is exact in one step on an affine map: ``z1 = z0 + (I − A)⁻¹ g(z0)``.
    The torch backend solves the Newton system by GMRES, which in exact arithmetic is exact
    within ``n`` iterations (``inner_m, inner_maxiter ≥ n``), and stops it at the relative
    forcing tolerance ``eta``: then ``‖g(z1)‖ ≤ eta · ‖g(z0)‖ ≤ tol`` for ``eta ≤ tol / r0``
    (we ask half of that, for the round-off of forward-mode JVPs). Two calls: ``f(z0)`` and
    ``f(z1)``, which the line search accepts. The scipy backend counts its finite-difference
    evaluations as calls and is not claimed."""
    if (solver.backend != "torch" or solver.forcing != "constant" or solver.jvp != "forward_ad"
            or min(solver.inner_m, solver.inner_maxiter) < inst.n
            or solver.eta > 0.5 * inst.tol / inst.r0):
        return None
    return 2


def _termination_options(inst: implicit.Instance, drawn: Mapping[str, Any]) -> dict:
    return {**drawn, "backend": "torch", "forcing": "constant", "jvp": "forward_ad",
            "eta": min(float(drawn.get("eta", 1e-2)), 0.5 * inst.tol / inst.r0),
            "inner_m": max(int(drawn.get("inner_m", 30)), inst.n),
            "inner_maxiter": max(int(drawn.get("inner_maxiter", 30)), inst.n)}


def finite_difference_calls(solver: NewtonKrylov, inst: implicit.Instance) -> Optional[int]:
    """Inexact Newton on an affine map in float32, products by finite differences (what
    ``jvp="auto"`` takes below float64). On ``g(z) = (A − I) z + b`` a Newton step whose inner
    GMRES meets its forcing term ``η`` leaves ``‖g(z1)‖ ≤ η ‖g(z0)‖`` with exact products
    (Dembo, Eisenstat & Steihaug 1982); a difference of an affine map over the step
    ``h = √eps (1 + ‖z‖) / ‖v‖`` is off ``(A − I) v`` by its rounding only, a relative
    ``ε ≤ 100 √eps (1 + L) / (1 − L)`` of it (the factor 100 covers ``‖f(z)‖ / (1 + ‖z‖)`` on
    the drawn problems), which adds ``ε`` to the contraction: ``q = η_max + ε`` per step,
    ``η_max`` the largest forcing term (``eta``, or Eisenstat–Walker's cap ``ETA_MAX``). The
    full step then decreases the residual, so each step makes one call: at most
    ``⌈log(tol / r0) / log q⌉ + 1`` calls. Claimed for ``q ≤ 1/2``, the torch backend with
    ``inner_m, inner_maxiter ≥ n``."""
    if inst.dtype == torch.float64 or solver.resolved_backend(
            torch.empty(0, dtype=inst.dtype)) != "torch" or solver.jvp == "forward_ad" \
            or min(solver.inner_m, solver.inner_maxiter) < inst.n:
        return None
    eta_max = float(solver.eta) if solver.forcing == "constant" else max(float(solver.eta),
                                                                         ETA_MAX)
    eps = torch.finfo(inst.dtype).eps
    q = eta_max + 100 * math.sqrt(eps) * (1 + inst.lipschitz) / (1 - inst.lipschitz)
    if q > 0.5:
        return None
    if inst.r0 <= inst.tol:
        return 1
    return math.ceil(math.log(inst.tol / inst.r0) / math.log(q)) + 1


def _finite_difference_options(inst: implicit.Instance, drawn: Mapping[str, Any]) -> dict:
    return {**drawn, "backend": "torch", "jvp": "auto",
            "inner_m": max(int(drawn.get("inner_m", 30)), inst.n),
            "inner_maxiter": max(int(drawn.get("inner_maxiter", 30)), inst.n)}


def _options():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({
        "backend": st.sampled_from(["auto", "torch", "scipy"]),
        "forcing": st.sampled_from(["eisenstat_walker", "constant"]),
        "eta": st.sampled_from([1e-2, 1e-4, 0.3]),
        "inner_m": st.integers(2, 30),
        "line_search": st.booleans(),
    })


@implicit.hookimpl
def implicit_register_solvers(register):
    register(
        implicit.SolverSpec(
            name="newton_krylov",
            factory=NewtonKrylov,
            capabilities={"uses_jvp"},
            option_strategy=_options,
            guarantees={
                "linear_termination": implicit.Guarantee(
                    problem="linear", calls=linear_termination_calls,
                    options=_termination_options,
                    statement="one Newton step is exact on an affine map: torch backend, "
                              "GMRES inner solve with inner_m, inner_maxiter >= n and constant "
                              "forcing eta <= tol / (2 r0): 2 calls"),
                "finite_difference_newton": implicit.Guarantee(
                    problem="linear_float32", calls=finite_difference_calls,
                    options=_finite_difference_options,
                    statement="inexact Newton (Dembo, Eisenstat & Steihaug 1982) in float32 with "
                              "finite-difference products: each step contracts the residual by "
                              "q = eta_max + 100 sqrt(eps) (1 + L)/(1 - L); "
                              "ceil(log(tol/r0)/log q) + 1 calls, claimed for q <= 1/2"),
            },
        )
    )
