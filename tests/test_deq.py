"""The DEQ layer end to end: gradients, tuple states, modes, warm starts, errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import implicit
from implicit import ConvergenceError, ConvergenceWarning

# the exact IFT gradient in training too (the default damps its adjoint there)
EXACT_IFT = implicit.make_backward("ift", damping=0.0)

TIGHT = dict(tol=1e-10, stop="abs", max_iter=500)


def tanh_cell(features=5, in_features=3, scale=0.6, seed=0):
    torch.manual_seed(seed)
    cell = implicit.make_cell("tanh", features=features, in_features=in_features).double()
    with torch.no_grad():
        cell.W.weight.mul_(scale / torch.linalg.matrix_norm(cell.W.weight, ord=2))
    return cell


def test_gradcheck_wrt_input(exact_pair):
    solver_name, backward_name = exact_pair
    layer = implicit.DEQ(tanh_cell(), solver=solver_name, backward=backward_name, **TIGHT).eval()
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_gradcheck_wrt_parameters(exact_pair):
    solver_name, backward_name = exact_pair
    layer = implicit.DEQ(tanh_cell(), solver=solver_name, backward=backward_name, **TIGHT).eval()
    x = torch.randn(3, 3, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def run(*ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(run, params)


def test_ift_matches_the_dense_implicit_gradient():
    cell = tanh_cell(features=4, in_features=2)
    layer = implicit.DEQ(cell, solver="forward", backward=EXACT_IFT, **TIGHT)
    x = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    w = torch.randn_like(z)
    (z * w).sum().backward()
    # dense reference: dz/dx = (I - J)^-1 ∂f/∂x at z*
    zs = z.detach()[0]
    jz = torch.autograd.functional.jacobian(lambda v: cell(v[None], x.detach())[0], zs)
    jx = torch.autograd.functional.jacobian(lambda v: cell(zs[None], v[None])[0], x.detach()[0])
    dzdx = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - jz, jx)
    torch.testing.assert_close(x.grad[0], w[0] @ dzdx, rtol=1e-7, atol=1e-9)
    adjoint = layer.backward_solution
    assert adjoint is not None and adjoint.all_converged and adjoint.nvjp == adjoint.n_calls


class PairCell(implicit.Cell):
    """A two-part state of different shapes: (B, 3) and (B, 2, 2), coupled through each other."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(0.3 * torch.randn(3, 4, dtype=torch.float64))
        self.B = nn.Parameter(0.3 * torch.randn(4, 3, dtype=torch.float64))

    def update(self, z, u):
        p, q = z
        p_next = torch.tanh(q.flatten(1) @ self.A.T + u)
        q_next = torch.tanh(p @ self.A * 0.5 + (p_next @ self.B.T) * 0.1).view(-1, 2, 2)
        return p_next, q_next

    def init_state(self, x):
        return (x.new_zeros(x.shape[0], 3), x.new_zeros(x.shape[0], 2, 2))


def test_tuple_state_solves_and_differentiates(exact_backward_name):
    torch.manual_seed(1)
    layer = implicit.DEQ(PairCell(), solver="forward", backward=exact_backward_name,
                         **TIGHT).eval()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    p, q = layer(x)
    assert p.shape == (2, 3) and q.shape == (2, 2, 2)
    assert layer.solution.all_converged
    assert isinstance(layer.solution.z, tuple)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_wrong_shapes_name_both():
    layer = implicit.DEQ(tanh_cell(features=5), solver="forward", backward=EXACT_IFT)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        layer(x, z0=torch.zeros(4, 6, dtype=torch.float64))

    class Growing(nn.Module):  # a plain module whose output shape differs from its input
        def forward(self, z, x):
            return torch.cat([z, x], dim=1)

    plain = implicit.DEQ(Growing(), solver="forward", backward=EXACT_IFT)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 2\)"):
        plain(torch.randn(2, 3), z0=torch.zeros(2, 2))


def test_dtype_mismatch_is_a_clear_error():
    layer = implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT)
    with pytest.raises(TypeError, match="float32.*float64|dtype"):
        layer(torch.randn(2, 3, dtype=torch.float64), z0=torch.zeros(2, 5))


