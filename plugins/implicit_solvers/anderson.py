"""Anderson acceleration (Walker & Ni 2011; "Deep Implicit Layers" ch. 4, ../shared/seeds/001).

Keeps the last ``m`` iterates ``x_i`` and residuals ``g_i = f(x_i) − x_i`` per sample and mixes

    α = argmin ‖Σ α_i g_i‖²  subject to  Σ α_i = 1
    x_next = Σ α_i (x_i + β g_i)      (β < 1 damped, β > 1 over-projected)

The constrained least squares is solved as ``(GGᵀ + λ' I) w = 1, α = w / Σw`` — the same
minimiser as the bordered KKT system of the tutorial — with a ridge ``λ' = lam · tr(GGᵀ)/k``
*relative to the residual scale*: an absolute ridge (the tutorial's 1e-4) dominates GGᵀ once
residuals are ~1e-2 and stalls the solve near 1e-3. The Gram matrix is updated one row per
step. The small system is symmetric positive definite when ``lam > 0`` and is solved by a
non-raising Cholesky factorisation (``torch.linalg.cholesky_ex``); a sample whose system is
not positive definite or non-finite falls back to a plain damped step from its latest iterate,
and the fallbacks are counted in ``Solution.stats["fallbacks"]`` (locuslab/deq#20 crashed there).

The residual history lives in a buffer taken once per solve from
:data:`implicit.workspace.workspace` (reused across solves on CPU) and written in place, so this
solver is not ``unrollable``. Each step writes ``g = f(x) − x`` of its new iterate straight into
the history slot it fills next and hands it to the loop, which would otherwise compute it again.
The mixing targets ``x + βg`` are ``f(x)`` itself for ``β = 1``, kept by reference on large
states (no copy).
Like every solver, the loop returns each sample's best iterate by residual.

**Safeguard** (``safeguard``: ``None`` = on where host checks are free, i.e. CPU): a step that
grows a sample's residual more than ``growth``-fold is cut back within the budget
(:func:`.linesearch.guard`) before its residual enters the history; the sample keeps the
shorter step scale (``z + damp · (mix − z)``) and doubles it back towards 1 with every step
that is not cut. On the standard test problems (``implicit bench --problems standard``) it
took Anderson from 13 to 15 solved of 22; DEQ workloads never trigger it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional, Union

import attrs
import torch

import implicit
from implicit.accelerator import host_checks
from implicit.validators import number_in, positive_int
from implicit.workspace import workspace

from .linesearch import (CUT_BUDGET, GROWTH, MAX_CUTS, GuardState, guard_enabled,
                         guard_strategies, guarded)
from .rows import CHAIN_MIN_NUMEL, combine, dots


def anderson_weights(
    gram: torch.Tensor, lam: float, newest: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixing weights ``α`` (``(B, k)``, summing to one) from the residual Gram matrix
    ``gram = GGᵀ`` (``(B, k, k)``), and a ``(B,)`` mask of samples whose solve failed (their
    weights are then all on column ``newest``: a plain step from the latest iterate).

    ``GGᵀ + λ'I`` is symmetric positive definite whenever ``λ' > 0``, so it is solved by a
    non-raising Cholesky factorisation (``cholesky_ex``), which also reports the systems that are
    not (``lam = 0`` with linearly dependent residuals, or non-finite entries). These tiny
    systems cost as many microseconds as they take calls, so this is written in few of them."""
    b, k = gram.shape[:2]
    system = gram.clone()
    diagonal = system.diagonal(dim1=-2, dim2=-1)
    trace = diagonal.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(gram.dtype).tiny)
    diagonal.add_(trace, alpha=lam / k)  # λ' = lam · tr(GGᵀ)/k
    factor, info = torch.linalg.cholesky_ex(system)
    w = torch.cholesky_solve(system.new_ones(b, k, 1), factor).squeeze(-1)
    alpha = w.div_(w.sum(dim=-1, keepdim=True))
    # a zero, infinite or NaN sum of w leaves a non-finite α, whose sum then is non-finite too
    failed = (info != 0) | ~torch.isfinite(alpha.sum(dim=-1))
    # (a host check is free on CPU and spares the fix-up there when nothing failed)
    if not host_checks(gram) or bool(failed.any()):
        alpha.masked_fill_(failed.unsqueeze(-1), 0.0)
        alpha[:, newest if newest >= 0 else k + newest] += failed
    return alpha, failed


