"""The contract checks themselves (plain functions; pytest and Hypothesis drive them).

Every check is a theorem for the instances the cell strategies draw; a failure raises
:class:`ContractViolation` with a message naming the plugin and what it broke.
"""

from __future__ import annotations

import gc
import math
import weakref
from typing import Any, Iterable, Optional

import attrs
import torch

from ..backward import Problem
from ..cell import init_state_of, injection_of, update_of
from ..deq import DEQ, flat_map, solve
from ..registry import Registry
from ..solution import Status
from ..solver import iterate, residuals
from ..specs import CellExample
from ..state import StateSpec


class ContractViolation(AssertionError):
    """A plugin broke a contract; the message says which and how."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


def _parts(state: Any) -> list[torch.Tensor]:
    return list(state) if isinstance(state, (tuple, list)) else [state]


@attrs.frozen(kw_only=True)
class Case:
    """One contract case: the plugins it combines; ``str(case)`` is its test id."""

    registry: Registry = attrs.field(eq=False, repr=False)
    cell: str
    solver: str
    backward: Optional[str] = None
    adjoint: Optional[str] = None

    def __str__(self) -> str:
        parts = [self.backward] if self.backward else []
        if self.adjoint:
            parts[-1] += f"[adjoint={self.adjoint}]"
        return "-".join(parts + [self.solver, self.cell])

    def example(self, draw, dtype: torch.dtype) -> CellExample:
        return draw(self.registry.get("cell", self.cell).spec.strategy(dtype=dtype),
                    label="example")

    @property
    def batch_independent(self) -> bool:
        return "batch_independent" in self.registry.get("cell", self.cell).spec.capabilities


def matrix(registry: Registry, only: Optional[Iterable[str]] = None) -> dict[str, list[Case]]:
    """The contract cases for what is registered and allowed by declared capabilities.

    * ``solver``: every solver (not ``linear_only``) × every cell with a strategy;
    * ``batch_rows``: the same, for ``batch_independent`` cells;
    * ``gradient`` and ``leak``: every backward × every cell, with the primary solver (the first
      ``unrollable`` one, so that backwards requiring it can run);
    * ``adjoint``: every backward taking an ``adjoint_solver`` × every solver × every cell.

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
    independent = {c.name for c in cells if "batch_independent" in c.spec.capabilities}
    gradient_cases, adjoint_cases = [], []
    if primary is not None:
        for b in registry.entries("backward"):
            if not b.spec.requires <= primary.spec.capabilities:
                continue
            for c in cells:
                if wanted(b, c, primary):
                    gradient_cases.append(Case(registry=registry, backward=b.name,
                                               solver=primary.name, cell=c.name))
                if "adjoint_solver" in b.spec.capabilities:
                    adjoint_cases += [
                        Case(registry=registry, backward=b.name, solver=primary.name,
                             cell=c.name, adjoint=s.name)
                        for s in all_solvers if wanted(b, c, s)
                        and s.spec.requires <= c.spec.capabilities
                    ]
    return {
        "solver": solver_cases,
        "batch_rows": [c for c in solver_cases if c.cell in independent],
        "gradient": gradient_cases,
        "leak": gradient_cases,
        "adjoint": adjoint_cases,
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


def check_solver_contract(registry: Registry, solver: str, example: CellExample, *, tol: float,
                          stop: str, max_iter: int) -> Optional[bool]:
    """Truthful record, budgets, structure, caller's tensors untouched, no graph, determinism,
    and convergence where it is guaranteed. Returns whether every sample converged."""
    f, fn, spec, z0 = _problem(example)
    before = [t.clone() for t in _parts(z0)]
    algorithm = registry.make("solver", solver, tol=tol, stop=stop, max_iter=max_iter,
                              policy="ignore")
    with torch.no_grad():
        sol = solve(f, z0, solver=algorithm)
    got = StateSpec.of(sol.z)
    _require(got == spec, f"{solver}: returned state {got.describe()} {got.dtype} on {got.device}"
             f" but the state is {spec.describe()} {spec.dtype} on {spec.device}")
    _require(all(torch.equal(a, b) for a, b in zip(before, _parts(z0))),
             f"{solver}: the caller's z0 was modified in place")
    _require(not any(t.requires_grad for t in _parts(sol.z)),
             f"{solver}: the forward solve built an autograd graph")
    _require(1 <= sol.n_calls <= max_iter,
             f"{solver}: n_calls={sol.n_calls} outside [1, max_iter={max_iter}]")
    _require(bool((sol.nfe >= 1).all() and (sol.nfe <= sol.n_calls).all()),
             f"{solver}: nfe {sol.nfe.tolist()} not within [1, n_calls={sol.n_calls}]")
    z = spec.flatten(sol.z)
    with torch.no_grad():
        abs_res, rel_res = residuals(z.double(), fn(z).double())
    recomputed = abs_res if stop == "abs" else rel_res
    clear = (recomputed - tol).abs() > 1e-3 * tol  # leave round-off at the boundary alone
    claimed, true = sol.converged[clear], (recomputed <= tol)[clear]
    _require(torch.equal(claimed, true),
             f"{solver}: the record is not truthful: converged={sol.converged.tolist()} but the "
             f"recomputed {stop} residuals are {recomputed.tolist()} against tol {tol}")

    with torch.no_grad():
        again = solve(f, z0, solver=algorithm)
    _require(all(torch.equal(a, b) for a, b in zip(_parts(sol.z), _parts(again.z)))
             and torch.equal(sol.nfe, again.nfe) and torch.equal(sol.converged, again.converged),
             f"{solver}: two solves of the same instance differ (not deterministic)")

    guaranteed = "contraction_convergent" in registry.get("solver", solver).spec.capabilities
    lipschitz = example.lipschitz
    if guaranteed and stop == "abs" and lipschitz is not None and lipschitz < 1:
        with torch.no_grad():
            flat0 = spec.flatten(z0).double()
            f0 = fn(spec.flatten(z0)).double()
            r0 = torch.linalg.vector_norm(f0 - flat0, dim=1).max()
            scale = torch.linalg.vector_norm(f0, dim=1).max()
        floor = 100 * torch.finfo(spec.dtype).eps * max(1.0, float(scale)) / (1 - lipschitz)
        needed = (math.log(tol / float(r0)) / math.log(lipschitz) if r0 > tol else 0) + 1
        if tol >= floor and max_iter >= needed + 1:
            _require(sol.all_converged,
                     f"{solver}: did not converge on a contraction (Lipschitz {lipschitz:.3g}) "
                     f"within {max_iter} calls, where {math.ceil(needed)} suffice: status "
                     f"{sol.status.name}, residuals {sol.residual.tolist()}")
    return sol.all_converged


def check_batch_rows(registry: Registry, solver: str, example: CellExample) -> None:
    """For a batch-independent cell, each row solved alone equals that row solved in a batch."""
    fn, spec, z0 = _flat_problem(example)
    algorithm = registry.make("solver", solver, tol=1e-10, stop="abs", max_iter=300,
                              policy="ignore")
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


def check_nonfinite(registry: Registry, solver: str, example: CellExample,
                    independent: bool) -> None:
    """A map that returns NaN for sample 0 (from its first call, ``f(z0)``): sample 0 is
    reported non-finite and not converged; for a batch-independent cell the other samples that
    the clean solve converges still converge, to the same point."""
    fn, spec, z0 = _flat_problem(example)
    flat0 = spec.flatten(z0)
    tol = 1e-4 if spec.dtype == torch.float32 else 1e-8
    algorithm = registry.make("solver", solver, tol=tol, stop="rel", max_iter=10,
                              policy="ignore")

    def poisoned(z: torch.Tensor) -> torch.Tensor:
        out = fn(z).clone()
        out[0] = float("nan")
        return out

    with torch.no_grad():
        sol = iterate(algorithm, poisoned, flat0).solution
        clean = iterate(algorithm, fn, flat0).solution if independent else None
    status = Status.from_code(int(sol.sample_status[0]))
    _require(status is Status.NONFINITE and not bool(sol.converged[0]),
             f"{solver}: f returned NaN for sample 0, but its status is {status.name} "
             f"(converged={bool(sol.converged[0])}), not NONFINITE")
    if clean is not None and flat0.shape[0] > 1:
        # samples the clean solve converges are converged to the same point despite the NaN
        # (not converged ones may be chaotic: rounding alone can move them)
        rows = torch.nonzero(clean.converged[1:]).flatten() + 1
        slack = max(math.sqrt(torch.finfo(spec.dtype).eps), 10 * tol)
        _require(bool(sol.converged[rows].all())
                 and torch.allclose(sol.z[rows], clean.z[rows], rtol=slack, atol=slack),
                 f"{solver}: a NaN in sample 0 changed the results of samples "
                 f"{rows.tolist()} (converged without it)")


def _far_start(z0: torch.Tensor) -> torch.Tensor:
    """A start away from any fixed point near ``z0``: gradients are compared where the solve
    has iterations to differentiate (unrolling a solve that stops at its first iterate gives a
    truncated gradient — zero when ``z0`` is already the fixed point)."""
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(2), dtype=z0.dtype)
    return z0 + noise * (1 + z0.abs().max())


