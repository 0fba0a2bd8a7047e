"""CUDA tests (``-m cuda``): skipped without a GPU, run by ``benchmarks/gpu_run.sh`` on one.

They cover what the CPU suite cannot: the accelerator branches on a real device (no host
checks, ``check_every = 4``, fix-ups without synchronisation, no buffer pooling), a solve and a
training step for every solver × backward on a small ResNet and a tanh cell, autocast bf16,
the workspace, ``torch.compile`` of a model with a DEQ, and DDP with nccl on a process group of
size 1.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

import implicit
from implicit.workspace import Workspace

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEVICE = "cuda"


def _cell(name: str):
    with implicit.seeded(0) as gen:
        if name == "resnet":
            cell = implicit.make_cell("resnet", channels=16, inner_channels=32, num_groups=4)
            x = torch.randn(4, 16, 8, 8, generator=gen)
        else:
            cell = implicit.make_cell("tanh", features=64, in_features=32)
            x = torch.randn(8, 32, generator=gen)
    return cell.to(DEVICE), x.to(DEVICE)


def _pairs():
    registry = implicit.get_registry()
    for solver in registry.entries("solver"):
        if "linear_only" in solver.spec.capabilities or "cuda" not in solver.spec.devices:
            continue
        for backward in registry.entries("backward"):
            if backward.spec.requires <= solver.spec.capabilities:
                yield solver.name, backward.name


@pytest.mark.parametrize("cell_kind", ["tanh", "resnet"])
@pytest.mark.parametrize("solver,backward", list(_pairs()))
def test_solve_and_train_step_on_cuda(cell_kind, solver, backward):
    cell, x = _cell(cell_kind)
    layer = implicit.DEQ(cell, solver=solver, backward=backward, tol=1e-4, max_iter=60,
                         policy="ignore")
    optimizer = torch.optim.SGD(cell.parameters(), lr=1e-2)
    out = layer(x.clone().requires_grad_())
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())
    optimizer.step()
    sol = layer.solution
    assert sol.n_calls <= 60 and bool((sol.nfe <= sol.n_calls).all())
    # the record is truthful on the device too
    with torch.no_grad():
        z = sol.z.reshape(sol.z.shape[0], -1)
        fz = cell.update(sol.z, cell.injection(x)).reshape(z.shape)
        res = (fz - z).norm(dim=1) / fz.norm(dim=1)
    clear = (res - 1e-4).abs() > 1e-6
    assert torch.equal(sol.converged[clear], (res <= 1e-4)[clear])


@pytest.mark.parametrize("solver", ["forward", "anderson", "broyden"])
def test_cuda_solve_matches_cpu(solver):
    cell, x = _cell("tanh")
    cell, x = cell.double(), x.double()
    algorithm = implicit.make_solver(solver, tol=1e-10, stop="abs", max_iter=200, policy="ignore")

    def solve(device):
        c, xx = cell.to(device), x.to(device)
        with torch.no_grad():
            u = c.injection(xx)
        return implicit.solve(lambda z: c.update(z, u), torch.zeros(xx.shape[0], 64,
                              dtype=torch.float64, device=device), solver=algorithm)

    gpu, cpu = solve("cuda"), solve("cpu")
    assert torch.allclose(gpu.z.cpu(), cpu.z, atol=1e-9)
    assert torch.equal(gpu.converged.cpu(), cpu.converged)
    assert gpu.n_calls <= cpu.n_calls + 3  # check_every = 4 on the device


def test_autocast_bf16_on_cuda():
    cell, x = _cell("resnet")
    layer = implicit.DEQ(cell, solver="anderson", backward="ift", tol=2e-2, max_iter=40,
                         policy="ignore")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x.clone().requires_grad_())
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in cell.parameters())


def test_the_workspace_does_not_pool_device_buffers():
    pool = Workspace()
    like = torch.zeros(1, device=DEVICE)
    buffer = pool.empty(8, 8, like=like)
    assert buffer.device.type == "cuda"
    pool.give(buffer)
    assert pool.held_bytes == 0


def test_torch_compile_of_a_model_with_a_deq_on_cuda():
    cell, x = _cell("tanh")
    model = torch.nn.Sequential(implicit.DEQ(cell, solver="anderson", backward="ift",
                                             tol=1e-4, max_iter=30, policy="ignore"),
                                torch.nn.Linear(64, 10)).to(DEVICE)
    compiled = torch.compile(model)
    compiled(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_nccl_on_one_process():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        cell, x = _cell("tanh")
        layer = implicit.DEQ(cell, solver="anderson", backward="ift", tol=1e-4, max_iter=40,
                             policy="ignore")
        model = torch.nn.parallel.DistributedDataParallel(layer, device_ids=[0])
        model(x).square().mean().backward()
        assert all(p.grad is not None for p in cell.parameters())
    finally:
        dist.destroy_process_group()
