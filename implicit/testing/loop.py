"""Contracts on the loop's own mechanisms, checked through every solver.

:func:`~implicit.iterate` decides, per sample, when a solve stops and what it returns: the
stopping test and its precision rule, divergence by residual and by the iterate's size, holding
a sample that went bad, the returned iterate (best or last), the per-sample counts, and — with
``fn_rows`` — compaction of stopped samples. These checks observe a solve from outside: the
map records every call it receives, and a subclass of the solver records each step's result
(the iterates the loop judges) without changing it. The reference is the documented rules
(:mod:`implicit.solver`'s module docstring) applied here, in float64, to those iterates — not the
loop's code — so a rule the loop drops or bends shows as a difference.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

from ..deq import DEQ, solve
from ..registry import Registry
from ..solution import Status
from ..solver import iterate
from .checks import _loss, _parts, _problem, linear_problem
from .claims import ContractViolation, Tally

#: the kinds of sample a loop problem mixes in one batch (see :func:`loop_examples`)
KINDS = ("contract", "translate", "blowup", "jump", "nan", "flat", "steep")
#: how much a ``blowup`` sample's value jumps past its start, in units of the batch's scale
BLOWUP = 1e12


@attrs.frozen
class LoopExample:
    """A batch of per-sample maps of kinds :data:`KINDS` on ``(B, n)`` states:

    * ``contract``: ``A_i z + b_i`` with ``‖A_i‖₂ < 1`` (converges);
    * ``translate``: ``z + c_i`` (no fixed point; its residual never changes, so only the
      iterate's growth can say it diverges);
    * ``blowup``: a contraction until call ``at[i]``, then ``z + BLOWUP · s · u`` (finite,
      beyond any divergence limit drawn);
    * ``jump``: a contraction started near its fixed point of norm 1000 until call ``at[i]``,
      then ``z + 300 · r0 · u``: the residual jumps past ``3 · r0`` and ``10 · r0`` while
      ``‖f(z)‖`` stays below 3 × its start (only the residual rule can see it);
    * ``nan``: a contraction until call ``at[i]``, then NaN;
    * ``flat``: the constant ``c_i`` of norm ``flat_norm`` (its residual is exactly 0 after one
      step: below the dtype's precision at that size for ``stop="abs"``);
    * ``steep``: ``z + b_i + 1e4 ‖z − z0_i‖² / ‖b_i‖ · u`` (no fixed point): any step of the
      residual's size grows the residual ~1e4-fold, every step again.
    """

    kinds: tuple
    A: torch.Tensor  # (B, n, n)
    b: torch.Tensor  # (B, n)
    at: tuple
    z0: torch.Tensor

    def map(self):
        """A fresh map (its call counter starts at 0) and the list of ``(input, output)`` calls
        it records (detached copies)."""
        calls: list = []
        kinds = self.kinds
        translate = torch.tensor([k == "translate" for k in kinds])[:, None]
        flat = torch.tensor([k == "flat" for k in kinds])[:, None]
        steep = torch.tensor([k == "steep" for k in kinds])[:, None]
        scale = float(self.z0.double().abs().max()) + 1.0
        direction = torch.ones_like(self.b) / math.sqrt(self.b.shape[1])
        with torch.no_grad():  # 300 r0 per jump sample
            first = torch.baddbmm(self.b.unsqueeze(2), self.A, self.z0.unsqueeze(2)).squeeze(2)
            jumps = 300 * torch.linalg.vector_norm(first - self.z0, dim=1)

        def fn(z: torch.Tensor) -> torch.Tensor:
            out = torch.baddbmm(self.b.unsqueeze(2), self.A, z.unsqueeze(2)).squeeze(2)
            out = torch.where(translate, z + self.b, out)
            out = torch.where(flat, self.b, out)
            if bool(steep.any()):
                away = ((z - self.z0) ** 2).sum(dim=1, keepdim=True)
                size = torch.linalg.vector_norm(self.b, dim=1, keepdim=True).clamp_min(1e-12)
                out = torch.where(steep, z + self.b + 1e4 * away / size * direction, out)
            count = len(calls) + 1
            bad = [i for i, k in enumerate(kinds)
                   if k in ("blowup", "jump", "nan") and count >= self.at[i]]
            if bad:
                out = out.clone()
                for i in bad:
                    out[i] = (z[i] + BLOWUP * scale * direction[i] if kinds[i] == "blowup"
                              else z[i] + jumps[i] * direction[i] if kinds[i] == "jump"
                              else torch.full_like(out[i], float("nan")))
            calls.append((z.detach().clone(), out.detach().clone()))
            return out

        return fn, calls


def loop_examples(dtype: torch.dtype, stop: str, tol: float, blowup: bool = False):
    """:class:`LoopExample` strategy: batch 2–6 of drawn kinds (at least one ``contract``),
    n 1–5; a ``flat`` sample's constant has norm ``4 · tol / eps`` for ``stop="abs"`` (its
    residual 0 is then below the attainable precision), else 1–10. ``blowup``: sample 1 is
    ``steep`` and sample 2 (of 3 or more) a ``blowup`` from call 2–5 (steps to cut, again and
    again, for the safeguard's contract)."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw_) -> LoopExample:
        batch = draw_(st.integers(2, 6), label="batch")
        n = draw_(st.integers(1, 5), label="n")
        kinds = draw_(st.lists(st.sampled_from(KINDS), min_size=batch - 1,
                               max_size=batch - 1), label="kinds")
        kinds = ["contract"] + kinds
        if blowup:
            kinds[1] = "steep"
            if batch > 2:
                kinds[2] = "blowup"
        kinds = tuple(kinds)
        norms = draw_(st.lists(st.floats(0.1, 0.95), min_size=batch, max_size=batch),
                      label="‖A_i‖")
        # call 1 often: a sample whose f(z0) is bad is held from the start
        at = draw_(st.lists(st.sampled_from([1, 1, 2, 3, 5, 8]), min_size=batch,
                            max_size=batch), label="bad from call")
        if blowup and batch > 2:
            at[2] = draw_(st.integers(2, 5), label="blowup from call")
        at = tuple(at)
        gen = torch.Generator().manual_seed(draw_(st.integers(0, 2**16), label="seed"))
        A = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
        A = A * (torch.tensor(norms, dtype=torch.float64)
                 / torch.linalg.matrix_norm(A, ord=2).clamp_min(1e-12))[:, None, None]
        b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
        eps = torch.finfo(dtype).eps
        for i, kind in enumerate(kinds):
            if kind == "flat":
                size = 4 * tol / eps if stop == "abs" else 10.0
                b[i] = b[i] / torch.linalg.vector_norm(b[i]).clamp_min(1e-12) * size
        z0 = torch.randn(batch, n, generator=gen, dtype=torch.float64)
        for i, kind in enumerate(kinds):
            if kind == "jump":  # near a fixed point of norm 1000
                fixed = b[i] / torch.linalg.vector_norm(b[i]).clamp_min(1e-12) * 1000
                b[i] = fixed - A[i] @ fixed
                z0[i] = fixed + 0.1 * z0[i]
        return LoopExample(kinds=kinds, A=A.to(dtype), b=b.to(dtype), at=at, z0=z0.to(dtype))

    return draw()


def spying(algorithm, calls: list):
    """A copy of ``algorithm`` whose :meth:`step` also appends each step's ``(z_next, fz_next,
    recorded, per_sample, counted)`` (detached copies; how many calls the map had recorded in
    ``calls`` when the step returned, directional derivatives off the budget included; whether
    the step counted its calls per sample; the budget's count of calls so far) to the returned
    list: the iterates the loop judges."""
    cls = type(algorithm)
    steps: list = []

    def step(self, fn, *args, **kwargs):
        out = cls.step(self, fn, *args, **kwargs)
        per_sample = getattr(fn, "sample_calls", None) is not None
        steps.append((out[0].detach().clone(), out[1].detach().clone(), len(calls), per_sample,
                      getattr(fn, "calls", len(calls))))
        return out

    spy_cls = type(f"Spied{cls.__name__}", (cls,), {"step": step, "__slots__": ()})
    values = {a.alias or a.name: getattr(algorithm, a.name) for a in attrs.fields(cls) if a.init}
    return spy_cls(**values), steps


def _norms(x: torch.Tensor, fx: torch.Tensor):
    d = fx.double() - x.double()
    return (d * d).sum(-1).sqrt(), (fx.double() * fx.double()).sum(-1).sqrt()


@attrs.frozen
class Expected:
    """The reference outcome of one sample: status, calls counted, the index of its stop
    (``None``: ran to the end), and the iterates the returned one may be."""

    status: Status
    nfe: int
    stop: Optional[int]
    returned: tuple
    imprecise: bool  # met tol only below the attainable precision, at some iterate
    borderline: bool  # a residual or size within round-off of a threshold: no claim


def reference(points: list, i: int, *, tol: float, stop: str, factor: float, returns: str,
              dtype: torch.dtype, calls_per_step: list) -> Expected:
    """Sample ``i``'s outcome by the documented rules applied to its iterates ``points``
    (``[(z0, f(z0)), (z1, f(z1)), ...]``; ``calls_per_step[k]`` calls of f were made to get
    iterate k + 1): stop at the first iterate that is non-finite (NONFINITE), meets tol where
    ``eps · ‖f(z)‖`` (abs) or ``eps`` (rel) is ≤ tol (CONVERGED), or from the second on has
    ``‖f(z) − z‖ > factor · r0`` or ``‖f(z)‖ > factor · max(‖f(z0)‖, r0)`` (DIVERGED); MAX_ITER
    if none does. The returned iterate: the best finite one by the stopping residual up to the
    stop, or the last finite one."""
    eps = torch.finfo(dtype).eps
    margin = 1e-4
    metrics, finite_idx, borderline, imprecise = [], [], False, False
    r0 = size0 = None
    status, stop_at = Status.MAX_ITER, None
    for k, (z, fz) in enumerate(points):
        a, s = _norms(z[i], fz[i])
        a, s = float(a), float(s)
        # where the state's dtype cannot carry these norms (a float32 overflow, a difference
        # of huge values rounded away), the documented rules, applied in float64, need not
        # give the loop's outcome: no claim
        a_own = float(torch.linalg.vector_norm(fz[i] - z[i]))
        s_own = float(torch.linalg.vector_norm(fz[i]))
        for exact, own in ((a, a_own), (s, s_own)):
            if math.isfinite(exact) and not math.isclose(exact, own, rel_tol=margin,
                                                         abs_tol=1e-30):
                borderline = True
        if not (math.isfinite(a) and math.isfinite(s)):
            status, stop_at = Status.NONFINITE, k
            break
        metric = a if stop == "abs" else (a / s if s > 0 else (0.0 if a == 0 else math.inf))
        metrics.append(metric)
        finite_idx.append(k)
        floor = eps * s if stop == "abs" else eps
        borderline |= abs(metric - tol) <= margin * tol or abs(floor - tol) <= margin * tol
        if k == 0:
            r0, size0 = a, max(s, a)
        if metric <= tol:
            if floor <= tol:
                status, stop_at = Status.CONVERGED, k
                break
            imprecise = True
        if k > 0 and factor > 0:
            borderline |= (abs(a - factor * r0) <= margin * factor * r0
                           or abs(s - factor * size0) <= margin * factor * size0)
            if a > factor * r0 or s > factor * size0:
                status, stop_at = Status.DIVERGED, k
                break
    nfe = 1 + sum(calls_per_step[:stop_at if stop_at is not None else len(calls_per_step)])
    if not finite_idx:
        returned = (0,)
    elif returns == "last":
        returned = (finite_idx[-1],)
    else:
        best = min(metrics)
        # round-off of the loop's norms in the state's dtype may pick a near-tie
        returned = tuple(k for k, m in zip(finite_idx, metrics)
                         if m <= best * (1 + margin) + (1e-300 if best == 0 else 0.0))
    return Expected(status=status, nfe=nfe, stop=stop_at, returned=returned,
                    imprecise=imprecise and status is not Status.CONVERGED,
                    borderline=borderline)


def check_loop(registry: Registry, solver: str, example: LoopExample, *, tol: float, stop: str,
               max_iter: int, factor: float, returns: str, options: Optional[dict] = None,
               tally: Optional[Tally] = None) -> None:
    """Each sample's status, count (``nfe``), returned iterate and residuals equal the
    :func:`reference` outcome of the iterates the solver produced (claim ``rules``); the
    count of samples that met tol only below the attainable precision is reported
    (``precision``); and a sample stopped as NONFINITE or DIVERGED is held: every later call
    of f gets, for it, the iterate it is held at (``held``)."""
    tally = tally if tally is not None else Tally()
    options = dict(options or {})
    base = registry.make("solver", solver, **options, tol=tol, stop=stop, max_iter=max_iter,
                         policy="ignore", divergence_factor=factor, returns=returns)
    fn, calls = example.map()
    algorithm, steps = spying(base, calls)
    with torch.no_grad():
        sol = iterate(algorithm, fn, example.z0).solution
    label = f"{solver}{options or ''} (tol {tol:g} {stop}, divergence_factor {factor:g}, " \
            f"returns={returns}, max_iter {max_iter}; kinds {list(example.kinds)})"
    if not calls:
        raise ContractViolation(f"{label}: f was never called")
    points = [calls[0]] + [(z, fz) for z, fz, _, _, _ in steps]
    made = [1] + [step[2] for step in steps]  # calls recorded when iterate k was returned
    budget = [1] + [step[4] for step in steps]  # of them, calls on the budget
    per_step = [b - a for a, b in zip(budget, budget[1:])]
    # a solver may count its calls per sample (Newton–Krylov's scipy backend): then at most
    # the steps' calls, else exactly them
    exact_counts = not any(step[3] for step in steps)
    statuses = [Status.from_code(int(c)) for c in sol.sample_status]
    imprecise_rows, exact = 0, True
    for i, kind in enumerate(example.kinds):
        want = reference(points, i, tol=tol, stop=stop, factor=factor, returns=returns,
                         dtype=example.z0.dtype, calls_per_step=per_step)
        imprecise_rows += want.imprecise
        exact &= not want.borderline
        if want.borderline:
            tally.no_claim("rules", "a residual within round-off of a threshold")
            continue
        got_z = sol.z[i]
        matches = [k for k in want.returned if torch.equal(points[k][0][i], got_z)]
        detail = (f"sample {i} ({kind}): reference {want.status.name} after {want.nfe} calls "
                  f"(stop at iterate {want.stop}), the record says {statuses[i].name} after "
                  f"{int(sol.nfe[i])}")
        counted = int(sol.nfe[i])
        if statuses[i] is not want.status or counted > want.nfe or (
                exact_counts and counted != want.nfe):
            raise ContractViolation(f"{label}: {detail}")
        if not matches:
            which = "best" if returns == "best" else "last finite"
            raise ContractViolation(f"{label}: {detail}; the returned z is not the {which} "
                                    f"iterate (expected one of iterates {list(want.returned)})")
        a, s = _norms(points[matches[0]][0][i], points[matches[0]][1][i])
        rel = (a / s if float(s) > 0 or not math.isfinite(float(a)) else
               torch.zeros_like(a) if float(a) == 0 else torch.full_like(a, math.inf))
        for name, recorded, true in (("abs", sol.abs_residual[i], a),
                                     ("rel", sol.rel_residual[i], rel)):
            close = torch.isclose(recorded.double(), true, rtol=1e-4, equal_nan=True,
                                  atol=10 * torch.finfo(example.z0.dtype).tiny)
            if not bool(close):
                raise ContractViolation(f"{label}: sample {i}: the record's {name} residual "
                                        f"{float(recorded):.6g} is not its returned iterate's "
                                        f"{float(true):.6g}")
        tally.claim("rules")
        if want.status in (Status.NONFINITE, Status.DIVERGED) and want.stop is not None:
            held_at = points[max(want.stop - 1, 0)][0]
            _check_held(label, calls, i, kind, after=made[want.stop], held_at=held_at,
                        tally=tally)
    eps = torch.finfo(example.z0.dtype).eps
    if not exact:
        tally.no_claim("precision", "a residual within round-off of a threshold")
    elif ("flat" in example.kinds and stop == "abs") or (stop == "rel" and tol < eps):
        below = sol.stats.get("below_precision", 0)
        if below != imprecise_rows:
            raise ContractViolation(
                f"{label}: {imprecise_rows} sample(s) met tol only below the attainable "
                f"precision (eps · ‖f(z)‖ > tol) and did not converge, but the record's "
                f"stats say below_precision={below}")
        tally.claim("precision")
    else:
        tally.no_claim("precision", "tol within the dtype's precision for every sample")


def _check_held(label: str, calls: list, i: int, kind: str, *, after: int, held_at,
                tally) -> None:
    """Calls of f after the ``after``-th give sample ``i`` the iterate it is held at,
    ``held_at`` (the last one before it went bad; ``z0`` if ``f(z0)`` was), whatever the
    solver proposes for it (up to a finite-difference step)."""
    later = [z[i] for z, _ in calls[after:]]
    if not later:
        tally.no_claim("held", "no call after the sample stopped")
        return
    # Newton–Krylov's directional derivatives evaluate f off its budget, at the held iterate
    # (forward mode) or a step of sqrt(eps)·‖z‖ from it (finite differences)
    slack = 10 * math.sqrt(torch.finfo(held_at.dtype).eps) * (
        1 + float(torch.linalg.vector_norm(held_at[i].double())))
    for j, row in enumerate(later):
        off = float(torch.linalg.vector_norm(row.double() - held_at[i].double()))
        if not off <= slack:
            raise ContractViolation(
                f"{label}: sample {i} ({kind}) stopped at call {after}, held at "
                f"{held_at[i].tolist()}, but call {after + j + 1} gave f {row.tolist()} for it "
                f"({off:.3g} away): a held sample's row must stay at its held iterate")
    tally.claim("held")


def _sizes_seen(cell) -> tuple[list, object]:
    """Record the batch size of every state ``cell.update`` is called with (an instance
    attribute wrapping the class's method); returns the list and a function that undoes it."""
    sizes: list = []
    original = type(cell).update

    def update(z, u):
        first = z[0] if isinstance(z, (tuple, list)) else z
        sizes.append(int(first.shape[0]))
        return original(cell, z, u)

    cell.update = update
    return sizes, lambda: cell.__dict__.pop("update", None)


def check_compaction(registry: Registry, solver: str, example, *, training: bool,
                     tol: float, options: Optional[dict] = None,
                     tally: Optional[Tally] = None) -> None:
    """A batch-independent cell solved with compaction (``DEQ(compact=True)``: stopped samples
    leave the solve, f runs on the active rows) and without it gives the same record — status
    and ``nfe`` per sample, ``z*`` to 1e-9 relative — and the same gradients of a fixed loss
    with respect to x and every parameter (1e-7 relative), in the drawn mode (training: the
    adjoint solve compacts too) — claim ``same_record``; ``compacted`` counts the examples
    where the cell was called on fewer rows (the solver's steps can evaluate the whole batch
    regardless: Newton–Krylov's scipy backend)."""
    tally = tally if tally is not None else Tally()
    cell, x = example.cell, example.x.detach()
    # samples that stop at different times: each starts from the fixed point at a distance
    # that shrinks 1000-fold from sample to sample, the last at it (it stops at once)
    with torch.no_grad():
        f, _, spec, start = _problem(example)
        near = registry.make("solver", solver, **dict(options or {}), tol=1e-12, stop="abs",
                             max_iter=500, policy="ignore")
        fixed = solve(f, start, solver=near).z  # (the case's own solver: any registry)
        flat = spec.flatten(fixed)
        batch = flat.shape[0]
        noise = torch.randn(flat.shape, generator=torch.Generator().manual_seed(5),
                            dtype=flat.dtype)
        distance = 10.0 ** -(3 * torch.arange(batch, dtype=flat.dtype))
        distance[-1] = 0.0 if batch > 1 else 1.0  # the last one starts at its fixed point
        z0 = spec.unflatten(flat + noise * distance[:, None])
    runs = []
    for compact in (False, True):
        layer = DEQ(cell, solver=solver, tol=tol, stop="abs", max_iter=200, policy="ignore",
                    solver_options=dict(options or {}), compact=compact)
        layer.train(training)
        sizes, undo = _sizes_seen(cell)
        try:
            xr = x.clone().requires_grad_()
            out = layer(xr, z0)
            params = [p for p in cell.parameters() if p.requires_grad]
            grads = torch.autograd.grad(_loss(out, torch.Generator().manual_seed(0)),
                                        [xr, *params], allow_unused=True)
        finally:
            undo()
        runs.append((layer.solution, grads, sizes))
    (plain, plain_grads, _), (compacted, compacted_grads, sizes) = runs
    compacted_rows = bool(sizes) and min(sizes) < max(sizes)
    label = f"{solver}{options or ''} ({'training' if training else 'eval'}, tol {tol:g})"
    # a sample whose residual sits at tol within the cell's rounding on a smaller batch may
    # stop a step apart: no claim then
    res = plain.abs_residual.double()
    if bool(((res - tol).abs() <= 1e-6 * tol).any()):
        tally.no_claim("same_record", "a residual within round-off of tol")
        return
    if not (torch.equal(plain.sample_status, compacted.sample_status)
            and torch.equal(plain.nfe, compacted.nfe)):
        raise ContractViolation(
            f"{label}: with compaction the record differs: status "
            f"{compacted.sample_status.tolist()} nfe {compacted.nfe.tolist()}, without "
            f"{plain.sample_status.tolist()} nfe {plain.nfe.tolist()}")
    for a, b in zip(_parts(plain.z), _parts(compacted.z)):
        off = float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))
        if off > 1e-9:
            raise ContractViolation(f"{label}: with compaction z* differs by {off:.3g} "
                                    f"(relative)")
    for g, h in zip(plain_grads, compacted_grads):
        if (g is None) != (h is None):
            raise ContractViolation(f"{label}: a gradient reaches a tensor only with or only "
                                    f"without compaction")
        if g is None:
            continue
        off = float((g - h).abs().max() / g.abs().max().clamp_min(1e-300))
        if off > 1e-7:
            raise ContractViolation(f"{label}: with compaction a gradient differs by {off:.3g} "
                                    f"(relative, worst entry)")
    tally.claim("same_record")
    if compacted_rows:
        tally.claim("compacted")
    else:
        tally.no_claim("compacted", "every call had the whole batch (the solver's step "
                                    "evaluates it whole, or a batch of one)")