def _loss(out: Any, gen: torch.Generator) -> torch.Tensor:
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in _parts(out)]
    return sum((w * t).sum() for w, t in zip(weights, _parts(out)))


def check_gradient_contract(registry: Registry, backward: str, solver: str,
                            example: CellExample) -> None:
    """Gradients reach x and every parameter and are finite; an ``exact`` backward matches
    central finite differences; the implied adjoint is within the declared bound."""
    cell, x = example.cell, example.x.detach()
    if x.dtype != torch.float64:
        raise ValueError("the gradient contract runs in float64")
    # outside training: there a backward forms the gradient its name promises (in training it
    # may regularise it, as ift's damping does)
    layer = DEQ(cell, solver=solver, backward=backward, tol=1e-11, stop="abs", max_iter=2000,
                policy="ignore").eval()
    xr = x.clone().requires_grad_()
    with torch.no_grad():
        start = init_state_of(cell, x) if example.z0 is None else example.z0
        spec0 = StateSpec.of(start)
        start = spec0.unflatten(_far_start(spec0.flatten(start)))
    out = layer(xr, start)
    if not layer.solution.all_converged:
        return  # nothing to claim about gradients around a point that was not found
    gen = torch.Generator().manual_seed(0)
    loss = _loss(out, gen)
    params = [p for p in cell.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [xr, *params], allow_unused=True)
    _require(all(g is not None for g in grads),
             f"{backward}: the gradient does not reach x and every parameter")
    _require(all(bool(torch.isfinite(g).all()) for g in grads),
             f"{backward}: non-finite gradient")
    spec = registry.get("backward", backward).spec
    check_adjoint(registry, backward, solver, example)
    if "exact" not in spec.capabilities:
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
             f"{backward}: directional derivative {analytic:.8g} but finite differences give "
             f"{numeric:.8g}")


