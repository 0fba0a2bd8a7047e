"""Training parity: the tutorial's DEQ code and ``implicit.DEQ``, same model, data and seed.

The recipe is "Deep Implicit Layers" ch. 4 (../shared/seeds/001) in 1-D: a ResNet cell with
GroupNorm (conv weights N(0, 0.01)), Anderson m=5, forward relative tolerance 1e-3 capped at 30
calls, the IFT backward solved by Anderson to 1e-6 (also capped at 30), Adam 2e-3 with a cosine
schedule, batch 100. Data: MNIST-1D (Greydanus & Kobak 2020, generated offline by the
``mnist1d`` package: 4000 train / 1000 test sequences of length 40) or scikit-learn's digits
(8×8 images, the 2-D cell). Both layers sit in one ``nn.Sequential`` built from the same seed
(stem conv + BatchNorm, the DEQ, BatchNorm, average pool, linear head) and are trained on the
same batches, so the only difference is the layer. By default the variants of one seed train
in lockstep in one process (``--schedule lockstep``: each batch goes to every variant in turn,
each step timed on its own), so that their times are taken under the same machine load::

    python benchmarks/training_parity.py --data mnist1d --epochs 30 --seeds 0 1 2 \\
        --variants tutorial implicit --out benchmarks/results/cpu-training-parity
    python benchmarks/training_parity.py --variants tutorial implicit:readout=state --epochs 5

The *tutorial* layer here is the chapter's algorithm written afresh: its Anderson (bordered
least squares with the absolute ridge ``lam = 1e-4``, the whole batch's relative residual as
the stopping test, the *last* iterate returned), its ``DEQFixedPoint`` (``f`` applied once more
to the solution with autograd on, and a backward hook solving ``g = Jᵀ g + grad`` by the same
Anderson from ``grad``). Variant options after ``:`` change one thing at a time (see
``VARIANTS``). ``--diagnose-every N`` records, every N steps and outside the timed region, the
spectral radius of J at the solution (power iteration with VJPs) and the residuals of both
solves. Each run writes ``runs/<variant>-seed<k>.json``; ``--out`` also writes ``results.json``
(mean ± std per variant) and ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import autograd, nn

import implicit

# ----------------------------------------------------------------------------------------------
# The tutorial's layer (ch. 4), written to its structure


def tutorial_anderson(f: Callable, x0: torch.Tensor, m: int = 5, lam: float = 1e-4,
                      max_iter: int = 50, tol: float = 1e-2, beta: float = 1.0,
                      keep: str = "last", stats: dict | None = None):
    """The tutorial's Anderson: ``max_iter`` calls of ``f`` at most, stops when the whole
    batch's ``‖f(x) − x‖ / (1e-5 + ‖f(x)‖)`` is below ``tol``; returns the last iterate (or,
    ``keep="best"``, each sample's best by its own relative residual) and the residual list.
    ``stats`` (a dict) receives ``ridge_share``: the batch mean of ``lam / (lam + mean diag
    GGᵀ)`` at the last mix (near 1: the ridge dominates and the weights are nearly uniform)."""
    bsz = x0.shape[0]
    X = torch.zeros(bsz, m, x0[0].numel(), dtype=x0.dtype, device=x0.device)
    F = torch.zeros_like(X)
    X[:, 0], F[:, 0] = x0.reshape(bsz, -1), f(x0).reshape(bsz, -1)
    X[:, 1], F[:, 1] = F[:, 0], f(F[:, 0].view_as(x0)).reshape(bsz, -1)
    H = torch.zeros(bsz, m + 1, m + 1, dtype=x0.dtype, device=x0.device)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = torch.zeros(bsz, m + 1, 1, dtype=x0.dtype, device=x0.device)
    y[:, 0] = 1
    best, best_res = X[:, 1].clone(), torch.full((bsz,), math.inf, device=x0.device)
    res, k = [], 1
    for k in range(2, max_iter):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        H[:, 1:n + 1, 1:n + 1] = (torch.bmm(G, G.transpose(1, 2))
                                  + lam * torch.eye(n, dtype=x0.dtype, device=x0.device)[None])
        alpha = torch.linalg.solve(H[:, :n + 1, :n + 1], y[:, :n + 1])[:, 1:n + 1, 0]
        if stats is not None:
            gram_scale = (G * G).sum(-1).mean(-1)
            stats["ridge_share"] = float((lam / (lam + gram_scale)).mean())
        X[:, k % m] = (beta * (alpha[:, None] @ F[:, :n])[:, 0]
                       + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0])
        F[:, k % m] = f(X[:, k % m].view_as(x0)).reshape(bsz, -1)
        gap = F[:, k % m] - X[:, k % m]
        res.append(gap.norm().item() / (1e-5 + F[:, k % m].norm().item()))
        if keep == "best":
            sample_res = gap.norm(dim=1) / (1e-5 + F[:, k % m].norm(dim=1))
            better = sample_res < best_res
            best = torch.where(better[:, None], X[:, k % m], best)
            best_res = torch.where(better, sample_res, best_res)
        if res[-1] < tol:
            break
    out = best if keep == "best" else X[:, k % m]
    return out.reshape(x0.shape).clone(), res


class TutorialDEQ(nn.Module):
    """The tutorial's ``DEQFixedPoint``: solve without a graph, apply ``f`` once more with
    autograd on (``readout="step"``; ``"state"`` returns the solution itself, attached to the
    graph through a zero-cost identity), and a hook that replaces the incoming gradient by the
    solution of ``g = Jᵀ g + grad``."""

    def __init__(self, f: nn.Module, forward_kwargs: dict, backward_kwargs: dict,
                 readout: str = "step", forward_solver: str = "tutorial") -> None:
        super().__init__()
        self.f = f
        self.forward_kwargs = forward_kwargs
        self.backward_kwargs = backward_kwargs
        self.readout = readout
        # "implicit": z* found by the library's solve (per-sample stopping and best iterate)
        # with the same solver settings, the rest of the layer the tutorial's (a half swap)
        self.forward_solver = forward_solver
        self.forward_res: list = []
        self.backward_res: list = []
        self.backward_stats: dict = {}
        self.z_star: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.forward_solver == "implicit":
                z, self.forward_res = library_anderson(lambda z: self.f(z, x),
                                                       torch.zeros_like(x),
                                                       **self.forward_kwargs)
            else:
                z, self.forward_res = tutorial_anderson(lambda z: self.f(z, x),
                                                        torch.zeros_like(x),
                                                        **self.forward_kwargs)
        self.z_star = z
        if not torch.is_grad_enabled():
            return self.f(z, x) if self.readout == "step" else z
        z0 = z.clone().detach().requires_grad_()
        f0 = self.f(z0, x)
        if self.readout == "step":
            z = self.f(z, x)
        else:  # z* itself, with the hook's adjoint taken back through f(z*) for the gradient
            z = _Attach.apply(z, f0)

        def backward_hook(grad):
            g, self.backward_res = tutorial_anderson(
                lambda y: autograd.grad(f0, z0, y, retain_graph=True)[0] + grad, grad,
                stats=self.backward_stats, **self.backward_kwargs)
            return g

        z.register_hook(backward_hook)
        return z


def library_anderson(f: Callable, x0: torch.Tensor, m: int = 5, lam: float = 1e-4,
                     max_iter: int = 50, tol: float = 1e-2, keep: str = "last", **_):
    """The forward half of the library's layer in the tutorial's calling convention: its
    Anderson (``m``, its own relative ridge) to ``tol`` per sample, each sample's best iterate,
    at most ``max_iter`` calls; returns the point and, as the tutorial's residual list, one
    entry per call after the first two (so that call counts read alike)."""
    sol = implicit.solve(f, x0, solver=implicit.make_solver(
        "anderson", m=m, tol=tol, max_iter=max_iter, policy="ignore"))
    # the batch's ‖f(z) − z‖ / ‖f(z)‖, as the tutorial reports it, from the per-sample record
    scale = sol.abs_residual / sol.rel_residual.clamp_min(1e-30)
    batch = float(sol.abs_residual.norm() / scale.norm().clamp_min(1e-30))
    return sol.z, [batch] * max(0, sol.n_calls - 2)


class TutorialForwardDEQ(nn.Module):
    """The other half swap: the tutorial's forward (its Anderson, batch stop, last iterate) finds
    ``z*``, and the library's ``DEQ`` forms the output and the gradient from there (its forward
    solve given ``z0 = z*`` and ``max_iter=1``: one evaluation of f, ``z*`` returned as is)."""

    def __init__(self, deq: implicit.DEQ, forward_kwargs: dict) -> None:
        super().__init__()
        self.deq = deq
        self.forward_kwargs = forward_kwargs
        self.forward_res: list = []

    @property
    def cell(self) -> nn.Module:
        return self.deq.cell

    @property
    def solution(self):
        return self.deq.solution

    @property
    def backward_solution(self):
        return self.deq.backward_solution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z, self.forward_res = tutorial_anderson(lambda z: self.deq.cell(z, x),
                                                    torch.zeros_like(x), **self.forward_kwargs)
        return self.deq(x, z)


class _Attach(torch.autograd.Function):
    """``z`` in value; its gradient goes to ``fz`` (so it reaches the parameters through one
    VJP of f, as the tutorial's re-engaged step does)."""

    @staticmethod
    def forward(ctx, z, fz):
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


# ----------------------------------------------------------------------------------------------
# Layers under test


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def slug(variant: str) -> str:
    """A variant's spelling as part of a file name that every file system accepts (no ':')."""
    return variant.replace(":", "--")


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"implicit:readout=state,adjoint_tol=1e-4"`` -> ``("implicit", {...})``."""
    base, _, rest = spec.partition(":")
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {base!r}; choose from {sorted(VARIANTS)}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"variant option {item!r} must be key=value")
        options[key] = _parse_value(value)
    return base, options


def tutorial_layer(cell: nn.Module, *, tol: float = 1e-3, max_iter: int = 30,
                   adjoint_tol: float = 1e-6, adjoint_max_iter: int = 30, lam: float = 1e-4,
                   adjoint_lam: float | None = None, keep: str = "last",
                   readout: str = "step", forward: str = "tutorial") -> nn.Module:
    """The tutorial's layer; ``forward="implicit"`` swaps in the library's forward solve."""
    if forward not in ("tutorial", "implicit"):
        raise SystemExit(f"tutorial:forward= must be tutorial or implicit, got {forward!r}")
    forward_kwargs = dict(m=5, lam=lam, tol=tol, max_iter=max_iter, keep=keep)
    backward = dict(m=5, lam=lam if adjoint_lam is None else adjoint_lam, tol=adjoint_tol,
                    max_iter=adjoint_max_iter)
    return TutorialDEQ(cell, forward_kwargs, backward, readout=readout, forward_solver=forward)


def implicit_layer(cell: nn.Module, *, tol: float = 1e-3, max_iter: int = 30,
                   adjoint_tol: float = 1e-6, adjoint_max_iter: int = 30,
                   adjoint_solver: "str | implicit.Solver | None" = None, forward: str = "implicit",
                   adjoint_beta: float | None = None, adjoint_returns: str | None = None,
                   adjoint_divergence: float | None = None,
                   **deq_options: Any) -> nn.Module:
    """The library's layer in the recipe; ``deq_options`` go to ``implicit.DEQ`` (names
    prefixed ``solver.`` / ``backward.`` go to the solver / the backward).
    ``forward="tutorial"`` swaps in the tutorial's forward solve (:class:`TutorialForwardDEQ`);
    ``adjoint_beta=b`` solves the adjoint by relaxed fixed-point iteration ``w ← (1 − b) w +
    b (Jᵀ w + y)`` (the forward solver with ``beta=b``); ``adjoint_returns`` sets which
    iterate the adjoint solve returns ("best" by residual, the default, or "last");
    ``adjoint_divergence`` its ``divergence_factor`` (a sample whose adjoint residual passes
    that multiple of its start is held there); ``adjoint.NAME=value`` sets any other option of
    the adjoint's solver (``adjoint.lam=100,adjoint.m=6``)."""
    adjoint_options = {k[8:]: deq_options.pop(k) for k in list(deq_options)
                       if k.startswith("adjoint.")}
    if (adjoint_beta is not None or adjoint_returns is not None or adjoint_divergence is not None
            or adjoint_options):
        name = "forward" if adjoint_beta is not None else (adjoint_solver or "anderson")
        adjoint_solver = implicit.make_solver(
            name, **({"beta": adjoint_beta} if adjoint_beta is not None else {}),
            **({"returns": adjoint_returns} if adjoint_returns is not None else {}),
            **({"divergence_factor": adjoint_divergence} if adjoint_divergence is not None
               else {}), **adjoint_options)
    if forward not in ("tutorial", "implicit"):
        raise SystemExit(f"implicit:forward= must be tutorial or implicit, got {forward!r}")
    if forward == "tutorial":
        deq = implicit_layer(cell, tol=tol, max_iter=1, adjoint_tol=adjoint_tol,
                             adjoint_max_iter=adjoint_max_iter, adjoint_solver=adjoint_solver,
                             adjoint_beta=adjoint_beta, adjoint_returns=adjoint_returns,
                             adjoint_divergence=adjoint_divergence, **deq_options)
        return TutorialForwardDEQ(deq, dict(m=5, lam=1e-4, tol=tol, max_iter=max_iter))
    solver_options = {k[7:]: v for k, v in deq_options.items() if k.startswith("solver.")}
    backward_options = {k[9:]: v for k, v in deq_options.items() if k.startswith("backward.")}
    deq_options = {k: v for k, v in deq_options.items() if "." not in k}
    backward_name = deq_options.pop("backward", "ift")
    if backward_name == "ift":
        backward_options = {"tol": adjoint_tol, "max_iter": adjoint_max_iter,
                            **({"solver": adjoint_solver} if adjoint_solver else {}),
                            **backward_options}
    return implicit.DEQ(
        cell,
        solver=implicit.make_solver("anderson", m=5, **solver_options),
        backward=implicit.make_backward(backward_name, **backward_options),
        tol=tol, max_iter=max_iter, policy="ignore", **deq_options,
    )


