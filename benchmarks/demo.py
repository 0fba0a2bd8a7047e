"""A small end-to-end demo: fit a DEQ(tanh, forward, ift) layer to a synthetic regression task.

Run: ``.venv/bin/python benchmarks/demo.py``. Prints the forward/backward solver records per
step and the training loss; finishes in seconds on 2 CPU cores.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import implicit


def main(steps: int = 30, batch: int = 64, features: int = 32, seed: int = 0) -> None:
    torch.manual_seed(seed)
    cell = implicit.make_cell("tanh", features=features, in_features=8)
    layer = implicit.DEQ(cell, solver="forward", backward="ift", tol=1e-4, max_iter=60)
    head = nn.Linear(features, 1)
    model = nn.ModuleDict({"deq": layer, "head": head})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(batch, 8)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    print(f"implicit {implicit.__version__}, torch {torch.__version__}")
    print(f"{'step':>4} {'loss':>9} {'fwd calls':>9} {'fwd resid':>9} {'bwd calls':>9} status")
    start = time.perf_counter()
    for step in range(steps):
        z = layer(x)
        loss = nn.functional.mse_loss(head(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        fwd, bwd = layer.solution, layer.backward_solution
        if step % 5 == 0 or step == steps - 1:
            print(
                f"{step:>4} {loss.item():>9.4f} {fwd.n_calls:>9} "
                f"{fwd.rel_residual.max().item():>9.1e} {bwd.n_calls:>9} {fwd.status.name}"
            )
    print(f"{steps} training steps in {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
