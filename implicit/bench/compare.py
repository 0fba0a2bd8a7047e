"""``implicit bench --compare torchdeq``: the same workloads through torchdeq, same process.

A plugin declares its torchdeq counterpart in its spec's ``equivalents`` (a solver: torchdeq's
solver name, used for the forward and the backward solve; a backward: ``torchdeq.get_deq``
keyword arguments). Both libraries get the same cell weights, input, tolerance and budget;
repeats alternate between them so drift in machine load hits both alike. Ratios are
torchdeq time / implicit-layers time (> 1: we are faster). torchdeq stops when every sample's
residual is below tol (its ``.max() < tol``), as we do; its backward runs with
``b_stop_mode="rel"`` and ``b_tol=tol``, the closest match to our gradient-relative adjoint tol.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch

from ..cell import init_state_of, injection_of, update_of
from ..deq import DEQ
from ..registry import Registry
from ..solver import residuals
from ..state import StateSpec
from .measure import Combination, build_problem, sync


def make_comparer(name: str, console) -> Optional[Callable[..., dict]]:
    if name != "torchdeq":
        raise ValueError(f"--compare supports 'torchdeq', got {name!r}")
    try:
        import torchdeq  # noqa: F401
    except ImportError:
        console.print(
            "[yellow]--compare torchdeq: torchdeq is not importable here, so the comparison "
            "columns are left out (pip install torchdeq to enable them)[/yellow]"
        )
        return None
    return compare_torchdeq


def _alternate(ours: Callable, theirs: Callable, device: torch.device, repeat: int):
    ours(), theirs()  # warm-up
    sync(device)
    t_ours, t_theirs = [], []
    for _ in range(repeat):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    return t_ours, t_theirs


def compare_torchdeq(combo: Combination, record: dict, registry: Registry) -> dict[str, Any]:
    from torchdeq import get_deq

    if combo.solver_options or combo.backward_options:
        return {"skipped": "equivalents are declared for default options only"}
    solver_eq = registry.get("solver", combo.solver).spec.equivalents.get("torchdeq")
    backward_eq = registry.get("backward", combo.backward).spec.equivalents.get("torchdeq")
    if solver_eq is None or backward_eq is None:
        missing = combo.solver if solver_eq is None else combo.backward
        return {"skipped": f"{missing!r} declares no torchdeq equivalent"}
    device = torch.device(combo.device)
    cell, x, _ = build_problem(registry, combo)
    solver = registry.make("solver", combo.solver, tol=combo.tol, stop=combo.stop,
                           max_iter=combo.max_iter, policy="ignore")
    layer = DEQ(cell, solver=solver, backward=registry.make("backward", combo.backward))
    deq = get_deq(
        f_solver=solver_eq, b_solver=solver_eq, f_max_iter=combo.max_iter,
        b_max_iter=combo.max_iter, f_tol=combo.tol, b_tol=combo.tol, f_stop_mode=combo.stop,
        b_stop_mode="rel", **(backward_eq if isinstance(backward_eq, dict) else {}),
    )
    with torch.no_grad():
        spec = StateSpec.of(init_state_of(cell, x))
    weight = torch.randn(spec.batch_size, spec.numel_per_sample,
                         generator=torch.Generator().manual_seed(combo.seed + 2),
                         dtype=torch.float64).to(device=device, dtype=spec.dtype)
    info_box: dict[str, Any] = {}

    def theirs_solve():
        u = injection_of(cell, x)
        z_out, info = deq(lambda z: update_of(cell, z, u), init_state_of(cell, x))
        info_box["info"] = info
        return z_out[-1]

    def ours_forward():
        with torch.no_grad():
            layer(x)

    def theirs_forward():
        deq.eval()
        with torch.no_grad():
            info_box["z"] = theirs_solve()
        deq.train()

    def step(run: Callable[[], Any]) -> Callable[[], None]:
        def go():
            loss = (spec.flatten(run()) * weight).sum()
            torch.autograd.grad(loss, [p for p in cell.parameters() if p.requires_grad])

        return go

    layer.train()
    deq.train()
    fwd_ours, fwd_theirs = _alternate(ours_forward, theirs_forward, device, combo.repeat)
    with torch.no_grad():
        z = spec.flatten(info_box["z"])
        fz = spec.flatten(update_of(cell, info_box["z"], injection_of(cell, x)))
        _, true_rel = residuals(z.double(), fz.double())
    nstep = info_box["info"].get("nstep")
    train_ours, train_theirs = _alternate(step(lambda: layer(x)), step(theirs_solve), device,
                                          combo.repeat)
    fo, ft = statistics.median(fwd_ours), statistics.median(fwd_theirs)
    to, tt = statistics.median(train_ours), statistics.median(train_theirs)
    import torchdeq

    return {
        "library": f"torchdeq {getattr(torchdeq, '__version__', '')}".strip(),
        "config": {"f_solver": solver_eq, "b_solver": solver_eq, **(
            backward_eq if isinstance(backward_eq, dict) else {})},
        "forward_time_s": {"implicit": fo, "torchdeq": ft},
        "train_step_time_s": {"implicit": to, "torchdeq": tt},
        "forward_time_ratio": ft / fo,
        "train_step_time_ratio": tt / to,
        "torchdeq_nstep_mean": float(nstep.double().mean()) if nstep is not None else None,
        "torchdeq_true_rel_residual_max": float(true_rel.max()),
        "implicit_forward_n_calls": layer.solution.n_calls,
    }