class TorchDEQLayer(nn.Module):
    """torchdeq's layer (Geng & Kolter 2023, ``pip install torchdeq``, an optional benchmark
    dependency) in the recipe: its Anderson in both solves (m=5 forward, its default m=6 in the
    backward), relative stops at the recipe's tolerances and caps, its IFT backward on the
    solution (``core="indexing"``, one state).

    Half swaps, as for the tutorial's layer: ``forward="implicit"`` finds ``z*`` with the
    library's solve (Anderson m=5, the recipe's tol and cap, per sample, best iterate) and
    hands it to torchdeq's own IFT gradient (``torchdeq.grad.backward_factory``: the output
    ``f(z*)`` and its adjoint by torchdeq's Anderson); ``backward="implicit"`` takes torchdeq's
    forward solve (its Anderson, batch stop, lowest-residual image) and lets the library's
    ``DEQ`` form the output and gradient from there (``max_iter=1`` from ``z0 = z*``, as
    :class:`TutorialForwardDEQ`). With ``forward="implicit"``, ``adjoint.NAME=value`` sets an
    option of torchdeq's backward Anderson (``m``, ``lam``, ``return_final``, ``stop_mode``,
    ``tau``) and ``solver.NAME=value`` one of the library's forward solver; with
    ``backward="implicit"``, ``backward.NAME=value`` sets an option of the library's backward."""

    def __init__(self, cell: nn.Module, *, tol: float, max_iter: int, adjoint_tol: float,
                 adjoint_max_iter: int, forward: str = "torchdeq",
                 backward: str = "torchdeq", **adjoint_options: Any) -> None:
        super().__init__()
        try:
            from torchdeq import get_deq
            from torchdeq.grad import backward_factory
            from torchdeq.solver import get_solver
        except ImportError:
            raise SystemExit("the torchdeq variant needs torchdeq: pip install torchdeq==0.1.0")
        for name, value in (("forward", forward), ("backward", backward)):
            if value not in ("torchdeq", "implicit"):
                raise SystemExit(f"torchdeq:{name}= must be torchdeq or implicit, got {value!r}")
        if forward == backward == "implicit":
            raise SystemExit("torchdeq:forward=implicit,backward=implicit is the implicit variant")
        if adjoint_options and forward != "implicit":
            raise SystemExit("torchdeq's adjoint options (adjoint.NAME=value: m, lam, "
                             "return_final, stop_mode, tau of its Anderson) need forward=implicit")
        solver_options = {k.removeprefix("solver."): adjoint_options.pop(k)
                          for k in list(adjoint_options) if k.startswith("solver.")}
        library_options = {k: adjoint_options.pop(k) for k in list(adjoint_options)
                           if k.startswith("backward.")}
        if library_options and backward != "implicit":
            raise SystemExit("backward.NAME=value options are the library's backward's: they "
                             "need backward=implicit")
        if solver_options and forward != "implicit":
            raise SystemExit("solver.NAME=value options are the library's forward solver's: "
                             "they need forward=implicit")
        adjoint_options = {k.removeprefix("adjoint."): v for k, v in adjoint_options.items()}
        self.cell = cell
        self.forward_solver = forward
        self.deq = get_deq(core="indexing", ift=True, f_solver="anderson", b_solver="anderson",
                           f_max_iter=max_iter, b_max_iter=adjoint_max_iter,
                           eval_f_max_iter=max_iter, f_tol=tol, b_tol=adjoint_tol,
                           f_stop_mode="rel", b_stop_mode="rel")
        self.solver = implicit.make_solver("anderson", m=5, tol=tol, max_iter=max_iter,
                                           policy="ignore", **solver_options)
        b_solver = get_solver("anderson")
        if adjoint_options.pop("solver", None) == "library":
            # the library's training_adjoint="averaged" (its window and ridge) inside
            # torchdeq's gradient structure
            b_solver = _library_averaged(int(adjoint_options.pop("window", 5)),
                                         adjoint_options.pop("ridge", None))
        self.ift = backward_factory("ift", b_solver=b_solver, b_solver_kwargs=dict(
            max_iter=adjoint_max_iter, tol=adjoint_tol, **{"stop_mode": "rel", **adjoint_options}))
        self.torchdeq_solve = (get_solver("anderson"), dict(
            m=5, max_iter=max_iter, tol=tol, stop_mode="rel"))
        self.library = (None if backward == "torchdeq" else implicit_layer(
            cell, tol=tol, max_iter=1, adjoint_tol=adjoint_tol,
            adjoint_max_iter=adjoint_max_iter, **library_options))
        self.info: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = lambda z: self.cell(z, x)  # noqa: E731
        if self.library is not None:  # torchdeq's forward, the library's output and gradient
            solve, options = self.torchdeq_solve
            with torch.no_grad():
                z, _, self.info = solve(fn, torch.zeros_like(x), **options)
            return self.library(x, z)
        if self.forward_solver == "implicit":  # the library's forward, torchdeq's gradient
            with torch.no_grad():
                z = implicit.solve(fn, torch.zeros_like(x), solver=self.solver).z
            if not self.training:
                return z
            return self.ift(self, fn, z)[-1]
        z_out, self.info = self.deq(fn, torch.zeros_like(x), solver_kwargs={"m": 5})
        return z_out[-1]


