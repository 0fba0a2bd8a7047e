"""The "Deep Implicit Layers" tutorial ch.4 CIFAR-10 model, trained with implicit-layers.

The model exactly as the tutorial (../shared/seeds/001): conv 3→48 + BatchNorm,
``DEQ(resnet 48/64, anderson m=5, tol 1e-2, max_iter 25)`` with the IFT backward (Anderson on the
adjoint too), BatchNorm, AvgPool 8, Linear → 10; Adam 1e-3, cosine schedule over all steps
(eta_min 1e-6), batch 100, 50 epochs, no augmentation. The tutorial reports 81.6 % test accuracy.

Data: the CIFAR-10 *python* pickles (``data_batch_1`` … ``data_batch_5``, ``test_batch``), read
directly — no torchvision::

    python benchmarks/cifar10.py --data ~/data/cifar-10-batches-py --out runs/cifar10
    python benchmarks/cifar10.py --data ... --out runs/cifar10 --resume   # continue exactly
    torchrun --nproc_per_node=2 benchmarks/cifar10.py --data ... --sync-bn   # DDP
    python benchmarks/cifar10.py --synthetic 2000 --epochs 2 --device cuda   # throughput only
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import torch
from torch import nn

import implicit
from implicit.training import Trainer, distributed_from_env, fit

FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
DOWNLOAD = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class MissingData(FileNotFoundError):
    """The CIFAR-10 pickles are not where ``--data`` says; the message says what to do."""


def find_batches(data: Path) -> Path:
    for candidate in (data, data / "cifar-10-batches-py"):
        if all((candidate / name).is_file() for name in FILES):
            return candidate
    missing = [n for n in FILES if not (data / n).is_file()]
    raise MissingData(
        f"CIFAR-10 python pickles not found in {data} (missing: {', '.join(missing)}).\n"
        f"Download {DOWNLOAD}, extract it (tar xzf cifar-10-python.tar.gz) and pass "
        "--data path/to/cifar-10-batches-py — the folder holding data_batch_1 … data_batch_5 "
        "and test_batch. Or use --synthetic N for random data of CIFAR shape."
    )


def load_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python pickle → (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    with open(path, "rb") as handle:
        entry = pickle.load(handle, encoding="bytes")
    data = entry[b"data"] if b"data" in entry else entry["data"]
    labels = entry[b"labels"] if b"labels" in entry else entry["labels"]
    images = torch.as_tensor(data, dtype=torch.uint8)
    if images.dim() != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected data of shape (N, 3072), got {tuple(images.shape)}")
    return images.reshape(-1, 3, 32, 32), torch.as_tensor(labels, dtype=torch.int64)


def load_cifar10(data: str | Path):
    """``((train_x, train_y), (test_x, test_y))`` from the pickles in ``data``."""
    folder = find_batches(Path(data).expanduser())
    parts = [load_batch(folder / name) for name in FILES[:-1]]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return train, load_batch(folder / "test_batch")


def synthetic(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=gen)
    return (x, y), (x[: max(1, n // 5)], y[: max(1, n // 5)])


def build_model(solver: str = "anderson", backward: str = "ift", channels: int = 48,
                inner: int = 64) -> nn.Sequential:
    """The tutorial's model (its seed: torch.manual_seed(0) before building)."""
    cell = implicit.make_cell("resnet", channels=channels, inner_channels=inner)
    deq = implicit.DEQ(cell, solver=solver, backward=backward, tol=1e-2, max_iter=25,
                       solver_options={"m": 5} if solver == "anderson" else None,
                       policy="ignore")
    return nn.Sequential(
        nn.Conv2d(3, channels, kernel_size=3, bias=True, padding=1),
        nn.BatchNorm2d(channels),
        deq,
        nn.BatchNorm2d(channels),
        nn.AvgPool2d(8, 8),
        nn.Flatten(),
        nn.Linear(channels * 4 * 4, 10),
    )


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255)  # torchvision's ToTensor, without torchvision


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder with the CIFAR-10 python pickles")
    parser.add_argument("--synthetic", type=int, metavar="N",
                        help="N random images of CIFAR shape instead of --data")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backward", default="ift", help="registered backward (default ift)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/cifar10"))
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--sync-bn", action="store_true",
                        help="SyncBatchNorm under torchrun (rank-invariant BatchNorm)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.synthetic:
        train, test = synthetic(args.synthetic, args.seed)
    elif args.data is not None:
        try:
            train, test = load_cifar10(args.data)
        except MissingData as exc:
            print(exc, file=sys.stderr)
            return 2
    else:
        print("no data: pass --data DIR (the CIFAR-10 python pickles, from "
              f"{DOWNLOAD}) or --synthetic N", file=sys.stderr)
        return 2

    rank, world = distributed_from_env()
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.manual_seed(args.seed)
    model = build_model(backward=args.backward).to(device)
    if world > 1:
        if args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(train[0]) // (args.batch_size * world))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, args.epochs * steps_per_epoch, eta_min=1e-6)
    trainer = Trainer(model, optimizer, train, test=test, scheduler=scheduler,
                      batch_size=args.batch_size, seed=args.seed, device=device,
                      transform=to_float)
    checkpoint = args.out / "checkpoint.pt"
    if args.resume and checkpoint.is_file():
        trainer.load(checkpoint)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"cifar10: {len(train[0])} train / {len(test[0])} test images, {params} "
              f"parameters, device {device}, world size {world}")
    start, steps0 = time.perf_counter(), trainer.step
    fit(trainer, args.epochs, out=args.out, checkpoint=checkpoint,
        title="tutorial ch.4 DEQ on CIFAR-10", progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    images = (trainer.step - steps0) * args.batch_size * world
    if rank == 0 and images:
        print(f"throughput: {images / elapsed:.1f} training images/s (incl. evaluation), "
              f"{elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