def test_plain_module_cell_like_the_tutorial():
    class TanhFixedPoint(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.linear = nn.Linear(n, n, bias=False, dtype=torch.float64)
            nn.init.normal_(self.linear.weight, std=0.2 / n**0.5)

        def forward(self, z, x):
            return torch.tanh(self.linear(z) + x)

    module = TanhFixedPoint(4)
    layer = implicit.DEQ(module, solver="forward", backward=EXACT_IFT, **TIGHT)
    assert "cell.linear.weight" in layer.state_dict()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    torch.testing.assert_close(z, module(z, x), rtol=0, atol=1e-9)
    assert torch.autograd.gradcheck(layer, (x,))


def test_output_is_exactly_the_recorded_solution():
    layer = implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT)
    z = layer(torch.randn(3, 3, dtype=torch.float64))
    assert torch.equal(z.detach(), layer.solution.z)


def test_eval_mode_keeps_a_graph_and_no_grad_builds_none():
    layer = implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT).eval()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    assert z.requires_grad
    (dx,) = torch.autograd.grad(z.sum(), x)
    assert torch.isfinite(dx).all() and dx.abs().sum() > 0
    with torch.no_grad():
        z = layer(x)
    assert not z.requires_grad and z.grad_fn is None


def test_separate_train_and_eval_budgets():
    layer = implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT, tol=1e-12, stop="abs",
                         max_iter=200, eval_tol=1e-3, eval_max_iter=7, policy="ignore")
    x = torch.randn(2, 3, dtype=torch.float64)
    layer(x)
    train_calls = layer.solution.n_calls
    layer.eval()
    layer(x)
    assert layer.solution.n_calls <= 7 < train_calls
    assert layer.solution.tol == 1e-3


def test_warm_start_from_the_previous_solution_is_cheaper():
    layer = implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT, tol=1e-9, stop="abs",
                         max_iter=300)
    x = torch.randn(4, 3, dtype=torch.float64)
    layer(x)
    cold = layer.solution.n_calls
    layer(x + 1e-6, z0=layer.solution.z)
    assert layer.solution.all_converged and layer.solution.n_calls < cold


def test_forward_nonconvergence_follows_the_layer_policy():
    cell = tanh_cell(scale=0.95)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match="DEQ forward solve"):
        implicit.DEQ(cell, solver="forward", backward=EXACT_IFT, tol=1e-12, max_iter=3)(x)
    with pytest.raises(ConvergenceError):
        implicit.DEQ(cell, solver="forward", backward=EXACT_IFT, tol=1e-12, max_iter=3,
                     policy="raise")(x)


def test_adjoint_nonconvergence_follows_its_policy():
    backward = implicit.make_backward("ift", max_iter=2, tol=1e-14, policy="raise")
    layer = implicit.DEQ(tanh_cell(scale=0.9), solver="forward", backward=backward, **TIGHT)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    with pytest.raises(ConvergenceError, match="IFT adjoint solve"):
        z.sum().backward()
    assert layer.backward_solution is None or not layer.backward_solution.all_converged


def test_adjoint_with_its_own_solver_instance():
    backward = implicit.make_backward(
        "ift", solver=implicit.make_solver("forward", beta=0.8), tol=1e-11, max_iter=400,
        damping=0.0)
    layer = implicit.DEQ(tanh_cell(), solver="forward", backward=backward, **TIGHT)
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_layer_pickles_and_deepcopies_with_identical_outputs():
    layer = implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT, **TIGHT)
    x = torch.randn(2, 3, dtype=torch.float64)
    want = layer(x)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(clone(x), want)


def test_bad_solver_and_backward_arguments():
    with pytest.raises(TypeError, match="solver"):
        implicit.DEQ(tanh_cell(), solver=3, backward=EXACT_IFT)
    with pytest.raises(TypeError, match="backward"):
        implicit.DEQ(tanh_cell(), solver="forward", backward=object())
    with pytest.raises(TypeError, match="nn.Module"):
        implicit.DEQ(lambda z, x: z, solver="forward", backward=EXACT_IFT)
    with pytest.raises(ValueError, match="in_features=3"):
        implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT)(torch.randn(2, 4))


class _RowCounting(implicit.Cell):
    """tanh(W z + U x) with per-sample contraction rates, recording the batch sizes it sees."""

    batch_independent = True

    def __init__(self, features: int = 6, batch: int = 8):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.W = torch.nn.Parameter(torch.randn(features, features, generator=gen,
                                                dtype=torch.float64) / features ** 0.5)
        self.U = torch.nn.Parameter(torch.randn(features, features, generator=gen,
                                                dtype=torch.float64))
        self.seen: list[int] = []

    def injection(self, x):
        # the sample's contraction rate rides in the injection, so it follows row subsets
        rate = torch.linspace(0.05, 0.9, x.shape[0], dtype=x.dtype)[:, None]
        return (x @ self.U.T, rate)

    def update(self, z, u):
        self.seen.append(z.shape[0])
        ux, rate = u
        return torch.tanh(rate * (z @ self.W.T) + ux)


