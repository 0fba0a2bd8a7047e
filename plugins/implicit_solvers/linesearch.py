"""Per-sample backtracking on ‖f(z) − z‖, shared by the quasi-Newton and Newton solvers.

Not a plugin (it registers nothing): a helper of the ``implicit_solvers`` family.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch


def backtrack(fn, z: torch.Tensor, direction: torch.Tensor, z_next: torch.Tensor,
              fz_next: torch.Tensor, g_norm: torch.Tensor, halvings: int):
    """Halve the step ``z + t · direction`` of each sample whose residual did not decrease
    (Armijo-style: ``‖g(z_next)‖ > (1 − 1e-4 t) ‖g(z)‖``), at most ``halvings`` times and never
    past ``fn.remaining``; samples the loop no longer counts (``fn.active``) are never halved. ``(z_next, fz_next)`` is the full step and its value; returns the
    accepted ``(z_next, fz_next)`` and the number of extra calls of ``fn`` made."""
    step = torch.ones_like(g_norm)
    calls = 0
    # samples the loop no longer counts (converged ones still iterated with the batch) never
    # make the batch pay for a halving
    active = getattr(fn, "active", None)
    for _ in range(halvings):
        worse = torch.linalg.vector_norm(fz_next - z_next, dim=1) > (1 - 1e-4 * step) * g_norm
        if active is not None:
            worse &= active
        if fn.remaining <= 0 or not bool(worse.any()):
            break
        step = torch.where(worse, step / 2, step)
        trial = z + step[:, None] * direction
        f_trial = fn(trial)
        calls += 1
        z_next = torch.where(worse[:, None], trial, z_next)
        fz_next = torch.where(worse[:, None], f_trial, fz_next)
    return z_next, fz_next, calls


#: the safeguard's defaults: a step is cut back when it grows the residual more than GROWTH-fold,
#: at most MAX_CUTS times per step
GROWTH = 10.0
MAX_CUTS = 8
#: a cut shrinks the step by at least this factor, and by more the further the residual blew up
MAX_SHRINK = 0.5
MIN_SHRINK = 1e-3


def guard(fn, z: torch.Tensor, z_next: torch.Tensor, fz_next: torch.Tensor, floor, *,
          growth: float, max_cuts: int, g_next: Optional[torch.Tensor] = None,
          cuts_left: Optional[torch.Tensor] = None):
    """Safeguard against blow-up: cut back the step ``z → z_next`` of each active sample whose
    residual grew by more than ``growth`` (``‖g(z_next)‖ > growth · max(‖g(z)‖, floor)``, or
    non-finite), as ``z + t · (z_next − z)``, until it does not, at most ``max_cuts`` times and
    never past ``fn.remaining``. ``‖g(z)‖`` is the loop's (``fn.residual``). Each cut shrinks
    ``t`` by ``√(growth · ‖g(z)‖ / ‖g(z_next)‖)``, clamped to [MIN_SHRINK, MAX_SHRINK] (a cubic
    blowing up by 1e9 needs a factor ~1e-3, not 30 halvings). ``floor`` (a number or ``(B,)``)
    keeps residuals at the tolerance's level from counting as growth. Samples the loop no
    longer counts (``fn.active``) are never cut. ``g_next``: ``fz_next − z_next`` if the caller
    has it. ``cuts_left``: a ``(B,)`` int64 count of the cuts each sample may still take in this
    solve (decremented in place), so that one sample whose map keeps blowing up cannot spend
    the batch's budget on cuts (a solver keeps it in its state; see :func:`cut_budget`).

    Returns ``(z_next, fz_next, calls, t)``: the accepted step, its value, the extra calls made
    and the per-sample factor ``t`` (1 where no cut was made), or ``None`` for ``t`` when no
    sample needed a cut (the common case: one norm, four small operations, one host check)."""
    bound = torch.clamp_min(fn.residual, floor) if isinstance(floor, float) else torch.maximum(
        fn.residual, floor)
    bound = bound * growth
    res = torch.linalg.vector_norm(fz_next - z_next if g_next is None else g_next, dim=1)
    fine = res <= bound  # False where non-finite
    if bool(fine.all()):
        return z_next, fz_next, 0, None
    bad = ~fine
    if fn.active is not None:
        bad &= fn.active
    if cuts_left is not None:
        bad &= cuts_left > 0
    if not bool(bad.any()):
        return z_next, fz_next, 0, None
    direction = z_next - z
    t = torch.ones_like(res)
    calls = 0
    while calls < max_cuts and fn.remaining > 0:
        ratio = res / bound  # > 1 where bad (inf or NaN where non-finite)
        shrink = torch.nan_to_num(ratio.rsqrt(), nan=MIN_SHRINK).clamp(MIN_SHRINK, MAX_SHRINK)
        t = torch.where(bad, t * shrink, t)
        if cuts_left is not None:
            cuts_left -= bad.long()
        trial = torch.addcmul(z, direction, t[:, None])
        f_trial = fn(trial)
        calls += 1
        keep = bad[:, None]
        z_next = torch.where(keep, trial, z_next)
        fz_next = torch.where(keep, f_trial, fz_next)
        res = torch.where(bad, torch.linalg.vector_norm(f_trial - trial, dim=1), res)
        bad = bad & ~(res <= bound)
        if cuts_left is not None:
            bad &= cuts_left > 0
        if not bool(bad.any()):
            break
    return z_next, fz_next, calls, t


#: the cuts one sample may take over a whole solve, in units of ``max_cuts``
CUT_BUDGET = 4


def cut_budget(z: torch.Tensor, max_cuts: int) -> torch.Tensor:
    """``(B,)`` cuts each sample may take in one solve: ``CUT_BUDGET × max_cuts``."""
    return torch.full((z.shape[0],), CUT_BUDGET * max_cuts, dtype=torch.int64,
                      device=z.device)


def guard_enabled(safeguard, fn, z: torch.Tensor) -> bool:
    """Whether a step is guarded: ``safeguard=True`` always, ``None`` (the default) where host
    checks are free (CPU, see :mod:`implicit.accelerator`; a cut needs one per step), ``False``
    never; and only inside the solver loop, which tells the step its residual."""
    from implicit.accelerator import host_checks

    if safeguard is False or getattr(fn, "residual", None) is None:
        return False
    return bool(safeguard) or host_checks(z)


def tolerance_floor(solver, fn):
    """The residual level that never counts as growth: the stopping tolerance as an absolute
    residual (``tol`` for ``stop="abs"``, ``tol · ‖f(z)‖`` per sample for ``"rel"``, from the
    loop's ``fn.scale``)."""
    if solver.stop == "abs":
        return float(solver.tol)
    return float(solver.tol) * fn.scale



@attrs.define
class GuardState:
    """What a guarded solver keeps for its safeguard over one solve (part of its state)."""

    cuts_left: Optional[torch.Tensor] = None  # (B,) cuts each sample may still take
    cuts: int = 0  # samples' steps cut, summed over steps
    calls: int = 0  # extra calls of f the cuts made

    def stats(self) -> dict:
        return {"safeguard_cuts": self.cuts, "safeguard_calls": self.calls}


def guarded(solver, fn, z, z_next, fz_next, state: GuardState,
            g_next: Optional[torch.Tensor] = None):
    """:func:`guard` with ``solver``'s options (``growth``, ``max_cuts``, its tolerance), the
    per-solve cut budget and the counts kept in ``state``; returns ``(z_next, fz_next, t)``."""
    if state.cuts_left is None:
        state.cuts_left = cut_budget(z, solver.max_cuts)
    z_next, fz_next, calls, t = guard(fn, z, z_next, fz_next, tolerance_floor(solver, fn),
                                      growth=solver.growth, max_cuts=solver.max_cuts,
                                      g_next=g_next, cuts_left=state.cuts_left)
    if t is not None:
        state.cuts += int((t < 1).sum())
        state.calls += calls
    return z_next, fz_next, t


def guard_strategies() -> dict:
    """Hypothesis strategies of the safeguard options, for a solver's option strategy."""
    from hypothesis import strategies as st

    return {"safeguard": st.sampled_from([None, True, False]),
            "growth": st.sampled_from([GROWTH, 2.0, 1e3])}
