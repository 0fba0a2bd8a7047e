"""Mixed precision (autocast) and torch.compile of cells and fixed-iteration solver blocks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import implicit
from implicit.cell import injection_of, update_of
from implicit.solver import compile_block, step_block

ROOT = Path(__file__).resolve().parents[1]


class RecordingTanh(implicit.Cell):
    """tanh(W z + u), recording the dtype its linear map computed in."""

    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.W = nn.Linear(features, features, bias=False)
        nn.init.normal_(self.W.weight, std=0.3 / features ** 0.5)
        self.seen: set[torch.dtype] = set()

    def update(self, z, u):
        wz = self.W(z)
        self.seen.add(wz.dtype)
        return torch.tanh(wz + u)


def test_autocast_runs_the_cell_in_bf16_and_the_solver_in_float32():
    torch.manual_seed(0)
    cell = RecordingTanh()
    layer = implicit.DEQ(cell, solver="anderson", backward="ift", tol=2e-2)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        loss = z.square().sum()
    assert cell.seen == {torch.bfloat16}
    assert z.dtype == torch.float32 and layer.solution.abs_residual.dtype == torch.float32
    assert layer.solution.converged.all()
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(cell.W.weight.grad).all()
    assert layer.backward_solution.converged.all()


class Overflowing(implicit.Cell):
    """z ← z/2 + A x: A x overflows float16 for large inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Linear(2, 2, bias=False)
        nn.init.constant_(self.A.weight, 100.0)

    def injection(self, x):
        return self.A(x)

    def update(self, z, u):
        return 0.5 * z + u


def test_float16_overflow_is_reported_non_finite_and_gradscaler_skips_the_step():
    cell = Overflowing()
    layer = implicit.DEQ(cell, solver="anderson", backward="ift", tol=1e-3)
    x = torch.tensor([[400.0, 400.0], [0.01, 0.02]])  # 8e4 > float16 max 65504 for sample 0
    scaler = torch.amp.GradScaler("cpu")
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.1)
    before = cell.A.weight.detach().clone()
    with pytest.warns(implicit.ConvergenceWarning, match="non-finite"):
        with torch.autocast("cpu", dtype=torch.float16):
            z = layer(x)
    status = layer.solution.sample_status.tolist()
    assert status[0] == implicit.Status.NONFINITE.code
    assert status[1] == implicit.Status.CONVERGED.code
    assert torch.isnan(z[0]).all() and torch.isfinite(z[1]).all()
    scaler.scale(z.sum()).backward()
    scaler.step(optimizer)  # found inf/NaN in the gradients: the step is skipped
    scaler.update()
    assert torch.equal(cell.A.weight, before)
    assert scaler.get_scale() < 65536.0  # and the scale backs off


def test_bf16_autocast_training_stays_finite_and_learns_on_digits():
    spec = importlib.util.spec_from_file_location("digits", ROOT / "benchmarks" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    sys.modules["digits"] = digits
    spec.loader.exec_module(digits)
    from implicit.training import fit

    trainer = digits.make_trainer(4, autocast_dtype=torch.bfloat16, tol=2e-2)
    history = fit(trainer, 4, progress=False, log=lambda line: None)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert history[-1]["test_accuracy"] >= 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def _tanh_problem():
    torch.manual_seed(0)
    cell = implicit.make_cell("tanh", features=16)
    x = torch.randn(4, 16)
    u = injection_of(cell, x)
    return cell, (lambda z: update_of(cell, z, u)), torch.zeros(4, 16)


def _resnet_problem():
    torch.manual_seed(0)
    cell = implicit.make_cell("resnet", channels=8, inner_channels=16)
    x = torch.randn(2, 8, 6, 6)
    u = injection_of(cell, x)
    return cell, (lambda z: update_of(cell, z.view(2, 8, 6, 6), u).reshape(2, -1)), \
        torch.zeros(2, 8 * 36)


@pytest.mark.parametrize("problem", [_tanh_problem, _resnet_problem], ids=["tanh", "resnet"])
@pytest.mark.parametrize("algorithm", ["forward", "anderson", "broyden"])
def test_a_block_of_solver_steps_compiles_without_graph_breaks(algorithm, problem):
    _, fn, z = problem()
    solver = implicit.make_solver(algorithm)
    with torch.no_grad():
        fz = fn(z)
        explanation = dynamo.explain(
            lambda z, fz, state: step_block(solver, fn, z, fz, state, 5)
        )(z, fz, solver.init(z, fz))
    dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_cell_and_block_match_eager():
    cell, fn, z = _tanh_problem()
    solver = implicit.make_solver("anderson")
    with torch.no_grad():
        fz = fn(z)
        eager = step_block(solver, fn, z, fz, solver.init(z, fz), 6)
        block = compile_block(solver, fn, 6, backend="aot_eager")
        compiled = block(z, fz, solver.init(z, fz))
    dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0])
    # the cell itself compiles and the DEQ runs on it (the loop, records and stops stay eager)
    compiled_cell = torch.compile(cell, backend="aot_eager")
    x = torch.randn(3, 16)
    plain = implicit.DEQ(cell, solver="anderson", backward="ift", tol=1e-6)
    layer = implicit.DEQ(compiled_cell, solver="anderson", backward="ift", tol=1e-6)
    torch.testing.assert_close(layer(x), plain(x))
    dynamo.reset()


def _model_with_a_deq(backward: str) -> nn.Module:
    torch.manual_seed(0)
    cell = implicit.make_cell("tanh", features=12)
    solver = "forward" if backward == "unrolled" else "anderson"  # unrolled needs unrollable
    deq = implicit.DEQ(cell, solver=solver, backward=backward, tol=1e-5, max_iter=60)
    return nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), deq, nn.ReLU(), nn.Linear(12, 3))


@pytest.mark.parametrize("backward", ["ift", "phantom", "unrolled"])
def test_torch_compile_of_a_model_with_a_deq_trains_like_eager(backward):
    """``torch.compile(model)`` (default inductor backend): the layer is a graph break, the
    code around it compiles, and three training steps give the eager losses and gradients."""
    eager, compiled_model = _model_with_a_deq(backward), _model_with_a_deq(backward)
    compiled = torch.compile(compiled_model)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(3)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    try:
        for x, y in batches:
            losses, grads = [], []
            for model, run, opt in zip((eager, compiled_model), (eager, compiled), optimizers):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(run(x), y)
                loss.backward()
                losses.append(loss.detach())
                grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
            for g_compiled, g_eager in zip(grads[1], grads[0]):
                torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-6)
        assert compiled_model[2].solution.status is implicit.Status.CONVERGED
    finally:
        dynamo.reset()


def test_fullgraph_compile_of_a_deq_says_why_in_one_line():
    model = _model_with_a_deq("ift")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    try:
        with pytest.raises(Exception, match="graph break under torch.compile"):
            compiled(torch.randn(2, 5))
    finally:
        dynamo.reset()
