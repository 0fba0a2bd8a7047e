"""A small training loop for DEQ models with exactly resumable checkpoints.

Used by ``benchmarks/cifar10.py`` and ``benchmarks/digits.py``; works the same under
``torchrun`` (DistributedDataParallel, each rank a shard of every epoch's permutation).

* :class:`ResumableSampler` — the epoch's permutation comes from ``(seed, epoch)`` alone and the
  position inside the epoch is part of the state, so a run stopped mid-epoch resumes on the
  very next batch;
* :class:`Trainer` — steps, evaluation, per-step mean forward/backward NFE of every
  :class:`implicit.DEQ` in the model, checkpoints holding model, optimizer, scheduler, sampler
  and RNG states; ``N`` steps straight equal ``N/2`` + resume + ``N/2``.

Distributed rules (see README): never put a collective inside the cell (ranks take different
numbers of solver steps, so a collective there deadlocks); BatchNorm outside the DEQ needs
``nn.SyncBatchNorm`` for rank-invariant results.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .deq import DEQ

Batch = tuple[torch.Tensor, torch.Tensor]


class ResumableSampler:
    """Indices of an epoch in a permutation fixed by ``(seed, epoch)``; sharded over ranks.

    Each rank gets ``ceil(n / world_size)`` indices per epoch (the permutation is padded by
    wrapping around, as ``DistributedSampler`` does), in batches of ``batch_size``.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, "
                             f"batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.arange(self.n)
        per_rank = -(-self.n // self.world_size)
        total = per_rank * self.world_size
        if total > self.n:
            order = torch.cat([order, order[: total - self.n]])
        return order[self.rank : total : self.world_size]

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def batches(self) -> Iterator[torch.Tensor]:
        """The remaining batches of the current epoch; the epoch advances when they run out."""
        indices = self._indices()
        while self.position < len(self):
            start = self.position * self.batch_size
            self.position += 1
            yield indices[start : start + self.batch_size]
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


def deq_layers(model: nn.Module) -> list[DEQ]:
    return [m for m in model.modules() if isinstance(m, DEQ)]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def distributed_from_env(backend: Optional[str] = None) -> tuple[int, int]:
    """Initialise ``torch.distributed`` when started by ``torchrun`` (``WORLD_SIZE`` set);
    return ``(rank, world_size)`` — ``(0, 1)`` otherwise. Backend: nccl on CUDA, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


class Trainer:
    """Train ``model`` on in-memory tensors ``train = (x, y)`` with cross-entropy (default).

    ``transform`` maps a batch of stored inputs to model inputs (e.g. uint8 → float / 255).
    Under an initialised process group the model should be wrapped in
    ``DistributedDataParallel`` by the caller; the sampler shards by rank and evaluation
    metrics are summed over ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train: Batch,
        *,
        batch_size: int,
        scheduler: Any = None,
        test: Optional[Batch] = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
        extra_loss: bool = True,
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_x, self.train_y = train
        self.test = test
        self.device = torch.device(device)
        self.transform = transform or (lambda x: x)
        self.loss_fn = loss_fn
        self.extra_loss = extra_loss
        self.autocast_dtype = autocast_dtype
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.sampler = ResumableSampler(len(self.train_x), batch_size, seed=seed,
                                        rank=self.rank, world_size=self.world_size)
        self.step = 0
        self.history: list[dict] = []

    # -- one step ----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.model(x)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.model(x)

    def train_step(self, index: torch.Tensor) -> dict:
        self.model.train()
        x = self.transform(self.train_x[index].to(self.device))
        y = self.train_y[index].to(self.device)
        for layer in deq_layers(self.model):
            layer.backward_solution = None
        self.optimizer.zero_grad(set_to_none=True)
        logits = self._forward(x)
        loss = self.loss_fn(logits.float(), y)
        total = loss
        if self.extra_loss:
            for layer in deq_layers(self.model):
                if layer.jacobian_loss is not None:
                    total = total + layer.jacobian_loss
        total.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        layers = deq_layers(self.model)
        record = {
            "loss": float(loss.detach()),
            "correct": int((logits.argmax(1) == y).sum()),
            "count": int(y.numel()),
            "fwd_nfe": _mean([float(l.solution.nfe.float().mean()) for l in layers
                              if l.solution is not None]),
            "bwd_nfe": _mean([float(l.backward_solution.nfe.float().mean()) for l in layers
                              if l.backward_solution is not None]),
        }
        return record

    def train_epoch(self, *, max_steps: Optional[int] = None,
                    on_step: Optional[Callable[[dict], None]] = None) -> dict:
        """Train the rest of the current epoch (or ``max_steps`` steps of it)."""
        records = []
        epoch = self.sampler.epoch
        for index in self.sampler.batches():
            records.append(self.train_step(index))
            if on_step is not None:
                on_step(records[-1])
            if max_steps is not None and len(records) >= max_steps:
                break
        return _summary(records, epoch=epoch)

    @torch.no_grad()
    def evaluate(self, batch_size: int = 500) -> dict:
        if self.test is None:
            return {}
        self.model.eval()
        x_all, y_all = self.test
        shard = torch.arange(self.rank, len(x_all), self.world_size)
        loss_sum = correct = count = 0.0
        nfe = []
        for start in range(0, len(shard), batch_size):
            index = shard[start : start + batch_size]
            x = self.transform(x_all[index].to(self.device))
            y = y_all[index].to(self.device)
            logits = self._forward(x).float()
            loss_sum += float(self.loss_fn(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += int(y.numel())
            nfe += [float(l.solution.nfe.float().mean()) for l in deq_layers(self.model)]
        totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(totals)
        return {"loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[2]),
                "fwd_nfe": _mean(nfe)}

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        model = self.model.module if hasattr(self.model, "module") else self.model
        return {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        model = self.model.module if hasattr(self.model, "module") else self.model
        model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.history = list(state["history"])

    def save(self, path: str | Path) -> None:
        if self.rank != 0:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # never a half-written checkpoint

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _summary(records: list[dict], **extra: Any) -> dict:
    count = sum(r["count"] for r in records)
    fwd = [r["fwd_nfe"] for r in records if r["fwd_nfe"] is not None]
    bwd = [r["bwd_nfe"] for r in records if r["bwd_nfe"] is not None]
    return {
        **extra,
        "steps": len(records),
        "loss": sum(r["loss"] * r["count"] for r in records) / max(count, 1),
        "accuracy": sum(r["correct"] for r in records) / max(count, 1),
        "fwd_nfe": _mean(fwd),
        "bwd_nfe": _mean(bwd),
    }


def plot_history(history: list[dict], path: str | Path, title: str) -> Optional[Path]:
    """Loss, accuracy and NFE per epoch as a PNG (needs matplotlib; None without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        axes[0].plot(epochs, [h.get(key) for h in history], marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("test_accuracy", "test")):
        axes[1].plot(epochs, [h.get(key) for h in history], marker="o", label=label)
    for key, label in (("fwd_nfe", "forward"), ("bwd_nfe", "backward")):
        axes[2].plot(epochs, [h.get(key) for h in history], marker="o", label=label)
    for ax, name in zip(axes, ("cross-entropy", "accuracy", "mean NFE per sample")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fit(trainer: Trainer, epochs: int, *, out: Optional[str | Path] = None,
        checkpoint: Optional[str | Path] = None, title: str = "DEQ training",
        progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Train until ``epochs`` epochs are done (continuing a resumed trainer), evaluating,
    checkpointing and plotting after each; a progress bar per epoch shows loss, accuracy and
    mean forward/backward NFE. Returns the per-epoch history."""
    out_dir = Path(out) if out is not None else None
    show = progress and trainer.rank == 0
    while trainer.sampler.epoch < epochs:
        epoch = trainer.sampler.epoch
        remaining = len(trainer.sampler) - trainer.sampler.position
        with _EpochBar(f"epoch {epoch + 1}/{epochs}", remaining, enabled=show) as bar:
            summary = trainer.train_epoch(on_step=bar.update)
        evaluation = trainer.evaluate()
        entry = {"epoch": epoch, "train_loss": summary["loss"],
                 "train_accuracy": summary["accuracy"], "fwd_nfe": summary["fwd_nfe"],
                 "bwd_nfe": summary["bwd_nfe"], "steps": trainer.step,
                 **{f"test_{k}": v for k, v in evaluation.items() if k != "fwd_nfe"},
                 "test_fwd_nfe": evaluation.get("fwd_nfe")}
        trainer.history.append(entry)
        if trainer.rank == 0:
            log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in entry.items() if v is not None))
        if checkpoint is not None:
            trainer.save(checkpoint)
        if out_dir is not None and trainer.rank == 0:
            plot_history(trainer.history, out_dir / "curves.png", title)
    return trainer.history


class _EpochBar:
    """A rich progress bar with running loss / accuracy / NFE (plain no-op without rich)."""

    def __init__(self, description: str, total: int, enabled: bool) -> None:
        self.description, self.total, self.enabled = description, total, enabled
        self.records: list[dict] = []
        self._progress = None

    def __enter__(self) -> "_EpochBar":
        if self.enabled:
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
                from rich.progress import TimeElapsedColumn
            except ImportError:
                return self
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      TextColumn("{task.fields[stats]}"), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, stats="")
        return self

    def update(self, record: dict) -> None:
        self.records.append(record)
        if self._progress is not None:
            running = _summary(self.records)
            stats = (f"loss {running['loss']:.3f}  acc {running['accuracy']:.3f}  nfe fwd "
                     f"{_fmt(running['fwd_nfe'])} bwd {_fmt(running['bwd_nfe'])}")
            self._progress.update(self._task, advance=1, stats=stats)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"