def _spd_solve_ones(system: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = system⁻¹ 1`` for a batch of small symmetric positive definite systems laid out
    batch-last, ``(k, k, B)``, by a Cholesky factorisation written out entry by entry: ``w``
    as ``(k, B)``, and a ``(B,)`` mask of the systems that are positive definite.

    Straight-line tensor code for the compiled path: inductor fuses it into one loop over the
    samples, where LAPACK's ``cholesky_ex`` and ``cholesky_solve`` are two library calls per
    step that cost more than their arithmetic at k ≤ 8 (measured on tanh d=256, batch 64).
    Batch-last, every entry is a contiguous ``(B,)`` row and that loop is vectorised over the
    samples; batch-first, inductor ran it one sample at a time on one thread, a chain of
    square roots and divisions per sample (batch 1024, d = 64: 32 µs a step more, measured).
    Reciprocal square roots replace the divisions. Eagerly it is many tiny operations: the
    eager ``step`` keeps LAPACK."""
    k = system.shape[0]
    tiny = torch.finfo(system.dtype).tiny
    L: list[list] = [[None] * k for _ in range(k)]
    inverse: list = [None] * k  # 1 / L[j][j]
    ok = None
    for j in range(k):
        pivot = system[j, j]
        for p in range(j):
            pivot = pivot - L[j][p] * L[j][p]
        ok = pivot > 0 if ok is None else ok & (pivot > 0)
        inverse[j] = torch.rsqrt(torch.clamp(pivot, min=tiny))
        for i in range(j + 1, k):
            entry = system[i, j]
            for p in range(j):
                entry = entry - L[i][p] * L[j][p]
            L[i][j] = entry * inverse[j]
    y: list = []
    for i in range(k):  # L y = 1
        t = torch.ones_like(inverse[i])
        for p in range(i):
            t = t - L[i][p] * y[p]
        y.append(t * inverse[i])
    w: list = [None] * k
    for i in reversed(range(k)):  # Lᵀ w = y
        t = y[i]
        for p in range(i + 1, k):
            t = t - L[p][i] * w[p]
        w[i] = t * inverse[i]
    return torch.stack(w), ok


@attrs.define
class AndersonState:
    # mixing targets x_i + β g_i: m slots of (B, n) tensors kept by reference (None until
    # filled), or on small states a (B, m, n) buffer they are copied into (see `init`)
    Y: Union[list, torch.Tensor]
    G: torch.Tensor  # (B, m, n) residuals g_i = f(x_i) − x_i
    gram: torch.Tensor  # (B, m, m) G Gᵀ
    count: int  # pairs stored so far
    fallbacks: torch.Tensor  # (B,) int64
    # per-sample step scale after a safeguard cut (None: 1 for every sample), and the counts
    damp: Optional[torch.Tensor] = None
    guard: GuardState = attrs.Factory(GuardState)
    # fallbacks of samples the loop has dropped (see `select`); whether G and a stacked Y came
    # from the workspace (buffers cut to a subset of the samples do not: odd shapes)
    fallbacks_dropped: int = 0
    pooled: bool = True


@attrs.frozen(kw_only=True)
class Anderson(implicit.Solver):
    """Anderson acceleration with history m, mixing beta and a relative ridge lam."""

    name: ClassVar[str] = "anderson"
    uses_residual: ClassVar[bool] = True
    selectable: ClassVar[bool] = True
    static: ClassVar[bool] = True

    m: int = attrs.field(default=5, validator=positive_int)
    beta: float = attrs.field(default=1.0, validator=number_in(0, 2, low_open=True))
    #: the ridge relative to the residuals' scale (``λ' = lam · tr(GGᵀ)/k``); from ~1 upwards
    #: the weights tend to uniform (the mix becomes the window's average)
    lam: float = attrs.field(default=1e-4, validator=number_in(0, 1e6))
    safeguard: Optional[bool] = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(bool)))
    growth: float = attrs.field(default=GROWTH, validator=number_in(1, float("inf")))
    max_cuts: int = attrs.field(default=MAX_CUTS, validator=positive_int)

    @property
    def cut_budget(self) -> int:
        """The safeguard's cuts one sample may take over a whole solve."""
        return CUT_BUDGET * self.max_cuts

    def init(self, z: torch.Tensor, fz: torch.Tensor) -> AndersonState:
        b, n = z.shape
        # only the first min(count, m) slots are ever read: no need to zero-fill the history.
        # Large states keep their f(x) rows by reference (no copy); on small ones the per-call
        # cost dominates, and one copy into a buffer beats stacking the rows for each mix
        small = b * n < CHAIN_MIN_NUMEL
        return AndersonState(
            Y=workspace.empty(b, self.m, n, like=z) if small else [None] * self.m,
            G=workspace.empty(b, self.m, n, like=z),
            gram=z.new_empty(b, self.m, self.m),
            count=0,
            fallbacks=torch.zeros(b, dtype=torch.int64, device=z.device),
        )

    def step(self, fn, z, fz, state: AndersonState, g=None):
        slot = state.count % self.m
        if g is None:
            g = fz - z
        compiling = torch.compiler.is_compiling()
        # the previous step wrote g straight into this slot (see below); the loop's masking
        # may have replaced it by a new tensor since, which is then copied in
        if compiling or g.data_ptr() != state.G[:, slot].data_ptr():
            state.G[:, slot] = g
        # storing x + βg (not x) makes the mix one pass over the history: Σ α_i (x_i + β g_i).
        # For β = 1 that is f(x) itself, kept by reference: the loop and the cell never write
        # into a tensor once they have handed it over, so no copy is needed
        target = fz if self.beta == 1 else torch.add(z, g, alpha=float(self.beta))
        stacked = isinstance(state.Y, torch.Tensor)
        if stacked:
            state.Y[:, slot] = target
        else:
            state.Y[slot] = target
        state.count += 1
        k = min(state.count, self.m)
        row = dots(g, state.G[:, :k])  # (B, k): <g_i, g>
        state.gram[:, slot, :k] = row
        state.gram[:, :k, slot] = row
        if k == 1:  # a plain (damped) step
            z_next = target
        else:
            alpha, failed = anderson_weights(state.gram[:, :k, :k], float(self.lam), newest=slot)
            # (samples the loop has stopped may sit at a stand-in fixed point, g = 0: not
            # a failure anyone sees)
            active = getattr(fn, "active", None)
            state.fallbacks += failed if active is None else failed & active
            z_next = combine(alpha, state.Y[:, :k] if stacked else state.Y[:k])
        if state.damp is not None:  # samples whose steps were cut go on with shorter ones
            z_next = torch.addcmul(z, z_next - z, state.damp[:, None])
        fz_next = fn(z_next)
        if compiling:
            return z_next, fz_next, state
        # g_next = f(z_next) − z_next goes straight into the slot the next step fills (its
        # oldest pair, no longer needed): the loop takes it from here, and no copy is made
        g_next = torch.sub(fz_next, z_next, out=state.G[:, state.count % self.m])
        if guard_enabled(self.safeguard, fn, z):
            z_cut, fz_cut = self._guard(fn, z, z_next, fz_next, g_next, state)
            if z_cut is not z_next:  # a cut step: its residual replaces the one written
                z_next, fz_next = z_cut, fz_cut
                g_next = torch.sub(fz_next, z_next, out=state.G[:, state.count % self.m])
        return z_next, fz_next, state, g_next

    def _guard(self, fn, z, z_next, fz_next, g_next, state: AndersonState):
        """Cut back a step whose residual grew by more than ``growth`` (see
        :func:`.linesearch.guard`); a sample whose step was cut keeps the shorter step scale for
        its next steps and doubles it back towards 1 with every step that is not cut."""
        z_next, fz_next, t = guarded(self, fn, z, z_next, fz_next, state.guard, g_next)
        damp = state.damp
        if t is not None:
            damp = t if damp is None else damp * t
            damp = torch.where(t < 1, damp, (2 * damp).clamp(max=1))
        elif damp is not None:
            damp = (2 * damp).clamp(max=1)
        state.damp = None if damp is None or bool((damp == 1).all()) else damp
        return z_next, fz_next

    # -- the compiled path's fixed-shape step (implicit.compiled) ------------------------------
    # The m slots are a ring written at slot `count mod m` (a tensor, not a Python number that
    # would change from step to step), and the slots not yet filled are masked out of the least
    # squares (their rows of the system are the identity, their weights zero). Same mix as
    # `step` up to round-off. The Gram matrix is kept batch-last, (m, m, B), for the small
    # solve (see `_spd_solve_ones`).

    static_inplace: ClassVar[tuple[str, ...]] = ("Y", "G")

    def static_init(self, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> dict:
        b, n = z.shape
        return {"Y": z.new_zeros(b, self.m, n), "G": z.new_zeros(b, self.m, n),
                "gram": z.new_zeros(self.m, self.m, b),
                "count": torch.zeros((), dtype=torch.int64, device=z.device),
                "fallbacks": torch.zeros(b, dtype=torch.int64, device=z.device)}

    def static_step(self, fn, z, fz, g, state: dict, active: torch.Tensor,
                    inplace: bool = False):
        """The history is a ring of ``m`` slots (slot ``count mod m`` is written). With
        ``inplace`` the new slot of each history is written into it (``Y`` and ``G`` are held
        by the loop); otherwise each history is rebuilt with the slot replaced, since the step
        runs in a ``torch.while_loop``, whose body may not write into what it carries. The slot
        is a one-hot mask, not an index, and the diagonal is taken by an identity mask, so the
        step is a few fused loops. The mix does not depend on the order of the slots; the
        unfilled ones are masked out."""
        m = self.m
        target = fz if self.beta == 1 else torch.add(z, g, alpha=float(self.beta))
        count = state["count"]
        slots = torch.arange(m, device=z.device)
        slot = torch.remainder(count, m)
        here = slots == slot  # (m,): the slot this step writes
        if inplace:
            G, Y = state["G"], state["Y"]
            G.index_copy_(1, slot.reshape(1), g.unsqueeze(1))
            Y.index_copy_(1, slot.reshape(1), target.unsqueeze(1))
        else:
            G = torch.where(here[None, :, None], g.unsqueeze(1), state["G"])
            Y = torch.where(here[None, :, None], target.unsqueeze(1), state["Y"])
        row = dots(g, G).t()  # (m, B): <g_i, g>
        gram = torch.where(here[:, None, None], row.unsqueeze(0), state["gram"])
        # (contiguous: the carried Gram matrix must keep the strides it came in with)
        gram = torch.where(here[None, :, None], row.unsqueeze(1), gram).contiguous()
        count = count + 1
        filled = slots < torch.clamp(count, max=m)
        both = (filled[:, None] & filled[None, :]).unsqueeze(-1)
        eye = (slots[:, None] == slots[None, :]).unsqueeze(-1)
        system = torch.where(both, gram, 0.0)
        diagonal = torch.where(eye, system, 0.0).sum(dim=1)  # (m, B)
        k = torch.clamp(count, max=m).to(z.dtype)
        trace = diagonal.sum(dim=0, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
        ridge = torch.where(filled[:, None], trace * (float(self.lam) / k), 1.0)
        system = system + torch.where(eye, ridge.unsqueeze(1), 0.0)
        w, ok = _spd_solve_ones(system)  # (m, B)
        w = torch.where(filled[:, None], w, 0.0)
        alpha = w / w.sum(dim=0, keepdim=True)
        failed = ~ok | ~torch.isfinite(alpha.sum(dim=0))
        alpha = torch.where(failed, here[:, None].to(alpha.dtype), alpha)
        z_next = torch.bmm(alpha.t().unsqueeze(1), Y).squeeze(1)
        fz_next = fn(z_next)
        state = {"Y": Y, "G": G, "gram": gram, "count": count,
                 "fallbacks": state["fallbacks"] + (failed & active).long()}
        return z_next, fz_next, fz_next - z_next, state

    def static_stats(self, state: dict) -> dict:
        return {"fallbacks": int(state["fallbacks"].sum())}

    def select(self, state: AndersonState, keep: torch.Tensor) -> AndersonState:
        """The history of the samples ``keep`` (each sample's mix uses its own rows only)."""
        def rows(t):
            return None if t is None else t.index_select(0, keep)

        dropped = int(state.fallbacks.sum()) - int(state.fallbacks.index_select(0, keep).sum())
        Y = rows(state.Y) if isinstance(state.Y, torch.Tensor) else [rows(y) for y in state.Y]
        selected = AndersonState(
            Y=Y, G=rows(state.G), gram=rows(state.gram), count=state.count,
            fallbacks=rows(state.fallbacks), damp=rows(state.damp),
            guard=attrs.evolve(state.guard, cuts_left=rows(state.guard.cuts_left)),
            fallbacks_dropped=state.fallbacks_dropped + dropped, pooled=False)
        self.release(state)
        return selected

    def stats(self, state: AndersonState) -> dict:
        return {"fallbacks": int(state.fallbacks.sum()) + state.fallbacks_dropped,
                **state.guard.stats()}

    def release(self, state: AndersonState) -> None:
        if state.pooled:
            workspace.give(state.G, *([state.Y] if isinstance(state.Y, torch.Tensor) else []))


#: the largest relative ridge under which the linear-termination claim is made
TERMINATION_LAM = 1e-12


def linear_termination_calls(solver: Anderson, inst: implicit.Instance) -> Optional[int]:
    """Walker & Ni 2011 (Thm 2.2): on ``f(z) = Az + b`` with a window holding every residual
    (``m ≥ n + 1``), undamped (``β = 1``) Anderson's iterate ``k + 1`` is ``f`` of GMRES's
    ``k``-th, so it is exact once GMRES is, after at most ``n`` steps: ``n + 2`` calls of f
    (``f(z0)`` included). Finite precision and the relative ridge ``λ' = lam · mean ‖g_i‖²``:
    the mix then leaves a residual ``‖A G α‖ ≤ L √λ' ‖α*‖``, and the normal equations lose
    ``κ(G)²·eps``; for ``lam ≤ 1e-12`` and ``tol ≥ 1e-8 · r0`` we allow ``2 + n // 2`` more
    calls (measured over 150 draws, n ≤ 6: at most 2 extra at lam = 1e-12)."""
    if (solver.m < inst.n + 1 or solver.beta != 1 or solver.lam > TERMINATION_LAM
            or solver.safeguard is not False):
        return None
    if inst.tol < 1e-8 * inst.r0:
        return None
    return inst.n + 2 + 2 + inst.n // 2


def _termination_options(inst: implicit.Instance, drawn: Mapping[str, Any]) -> dict:
    # the theorem is about full steps: no safeguard cuts
    return {**drawn, "m": max(int(drawn.get("m", 5)), inst.n + 1), "beta": 1.0,
            "lam": min(float(drawn.get("lam", TERMINATION_LAM)), TERMINATION_LAM),
            "safeguard": False}


def _options():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({
        "m": st.integers(1, 8),
        "beta": st.sampled_from([1.0, 0.8, 0.5, 1.3]),
        "lam": st.sampled_from([1e-4, 1e-8, 1e-13, 1e-2]),
        **guard_strategies(),
    })


def anderson_step(solver: "Anderson", zs: torch.Tensor, fzs: torch.Tensor
                  ) -> Optional[torch.Tensor]:
    """The documented mix (module docstring), from scratch in float64: the last ``m`` iterates
    ``x_i`` and residuals ``g_i``, ``α = (GGᵀ + λ'I)⁻¹1 / Σ``, ``λ' = lam · tr(GGᵀ)/k``,
    ``x_next = Σ α_i (x_i + β g_i)``; ``None`` where that small system is singular or
    ill-conditioned (condition number above 1e6: round-off, not the options, would decide the
    comparison, and the solver may take its documented fallback instead)."""
    xs, gs = zs[-solver.m:].double(), (fzs - zs)[-solver.m:].double()
    k = xs.shape[0]
    gram = gs @ gs.T
    system = gram + float(solver.lam) * torch.trace(gram) / k * torch.eye(k, dtype=gram.dtype)
    if not bool(torch.isfinite(system).all()) or not float(torch.linalg.cond(system)) <= 1e6:
        return None  # (a NaN condition number: singular)
    w = torch.linalg.solve(system, torch.ones(k, dtype=gram.dtype))
    alpha = w / w.sum()
    return alpha @ (xs + float(solver.beta) * gs)


def _formula_options(drawn: Mapping[str, Any]) -> dict:
    return {**drawn, "safeguard": False}  # its cuts are not part of the mixing formula


@implicit.hookimpl
def implicit_register_solvers(register):
    register(
        implicit.SolverSpec(
            name="anderson", factory=Anderson, equivalents={"torchdeq": "anderson"},
            option_strategy=_options,
            step_formula=implicit.StepFormula(
                step=anderson_step, options=_formula_options,
                statement="x_next = sum_i alpha_i (x_i + beta g_i) over the last m iterates, "
                          "alpha = (G G^T + lam tr(G G^T)/k I)^-1 1, normalised to sum 1"),
            guarantees={
                "linear_termination": implicit.Guarantee(
                    problem="linear", calls=linear_termination_calls,
                    options=_termination_options,
                    statement="Walker & Ni 2011: with m >= n + 1 and beta = 1 Anderson's "
                              "iterate k+1 is f(GMRES iterate k), exact after n + 2 calls; "
                              "slack 2 + n // 2 calls for lam <= 1e-12 and tol >= 1e-8 r0"),
            },
        )
    )