def _library_averaged(window: int, ridge: "float | None"):
    """A torchdeq backward solver running the library's averaged adjoint iteration
    (``ift(training_adjoint="averaged")``) on torchdeq's ``u ↦ Jᵀu + y``."""
    from types import SimpleNamespace

    from implicit_backwards.ift import _averaged

    def solve(func, x0, max_iter=30, tol=1e-6, **_):
        shape = x0.shape
        y = func(torch.zeros_like(x0)).reshape(shape[0], -1)
        scale = y.norm(dim=1, keepdim=True).clamp_min(1e-30)
        ridges = None
        if ridge is not None:
            squares = scale.squeeze(1) ** 2
            ridges = (ridge * squares.mean() / squares)[:, None]
        adjoint = lambda u: func((u * scale).reshape(shape)).reshape(shape[0], -1) / scale  # noqa: E731
        w, _ = _averaged(adjoint, y / scale, window, ridges,
                         SimpleNamespace(tol=tol, max_iter=max_iter - 1))
        return (w * scale).reshape(shape), [], {}

    return solve


def torchdeq_layer(cell: nn.Module, *, tol: float = 1e-3, max_iter: int = 30,
                   adjoint_tol: float = 1e-6, adjoint_max_iter: int = 30,
                   forward: str = "torchdeq", backward: str = "torchdeq",
                   **adjoint_options: Any) -> nn.Module:
    return TorchDEQLayer(cell, tol=tol, max_iter=max_iter, adjoint_tol=adjoint_tol,
                         adjoint_max_iter=adjoint_max_iter, forward=forward, backward=backward,
                         **adjoint_options)


VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "tutorial": tutorial_layer,
    "implicit": implicit_layer,
    "torchdeq": torchdeq_layer,
}


# ----------------------------------------------------------------------------------------------
# Data and model


def load_data(name: str, seed: int = 0):
    """``((train_x, train_y), (test_x, test_y), dims)``: MNIST-1D as ``(N, 1, 40)`` sequences or
    digits as standardised ``(N, 1, 8, 8)`` images."""
    if name == "mnist1d":
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError:
            raise SystemExit("MNIST-1D needs the mnist1d package: pip install mnist1d "
                             "(or pip install 'implicit-layers[examples]')")
        args = get_dataset_args()
        data = make_dataset(args)  # generated from its fixed seed (42): no download
        train = (torch.as_tensor(data["x"], dtype=torch.float32)[:, None],
                 torch.as_tensor(data["y"], dtype=torch.int64))
        test = (torch.as_tensor(data["x_test"], dtype=torch.float32)[:, None],
                torch.as_tensor(data["y_test"], dtype=torch.int64))
        return train, test, 1
    if name == "digits":
        sys.path.insert(0, str(Path(__file__).parent))
        from digits import load_digits_split

        (tx, ty), (vx, vy) = load_digits_split(seed=0)
        return (tx.view(-1, 1, 8, 8), ty), (vx.view(-1, 1, 8, 8), vy), 2
    raise SystemExit(f"unknown data {name!r}: choose mnist1d or digits")