@pytest.mark.parametrize("solver", ["forward", "anderson", "broyden"])
def test_compaction_evaluates_only_active_samples_with_the_same_record(solver, monkeypatch):
    """Samples converging at different times: with compaction (the default for a
    batch-independent cell) later forward calls see fewer rows and so do the adjoint's VJPs,
    and the records and the gradient are those of full-batch evaluation."""
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad = torch.autograd.grad
    results = {}
    for compact in (False, None):
        vjp_rows = []

        def counting_grad(outputs, inputs, grad_outputs=None, *args, **kwargs):
            if isinstance(grad_outputs, torch.Tensor):
                vjp_rows.append(grad_outputs.shape[0])
            return grad(outputs, inputs, grad_outputs, *args, **kwargs)

        cell = _RowCounting()
        layer = implicit.DEQ(cell, solver=solver, backward="ift", tol=1e-10, stop="abs",
                             max_iter=200, compact=compact)
        xr = x.clone().requires_grad_()
        z = layer(xr)
        monkeypatch.setattr(torch.autograd, "grad", counting_grad)
        z.square().sum().backward()
        monkeypatch.setattr(torch.autograd, "grad", grad)
        results[compact] = (z.detach(), layer.solution, layer.backward_solution, xr.grad,
                            cell.seen, vjp_rows)
    (z0, s0, b0, g0, seen0, v0), (z1, s1, b1, g1, seen1, v1) = results[False], results[None]
    forward0, forward1 = seen0[:s0.n_calls], seen1[:s1.n_calls]
    assert set(forward0) == {8} and min(forward1) < 8  # compaction happened, only with it
    assert sum(forward1) < sum(forward0)
    assert set(v0) == {8} and min(v1) < 8 and sum(v1) < sum(v0)  # the adjoint's VJPs too
    torch.testing.assert_close(z1, z0, rtol=0, atol=1e-12)
    for a, b in ((s0, s1), (b0, b1)):
        assert torch.equal(b.nfe, a.nfe) and b.n_calls == a.n_calls
        assert torch.equal(b.sample_status, a.sample_status)
    torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-12)


def test_compaction_needs_batch_independence():
    class Coupled(_RowCounting):
        batch_independent = False

    cell = Coupled()
    layer = implicit.DEQ(cell, solver="forward", backward="ift", tol=1e-10, stop="abs",
                         max_iter=200)
    layer(torch.randn(8, 6, dtype=torch.float64))
    assert set(cell.seen) == {8}  # a cell that does not declare it is always given the batch

    class PlainWithSharedInput(torch.nn.Module):  # x = (batched, shared): no rows to take
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6, dtype=torch.float64)

        def forward(self, z, x):
            return 0.5 * torch.tanh(self.lin(z) + x[0]) * x[1]

    layer = implicit.DEQ(PlainWithSharedInput(), solver="forward", backward="ift",
                         compact=True)
    x = torch.randn(8, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="compact=True.*batched in dimension 0"):
        layer((x, torch.ones(1, 1, dtype=torch.float64)), z0=torch.zeros_like(x))
    with pytest.raises(TypeError, match="compact must be None, True or False"):
        implicit.DEQ(PlainWithSharedInput(), solver="forward", backward="ift", compact="yes")


def test_compaction_takes_rows_of_the_injection_as_the_cell_says():
    """The monotone cell's injection holds its (features × features) weight besides the
    per-sample term; with as many features as samples a naive row index would cut W too."""
    torch.manual_seed(0)
    cell = implicit.make_cell("monotone", features=3, in_features=2).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    full = implicit.DEQ(cell, solver="forward", backward="ift", tol=1e-10, stop="abs",
                        max_iter=300, compact=False)
    compacted = implicit.DEQ(cell, solver="forward", backward="ift", tol=1e-10, stop="abs",
                             max_iter=300)
    torch.testing.assert_close(compacted(x), full(x), rtol=0, atol=1e-12)


def test_registered_cells_declare_batch_independence_consistently(registry):
    for entry in registry.entries():
        if entry.kind != "cell":
            continue
        spec = registry.get("cell", entry.name).spec
        declared = "batch_independent" in spec.capabilities
        assert getattr(spec.factory, "batch_independent", False) == declared, entry.name
