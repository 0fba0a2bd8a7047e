"""The contract checks themselves (plain functions; pytest and Hypothesis drive them).

Every check is a theorem for the instances the strategies draw; a failure raises
:class:`ContractViolation` with a message naming the plugin and what it broke. Each check
computes its reference without the code under test: residuals from the documented formula in
float64 (:func:`true_residuals`, not the loop's), dense Jacobians for adjoints, plain autograd
loops for unrolled and second-order gradients, each row solved alone for per-sample counts.
A check whose precondition fails (a solve that did not converge, options outside a theorem's
hypotheses) makes no claim and tells its :class:`~implicit.testing.claims.Tally` why; the suite
fails a case whose claims were mostly not made (vacuous).
"""

from __future__ import annotations

import gc
import math
import weakref
from typing import Any, Iterable, Optional

import attrs
import torch

from ..accelerator import host_checks
from ..backward import Problem
from ..cell import Cell, init_state_of, injection_of, update_of
from ..compiled import FALLBACK_BLOCK
from ..deq import DEQ, flat_map, solve
from ..registry import Registry
from ..solution import Status
from ..solver import iterate
from ..specs import CellExample, Guarantee, Instance
from ..state import StateSpec
from .claims import ContractViolation, Tally


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


def _parts(state: Any) -> list[torch.Tensor]:
    return list(state) if isinstance(state, (tuple, list)) else [state]


#: the torch.compile backend of the contract suite's compiled cases: AOTAutograd's tracing
#: and functionalisation run the blocks as inductor would receive them, without its code
#: generation (minutes per drawn set of options on CPU); CI also compiles with inductor
#: (tests/test_compiled.py)
COMPILE_BACKEND = "aot_eager"
#: examples per compiled case (each compiles its blocks)
COMPILED_EXAMPLES = 3

#: the contract suite's own problem for ``linear_only`` solvers (not a registered cell): an
#: affine map ``f(z) = A_i z + b_i`` per sample, :func:`affine_examples`
AFFINE = "affine"
#: the suite's problem for the loop's own rules (:mod:`implicit.testing.loop`): per-sample
#: maps that converge, run off, blow up, turn NaN or sit below the dtype's precision
LOOP = "loop-problem"


class AffineCell(Cell):
    """``z ↦ A_i z + b_i`` for each sample ``i``; the injection ``u = {"A": (B, n, n), "b":
    (B, n)}`` carries the per-sample matrix and offset, so the map is batch-independent and
    its samples differ in their spectra (the maps ``linear_only`` solvers are made for)."""

    batch_independent = True

    def update(self, z: torch.Tensor, u: dict) -> torch.Tensor:
        return torch.baddbmm(u["b"].unsqueeze(2), u["A"], z.unsqueeze(2)).squeeze(2)


def affine_examples(dtype: torch.dtype = torch.float64):
    """Examples of :class:`AffineCell`: batch 1–4, n 1–8, each ``A_i`` a Gaussian matrix
    scaled to a drawn spectral norm in [0.05, 3] (beyond 1 too: the fixed point exists where
    ``I − A_i`` is invertible, and GMRES finds it where fixed-point iteration cannot), a
    Gaussian ``b_i`` and start ``z0``; ``lipschitz`` is the largest ``‖A_i‖₂``."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw_) -> CellExample:
        batch = draw_(st.integers(1, 4), label="batch")
        n = draw_(st.integers(1, 8), label="n")
        norms = torch.tensor(draw_(st.lists(st.floats(0.05, 3.0), min_size=batch,
                                            max_size=batch), label="‖A_i‖"), dtype=torch.float64)
        gen = torch.Generator().manual_seed(draw_(st.integers(0, 2**16), label="seed"))
        A = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
        A = A * (norms / torch.linalg.matrix_norm(A, ord=2).clamp_min(1e-12))[:, None, None]
        b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
        z0 = torch.randn(batch, n, generator=gen, dtype=torch.float64)
        return CellExample(cell=AffineCell(), x={"A": A.to(dtype), "b": b.to(dtype)},
                           z0=z0.to(dtype), lipschitz=float(norms.max()))

    return draw()


@attrs.frozen(kw_only=True)
class Case:
    """One contract case: the plugins it combines; ``str(case)`` is its test id."""

    registry: Registry = attrs.field(eq=False, repr=False)
    cell: str
    solver: str
    backward: Optional[str] = None
    adjoint: Optional[str] = None
    guarantee: Optional[str] = None  # efficacy cases: the solver's guarantee checked
    compiled: bool = False  # the solver runs its compiled path (see COMPILE_BACKEND)

    def __str__(self) -> str:
        if self.guarantee:
            solver = self.solver + ("[compiled]" if self.compiled else "")
            return "-".join([solver, self.guarantee] + ([self.cell] if self.cell else []))
        parts = [self.backward] if self.backward else []
        if self.adjoint:
            parts[-1] += f"[adjoint={self.adjoint}]"
        return "-".join(parts + [self.solver + ("[compiled]" if self.compiled else ""),
                                 self.cell])

    def options(self, draw, kind: str = "solver") -> dict:
        """Options of this case's solver (or backward) drawn from the plugin's declared
        ``option_strategy``; ``{}`` (the defaults) when it declares none. A compiled case's
        solver gets ``compile=COMPILE_BACKEND`` (and no forced safeguard, which needs the
        eager loop)."""
        name = self.solver if kind == "solver" else self.backward
        strategy = self.registry.get(kind, name).spec.option_strategy
        options = dict(draw(strategy(), label=f"{kind} options")) if strategy else {}
        if self.compiled and kind == "solver":
            options["compile"] = COMPILE_BACKEND
            if options.get("safeguard") is True:
                options["safeguard"] = None
            from hypothesis import strategies as st

            # None: the whole solve as one while loop (the default); k: blocks of k steps
            options["block"] = draw(st.sampled_from([None, 1, 3, 8]), label="block")
        return options

    def example(self, draw, dtype: torch.dtype) -> CellExample:
        if self.cell == AFFINE:
            return draw(affine_examples(dtype), label="example")
        return draw(self.registry.get("cell", self.cell).spec.strategy(dtype=dtype),
                    label="example")

    @property
    def batch_independent(self) -> bool:
        if self.cell == AFFINE:
            return True
        return "batch_independent" in self.registry.get("cell", self.cell).spec.capabilities


def guarantees_of(spec) -> dict[str, Guarantee]:
    """A solver's declared guarantees; ``contraction_convergent`` without a declared
    ``contraction`` guarantee implies Banach's bound for the plain iteration."""
    found = dict(getattr(spec, "guarantees", {}) or {})
    if "contraction_convergent" in spec.capabilities and "contraction" not in found:
        found["contraction"] = Guarantee(
            problem="contraction", calls=_banach_calls,
            statement="declared contraction_convergent: Banach's bound for z <- f(z), "
                      "ceil(log(tol/r0)/log L) + 1 calls")
    return found