#: the model axes of the family (``build_model``'s keywords) and their defaults: the benchmark's
#: original model (BatchNorm stem and head, a flatten of 10 positions)
MODEL_DEFAULTS = {"channels": 48, "inner_channels": 64, "norm": "batch", "head": "flatten",
                  "groups": 8, "stem_kernel": 3}


def build_model(layer: str, options: dict, *, dims: int, length: int, seed: int,
                channels: int = 48, inner_channels: int = 64, pool: int = 4,
                norm: str = "batch", head: str = "flatten", groups: int = 8,
                stem_kernel: int = 3) -> nn.Sequential:
    """Stem conv + norm, the DEQ, norm, a head, linear; the same weights for every variant of
    one seed (the layer holds no parameters of its own). ``norm``: ``"batch"`` (BatchNorm) or
    ``"group"`` (GroupNorm with ``groups`` groups) in the stem and the head; the cell's
    GroupNorms take ``groups`` too. ``head``: ``"flatten"`` (average pool by ``pool``, flatten:
    ``length // pool`` positions per dimension) or ``"pool"`` (adaptive average pool to 4
    positions: 4 in 1-D, 2 × 2 in 2-D)."""
    torch.manual_seed(seed)
    conv, batch_norm, avg, adaptive = (
        (nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d) if dims == 1
        else (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))
    if norm not in ("batch", "group") or head not in ("flatten", "pool"):
        raise SystemExit(f"norm must be batch or group and head flatten or pool, got {norm!r}, "
                         f"{head!r}")

    def normalise() -> nn.Module:
        return batch_norm(channels) if norm == "batch" else nn.GroupNorm(groups, channels)

    stem = conv(1, channels, stem_kernel, padding=stem_kernel // 2, bias=True)
    cell = implicit.make_cell("resnet", channels=channels, inner_channels=inner_channels,
                              dims=dims, num_groups=groups)
    if head == "flatten":
        pooling, positions = avg(pool), (length // pool) ** dims
    else:
        pooling, positions = adaptive(4 if dims == 1 else 2), 4
    return nn.Sequential(stem, normalise(), VARIANTS[layer](cell, **options), normalise(),
                         pooling, nn.Flatten(), nn.Linear(channels * positions, 10))


# ----------------------------------------------------------------------------------------------
# Diagnostics


def spectral_radius(cell: nn.Module, z: torch.Tensor, x: torch.Tensor, iters: int = 40,
                    tail: int = 10) -> torch.Tensor:
    """Per-sample estimate of ρ(J) at ``z`` (J = ∂f/∂z): ``(‖(Jᵀ)^iters v‖ /
    ‖(Jᵀ)^(iters−tail) v‖)^(1/tail)`` from a random v (Gelfand's formula; ρ(Jᵀ) = ρ(J))."""
    with torch.enable_grad():
        z0 = z.detach().requires_grad_()
        fz = cell(z0, x.detach())
        v = torch.randn_like(z0)
        log_norm = torch.zeros(z.shape[0])
        marks = {}
        for i in range(1, iters + 1):
            (v,) = autograd.grad(fz, z0, v, retain_graph=True)
            norm = v.flatten(1).norm(dim=1).clamp_min(1e-30)
            log_norm = log_norm + norm.log()
            v = v / norm.view(-1, *[1] * (v.dim() - 1))
            marks[i] = log_norm.clone()
    return ((marks[iters] - marks[iters - tail]) / tail).exp()


def _deq_of(model: nn.Sequential) -> nn.Module:
    return model[2]


def diagnose(model: nn.Sequential, x: torch.Tensor) -> dict:
    """Residuals of the last training step's solves and ρ(J) at this batch's solution."""
    layer = _deq_of(model)
    with torch.no_grad():
        u = model[1](model[0](x))
    if isinstance(layer, TorchDEQLayer):
        rel = layer.info.get("rel_lowest")
        return {"forward_residual": float(rel.mean()) if rel is not None else float("nan"),
                "adjoint_residual": float("nan"), "rho_mean": float("nan"),
                "rho_max": float("nan")}
    if isinstance(layer, TutorialDEQ):
        fwd = layer.forward_res[-1] if layer.forward_res else float("nan")
        bwd = layer.backward_res[-1] if layer.backward_res else float("nan")
        z = layer.z_star
        cell = layer.f
    else:
        sol, bsol = layer.solution, layer.backward_solution
        fwd = float(sol.rel_residual.mean()) if sol is not None else float("nan")
        bwd = float(bsol.abs_residual.mean()) if bsol is not None else float("nan")
        cell = layer.cell
        z = sol.z if sol is not None else None
    rho = spectral_radius(cell, z, u) if z is not None and z.shape == u.shape else None
    extra = ({"adjoint_ridge_share": layer.backward_stats.get("ridge_share", float("nan"))}
             if isinstance(layer, TutorialDEQ) else {})
    return {"forward_residual": fwd, "adjoint_residual": bwd, **extra,
            "rho_mean": float(rho.mean()) if rho is not None else float("nan"),
            "rho_max": float(rho.max()) if rho is not None else float("nan")}


# ----------------------------------------------------------------------------------------------
# Training


def evaluate(model: nn.Module, data) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data[0]), 500):
            x, y = data[0][i:i + 500], data[1][i:i + 500]
            correct += int((model(x).argmax(1) == y).sum())
    model.train()
    return correct / len(data[0])