def check_adjoint(registry: Registry, backward: str, solver: str, example: CellExample,
                  adjoint: Optional[str] = None) -> Optional[float]:
    """The adjoint the backward implies, ``w̃ = ∂L/∂e`` for ``f(z) + e`` at ``e = 0``, against
    the dense ``w = (I − Jᵀ)⁻¹ y``: exact backwards to 1e-6 relative, others within their
    declared ``adjoint_error_bound``. Returns the relative error (None: no claim made)."""
    spec = registry.get("backward", backward).spec
    exact = "exact" in spec.capabilities
    if not exact and spec.adjoint_error_bound is None:
        return None
    options = {"solver": adjoint} if adjoint is not None else {}
    strategy = registry.make("backward", backward, **options)
    fn, state_spec, z0 = _flat_problem(example)
    flat0 = _far_start(state_spec.flatten(z0).detach())
    e = torch.zeros_like(flat0, requires_grad=True)
    records = []
    problem = Problem(fn=lambda z: fn(z) + e, z0=flat0, inputs=(e,),
                      fn_with=lambda z, inputs: fn(z) + inputs[0],
                      on_backward_solution=records.append)
    algorithm = registry.make("solver", solver, tol=1e-12, stop="abs", max_iter=2000,
                              policy="ignore")
    result = strategy(problem, algorithm)
    if not result.solution.all_converged:
        return None
    y = torch.randn(flat0.shape, generator=torch.Generator().manual_seed(1), dtype=flat0.dtype)
    implied = (torch.autograd.grad(result.z, e, y)[0] if result.z.requires_grad
               else torch.zeros_like(y))  # z does not depend on e at all
    if any(not r.all_converged for r in records):
        return None  # the adjoint solve itself did not converge: no exactness to claim
    z_star = result.solution.z.reshape(-1).detach()
    jac = torch.autograd.functional.jacobian(lambda z: fn(z.view_as(flat0)).reshape(-1), z_star)
    eye = torch.eye(jac.shape[0], dtype=jac.dtype)
    w = torch.linalg.solve(eye - jac.T, y.reshape(-1))
    error = float(torch.linalg.vector_norm(implied.reshape(-1) - w) / torch.linalg.vector_norm(w))
    label = backward + (f" (adjoint solver {adjoint})" if adjoint else "")
    if exact:
        _require(error <= 1e-6, f"{label}: the implied adjoint is off the exact one by "
                                f"{error:.3g} (relative)")
    else:
        norm = float(torch.linalg.matrix_norm(jac, ord=2))
        bound = spec.adjoint_error_bound(strategy, norm)
        _require(error <= bound * (1 + 1e-6) + 1e-9,
                 f"{label}: adjoint error {error:.3g} exceeds the declared bound {bound:.3g} "
                 f"(‖J‖₂ = {norm:.3g})")
    return error


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