def _banach_calls(solver, inst: Instance) -> Optional[int]:
    floor = 100 * torch.finfo(inst.dtype).eps * max(1.0, inst.scale) / (1 - inst.lipschitz)
    if inst.lipschitz >= 1 or inst.tol < floor:
        return None
    needed = math.ceil(math.log(inst.tol / inst.r0) / math.log(inst.lipschitz)) \
        if inst.r0 > inst.tol else 0
    return needed + 1


#: the options of a solver with the shared safeguard (a cut-back of steps that grow the
#: residual): ``safeguard``, ``growth``, ``max_cuts``, and its ``cut_budget`` per sample
SAFEGUARD_OPTIONS = ("safeguard", "growth", "max_cuts")


def has_safeguard(factory) -> bool:
    """Whether a solver class has the safeguard's options and per-sample cut budget."""
    try:
        names = set(attrs.fields_dict(factory))
    except (TypeError, attrs.exceptions.NotAnAttrsClassError):
        return False
    return set(SAFEGUARD_OPTIONS) <= names and hasattr(factory, "cut_budget")



def matrix(registry: Registry, only: Optional[Iterable[str]] = None) -> dict[str, list[Case]]:
    """The contract cases for what is registered and allowed by declared capabilities.

    * ``solver`` and ``fault``: every solver (not ``linear_only``) × every cell with a strategy,
      and every ``linear_only`` solver × the suite's affine problem (:data:`AFFINE`);
    * ``batch_rows``: the same, for ``batch_independent`` cells (the affine problem is one);
    * ``efficacy``: every solver × each of its guarantees (× every ``lipschitz_bounded`` cell,
      for guarantees on contractions), and again on the compiled path of solvers that have one;
    * ``gradient``: every backward × every cell with the primary solver (the first
      ``unrollable`` one, so that backwards requiring it can run), and every ``exact`` backward
      × every other solver it can run with × every ``cheap`` cell;
    * ``leak``: every backward × every cell, with the primary solver;
    * ``adjoint``: every backward taking an ``adjoint_solver`` × every solver × every cell;
    * ``loop``: every solver × the suite's loop problem (:data:`LOOP`,
      :mod:`implicit.testing.loop`);
    * ``compaction``: every solver × every ``batch_independent`` ``cheap`` cell;
    * ``step``: every solver declaring a ``step_formula``;
    * ``safeguard``: every solver with the safeguard's options × the loop problem.

    ``only`` keeps cases involving a plugin whose name, plugin (entry point) or distribution is
    listed.
    """
    keep = set(only or ())

    def wanted(*entries) -> bool:
        return not keep or any({e.name, e.plugin, e.distribution} & keep for e in entries)

    cells = [e for e in registry.entries("cell") if e.spec.strategy is not None]
    all_solvers = registry.entries("solver")
    solvers = [e for e in all_solvers if "linear_only" not in e.spec.capabilities]
    primary = next((e for e in solvers if "unrollable" in e.spec.capabilities), None)
    solver_cases = [Case(registry=registry, solver=s.name, cell=c.name)
                    for s in solvers for c in cells
                    if s.spec.requires <= c.spec.capabilities and wanted(s, c)]
    # solvers of affine maps only (GMRES): the record, budget and fault contracts on an affine
    # map the suite draws itself; their result on a cell's nonlinear map is not promised
    solver_cases += [Case(registry=registry, solver=s.name, cell=AFFINE) for s in all_solvers
                     if "linear_only" in s.spec.capabilities and not s.spec.requires
                     and wanted(s)]
    # solvers with a compiled path: the solver contract over it too, on the cheap cells (each
    # drawn set of options compiles anew, seconds apiece: few examples, see COMPILED_EXAMPLES)
    compiled_cases = [Case(registry=registry, solver=s.name, cell=c.name, compiled=True)
                      for s in solvers if getattr(s.spec.factory, "static", False)
                      for c in cells if c.spec.contract_cost == "cheap"
                      and s.spec.requires <= c.spec.capabilities and wanted(s, c)]
    independent = {c.name for c in cells if "batch_independent" in c.spec.capabilities}
    efficacy_cases = []
    for s in all_solvers:
        for name, guarantee in guarantees_of(s.spec).items():
            if guarantee.problem in ("linear", "linear_float32"):
                if wanted(s):
                    efficacy_cases.append(Case(registry=registry, solver=s.name, cell="",
                                               guarantee=name))
                continue
            efficacy_cases += [Case(registry=registry, solver=s.name, cell=c.name,
                                    guarantee=name)
                               for c in cells if "lipschitz_bounded" in c.spec.capabilities
                               and s.spec.requires <= c.spec.capabilities and wanted(s, c)]
    gradient_cases, leak_cases, adjoint_cases = [], [], []
    if primary is not None:
        for b in registry.entries("backward"):
            for s in solvers:
                if not b.spec.requires <= s.spec.capabilities:
                    continue
                if s is not primary and "exact" not in b.spec.capabilities:
                    continue
                for c in cells:
                    if not s.spec.requires <= c.spec.capabilities or not wanted(b, c, s):
                        continue
                    if s is not primary and c.spec.contract_cost != "cheap":
                        continue
                    case = Case(registry=registry, backward=b.name, solver=s.name, cell=c.name)
                    gradient_cases.append(case)
                    if s is primary:
                        leak_cases.append(case)
            if not b.spec.requires <= primary.spec.capabilities:
                continue
            if "adjoint_solver" in b.spec.capabilities:
                adjoint_cases += [
                    Case(registry=registry, backward=b.name, solver=primary.name,
                         cell=c.name, adjoint=s.name)
                    for c in cells for s in all_solvers if wanted(b, c, s)
                    and s.spec.requires <= c.spec.capabilities
                ]
    return {
        "solver": solver_cases + compiled_cases,
        "fault": solver_cases,
        "batch_rows": [c for c in solver_cases if c.cell in independent or c.cell == AFFINE],
        # the compiled path's fixed-shape steps under the same theorems (few examples: each
        # drawn set of options compiles anew)
        "efficacy": efficacy_cases + [
            attrs.evolve(c, compiled=True) for c in efficacy_cases
            if getattr(registry.get("solver", c.solver).spec.factory, "static", False)],
        "gradient": gradient_cases,
        "leak": leak_cases,
        "adjoint": adjoint_cases,
        "loop": [Case(registry=registry, solver=s.name, cell=LOOP) for s in all_solvers
                 if not s.spec.requires and wanted(s)],
        "compaction": [c for c in solver_cases if c.cell in independent
                       and registry.get("cell", c.cell).spec.contract_cost == "cheap"],
        "step": [Case(registry=registry, solver=s.name, cell="", guarantee="step_formula")
                 for s in all_solvers if s.spec.step_formula is not None and wanted(s)],
        "safeguard": [Case(registry=registry, solver=s.name, cell=LOOP) for s in all_solvers
                      if has_safeguard(s.spec.factory) and not s.spec.requires and wanted(s)],
    }


