"""Training: the CIFAR-10 pickle loader, exact resume, the digits example's accuracy floor."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from implicit.training import ResumableSampler, Trainer

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cifar10 = _script("cifar10")
digits = _script("digits")


def write_tiny_cifar(folder: Path, per_file: int = 4, seed: int = 0) -> dict:
    """The CIFAR-10 python format: pickled dicts with b'data' (N, 3072) uint8, b'labels'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in cifar10.FILES:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_file)]
        with open(folder / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels,
                         b"filenames": [b"x.png"] * per_file}, handle)
        written[name] = (data, labels)
    return written


def test_loader_reads_the_python_pickles(tmp_path):
    written = write_tiny_cifar(tmp_path / "cifar-10-batches-py")
    (train_x, train_y), (test_x, test_y) = cifar10.load_cifar10(tmp_path)  # finds the subfolder
    assert train_x.shape == (20, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (4, 3, 32, 32) and test_y.dtype == torch.int64
    data, labels = written["data_batch_2"]
    # rows are channel-major 1024 red, 1024 green, 1024 blue values, as the format documents
    assert torch.equal(train_x[4:8], torch.as_tensor(data).reshape(4, 3, 32, 32))
    assert train_y[4:8].tolist() == labels
    assert test_y.tolist() == written["test_batch"][1]
    assert torch.allclose(cifar10.to_float(train_x[:1]), train_x[:1].float() / 255)


def test_missing_data_says_where_to_put_what(tmp_path, capsys):
    with pytest.raises(cifar10.MissingData, match="data_batch_1"):
        cifar10.load_cifar10(tmp_path)
    assert cifar10.main(["--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and "test_batch" in err
    assert cifar10.main([]) == 2


def test_tutorial_model_matches_the_chapter():
    torch.manual_seed(0)
    model = cifar10.build_model()
    deq = model[2]
    assert deq.solver.name == "anderson" and deq.solver.m == 5
    assert deq.solver.tol == 1e-2 and deq.solver.max_iter == 25
    assert deq.backward.name == "ift"
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def _cifar_trainer(folder: Path, seed: int) -> Trainer:
    (train, test) = cifar10.load_cifar10(folder)
    torch.manual_seed(seed)
    model = cifar10.build_model(channels=8, inner=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 20, eta_min=1e-6)
    return Trainer(model, optimizer, train, test=test, scheduler=scheduler, batch_size=6,
                   seed=3, transform=cifar10.to_float)


def _losses(trainer: Trainer, steps: int) -> list[float]:
    losses = []
    while len(losses) < steps:
        for index in trainer.sampler.batches():
            losses.append(trainer.train_step(index)["loss"])
            if len(losses) == steps:
                return losses
    return losses


def test_resume_is_exact(tmp_path):
    """N steps straight equal N/2 steps, a checkpoint, a fresh process state, N/2 steps —
    across an epoch boundary, with BatchNorm statistics, Adam, the cosine schedule and the
    sampler's position mid-epoch."""
    write_tiny_cifar(tmp_path / "data")
    n = 8  # 20 images in batches of 6: 4 batches per epoch, the checkpoint lands mid-epoch 1
    straight = _losses(_cifar_trainer(tmp_path / "data", seed=0), n)

    first = _cifar_trainer(tmp_path / "data", seed=0)
    head = _losses(first, n // 2 + 1)  # 5 steps: one into the second epoch
    first.save(tmp_path / "ckpt.pt")
    torch.manual_seed(12345)  # the resumed run must not depend on the state it starts from
    resumed = _cifar_trainer(tmp_path / "data", seed=99)
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.sampler.epoch == 1 and resumed.sampler.position == 1
    tail = _losses(resumed, n - len(head))
    assert len(straight) == len(head + tail)
    np.testing.assert_allclose(head + tail, straight, rtol=0, atol=1e-6)


def test_sampler_covers_each_epoch_once_and_shards_by_rank():
    sampler = ResumableSampler(10, 3, seed=1)
    epoch0 = torch.cat(list(sampler.batches()))
    assert sorted(epoch0.tolist()) == list(range(10)) and sampler.epoch == 1
    epoch1 = torch.cat(list(sampler.batches()))
    assert not torch.equal(epoch0, epoch1)
    shards = [torch.cat(list(ResumableSampler(10, 3, seed=1, rank=r, world_size=2).batches()))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(torch.cat(shards).tolist()) == list(range(10))


def test_cifar_script_runs_end_to_end_on_synthetic_data(tmp_path):
    out = tmp_path / "run"
    assert cifar10.main(["--synthetic", "30", "--epochs", "1", "--batch-size", "15",
                         "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert (out / "checkpoint.pt").is_file() and (out / "curves.png").is_file()
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["sampler"]["epoch"] == 1
    assert state["history"][0]["fwd_nfe"] > 0 and state["history"][0]["bwd_nfe"] > 0


def test_digits_example_learns():
    """The real-data example at reduced epochs (the full run reaches 97.6 %, README)."""
    trainer = digits.make_trainer(6)
    from implicit.training import fit

    history = fit(trainer, 6, progress=False, log=lambda line: None)
    assert history[-1]["test_accuracy"] >= 0.95
    assert history[-1]["fwd_nfe"] < 40  # the solves converge (max_iter 40)
