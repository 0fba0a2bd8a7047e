"""Does the Jacobian term shorten the solves? Train the same tanh DEQ with and without it.

Bai, Koltun & Kolter 2021 report 30/35 → 12/13 forward/backward solver steps on WikiText-103
with Jacobian regularisation. This script trains a ``DEQ(tanh, anderson, ift)`` regression
model on synthetic data twice from the same initialisation — once with ``jac_loss_weight`` — and
prints the forward ``n_calls`` to tolerance, the Jacobian estimates and the task loss::

    python benchmarks/jacobian_regularization.py            # defaults below
    python benchmarks/jacobian_regularization.py --steps 300 --weight 2.0 --features 32
    python benchmarks/jacobian_regularization.py --out DIR   # also DIR/output.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import implicit
from implicit.bench.transcript import Transcript


def train(weight: float, *, steps: int, features: int, seed: int, lr: float,
          tol: float = 1e-4) -> dict:
    """Train one model; return its final forward n_calls, Jacobian telemetry and loss."""
    torch.manual_seed(seed)
    cell = implicit.make_cell("tanh", features=features, in_features=8, init_scale=0.45)
    # the exact IFT gradient (Bai et al.'s setting): the default damped adjoint regularises
    # on its own, which would blur what the Jacobian term itself does
    exact = implicit.make_backward("ift", damping=0.0)
    layer = implicit.DEQ(cell, solver="anderson", backward=exact, tol=tol, max_iter=100,
                         jac_loss_weight=weight, jac_probes=1, policy="ignore")
    head = torch.nn.Linear(features, 1)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(256, 8, generator=gen)
    # a target with sharp features: fitting it pushes the cell towards larger gains
    y = torch.sign(torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:2])) * 2
    params = list(layer.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    calls = []
    for _ in range(steps):
        opt.zero_grad()
        z = layer(x)
        loss = torch.nn.functional.mse_loss(head(z), y)
        total = loss + (layer.jacobian_loss if layer.jacobian_loss is not None else 0)
        total.backward()
        opt.step()
        calls.append(layer.solution.n_calls)
    layer.eval()
    layer.spectral_iters = 100
    with torch.no_grad():
        z = layer(x)
        final_loss = float(torch.nn.functional.mse_loss(head(z), y))
    estimate = implicit.stability.jacobian_frobenius(
        lambda s: cell(s, x), z, probes=64, create_graph=False)
    return {
        "weight": weight,
        "n_calls_first": calls[0],
        "n_calls_last10_mean": sum(calls[-10:]) / 10,
        "n_calls_eval": layer.solution.n_calls,
        "spectral_norm_mean": float(layer.solution.stats["jac_spectral_norm"].mean()),
        "frobenius_mean": float(estimate.mean()),
        "train_loss": final_loss,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--weight", type=float, default=10.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the output to DIR/output.txt")
    args = parser.parse_args(argv)
    transcript = Transcript("jacobian_regularization.py", argv)
    for weight in (0.0, args.weight):
        result = train(weight, steps=args.steps, features=args.features, seed=args.seed,
                       lr=args.lr)
        transcript.say("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in result.items()))
    transcript.save(args.out)


if __name__ == "__main__":
    main()