def _problem(example: CellExample):
    """``(f, f_flat, spec, z0)``: the example's map on structured and on flat ``(B, n)``
    states, the state's structure and the initial state."""
    cell, x = example.cell, example.x
    with torch.no_grad():
        u = injection_of(cell, x)
    z0 = example.z0 if example.z0 is not None else init_state_of(cell, x)
    spec = StateSpec.of(z0)

    def f(z):
        return update_of(cell, z, u)

    return f, flat_map(f, spec), spec, z0


def _flat_problem(example: CellExample):
    _, fn, spec, z0 = _problem(example)
    return fn, spec, z0


def true_residuals(z: torch.Tensor, fz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented per-sample residuals, recomputed here in float64 from their definition
    (``abs = ‖f(z) − z‖₂``, ``rel = abs / ‖f(z)‖₂`` with ``0/0 = 0`` and ``x/0 = ∞``), not by the
    library's own residual function, so a wrong definition there cannot move the reference."""
    diff = fz.double() - z.double()
    abs_res = (diff * diff).sum(dim=1).sqrt()
    scale = (fz.double() * fz.double()).sum(dim=1).sqrt()
    inf = torch.full_like(abs_res, math.inf)
    rel_res = torch.where(scale > 0, abs_res / scale.clamp_min(1e-300),
                          torch.where(abs_res > 0, inf, torch.zeros_like(abs_res)))
    return abs_res, rel_res


def _statuses(sol) -> list[Status]:
    return [Status.from_code(int(c)) for c in sol.sample_status]


def _check_truthful(name: str, sol, fn, spec, tol: float, stop: str, tally: Tally) -> None:
    z = spec.flatten(sol.z)
    with torch.no_grad():
        abs_res, rel_res = true_residuals(z, fn(z))
    recomputed = abs_res if stop == "abs" else rel_res
    clear = (recomputed - tol).abs() > 1e-3 * tol  # leave round-off at the boundary alone
    if not bool(clear.any()):
        tally.no_claim("truthful_record", "every residual within 1e-3 tol of tol")
        return
    claimed, true = sol.converged[clear], (recomputed <= tol)[clear]
    _require(torch.equal(claimed, true),
             f"{name}: the record is not truthful: converged={sol.converged.tolist()} but the "
             f"{stop} residuals recomputed from their definition are {recomputed.tolist()} "
             f"against tol {tol}")
    tally.claim("truthful_record")


#: the documented resolution of a residual: one rounding, ``eps · ‖f(z)‖`` (``stop="abs"``) or
#: ``eps`` (``"rel"``), in the state's dtype (``implicit.solver.PRECISION``)
RESOLUTION = 1.0


def _check_precise(name: str, sol, fn, spec, tol: float, stop: str) -> None:
    """No false convergence: a converged sample's tolerance is above what the state's dtype
    can resolve at its ``‖f(z)‖`` (recomputed here)."""
    eps = torch.finfo(spec.dtype).eps
    z = spec.flatten(sol.z)
    with torch.no_grad():
        scale = (fn(z).double() ** 2).sum(dim=1).sqrt()
    floor = RESOLUTION * eps * (scale if stop == "abs" else torch.ones_like(scale))
    false = sol.converged & (floor > tol * (1 + 1e-3))
    if bool(false.any()):
        raise ContractViolation(
            f"{name}: samples {torch.nonzero(false).flatten().tolist()} are reported converged "
            f"with {stop} tol {tol:.3g}, below the attainable precision "
            f"{float(floor[false].max()):.3g} (eps · ‖f(z)‖): a false convergence")


def check_solver_contract(registry: Registry, solver: str, example: CellExample, *, tol: float,
                          stop: str, max_iter: int, options: Optional[dict] = None,
                          tally: Optional[Tally] = None) -> Optional[bool]:
    """Truthful record (against residuals recomputed from their definition), budgets and counts
    (``nfe[i] ≤ n_calls ≤ max_iter``; ``n_calls = max nfe`` when stopping is tested every call;
    ``n_calls = max_iter`` exactly when a sample ran out of budget), structure, caller's
    tensors untouched, no graph, determinism. Returns whether every sample converged."""
    tally = tally if tally is not None else Tally()
    options = dict(options or {})
    f, fn, spec, z0 = _problem(example)
    before = [t.clone() for t in _parts(z0)]
    algorithm = registry.make("solver", solver, **options, tol=tol, stop=stop,
                              max_iter=max_iter, policy="ignore")
    name = f"{solver}{options or ''}"
    with torch.no_grad():
        sol = solve(f, z0, solver=algorithm)
    got = StateSpec.of(sol.z)
    _require(got == spec, f"{name}: returned state {got.describe()} {got.dtype} on {got.device}"
             f" but the state is {spec.describe()} {spec.dtype} on {spec.device}")
    _require(all(torch.equal(a, b) for a, b in zip(before, _parts(z0))),
             f"{name}: the caller's z0 was modified in place")
    _require(not any(t.requires_grad for t in _parts(sol.z)),
             f"{name}: the forward solve built an autograd graph")
    _require(1 <= sol.n_calls <= max_iter,
             f"{name}: n_calls={sol.n_calls} outside [1, max_iter={max_iter}]")
    _require(bool((sol.nfe >= 1).all() and (sol.nfe <= sol.n_calls).all()),
             f"{name}: nfe {sol.nfe.tolist()} not within [1, n_calls={sol.n_calls}]")
    _check_truthful(name, sol, fn, spec, tol, stop, tally)
    _check_precise(name, sol, fn, spec, tol, stop)
    statuses = _statuses(sol)
    _require(all((s is Status.CONVERGED) == bool(c) for s, c in zip(statuses, sol.converged)),
             f"{name}: per-sample statuses {[s.name for s in statuses]} disagree with "
             f"converged={sol.converged.tolist()}")
    # the loop tests "all done?" every check_every steps (1 with host checks, else 4), so at
    # most check_every − 1 calls follow the last sample's stop; a compiled solve tests it
    # after every step in its while loop (block=None), or between blocks of `block` steps,
    # FALLBACK_BLOCK when a map that cannot be traced sends a block=None solve to blocks
    every = getattr(algorithm, "check_every", None) or (
        1 if host_checks(spec.flatten(sol.z)) else 4)
    if getattr(algorithm, "compile", False):
        every = int(algorithm.block or (1 if sol.stats.get("loop") == "while"
                                        else FALLBACK_BLOCK))
    _require(int(sol.nfe.max()) <= sol.n_calls <= int(sol.nfe.max()) + every - 1,
             f"{name}: n_calls={sol.n_calls} but the most calls any sample was active for is "
             f"{int(sol.nfe.max())} and stopping is tested every {every} steps: calls made "
             f"after every sample was done")
    tally.claim("stops_when_done")
    if any(s is Status.MAX_ITER for s in statuses):
        # the budget ran out: every call was made, or fewer were left than one step of this
        # solver needs (its declared min_step_calls), and the record says how many
        need = type(algorithm).min_step_calls
        unused = max_iter - sol.n_calls
        _require(unused < need,
                 f"{name}: a sample reports MAX_ITER but only {sol.n_calls} of max_iter="
                 f"{max_iter} calls were made (a step needs {need})")
        _require(sol.stats.get("unused_calls", 0) == unused,
                 f"{name}: {unused} call(s) of max_iter={max_iter} were left unused but the "
                 f"record's stats say unused_calls={sol.stats.get('unused_calls')}")
        tally.claim("budget_edge")
    else:
        tally.no_claim("budget_edge", "no sample ran out of budget")

    with torch.no_grad():
        again = solve(f, z0, solver=algorithm)
    _require(all(torch.equal(a, b) for a, b in zip(_parts(sol.z), _parts(again.z)))
             and torch.equal(sol.nfe, again.nfe) and torch.equal(sol.converged, again.converged),
             f"{name}: two solves of the same instance differ (not deterministic)")
    return sol.all_converged


def check_efficacy(registry: Registry, solver: str, guarantee: str, fn, z0: torch.Tensor, *,
                   lipschitz: float, tol_factor: float, options: Optional[dict] = None,
                   tally: Optional[Tally] = None) -> Optional[int]:
    """The solver's declared ``guarantee`` on the flat problem ``z = fn(z)`` from ``z0``
    (``(B, n)``; a linear map or a contraction with Lipschitz bound ``lipschitz``): with the
    options the guarantee asks for and ``tol = tol_factor · r0`` (absolute), every sample's
    residual, recomputed from its definition, is below tol after at most the bound's number of
    calls. Returns the bound (``None``: the theorem's hypotheses do not hold, no claim)."""
    tally = tally if tally is not None else Tally()
    entry = registry.get("solver", solver)
    claim = guarantees_of(entry.spec)[guarantee]
    with torch.no_grad():
        f0 = fn(z0)
        r0_rows, _ = true_residuals(z0, f0)
        scale = float((f0.double() ** 2).sum(dim=1).sqrt().max())
    r0 = float(r0_rows.max())
    tol = tol_factor * r0 if r0 > 0 else 1e-12
    inst = Instance(n=z0.shape[1], lipschitz=float(lipschitz), r0=r0, tol=tol, scale=scale,
                    dtype=z0.dtype)
    chosen = dict(claim.options(inst, dict(options or {})))
    probe = registry.make("solver", solver, **chosen, tol=tol, stop="abs", max_iter=10_000,
                          policy="ignore")
    bound = claim.calls(probe, inst)
    if bound is None:
        tally.no_claim("efficacy", "the theorem's hypotheses do not hold for these options")
        return None
    algorithm = registry.make("solver", solver, **chosen, tol=tol, stop="abs",
                              max_iter=bound + 2, policy="ignore")
    with torch.no_grad():
        sol = iterate(algorithm, fn, z0).solution
        abs_res, _ = true_residuals(sol.z, fn(sol.z))
    label = f"{solver}{chosen}"
    # calls to convergence: the most calls a sample was active for (the loop may make up to
    # check_every − 1 more before it notices that every sample is done)
    _require(bool((abs_res <= tol * (1 + 1e-6)).all()) and int(sol.nfe.max()) <= bound,
             f"{label}: breaks its guarantee {guarantee!r} ({claim.statement}): on "
             f"n={inst.n}, L={inst.lipschitz:.3g}, tol={tol:.3g} (r0={r0:.3g}) it claims "
             f"convergence within {bound} calls, but after {int(sol.nfe.max())} calls the "
             f"residuals "
             f"are {abs_res.tolist()} (status {sol.status.name})")
    tally.claim("efficacy")
    return bound


def linear_problem(n: int, lipschitz: float, batch: int, seed: int,
                   dtype: torch.dtype = torch.float64):
    """``(fn, z0)``: ``f(z) = A z + b`` per sample computed in ``dtype``, each
    ``‖A_i‖₂ = lipschitz`` (drawn in float64, then rounded)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    A = A * (lipschitz / torch.linalg.matrix_norm(A, ord=2))[:, None, None]
    b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    z0 = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    A, b, z0 = A.to(dtype), b.to(dtype), z0.to(dtype)

    def fn(z: torch.Tensor) -> torch.Tensor:
        return torch.bmm(A, z.unsqueeze(2)).squeeze(2) + b

    return fn, z0


def contraction_problem(example: CellExample):
    """``(fn, z0, lipschitz)`` of a drawn cell example (``lipschitz`` None when unknown)."""
    fn, spec, z0 = _flat_problem(example)
    return fn, spec.flatten(z0).detach(), example.lipschitz


def check_batch_rows(registry: Registry, solver: str, example: CellExample,
                     options: Optional[dict] = None, tally: Optional[Tally] = None) -> None:
    """For a batch-independent cell, each row solved alone equals that row solved in a batch:
    the same point and status, and a count ``nfe[i]`` in the batch of at least ``n_calls``
    alone (the reference for per-sample counts; equal for solvers making one call per step)."""
    tally = tally if tally is not None else Tally()
    fn, spec, z0 = _flat_problem(example)
    algorithm = registry.make("solver", solver, **(options or {}), tol=1e-10, stop="abs",
                              max_iter=300, policy="ignore")
    flat0 = spec.flatten(z0)
    with torch.no_grad():
        together = iterate(algorithm, fn, flat0).solution
        for i in range(flat0.shape[0]):
            def row_fn(z, i=i):
                full = flat0.clone()
                full[i : i + 1] = z
                return fn(full)[i : i + 1]

            row = iterate(algorithm, row_fn, flat0[i : i + 1]).solution
            _require(bool(row.converged[0]) == bool(together.converged[i]),
                     f"{solver}: sample {i} converged={bool(together.converged[i])} in the batch "
                     f"but {bool(row.converged[0])} alone")
            _require(torch.allclose(row.z[0], together.z[i], rtol=1e-7, atol=1e-9),
                     f"{solver}: sample {i} solved alone differs from its row in the batch by "
                     f"{float((row.z[0] - together.z[i]).abs().max()):.3g}")
            # in the batch it is also evaluated at the calls other samples' line searches make
            # while it is active, so its count may be larger — unless every step made one call
            single = together.stats.get("loop_steps") == together.n_calls - 1
            alone = int(row.nfe[0])
            _require(int(together.nfe[i]) == alone if single
                     else int(together.nfe[i]) >= alone,
                     f"{solver}: sample {i} takes {alone} calls alone but its count in "
                     f"the batch is nfe={int(together.nfe[i])} (steps of one call each: "
                     f"{single})")
    tally.claim("rows_match")


FAULTS = ("nan", "inf", "diverge")


def check_fault(registry: Registry, solver: str, example: CellExample, *, at_call: int,
                fault: str, independent: bool, options: Optional[dict] = None,
                tally: Optional[Tally] = None) -> None:
    """f turns bad for sample 0 from its call number ``at_call`` on: NaN or Inf in its row, or
    (``"diverge"``) a map with no fixed point whose residual ``1 + ‖z‖²`` grows with the iterate.
    Sample 0, if it was still active at that call in the clean solve, ends not converged — with
    status NONFINITE for NaN/Inf — and keeps the clean result if it had converged before; for a
    batch-independent cell every other sample ends exactly as in the clean solve."""
    tally = tally if tally is not None else Tally()
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    fn, spec, z0 = _flat_problem(example)
    flat0 = spec.flatten(z0)
    tol = 1e-4 if spec.dtype == torch.float32 else 1e-8
    # a budget that does not bind the other samples: the faulty one may take a line search's
    # extra calls at every step, and the budget is the batch's
    algorithm = registry.make("solver", solver, **(options or {}), tol=tol, stop="rel",
                              max_iter=120, policy="ignore")
    calls = [0]

    def faulty(z: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = fn(z)
        if calls[0] < at_call:
            return out
        out = out.clone()
        if fault == "diverge":
            grow = 1 + (z[0] * z[0]).sum()
            out[0] = z[0] + grow / math.sqrt(z.shape[1])
        else:
            out[0] = float("nan") if fault == "nan" else float("inf")
        return out

    with torch.no_grad():
        clean = iterate(algorithm, fn, flat0).solution
        sol = iterate(algorithm, faulty, flat0).solution
    label = f"{solver}{options or ''}"
    hit = at_call <= int(clean.nfe[0])  # sample 0 was active when f turned bad for it
    if at_call > clean.n_calls:
        tally.no_claim("fault_reported", "the solve ended before the faulty call")
    elif not hit:
        _require(bool(sol.converged[0]) and torch.equal(sol.z[0], clean.z[0]),
                 f"{label}: sample 0 had converged before call {at_call}, where its f turned "
                 f"{fault}, yet it ends {_statuses(sol)[0].name} instead of its clean result")
        tally.claim("fault_reported")
    else:
        status = _statuses(sol)[0]
        expected = ({Status.NONFINITE} if fault != "diverge"
                    else {Status.MAX_ITER, Status.DIVERGED, Status.NONFINITE})
        _require(status in expected and not bool(sol.converged[0]),
                 f"{label}: f turned {fault} for sample 0 at call {at_call}, but its status is "
                 f"{status.name} (converged={bool(sol.converged[0])}), not "
                 f"{' or '.join(sorted(s.name for s in expected))}")
        tally.claim("fault_reported")
    if not independent or flat0.shape[0] < 2:
        tally.no_claim("others_unchanged", "batch of one" if flat0.shape[0] < 2
                       else "the cell couples the samples")
        return
    # samples the clean solve converges end as they do there: same point, status and count
    rows = torch.nonzero(clean.converged[1:]).flatten() + 1
    if rows.numel() == 0:
        tally.no_claim("others_unchanged", "no other sample converges in the clean solve")
        return
    slack = max(math.sqrt(torch.finfo(spec.dtype).eps), 10 * tol)
    _require(bool(sol.converged[rows].all())
             and torch.allclose(sol.z[rows], clean.z[rows], rtol=slack, atol=slack),
             f"{label}: f turning {fault} for sample 0 at call {at_call} changed the results "
             f"of samples {rows.tolist()} (converged without it)")
    tally.claim("others_unchanged")


def check_nonfinite(registry: Registry, solver: str, example: CellExample,
                    independent: bool, tally: Optional[Tally] = None) -> None:
    """A map that returns NaN for sample 0 from its first call: :func:`check_fault` at call 1."""
    check_fault(registry, solver, example, at_call=1, fault="nan", independent=independent,
                tally=tally)


def _far_start(z0: torch.Tensor) -> torch.Tensor:
    """A start away from any fixed point near ``z0``: gradients are compared where the solve
    has iterations to differentiate (unrolling a solve that stops at its first iterate gives a
    truncated gradient — zero when ``z0`` is already the fixed point)."""
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(2), dtype=z0.dtype)
    return z0 + noise * (1 + z0.abs().max())


def _loss(out: Any, gen: torch.Generator) -> torch.Tensor:
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in _parts(out)]
    return sum((w * t).sum() for w, t in zip(weights, _parts(out)))


def _exact_layer(cell, solver: str, backward: str, solver_options: dict,
                 backward_options: dict, tol: float = 1e-11, stop: str = "abs") -> DEQ:
    # outside training: there a backward forms the gradient its name promises (in training it
    # may regularise it, as ift's damping does)
    return DEQ(cell, solver=solver, backward=backward, tol=tol, stop=stop, max_iter=2000,
               policy="ignore", solver_options=solver_options,
               backward_options=backward_options).eval()


def check_gradient_contract(registry: Registry, backward: str, solver: str,
                            example: CellExample, *, solver_options: Optional[dict] = None,
                            backward_options: Optional[dict] = None,
                            tally: Optional[Tally] = None) -> None:
    """Gradients reach x and every parameter and are finite; an ``exact`` backward matches
    central finite differences; the implied adjoint matches the dense one (exact backwards),
    the declared formula and bound (approximate ones); a ``second_order`` backward's
    Hessian-vector product matches a plain autograd loop's; a ``backprop_through_iterates``
    backward's gradient is that of the solver's own iterates."""
    tally = tally if tally is not None else Tally()
    solver_options, backward_options = dict(solver_options or {}), dict(backward_options or {})
    cell, x = example.cell, example.x.detach()
    if x.dtype != torch.float64:
        raise ValueError("the gradient contract runs in float64")
    layer = _exact_layer(cell, solver, backward, solver_options, backward_options)
    xr = x.clone().requires_grad_()
    with torch.no_grad():
        start = init_state_of(cell, x) if example.z0 is None else example.z0
        spec0 = StateSpec.of(start)
        start = spec0.unflatten(_far_start(spec0.flatten(start)))
    out = layer(xr, start)
    if not layer.solution.all_converged:
        tally.no_claim("gradient", f"the forward solve did not converge ({solver}"
                                   f"{solver_options or ''} at tol 1e-11 in 2000 calls)")
        return
    gen = torch.Generator().manual_seed(0)
    loss = _loss(out, gen)
    params = [p for p in cell.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [xr, *params], allow_unused=True)
    label = f"{backward}{backward_options or ''} with {solver}{solver_options or ''}"
    _require(all(g is not None for g in grads),
             f"{label}: the gradient does not reach x and every parameter")
    _require(all(bool(torch.isfinite(g).all()) for g in grads),
             f"{label}: non-finite gradient")
    spec = registry.get("backward", backward).spec
    check_adjoint(registry, backward, solver, example, options=backward_options,
                  solver_options=solver_options, tally=tally)
    if "exact" not in spec.capabilities:
        tally.claim("gradient")
        return
    direction = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    eps = 1e-6
    with torch.no_grad():
        gen_fd = torch.Generator().manual_seed(0)
        plus = _loss(layer(x + eps * direction, start), gen_fd)
        gen_fd = torch.Generator().manual_seed(0)
        minus = _loss(layer(x - eps * direction, start), gen_fd)
    numeric = float((plus - minus) / (2 * eps))
    analytic = float((grads[0] * direction).sum())
    scale = max(1.0, abs(numeric))
    _require(abs(numeric - analytic) <= 1e-4 * scale,
             f"{label}: directional derivative {analytic:.8g} but finite differences give "
             f"{numeric:.8g}")
    tally.claim("gradient")
    _check_exact_in_training(layer, xr, start, grads, params, label, tally)


def _check_exact_in_training(layer: DEQ, xr: torch.Tensor, start: Any, grads, params,
                             label: str, tally: Tally) -> None:
    """An ``exact`` backward whose solves converged tightly gives the true derivative in
    training mode too (a fresh layer is in training mode, and users gradcheck it): the training
    gradient equals the eval one just checked against finite differences. No claim when the
    cell itself computes differently in training (dropout, batch statistics)."""
    cell = layer.cell
    try:
        with torch.no_grad():
            z_star = layer.solution.z
            u = injection_of(cell, xr.detach())
            evaluated = _parts(update_of(cell, z_star, u))
            cell.train()
            trained = _parts(update_of(cell, z_star, u))
        if not all(torch.allclose(a, b, rtol=1e-12, atol=1e-12)
                   for a, b in zip(evaluated, trained)):
            tally.no_claim("exact_in_training", "the cell computes differently in training")
            return
        layer.train()
        out = layer(xr, start)
        got = torch.autograd.grad(_loss(out, torch.Generator().manual_seed(0)), [xr, *params],
                                  allow_unused=True)
    finally:
        layer.eval()
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                for a, b in zip(got, grads) if b is not None and a is not None)
    _require(worst <= 1e-6,
             f"{label}: in training mode the gradient of a layer whose solves converged to "
             f"1e-11 is off the exact one by {worst:.3g} (relative, worst tensor): a tightly "
             f"solved layer must give the true derivative in either mode")
    tally.claim("exact_in_training")


def check_adjoint(registry: Registry, backward: str, solver: str, example: CellExample,
                  adjoint: Optional[str] = None, *, options: Optional[dict] = None,
                  solver_options: Optional[dict] = None,
                  tally: Optional[Tally] = None) -> Optional[float]:
    """The adjoint the backward implies, ``w̃ = ∂L/∂e`` for ``f(z) + e`` at ``e = 0``, against
    the dense ``w = (I − Jᵀ)⁻¹ y``: exact backwards to 1e-6 relative; others against their
    declared ``adjoint_formula`` (1e-6 relative) and within their ``adjoint_error_bound``.
    Returns the relative error to the exact adjoint (None: no claim made)."""
    tally = tally if tally is not None else Tally()
    spec = registry.get("backward", backward).spec
    exact = "exact" in spec.capabilities
    if not exact and spec.adjoint_error_bound is None and spec.adjoint_formula is None:
        tally.no_claim("adjoint", "an approximate backward declaring no formula or bound")
        return None
    options = dict(options or {})
    if adjoint is not None:
        options["solver"] = adjoint
    strategy = registry.make("backward", backward, **options)
    fn, state_spec, z0 = _flat_problem(example)
    flat0 = _far_start(state_spec.flatten(z0).detach())
    e = torch.zeros_like(flat0, requires_grad=True)
    records = []
    problem = Problem(fn=lambda z: fn(z) + e, z0=flat0, inputs=(e,),
                      fn_with=lambda z, inputs: fn(z) + inputs[0],
                      on_backward_solution=records.append)
    algorithm = registry.make("solver", solver, **(solver_options or {}), tol=1e-12,
                              stop="abs", max_iter=2000, policy="ignore")
    result = strategy(problem, algorithm)
    if not result.solution.all_converged:
        tally.no_claim("adjoint", "the forward solve did not converge (tol 1e-12, 2000 calls)")
        return None
    y = torch.randn(flat0.shape, generator=torch.Generator().manual_seed(1), dtype=flat0.dtype)
    implied = (torch.autograd.grad(result.z, e, y)[0] if result.z.requires_grad
               else torch.zeros_like(y))  # z does not depend on e at all
    if any(not r.all_converged for r in records):
        tally.no_claim("adjoint", "the adjoint solve did not converge")
        return None
    z_star = result.solution.z.detach()
    errors = []
    label = backward + (f" (adjoint solver {adjoint})" if adjoint else "") + \
        (f"{options}" if options else "")
    bound_error = 0.0
    for i in range(flat0.shape[0]):  # per sample: the Jacobian is block diagonal in the batch
        def row_fn(z, i=i):
            full = z_star.clone()
            full[i] = z
            return fn(full)[i]

        jac = torch.autograd.functional.jacobian(row_fn, z_star[i])
        eye = torch.eye(jac.shape[0], dtype=jac.dtype)
        w = torch.linalg.solve(eye - jac.T, y[i])
        error = float(torch.linalg.vector_norm(implied[i] - w) / torch.linalg.vector_norm(w))
        errors.append(error)
        if exact:
            _require(error <= 1e-6, f"{label}: the implied adjoint of sample {i} is off the "
                                    f"exact one by {error:.3g} (relative)")
            continue
        if spec.adjoint_formula is not None:
            expected = spec.adjoint_formula(strategy, jac, y[i])
            off = float(torch.linalg.vector_norm(implied[i] - expected)
                        / torch.linalg.vector_norm(expected).clamp_min(1e-300))
            _require(off <= 1e-6, f"{label}: the implied adjoint of sample {i} is off its "
                                  f"documented formula by {off:.3g} (relative)")
        if spec.adjoint_error_bound is not None:
            norm = float(torch.linalg.matrix_norm(jac, ord=2))
            bound = spec.adjoint_error_bound(strategy, norm)
            bound_error = max(bound_error, error - bound)
            _require(error <= bound * (1 + 1e-6) + 1e-9,
                     f"{label}: adjoint error {error:.3g} of sample {i} exceeds the declared "
                     f"bound {bound:.3g} (‖J‖₂ = {norm:.3g})")
    tally.claim("adjoint")
    _check_training_adjoint(spec, strategy, fn, flat0, algorithm, y, label, tally)
    if spec.training_adjoint is None:
        _check_same_in_training(strategy, fn, flat0, algorithm, y, implied, label, tally)
    return max(errors)


def _check_same_in_training(strategy, fn, flat0: torch.Tensor, algorithm, y: torch.Tensor,
                            implied: torch.Tensor, label: str, tally: Tally) -> None:
    """A backward that declares no training adjoint forms the same gradient in training: its
    training-mode implied adjoint equals the eval-mode one just checked against the dense
    reference (1e-9 relative)."""
    e = torch.zeros_like(flat0, requires_grad=True)
    problem = Problem(fn=lambda z: fn(z) + e, z0=flat0, inputs=(e,),
                      fn_with=lambda z, inputs: fn(z) + inputs[0], training=True)
    result = strategy(problem, algorithm)
    trained = (torch.autograd.grad(result.z, e, y)[0] if result.z.requires_grad
               else torch.zeros_like(y))
    off = float((torch.linalg.vector_norm(trained - implied, dim=1)
                 / torch.linalg.vector_norm(implied, dim=1).clamp_min(1e-300)).max())
    _require(off <= 1e-9, f"{label}: in training the implied adjoint differs from the one in "
                          f"eval by {off:.3g} (relative, worst sample), and the backward "
                          f"declares no training adjoint (BackwardSpec.training_adjoint)")
    tally.claim("same_in_training")


def _check_training_adjoint(spec, strategy, fn, flat0: torch.Tensor, algorithm, y: torch.Tensor,
                            label: str, tally: Tally) -> None:
    """In training, at an inexact ``z*`` (a forward solve cut at 3 calls), the adjoint the
    strategy's gradient implies equals its declared ``training_adjoint`` formula (1e-6
    relative), from the dense Jacobians at that ``z*`` — e.g. ift's damped
    ``(I − (1 − δ) Jᵀ)⁻¹ y``, not the exact adjoint the eval-mode claim checks."""
    pinned = spec.training_adjoint(strategy) if spec.training_adjoint is not None else None
    if pinned is None:
        tally.no_claim("training_adjoint", "no training-mode formula declared")
        return
    trained, formula = pinned
    e = torch.zeros_like(flat0, requires_grad=True)
    records = []
    problem = Problem(fn=lambda z: fn(z) + e, z0=flat0, inputs=(e,),
                      fn_with=lambda z, inputs: fn(z) + inputs[0],
                      on_backward_solution=records.append, training=True)
    cut = attrs.evolve(algorithm, max_iter=3, tol=1e-12)
    result = trained(problem, cut)
    exact_below = getattr(trained, "exact_below", 0.0)
    if not bool((result.solution.rel_residual > exact_below).all()):
        tally.no_claim("training_adjoint", "a sample's z* met exact_below in 3 calls")
        return
    implied = (torch.autograd.grad(result.z, e, y)[0] if result.z.requires_grad
               else torch.zeros_like(y))
    if any(r.status is Status.NONFINITE for r in records):
        tally.no_claim("training_adjoint", "the adjoint solve went non-finite")
        return
    if getattr(trained, "training_adjoint", None) == "damped" and not all(
            bool(r.converged.all()) for r in records):
        tally.no_claim("training_adjoint", "the damped adjoint solve did not converge")
        return
    # the Jacobian at the strategy's output: z* (the solver's), or a step past it for a
    # strategy that returns f(z*) in training (ift's "calibrated")
    z_star = result.z.detach()
    jacs = []
    for i in range(flat0.shape[0]):
        def row_fn(z, i=i):
            full = z_star.clone()
            full[i] = z
            return fn(full)[i]

        jacs.append(torch.autograd.functional.jacobian(row_fn, z_star[i]))
    jac = torch.stack(jacs)
    expected = formula(jac, y)
    off = float((torch.linalg.vector_norm(implied - expected, dim=1)
                 / torch.linalg.vector_norm(expected, dim=1).clamp_min(1e-300)).max())
    _require(off <= 1e-6, f"{label}: in training (z* inexact) the implied adjoint is off the "
                          f"documented training formula by {off:.3g} (relative, worst sample)")
    tally.claim("training_adjoint")


def check_backprop_through_iterates(registry: Registry, backward: str, solver: str,
                                    example: CellExample, *,
                                    solver_options: Optional[dict] = None,
                                    tally: Optional[Tally] = None) -> None:
    """A ``backprop_through_iterates`` backward's gradient equals that of a plain autograd loop
    of the solver's own ``step`` (called directly, outside the library's loop), where each
    sample's output is its iterate after as many steps as its record says it took — at a loose
    tolerance (1e-3), where that gradient differs from the implicit one."""
    tally = tally if tally is not None else Tally()
    cell, x = example.cell, example.x.detach()
    layer = _exact_layer(cell, solver, backward, dict(solver_options or {}), {}, tol=1e-3,
                         stop="abs")
    with torch.no_grad():
        start = init_state_of(cell, x) if example.z0 is None else example.z0
        spec0 = StateSpec.of(start)
        start = spec0.unflatten(_far_start(spec0.flatten(start)))
    xr = x.clone().requires_grad_()
    out = layer(xr, start)
    sol = layer.solution
    if not sol.all_converged:
        tally.no_claim("backprop_through_iterates", "the forward solve did not converge")
        return
    weights = torch.randn(spec0.flatten(start).shape, generator=torch.Generator().manual_seed(0),
                          dtype=x.dtype)
    (got,) = torch.autograd.grad((spec0.flatten(out) * weights).sum(), xr)

    xw = x.clone().requires_grad_()
    u = injection_of(cell, xw)

    def fn(z):
        return spec0.flatten(update_of(cell, spec0.unflatten(z), u))

    algorithm = registry.make("solver", solver, **(solver_options or {}), tol=0.0, stop="abs",
                              max_iter=10**6, policy="ignore")
    z = spec0.flatten(start)
    fz = fn(z)
    state = algorithm.init(z, fz)
    calls = _Calls(fn)
    steps = (sol.nfe - 1).tolist()
    picked = [None] * len(steps)
    for k in range(max(steps) + 1):
        for i, s_i in enumerate(steps):
            if s_i == k:
                picked[i] = z[i]
        if k == max(steps):
            break
        stepped = (algorithm.step(calls, z, fz, state, g=fz - z)
                   if getattr(algorithm, "uses_residual", False)
                   else algorithm.step(calls, z, fz, state))
        z, fz, state = stepped[:3]
    (want,) = torch.autograd.grad((torch.stack(picked) * weights).sum(), xw)
    scale = float(want.abs().max()) + 1e-12
    _require(torch.allclose(got, want, rtol=1e-7, atol=1e-9 * scale),
             f"{backward} with {solver}: the gradient differs from backprop through the "
             f"solver's own steps ({steps} per sample) by {float((got - want).abs().max()):.3g}")
    tally.claim("backprop_through_iterates")


class _Calls:
    """A stand-in for the loop's evaluator when a solver's step is called directly."""

    def __init__(self, fn):
        self.fn, self.calls, self.remaining, self.sample_calls = fn, 0, 10**9, None

    def __call__(self, z):
        self.calls += 1
        return self.fn(z)


def check_second_order(registry: Registry, backward: str, solver: str, example: CellExample, *,
                       solver_options: Optional[dict] = None,
                       backward_options: Optional[dict] = None,
                       tally: Optional[Tally] = None) -> None:
    """A ``second_order`` backward's Hessian-vector product ``∂/∂x (∂L/∂x · v)`` matches that
    of a plain autograd loop ``z ← f(z, x)`` run until ``L^K < 1e-14`` (its derivatives converge
    to those of ``z*`` for a contraction), to 1e-5 relative."""
    tally = tally if tally is not None else Tally()
    L = example.lipschitz
    if L is None or L >= 0.95:
        tally.no_claim("second_order", "no Lipschitz bound below 0.95 for the reference loop")
        return
    cell, x = example.cell, example.x.detach()
    layer = _exact_layer(cell, solver, backward, dict(solver_options or {}),
                         dict(backward_options or {}))
    start = init_state_of(cell, x) if example.z0 is None else example.z0
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)

    def hvp(forward) -> torch.Tensor:
        xr = x.clone().requires_grad_()
        loss = _loss(forward(xr), torch.Generator().manual_seed(0))
        (g,) = torch.autograd.grad(loss, xr, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), xr)
        return h

    got = hvp(lambda xr: layer(xr, start))
    if not layer.solution.all_converged:
        tally.no_claim("second_order", "the forward solve did not converge")
        return
    steps = math.ceil(math.log(1e-14) / math.log(max(L, 1e-3))) + 20

    def loop(xr):
        u = injection_of(cell, xr)
        z = start
        for _ in range(steps):
            z = update_of(cell, z, u)
        return z

    want = hvp(loop)
    scale = float(want.abs().max()) + 1e-12
    _require(torch.allclose(got, want, rtol=1e-5, atol=1e-5 * scale),
             f"{backward} with {solver}: the Hessian-vector product differs from a plain "
             f"autograd loop's by {float((got - want).abs().max()):.3g} (scale {scale:.3g})")
    tally.claim("second_order")


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in module.modules()) + sum(
        len(getattr(p, "_backward_hooks", None) or {}) for p in module.parameters())


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def check_no_leak(registry: Registry, backward: str, solver: str, example: CellExample,
                  steps: int = 50) -> None:
    """``steps`` training steps leave no hooks behind, free every step's graph without the
    garbage collector (no reference cycles) and keep the number of live tensors flat."""
    cell, x = example.cell, example.x.detach()
    layer = DEQ(cell, solver=solver, backward=backward, tol=1e-6, max_iter=60, policy="ignore")
    hooks = _hook_count(layer)
    gen = torch.Generator().manual_seed(0)

    def step() -> weakref.ref:
        out = layer(x.clone().requires_grad_())
        _loss(out, gen).backward()
        return weakref.ref(_parts(out)[0])

    warmup = min(5, steps)
    for _ in range(warmup):
        step()
    baseline = _live_tensors()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(steps - warmup):
            ref = step()
            _require(ref() is None,
                     f"{backward}: step {warmup + i + 1}'s output (and its graph) is still alive "
                     "after backward without the garbage collector: a reference cycle")
    finally:
        if enabled:
            gc.enable()
    _require(_hook_count(layer) == hooks,
             f"{backward}: {_hook_count(layer) - hooks} hooks left on the layer after {steps} "
             "steps")
    after = _live_tensors()
    _require(after <= baseline,
             f"{backward}: live tensors grew from {baseline} to {after} over {steps - warmup} "
             "training steps")