def _solve_calls(layer: nn.Module) -> tuple[float, float]:
    """Mean calls of f per sample in the last training step's forward and adjoint solves (the
    tutorial's solves run on the whole batch: their count of iterates)."""
    if isinstance(layer, TutorialDEQ):
        return len(layer.forward_res) + 2, len(layer.backward_res) + 2
    if isinstance(layer, TorchDEQLayer):  # its forward's steps; the backward's are not reported
        steps = layer.info.get("nstep")
        return (float(steps.float().mean()) if steps is not None else float("nan"),
                float("nan"))
    sol, bsol = layer.solution, getattr(layer, "backward_solution", None)
    if isinstance(layer, TutorialForwardDEQ):
        sol = None
    forward = (float(sol.nfe.float().mean()) if sol is not None
               else len(getattr(layer, "forward_res", [])) + 2.0)
    adjoint = float(bsol.nfe.float().mean()) if bsol is not None else float("nan")
    return forward, adjoint


class Run:
    """One variant's training: model, optimiser and schedule built from the seed, one timed
    step per batch, a test evaluation per epoch (outside the timed region)."""

    def __init__(self, variant: str, *, data: str, epochs: int, seed: int, batch_size: int = 100,
                 lr: float = 2e-3, diagnose_every: int = 0, **model_options) -> None:
        layer, options = parse_variant(variant)
        self.train_set, self.test_set, dims = load_data(data)
        self.n = len(self.train_set[0])
        length = self.train_set[0].shape[-1]
        self.model = build_model(layer, options, dims=dims, length=length, seed=seed,
                                 **model_options)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        steps_per_epoch = -(-self.n // batch_size)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, epochs * steps_per_epoch)
        self.loss_fn = nn.CrossEntropyLoss()
        self.info = {"variant": variant, "data": data, "seed": seed, "epochs": epochs,
                     "model": model_options}
        self.diagnose_every = diagnose_every
        self.history: list = []
        self.diagnostics: list = []
        self.train_seconds, self.steps = 0.0, 0
        self._loss, self._calls = 0.0, [0.0, 0.0]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        start = time.perf_counter()
        loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.train_seconds += time.perf_counter() - start
        self._loss += float(loss.detach()) * len(x)
        for i, calls in enumerate(_solve_calls(_deq_of(self.model))):
            self._calls[i] += calls
        self.steps += 1
        if self.diagnose_every and self.steps % self.diagnose_every == 0:
            self.diagnostics.append({"step": self.steps, **diagnose(self.model, x)})

    def end_epoch(self, epoch: int, steps: int, log=print) -> None:
        accuracy = evaluate(self.model, self.test_set)
        self.history.append({
            "epoch": epoch, "train_loss": self._loss / self.n, "test_accuracy": accuracy,
            "train_seconds": self.train_seconds,
            "forward_calls": self._calls[0] / steps, "adjoint_calls": self._calls[1] / steps})
        h, d = self.history[-1], self.diagnostics
        log(f"{self.info['variant']} seed {self.info['seed']} epoch {epoch:3d}: loss "
            f"{h['train_loss']:.4f}  test {100 * accuracy:.2f}%  {self.train_seconds:.0f} s  "
            f"calls {h['forward_calls']:.1f}/{h['adjoint_calls']:.1f}"
            + (f"  rho {d[-1]['rho_mean']:.3f}  fwd {d[-1]['forward_residual']:.3g}"
               f"  adj {d[-1]['adjoint_residual']:.3g}" if d else ""))
        self._loss, self._calls = 0.0, [0.0, 0.0]

    def result(self) -> dict:
        return {**self.info, "test_accuracy": self.history[-1]["test_accuracy"],
                "train_seconds": self.train_seconds, "history": self.history,
                "diagnostics": self.diagnostics, "threads": torch.get_num_threads(),
                "torch": torch.__version__}


def train_together(variants: list[str], *, data: str, epochs: int, seed: int,
                   batch_size: int = 100, log=print, **options) -> list[dict]:
    """Train every variant of one seed in lockstep: the same batch goes to each in turn (the
    order alternating from step to step), each step timed on its own. The layers then meet the
    same machine at every moment — a load that comes and goes, or one run finishing before the
    other and leaving the machine to it, slows them alike — so their time ratio is measured
    under equal conditions. One variant is a plain training run."""
    runs = [Run(v, data=data, epochs=epochs, seed=seed, batch_size=batch_size, **options)
            for v in variants]
    train_set, n = runs[0].train_set, runs[0].n
    order = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=order)
        steps = 0
        for i in range(0, n, batch_size):
            index = perm[i:i + batch_size]
            x, y = train_set[0][index], train_set[1][index]
            for run in (runs if steps % 2 == 0 else runs[::-1]):
                run.step(x, y)
            steps += 1
        for run in runs:
            run.end_epoch(epoch, steps, log=log)
    return [run.result() for run in runs]


