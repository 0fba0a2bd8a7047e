"""A DEQ classifier on real data that trains on a CPU in seconds: scikit-learn's digits.

``load_digits`` (1797 8×8 handwritten digits) ships inside scikit-learn, so nothing is
downloaded. Model: Linear 64→64 injection, ``DEQ(tanh 64, anderson, ift)``, Linear → 10; Adam
with a cosine schedule; a fixed stratified 75/25 split::

    python benchmarks/digits.py                       # 40 epochs, prints the test accuracy
    python benchmarks/digits.py --epochs 5 --out runs/digits
    torchrun --nproc_per_node=2 benchmarks/digits.py  # DDP on gloo
    python benchmarks/digits.py --autocast bfloat16   # the cell in bf16 under autocast
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import implicit
from implicit.training import Trainer, distributed_from_env, fit


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    """Standardised digits as ``((train_x, train_y), (test_x, test_y))``, stratified split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - the examples extra installs it
        raise SystemExit("this example needs scikit-learn: pip install 'implicit-layers[examples]'")
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    test_index = []
    for label in range(10):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        test_index.append(members[: round(test_fraction * len(members))])
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask[torch.cat(test_index)] = True
    mean, std = x[~test_mask].mean(0), x[~test_mask].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return (x[~test_mask], y[~test_mask]), (x[test_mask], y[test_mask])


def build_model(features: int = 64, solver: str = "anderson",
                backward: "str | implicit.BackwardStrategy" = "ift",
                tol: float = 1e-4, **deq_options) -> nn.Sequential:
    cell = implicit.make_cell("tanh", features=features, in_features=features)
    deq = implicit.DEQ(cell, solver=solver, backward=backward, tol=tol, max_iter=40,
                       policy="ignore", **deq_options)
    return nn.Sequential(nn.Linear(64, features), deq, nn.Linear(features, 10))


def make_trainer(epochs: int, *, seed: int = 0, lr: float = 3e-3, batch_size: int = 64,
                 backward: "str | implicit.BackwardStrategy" = "ift", autocast_dtype=None,
                 features: int = 64,
                 **deq_options) -> Trainer:
    train, test = load_digits_split(seed)
    torch.manual_seed(seed)
    model = build_model(features, backward=backward, **deq_options)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)
        world = torch.distributed.get_world_size()
    else:
        world = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(train[0]) // (batch_size * world))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-5)
    return Trainer(model, optimizer, train, test=test, scheduler=scheduler,
                   batch_size=batch_size, seed=seed, autocast_dtype=autocast_dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--backward", default="ift")
    parser.add_argument("--training-adjoint", choices=["calibrated", "damped", "relaxed",
                                                       "averaged"],
                        help="ift's training adjoint (default: ift's default, calibrated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autocast", choices=["bfloat16", "float16"])
    parser.add_argument("--tol", type=float, help="DEQ tolerance (default 1e-4; 2e-2 under "
                        "autocast: a bf16 cell cannot resolve 1e-4)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    rank, _ = distributed_from_env()
    dtype = getattr(torch, args.autocast) if args.autocast else None
    tol = args.tol if args.tol is not None else (2e-2 if dtype is not None else 1e-4)
    backward = args.backward
    if args.training_adjoint is not None:
        if backward != "ift":
            parser.error("--training-adjoint is an option of --backward ift")
        backward = implicit.make_backward("ift", training_adjoint=args.training_adjoint)
    trainer = make_trainer(args.epochs, seed=args.seed, lr=args.lr, backward=backward,
                           autocast_dtype=dtype, tol=tol)
    checkpoint = args.out / "checkpoint.pt" if args.out else None
    if args.resume and checkpoint is not None and checkpoint.is_file():
        trainer.load(checkpoint)
    history = fit(trainer, args.epochs, out=args.out, checkpoint=checkpoint,
                  title="DEQ(tanh) on scikit-learn digits", progress=not args.no_progress)
    if rank == 0:
        print(f"digits: test accuracy {history[-1]['test_accuracy']:.4f} after "
              f"{args.epochs} epochs ({trainer.step} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
