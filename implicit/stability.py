"""Stability tools: Jacobian regularisation, spectral estimates, normalised weights.

Bai, Koltun & Kolter 2021 ("Stabilizing Equilibrium Models by Jacobian Regularization"; the deq
README, ../shared/seeds/003) penalise ``‖J_f(z*)‖_F²`` to keep equilibria stable and solves
short. Everything here works on maps ``fn`` of batched states ``(B, ...)`` (the batch in
dimension 0) and reports per-sample numbers. For a cell whose samples do not interact
(``batch_independent``) the per-sample Jacobian is the block of sample ``i``; for a cell that
couples samples, row ``i`` of the estimates covers the outputs of sample ``i`` only.

* :func:`jacobian_frobenius` — Hutchinson's estimate of ``‖J‖_F² / numel`` (per sample),
  differentiable with respect to the parameters of ``fn``: the loss term of Bai et al.
* :func:`jacobian_spectral_norm` — ``‖J‖₂`` by power iteration on ``JᵀJ`` (a contraction
  indicator: ``‖J‖₂ < 1`` at ``z*`` means forward iteration converges locally).
* :func:`normalize_weights` — weight or spectral normalisation of a cell's weights with
  ``torch.nn.utils.parametrizations``; :class:`implicit.DEQ` computes parametrized weights once
  per forward (one power-iteration step per solve, not one per cell call).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

TensorMap = Callable[[torch.Tensor], torch.Tensor]
PROBES = ("gaussian", "rademacher")


def _probe(like: torch.Tensor, kind: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")


def _check_probes(probes: object) -> int:
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    return probes


def jacobian_frobenius(
    fn: TensorMap,
    z: torch.Tensor,
    *,
    probes: int = 1,
    probe: str = "gaussian",
    generator: Optional[torch.Generator] = None,
    create_graph: bool = True,
    per_probe: bool = False,
) -> torch.Tensor:
    """Hutchinson estimate of ``‖J_fn(z)‖_F² / numel`` per sample, ``(B,)``.

    ``E[‖vᵀJ‖²] = tr(J Jᵀ) = ‖J‖_F²`` for probes with ``E[v vᵀ] = I`` (``probe="gaussian"``
    or ``"rademacher"``; Rademacher has the lower variance). Divided by the state's numel per
    sample, as Bai et al. do, so the weight of the loss term does not depend on the state size.

    Gradient path: ``fn`` is evaluated once at a *detached* copy of ``z`` (no gradient through
    the solver or ``z*``), and each ``vᵀJ`` is a VJP taken with ``create_graph=True``, so the
    estimate's gradient reaches the parameters of ``fn`` by double backward through that one
    call. With ``create_graph=False`` the result is detached (telemetry only).

    ``per_probe=True`` returns the ``(probes, B)`` samples whose mean is the estimate (for a
    standard error: ``samples.std(0) / √probes``).
    """
    probes = _check_probes(probes)
    if z.dim() < 1:
        raise ValueError("z must have a batch dimension (dimension 0)")
    with torch.enable_grad():
        zd = z.detach().requires_grad_(True)
        fz = fn(zd)
        if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
            raise ValueError("fn must map a state to a state of the same shape")
        numel = max(1, z[0].numel())
        samples = []
        for i in range(probes):
            v = _probe(fz, probe, generator)
            (vjp,) = torch.autograd.grad(
                fz, zd, v, retain_graph=i < probes - 1 or create_graph,
                create_graph=create_graph, allow_unused=True,
            )
            if vjp is None:  # fn does not depend on z
                vjp = torch.zeros_like(zd)
            samples.append(vjp.reshape(vjp.shape[0], -1).pow(2).sum(dim=1) / numel)
    stacked = torch.stack(samples)
    if not create_graph:
        stacked = stacked.detach()
    return stacked if per_probe else stacked.mean(dim=0)


def jacobian_spectral_norm(
    fn: TensorMap,
    z: torch.Tensor,
    *,
    iters: int = 50,
    tol: float = 1e-6,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``‖J_fn(z)‖₂`` per sample, ``(B,)``, by power iteration on ``JᵀJ`` (no gradient).

    ``JᵀJ`` is symmetric positive semi-definite, so its dominant eigenvalue is ``σ_max²`` and
    power iteration converges at rate ``(σ₂/σ₁)²``; plain power iteration on a non-symmetric
    ``J`` would oscillate on a complex dominant pair and miss it. Each iteration is one JVP and
    one VJP, both from a single evaluation of ``fn`` (the JVP by the double-VJP trick). Stops
    after ``iters`` iterations or when every sample's estimate changes by less than ``tol``
    (relative). A contraction indicator: ``‖J‖₂ < 1`` at a fixed point means plain forward
    iteration converges near it (``‖J‖₂`` bounds the spectral radius from above).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    with torch.enable_grad():
        zd = z.detach().requires_grad_(True)
        fz = fn(zd)
        if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
            raise ValueError("fn must map a state to a state of the same shape")
        if not fz.requires_grad:
            return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        # u ↦ Jᵀu with a graph, so that v ↦ J v = d(Jᵀu · v)/du is one more backward
        u = torch.zeros_like(fz, requires_grad=True)
        (jt_u,) = torch.autograd.grad(fz, zd, u, create_graph=True)

        def jvp(v: torch.Tensor) -> torch.Tensor:
            (out,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            return out

        def vjp(w: torch.Tensor) -> torch.Tensor:
            (out,) = torch.autograd.grad(fz, zd, w, retain_graph=True)
            return out

        batch = z.shape[0]

        def norms(t: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vector_norm(t.reshape(batch, -1), dim=1)

        def per_sample(scale: torch.Tensor) -> torch.Tensor:
            return scale.reshape(batch, *([1] * (z.dim() - 1)))

        v = _probe(z, "gaussian", generator)
        v = v / per_sample(norms(v).clamp_min(torch.finfo(z.dtype).tiny))
        sigma = torch.zeros(batch, dtype=z.dtype, device=z.device)
        for _ in range(iters):
            jv = jvp(v)
            new_sigma = norms(jv)  # ‖J v‖ with ‖v‖ = 1: a lower bound that rises to σ_max
            w = vjp(jv)  # JᵀJ v
            w_norm = norms(w)
            zero = w_norm == 0
            v = torch.where(per_sample(zero), v, w / per_sample(w_norm.clamp_min(
                torch.finfo(z.dtype).tiny)))
            done = bool(((new_sigma - sigma).abs() <= tol * new_sigma.abs()).all())
            sigma = new_sigma
            if done:
                break
        # the Rayleigh quotient at the final vector is the sharpest estimate
        return norms(jvp(v)).detach()


_NORMALIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def normalize_weights(
    cell: nn.Module,
    kind: str = "spectral",
    *,
    modules: Optional[Iterable[type]] = None,
    name: str = "weight",
) -> nn.Module:
    """Weight or spectral normalisation of every ``weight`` of ``cell``'s Linear/Conv layers
    (or of ``modules`` types), with ``torch.nn.utils.parametrizations``; returns ``cell``.

    ``kind="spectral"`` divides each weight by a power-iteration estimate of its spectral norm
    (a 1-Lipschitz layer); ``kind="weight"`` reparametrises ``W = g · V / ‖V‖``. Inside
    :class:`implicit.DEQ` every parametrized weight is computed once per forward and held for
    the whole solve and its backward (in training, spectral normalisation's power iteration
    would otherwise move the weight on every call of the cell, and so the fixed point).
    """
    from torch.nn.utils import parametrizations

    if kind == "spectral":
        apply = parametrizations.spectral_norm
    elif kind == "weight":
        apply = parametrizations.weight_norm
    else:
        raise ValueError(f"kind must be 'spectral' or 'weight', got {kind!r}")
    types = tuple(modules) if modules is not None else _NORMALIZABLE
    targets = [m for m in cell.modules() if isinstance(m, types)
               and isinstance(getattr(m, name, None), torch.Tensor)]
    if not targets:
        raise ValueError(
            f"{type(cell).__name__} has no {'/'.join(t.__name__ for t in types)} module with "
            f"a {name!r} tensor to normalise"
        )
    for module in targets:
        apply(module, name=name)
    return cell


def _parametrized_slots(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    from torch.nn.utils import parametrize

    return {
        (f"{prefix}.{tensor_name}" if prefix else tensor_name): (sub, tensor_name)
        for prefix, sub in module.named_modules() if parametrize.is_parametrized(sub)
        for tensor_name in sub.parametrizations
    }


def _has_parametrizations(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules is parametrized: a walk over the
    ``_modules`` dicts (the ``parametrizations`` ModuleDict that ``register_parametrization``
    adds is one of them), without ``named_modules``' prefixes or ``is_parametrized``'s
    attribute misses — a DEQ asks on every forward, and most cells have none."""
    seen, stack = set(), [module]
    while stack:
        children = stack.pop()._modules
        if isinstance(children.get("parametrizations"), nn.ModuleDict):
            return True
        for child in children.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return False