def train(variant: str, *, data: str, epochs: int, seed: int, batch_size: int = 100,
          lr: float = 2e-3, diagnose_every: int = 0, log=print, **model_options) -> dict:
    """One variant's training run (see :func:`train_together`)."""
    return train_together([variant], data=data, epochs=epochs, seed=seed, batch_size=batch_size,
                          lr=lr, diagnose_every=diagnose_every, log=log, **model_options)[0]


def compare_gradients(variants: list[str], *, data: str, steps: int, seed: int,
                      batch_size: int = 100, lr: float = 2e-3, log=print,
                      **model_options) -> dict:
    """Train the first variant for ``steps`` steps, then take the parameter gradient of every
    variant on the next batch with the same weights; cosines and norm ratios against the first
    (the layers hold no parameters, so they are swapped in and out of one model)."""
    train_set, _, dims = load_data(data)
    length = train_set[0].shape[-1]
    first, first_options = parse_variant(variants[0])
    model = build_model(first, first_options, dims=dims, length=length, seed=seed,
                        **model_options)
    cell = _deq_of(model).f if isinstance(_deq_of(model), TutorialDEQ) else _deq_of(model).cell
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    n = len(train_set[0])
    perm = torch.cat([torch.randperm(n, generator=order) for _ in range(steps // (n // batch_size) + 2)])
    for step in range(steps):
        index = perm[step * batch_size:(step + 1) * batch_size]
        loss = loss_fn(model(train_set[0][index]), train_set[1][index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    index = perm[steps * batch_size:(steps + 1) * batch_size]
    x, y = train_set[0][index], train_set[1][index]
    grads, notes = {}, {}
    for spec in variants:
        name, options = parse_variant(spec)
        model[2] = VARIANTS[name](cell, **options)
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        grads[spec] = torch.cat([p.grad.flatten() for p in model.parameters()])
        notes[spec] = diagnose(model, x)
    ref = grads[variants[0]]
    out = {}
    for spec, g in grads.items():
        out[spec] = {"cosine": float(torch.nn.functional.cosine_similarity(g, ref, dim=0)),
                     "norm_ratio": float(g.norm() / ref.norm()), **notes[spec]}
        log(f"step {steps}  {spec:50s} cos {out[spec]['cosine']:.3f}  norm x{out[spec]['norm_ratio']:.2f}"
            f"  rho {notes[spec]['rho_mean']:.3f}  fwd {notes[spec]['forward_residual']:.3g}"
            f"  adj {notes[spec]['adjoint_residual']:.3g}")
    return out


def summarize(runs: list[dict]) -> dict:
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        acc = [r["test_accuracy"] for r in mine]
        sec = [r["train_seconds"] for r in mine]
        out[variant] = {
            "seeds": [r["seed"] for r in mine],
            "test_accuracy_mean": statistics.fmean(acc),
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "train_seconds_mean": statistics.fmean(sec),
            "train_seconds_std": statistics.stdev(sec) if len(sec) > 1 else 0.0,
            "test_accuracy": acc, "train_seconds": sec,
        }
    return out


def markdown(summary: dict, reference: str = "tutorial") -> str:
    """The README table of a summary: accuracy mean ± std, per-seed values, training time and
    its ratio to ``reference``'s (per seed, then averaged)."""
    lines = ["| layer | test accuracy (mean ± std) | per seed | training time | ÷ tutorial |",
             "|---|---|---|---|---|"]
    ref = summary.get(reference)
    for variant, s in summary.items():
        ratio = "—"
        if ref is not None and variant != reference and s["seeds"] == ref["seeds"]:
            ratios = [a / b for a, b in zip(s["train_seconds"], ref["train_seconds"])]
            ratio = f"{statistics.fmean(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})"
        lines.append(
            f"| `{variant}` | {100 * s['test_accuracy_mean']:.2f} ± "
            f"{100 * s['test_accuracy_std']:.2f} % | "
            f"{', '.join(f'{100 * a:.1f}' for a in s['test_accuracy'])} | "
            f"{s['train_seconds_mean']:.0f} ± {s['train_seconds_std']:.0f} s | {ratio} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    for color, variant in zip(colors, variants):
        for j, r in enumerate(r for r in runs if r["variant"] == variant):
            epochs = [h["epoch"] for h in r["history"]]
            label = variant if j == 0 else None
            axes[0].plot(epochs, [100 * h["test_accuracy"] for h in r["history"]], color=color,
                         alpha=0.8, label=label)
            axes[1].plot(epochs, [h["train_loss"] for h in r["history"]], color=color,
                         alpha=0.8, label=label)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (one line per seed)")
    low = min(100 * h["test_accuracy"] for r in runs for h in r["history"][len(r["history"]) // 3:])
    axes[0].set_ylim(max(0, low - 2), 100)
    axes[1].set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist1d", choices=["mnist1d", "digits"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["tutorial", "implicit"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels", type=int, default=MODEL_DEFAULTS["channels"])
    parser.add_argument("--inner-channels", type=int, default=MODEL_DEFAULTS["inner_channels"])
    parser.add_argument("--norm", choices=["batch", "group"], default=MODEL_DEFAULTS["norm"],
                        help="the stem's and the head's norm")
    parser.add_argument("--head", choices=["flatten", "pool"], default=MODEL_DEFAULTS["head"],
                        help="flatten: average pool by 4 and flatten; pool: adaptive average "
                        "pool to 4 positions")
    parser.add_argument("--groups", type=int, default=MODEL_DEFAULTS["groups"],
                        help="GroupNorm groups (the cell's, and the stem's and head's with "
                        "--norm group)")
    parser.add_argument("--stem-kernel", type=int, default=MODEL_DEFAULTS["stem_kernel"])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--diagnose-every", type=int, default=0)
    parser.add_argument("--schedule", choices=["lockstep", "sequential"], default="lockstep",
                        help="lockstep (default): the variants of a seed train in one process "
                        "on the same batches, steps alternating, so that they are timed under "
                        "the same machine load; sequential: one after the other")
    parser.add_argument("--runs", type=Path, default=Path("bench-out/training-parity"),
                        help="folder for one JSON per run (existing runs are reused)")
    parser.add_argument("--out", type=Path, help="write results.json and curves.png here")
    parser.add_argument("--compare-gradients", type=int, nargs="+", metavar="STEP",
                        help="instead of training: gradients of every variant after STEP steps "
                        "of the first (cosine and norm against it)")
    args = parser.parse_args(argv)
    for spec in args.variants:
        parse_variant(spec)
    torch.set_num_threads(args.threads)
    model = {"channels": args.channels, "inner_channels": args.inner_channels,
             "norm": args.norm, "head": args.head, "groups": args.groups,
             "stem_kernel": args.stem_kernel}
    # runs of the original model keep their file names; another model's names say how it differs
    tag = "".join(f"-{key}{value}" for key, value in model.items()
                  if key not in ("channels", "inner_channels") and value != MODEL_DEFAULTS[key])
    tag += f"-lr{args.lr:g}" if args.lr != 2e-3 else ""
    if args.compare_gradients:
        found = {steps: compare_gradients(args.variants, data=args.data, steps=steps,
                                          seed=args.seeds[0], lr=args.lr, **model)
                 for steps in args.compare_gradients}
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gradients.json").write_text(json.dumps(found, indent=1))
        return 0
    args.runs.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        paths = {variant: args.runs / (f"{args.data}-c{args.channels}-{args.inner_channels}"
                                       f"{tag}-{slug(variant)}-e{args.epochs}-seed{seed}.json")
                 for variant in args.variants}
        if all(path.exists() for path in paths.values()):
            for path in paths.values():
                runs.append(json.loads(path.read_text()))
                print(f"reusing {path}")
            continue
        options = dict(data=args.data, epochs=args.epochs, seed=seed, lr=args.lr,
                       diagnose_every=args.diagnose_every, **model)
        if args.schedule == "lockstep":
            found = train_together(args.variants, **options)
        else:
            found = [train(variant, **options) for variant in args.variants]
        for run in found:
            run["schedule"] = args.schedule
            paths[run["variant"]].write_text(json.dumps(run, indent=1))
        runs.extend(found)
    summary = summarize(runs)
    print(markdown(summary))
    for variant, s in summary.items():
        print(f"{variant:40s} test {100 * s['test_accuracy_mean']:.2f} ± "
              f"{100 * s['test_accuracy_std']:.2f} %   train {s['train_seconds_mean']:.0f} ± "
              f"{s['train_seconds_std']:.0f} s   (seeds {s['seeds']})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/training_parity.py " + " ".join(argv or sys.argv[1:])
        (args.out / "results.json").write_text(json.dumps(
            {"command": command, "summary": summary, "runs": runs}, indent=1))
        plot(runs, args.out / "curves.png",
             f"{args.data}, {args.epochs} epochs, seeds {args.seeds}, {args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