def check_step_formula(registry: Registry, solver: str, *, n: int, batch: int,
                       lipschitz: float, seed: int, steps: int, options: Optional[dict] = None,
                       tally: Optional[Tally] = None) -> None:
    """Every step of a solve of ``f(z) = A_i z + b_i`` (float64, ``‖A_i‖₂ = lipschitz``) from
    the drawn options equals the solver's declared :class:`~implicit.StepFormula` applied to
    that sample's iterates so far, to 1e-9 relative — so an option the step ignores (a damping,
    a ridge, a memory size) fails. Steps that made more than one call of f, and histories the
    formula does not cover, make no claim."""
    tally = tally if tally is not None else Tally()
    formula = registry.get("solver", solver).spec.step_formula
    options = dict(formula.options(dict(options or {})))
    fn, z0 = linear_problem(n, lipschitz, batch=batch, seed=seed)
    base = registry.make("solver", solver, **options, tol=0.0, stop="abs", max_iter=steps + 1,
                         policy="ignore")
    calls: list = []

    def recorded(z):
        out = fn(z)
        calls.append(out)
        return out

    algorithm, stepped = spying(base, calls)
    with torch.no_grad():
        iterate(algorithm, recorded, z0)
    zs = [z0] + [z for z, *_ in stepped]
    fzs = [calls[0]] + [fz for _, fz, *_ in stepped]
    made = [1] + [s[2] for s in stepped]
    label = f"{solver}{options}"
    checked = 0
    for k in range(1, len(zs)):
        if made[k] - made[k - 1] != 1:
            continue  # a cut or a line search: not the formula's step
        for i in range(batch):
            history_z = torch.stack([z[i] for z in zs[:k]]).double()
            history_f = torch.stack([fz[i] for fz in fzs[:k]]).double()
            if not bool(torch.isfinite(history_f).all()):
                break
            want = formula.step(algorithm, history_z, history_f)
            if want is None:
                continue
            got = zs[k][i].double()
            off = float(torch.linalg.vector_norm(got - want)
                        / torch.linalg.vector_norm(want).clamp_min(1e-300))
            if off > 1e-9:
                raise ContractViolation(
                    f"{label}: step {k} of sample {i} is off its documented formula "
                    f"({formula.statement}) by {off:.3g} (relative)")
            checked += 1
    if checked:
        tally.claim("step_formula")
    else:
        tally.no_claim("step_formula", "no step the formula covers")