def parametrized_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The current value of every parametrized tensor of ``module`` by qualified name (e.g.
    ``"W.weight"``), each computed once (with autograd history to the originals when grad is
    enabled; in training, spectral normalisation takes its one power-iteration step here)."""
    if not _has_parametrizations(module):
        return {}
    from torch.nn.utils import parametrize

    with parametrize.cached():
        return {key: getattr(sub, name) for key, (sub, name) in
                _parametrized_slots(module).items()}


@contextlib.contextmanager
def hold_parametrized(module: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, the parametrized tensors of ``module`` named in ``values`` (qualified
    names, as :func:`parametrized_tensors` returns) *are* those tensors: no parametrization
    runs (so no power-iteration step moves a spectral-normalised weight between calls).

    Uses the cache behind ``torch.nn.utils.parametrize.cached()``, pre-filled with ``values``.
    """
    from torch.nn.utils import parametrize

    if not values:
        yield
        return
    cache = getattr(parametrize, "_cache", None)
    if not isinstance(cache, dict):  # pragma: no cover - a torch without the cache
        raise RuntimeError(
            "this torch version has no torch.nn.utils.parametrize cache to hold parametrized "
            "weights fixed during a solve; remove the parametrizations or use torch >= 2.11"
        )
    slots = _parametrized_slots(module)
    with parametrize.cached():
        saved = {}
        for key, value in values.items():
            sub, name = slots[key]
            saved[(id(sub), name)] = cache.get((id(sub), name))
            cache[(id(sub), name)] = value
        try:
            yield
        finally:
            for slot, previous in saved.items():
                if previous is None:
                    cache.pop(slot, None)
                else:
                    cache[slot] = previous


def hook_based_spectral_norm(module: nn.Module) -> list[str]:
    """Names of submodules normalised by the old hook-based ``torch.nn.utils.spectral_norm``
    (it runs a power-iteration step on *every* call in training, moving the weight)."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    return [name or type(module).__name__ for name, sub in module.named_modules()
            if any(isinstance(h, SpectralNorm) for h in sub._forward_pre_hooks.values())]
