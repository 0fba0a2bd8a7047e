"""The contract checks themselves (plain functions; pytest and Hypothesis drive them)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from ..cell import init_state_of, injection_of, update_of
from ..deq import DEQ, flat_map, solve
from ..registry import Registry
from ..solver import residuals
from ..specs import CellExample
from ..state import StateSpec


class ContractViolation(AssertionError):
    """A plugin broke a contract; the message says which and how."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


def _parts(state: Any) -> list[torch.Tensor]:
    return list(state) if isinstance(state, (tuple, list)) else [state]


def matrix(registry: Registry, only: Optional[Iterable[str]] = None) -> dict[str, list]:
    """The contract cases: ``{"solver": [(solver, cell)], "gradient": [(backward, solver,
    cell)]}`` for what is registered and allowed by declared capabilities. ``only`` keeps cases
    involving a plugin whose name, plugin (entry point) or distribution is listed."""
    keep = set(only or ())

    def wanted(*entries) -> bool:
        return not keep or any({e.name, e.plugin, e.distribution} & keep for e in entries)

    cells = [e for e in registry.entries("cell") if e.spec.strategy is not None]
    solvers = [e for e in registry.entries("solver") if "linear_only" not in e.spec.capabilities]
    primary = next((e for e in solvers if "unrollable" in e.spec.capabilities), None)
    solver_cases = [(s.name, c.name) for s in solvers for c in cells
                    if s.spec.requires <= c.spec.capabilities and wanted(s, c)]
    gradient_cases = []
    if primary is not None:
        gradient_cases = [(b.name, primary.name, c.name)
                          for b in registry.entries("backward") for c in cells
                          if b.spec.requires <= primary.spec.capabilities and wanted(b, c)]
    return {"solver": solver_cases, "gradient": gradient_cases}


def check_solver_contract(registry: Registry, solver: str, example: CellExample, *, tol: float,
                          stop: str, max_iter: int) -> None:
    cell, x = example.cell, example.x
    u = injection_of(cell, x)
    z0 = example.z0 if example.z0 is not None else init_state_of(cell, x)
    before = [t.clone() for t in _parts(z0)]
    algorithm = registry.make("solver", solver, tol=tol, stop=stop, max_iter=max_iter,
                              policy="ignore")
    spec = StateSpec.of(z0)
    with torch.no_grad():
        sol = solve(lambda z: update_of(cell, z, u), z0, solver=algorithm)
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
    fn = flat_map(lambda z: update_of(cell, z, u), spec)
    z = spec.flatten(sol.z)
    with torch.no_grad():
        abs_res, rel_res = residuals(z.double(), fn(z).double())
    recomputed = abs_res if stop == "abs" else rel_res
    clear = (recomputed - tol).abs() > 1e-3 * tol  # leave round-off at the boundary alone
    claimed, true = sol.converged[clear], (recomputed <= tol)[clear]
    _require(torch.equal(claimed, true),
             f"{solver}: the record is not truthful: converged={sol.converged.tolist()} but the "
             f"recomputed {stop} residuals are {recomputed.tolist()} against tol {tol}")


def check_gradient_contract(registry: Registry, backward: str, solver: str,
                            example: CellExample) -> None:
    cell, x = example.cell, example.x.detach()
    if x.dtype != torch.float64:
        raise ValueError("the gradient contract runs in float64")
    layer = DEQ(cell, solver=solver, backward=backward, tol=1e-11, stop="abs", max_iter=2000,
                policy="ignore")
    xr = x.clone().requires_grad_()
    out = layer(xr)
    if not layer.solution.all_converged:
        return  # nothing to claim about gradients around a point that was not found
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in _parts(out)]
    loss = sum((w * t).sum() for w, t in zip(weights, _parts(out)))
    params = [p for p in cell.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [xr, *params], allow_unused=True)
    _require(all(g is not None for g in grads),
             f"{backward}: the gradient does not reach x and every parameter")
    _require(all(bool(torch.isfinite(g).all()) for g in grads),
             f"{backward}: non-finite gradient")
    spec = registry.get("backward", backward).spec
    if "exact" not in spec.capabilities:
        return
    direction = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    eps = 1e-6
    with torch.no_grad():
        plus = sum((w * t).sum() for w, t in zip(weights, _parts(layer(x + eps * direction))))
        minus = sum((w * t).sum() for w, t in zip(weights, _parts(layer(x - eps * direction))))
    numeric = float((plus - minus) / (2 * eps))
    analytic = float((grads[0] * direction).sum())
    scale = max(1.0, abs(numeric))
    _require(abs(numeric - analytic) <= 1e-4 * scale,
             f"{backward}: directional derivative {analytic:.8g} but finite differences give "
             f"{numeric:.8g}")