def check_safeguard(registry: Registry, solver: str, example: LoopExample, *, tol: float,
                    stop: str, max_iter: int, max_cuts: int, options: Optional[dict] = None,
                    tally: Optional[Tally] = None) -> None:
    """The safeguard (``safeguard=True``; a line search, if the solver has one, off) on the
    loop problem. A step's first call is its proposal, later calls are cuts; a sample is cut in
    a call when its row there moved from the step's previous call. Claims (``safeguard``): only samples the
    loop counts are cut, and only when the proposal grew their residual past ``growth ·
    max(‖g(z)‖, floor)`` (``floor``: tol, or ``tol · ‖f(z)‖`` for ``stop="rel"``) or is not
    finite; every such sample with cuts left is cut; no step makes more than ``max_cuts`` cuts;
    no sample takes more than the solver's ``cut_budget`` over the solve."""
    tally = tally if tally is not None else Tally()
    options = dict(options or {})
    options.update(safeguard=True, max_cuts=max_cuts)
    base = registry.make("solver", solver, **options, tol=tol, stop=stop, max_iter=max_iter,
                         policy="ignore")
    if "line_search" in attrs.fields_dict(type(base)):
        base = attrs.evolve(base, line_search=False)
    fn, calls = example.map()
    algorithm, steps = spying(base, calls)
    with torch.no_grad():
        iterate(algorithm, fn, example.z0)
    label = f"{solver}{options} (tol {tol:g} {stop}, max_iter {max_iter}; kinds " \
            f"{list(example.kinds)})"
    points = [calls[0]] + [(z, fz) for z, fz, *_ in steps]
    made = [1] + [s[2] for s in steps]
    batch = example.z0.shape[0]
    outcomes = [reference(points, i, tol=tol, stop=stop, factor=base.divergence_factor,
                          returns="best", dtype=example.z0.dtype,
                          calls_per_step=[b - a for a, b in zip(made, made[1:])])
                for i in range(batch)]
    if any(o.borderline for o in outcomes):
        tally.no_claim("safeguard", "a residual within round-off of a threshold")
        return
    used = [0] * batch
    cut_steps = 0
    growth = float(base.growth)
    for k in range(1, len(points)):
        window = calls[made[k - 1]:made[k]]  # this step's calls: proposal, then cuts
        proposal_z, proposal_f = window[0]
        cuts = window[1:]
        z, fz = points[k - 1]
        if len(cuts) > max_cuts:
            raise ContractViolation(f"{label}: step {k} made {len(cuts)} cuts, more than "
                                    f"max_cuts={max_cuts}")
        for i in range(batch):
            active = outcomes[i].stop is None or outcomes[i].stop >= k
            step_size = float(torch.linalg.vector_norm((proposal_z[i] - z[i]).double()))
            # cut in a call: its row moved from where the step's previous call had it — in the
            # first cut by at least half the step (a cut shrinks it 2-fold or more; an uncut
            # row is z + 1·(proposal − z), the proposal up to rounding), in later ones at all
            # (a row not cut again keeps its last trial, bit for bit)
            moved = []
            for j, c in enumerate(cuts):
                if j == 0:
                    moved.append(float(torch.linalg.vector_norm(
                        (c[0][i] - proposal_z[i]).double())) > 0.25 * step_size)
                else:
                    moved.append(not torch.equal(c[0][i], cuts[j - 1][0][i]))
            count = sum(moved)
            a, s = _norms(z[i], fz[i])
            floor = tol if stop == "abs" else tol * float(s)
            bound = growth * max(float(a), floor)
            grown, _ = _norms(proposal_z[i], proposal_f[i])
            bad = not math.isfinite(float(grown)) or float(grown) > bound
            if count and not active:
                raise ContractViolation(f"{label}: step {k} cut sample {i}, which had stopped "
                                        f"(samples the loop no longer counts are never cut)")
            if count and not bad:
                raise ContractViolation(
                    f"{label}: step {k} cut sample {i}, whose proposal's residual "
                    f"{float(grown):.3g} is within growth · max(‖g(z)‖, floor) = {bound:.3g}")
            left = algorithm.cut_budget - used[i]
            budget_left = made[k - 1] + 1 < max_iter  # a call left after the proposal
            if active and bad and left > 0 and budget_left and not count and max_cuts > 0:
                # borderline growth (round-off of the loop's norms) makes no claim
                if abs(float(grown) - bound) > 1e-6 * bound:
                    raise ContractViolation(
                        f"{label}: step {k} did not cut sample {i}, whose proposal grew its "
                        f"residual to {float(grown):.3g} past {bound:.3g}, with {left} cuts "
                        f"of its budget left")
            used[i] += count
            if used[i] > algorithm.cut_budget:
                raise ContractViolation(f"{label}: sample {i} took {used[i]} cuts, more than "
                                        f"its cut_budget {algorithm.cut_budget}")
        cut_steps += bool(cuts)
    if cut_steps:
        tally.claim("safeguard")
    else:
        tally.no_claim("safeguard", "no step was cut")
