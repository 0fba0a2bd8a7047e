"""Batched restarted GMRES (Saad & Schultz 1986), one Arnoldi process per sample.

``batched_gmres`` solves ``A_i x_i = b_i`` for every sample ``i`` of a batch with a
matrix-free ``matvec`` that applies all ``A_i`` at once. Each sample has its own Krylov space,
Hessenberg matrix and Givens rotations — never one Krylov space over the whole batch, which
would couple the samples — and stops on its own relative residual ``‖b − A x‖ ≤ rtol ‖b‖``.

The ``gmres`` solver plugin applies it to a fixed-point problem ``w = h(w)`` whose map is
*affine* (``linear_only``): with ``A v = h(w + v) − h(w)`` it solves ``(I − A) δ = h(w) − w``,
one restart cycle per step. That is what the IFT adjoint ``w = Jᵀ w + y`` is, and GMRES makes it
converge at repelling equilibria (spectral radius of J above 1), where fixed-point iteration
cannot.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import attrs
import torch

import implicit
from implicit.validators import positive_int

from .rows import dots


@attrs.frozen(eq=False)
class GMRESResult:
    x: torch.Tensor  # (B, n)
    residual: torch.Tensor  # (B,) estimated ‖b − A x‖
    matvecs: int
    converged: torch.Tensor  # (B,) bool


def batched_gmres(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    rtol: torch.Tensor | float = 1e-6,
    restart: int = 20,
    max_matvecs: int = 100,
    cycles: Optional[int] = None,
) -> GMRESResult:
    """Solve ``A x = b`` per sample (rows of ``b``: ``(B, n)``); ``rtol`` may be per sample.

    ``max_matvecs`` bounds the products with ``A`` made here, the true residual ``b − A x``
    computed after each restart cycle included; ``cycles`` (None: no bound) bounds the restart
    cycles. Where either bound leaves no product for the true residual after a cycle, the
    result's ``residual`` is the cycle's least-squares estimate (equal to the true one in exact
    arithmetic) and ``converged`` is judged on it."""
    bsz, n = b.shape
    dtype, device = b.dtype, b.device
    tiny = torch.finfo(dtype).tiny
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    b_norm = torch.linalg.vector_norm(b, dim=1)
    target = torch.as_tensor(rtol, dtype=dtype, device=device) * b_norm
    matvecs = 0
    r = b - matvec(x) if x0 is not None else b.clone()
    matvecs += x0 is not None
    beta = torch.linalg.vector_norm(r, dim=1)
    converged = beta <= target
    # a sample with a non-finite right-hand side or residual is hopeless: it must not keep the
    # others iterating (nor spend the shared matvec budget)
    hopeless = ~torch.isfinite(beta) | ~torch.isfinite(target)
    cycle = 0
    while matvecs < max_matvecs and not bool((converged | hopeless).all()):
        cycle += 1
        m = min(restart, max_matvecs - matvecs)
        V = torch.zeros(bsz, m + 1, n, dtype=dtype, device=device)
        H = torch.zeros(bsz, m + 1, m, dtype=dtype, device=device)
        # Y: each sample's least-squares coefficients, as of the last column it used
        Y = torch.zeros(bsz, m, dtype=dtype, device=device)
        V[:, 0] = r / beta.clamp_min(tiny)[:, None]
        done = converged | hopeless  # samples that need no more columns in this cycle
        used = torch.zeros(bsz, dtype=torch.long, device=device)
        estimate = beta  # each sample's least-squares residual, as of the last column it used
        k = 0
        for k in range(m):
            w = matvec(V[:, k])
            matvecs += 1
            # classical Gram–Schmidt twice (CGS2: as accurate as modified Gram–Schmidt,
            # Giraud et al. 2005), per sample: each pass is two batched products with the basis
            # so far, where modified Gram–Schmidt takes 2(k + 1) passes over the state. On a
            # shared CPU every pass of that size waits at an OpenMP barrier for a descheduled
            # thread (benchmarks/contention.py)
            # (fused: w − h·basis is one baddbmm, the normalisation writes into V directly)
            basis = V[:, :k + 1]
            h = dots(w, basis)
            w = torch.baddbmm(w.unsqueeze(1), h.unsqueeze(1), basis, alpha=-1).squeeze(1)
            h_again = dots(w, basis)
            w = torch.baddbmm(w.unsqueeze(1), h_again.unsqueeze(1), basis, alpha=-1).squeeze(1)
            H[:, :k + 1, k] = h + h_again
            h_next = torch.linalg.vector_norm(w, dim=1)
            H[:, k + 1, k] = h_next
            torch.div(w, h_next.clamp_min(tiny)[:, None], out=V[:, k + 1])
            # the small least squares min ‖β e₁ − H y‖ by one batched QR of the
            # (k + 2) × (k + 1) Hessenberg matrix, redone each column: a handful of operations
            # per column, where updating Givens rotations takes ~8 tiny ones per earlier column
            # (k of them) — under CPU contention those tiny operations, not the matvecs, were
            # most of a Newton–Krylov solve's time (benchmarks/contention.py)
            Q, R = torch.linalg.qr(H[:, :k + 2, :k + 1], mode="complete")
            rhs = beta[:, None] * Q[:, 0, :]  # Qᵀ β e₁
            residual = rhs[:, k + 1].abs()
            y = torch.linalg.solve_triangular(R[:, :k + 1, :k + 1], rhs[:, :k + 1, None],
                                              upper=True).squeeze(2)
            y = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
            Y[:, :k + 1] = torch.where(done[:, None], Y[:, :k + 1], y)
            estimate = torch.where(done, estimate, residual)
            used = torch.where(done, used, used + 1)
            # happy breakdown (h_next = 0) means the Krylov space holds the exact solution
            done = done | (residual <= target) | (h_next <= tiny * (1 + R[:, k, k].abs())) \
                | ~torch.isfinite(residual)
            # a sample that needs no more columns gets a zero one: the next product is then
            # taken at its own iterate, never at a non-finite or huge basis vector (a map that
            # mixes the samples would spread it)
            V[:, k + 1].masked_fill_(done[:, None], 0.0)
            if bool(done.all()):
                break
        cols = k + 1
        y = Y[:, :cols]
        x = x + torch.bmm(y.unsqueeze(1), V[:, :cols]).squeeze(1)
        if matvecs >= max_matvecs or (cycles is not None and cycle >= cycles):
            # no product left for the true residual (or no cycle to use it): the estimate
            beta = estimate
            converged = beta <= target * (1 + 1e-6)
            hopeless = hopeless | ~torch.isfinite(beta)
            break
        r = b - matvec(x)
        matvecs += 1
        beta = torch.linalg.vector_norm(r, dim=1)
        converged = beta <= target * (1 + 1e-6)
        hopeless = hopeless | ~torch.isfinite(beta)
        if bool(((used == 0) | converged | hopeless).all()):
            break
    return GMRESResult(x=x, residual=beta, matvecs=matvecs, converged=converged)


@attrs.frozen(kw_only=True)
class GMRES(implicit.Solver):
    """Restarted GMRES per sample for affine fixed points w = h(w) (e.g. the IFT adjoint)."""

    name: ClassVar[str] = "gmres"
    #: a step is one restart cycle: a Krylov product or more, then f at the new iterate
    min_step_calls: ClassVar[int] = 2

    restart: int = attrs.field(default=20, validator=positive_int)

    def step(self, fn, z, fz, state):
        # h affine: h(z + v) − h(z) = A v; the fixed point solves (I − A) δ = h(z) − z. One
        # restart cycle of at most `restart` products, keeping one call for f at the new
        # iterate: its f(z') − z' is the cycle's true residual b − A x, so none is spent on
        # that inside the cycle (the loop takes the step only with ≥ min_step_calls left)
        result = batched_gmres(
            lambda v: v - (fn(z + v) - fz),
            fz - z,
            rtol=_inner_rtol(self, z, fz),
            restart=self.restart,
            max_matvecs=min(self.restart, fn.remaining - 1),
            cycles=1,
        )
        z_next = z + result.x
        return z_next, fn(z_next), state


def _inner_rtol(solver: implicit.Solver, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
    """Per-sample relative tolerance for one cycle, aimed a little below the loop's stop."""
    res = torch.linalg.vector_norm(fz - z, dim=1).clamp_min(torch.finfo(z.dtype).tiny)
    if solver.stop == "abs":
        goal = torch.full_like(res, float(solver.tol))
    else:
        goal = float(solver.tol) * torch.linalg.vector_norm(fz, dim=1)
    return (0.5 * goal / res).clamp(max=0.5)


def linear_termination_calls(solver: GMRES, inst: implicit.Instance) -> Optional[int]:
    """GMRES minimises the residual over the Krylov space, which holds the solution after at
    most ``n`` matrix-vector products (Saad & Schultz 1986), so one cycle with ``restart ≥ n``
    is exact. Calls of the affine map: ``f(z0)``, at most ``n`` products ``f(z + v)`` and
    ``f`` at the new iterate: ``n + 2``."""
    if solver.restart < inst.n:
        return None
    return inst.n + 2


def _options():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({"restart": st.integers(1, 30)})


@implicit.hookimpl
def implicit_register_solvers(register):
    register(
        implicit.SolverSpec(
            name="gmres", factory=GMRES, capabilities={"linear_only"},
            option_strategy=_options,
            guarantees={
                "linear_termination": implicit.Guarantee(
                    problem="linear", calls=linear_termination_calls,
                    options=lambda inst, drawn: {**drawn, "restart": max(
                        int(drawn.get("restart", 20)), inst.n)},
                    statement="Saad & Schultz 1986: GMRES is exact within n products; with "
                              "restart >= n one cycle: n + 2 calls of the affine map"),
            },
        )
    )
