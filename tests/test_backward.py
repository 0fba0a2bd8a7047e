"""Backward strategies: exactness of ift (first and second order), phantom's bound, unrolled."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit

# the exact IFT gradient in training too (the default damps its adjoint there)
EXACT_IFT = implicit.make_backward("ift", damping=0.0)

D64 = torch.float64
TIGHT = dict(tol=1e-11, stop="abs", max_iter=800)


def tanh_cell(features=4, in_features=3, scale=0.6, seed=0):
    torch.manual_seed(seed)
    cell = implicit.make_cell("tanh", features=features, in_features=in_features).double()
    with torch.no_grad():
        cell.W.weight.mul_(scale / torch.linalg.matrix_norm(cell.W.weight, ord=2))
    return cell


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    return implicit.make_cell("resnet", channels=2, inner_channels=2, kernel_size=3,
                              num_groups=2, init_std=0.3).double()


def _param_fn(layer, x):
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    return (lambda *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (x,))), params


@pytest.mark.parametrize("cell_kind", ["tanh", "resnet"])
def test_ift_gradcheck_with_every_adjoint_solver(adjoint_solver_name, cell_kind):
    # The forward solver is plain iteration: its error at x ± eps is smooth in x, so the
    # numerical Jacobian is clean; the adjoint solver is the one under test.
    cell = tanh_cell() if cell_kind == "tanh" else tiny_resnet()
    backward = implicit.make_backward("ift", solver=adjoint_solver_name, tol=1e-12,
                                      max_iter=800, damping=0.0)
    layer = implicit.DEQ(cell, solver="forward", backward=backward, **TIGHT)
    x = (torch.randn(2, 3, dtype=D64) if cell_kind == "tanh"
         else torch.randn(1, 2, 3, 3, dtype=D64)).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))
    run, params = _param_fn(layer, x.detach())
    # the ResNet cell has ~80 parameters: check random directions (fast mode) to stay quick
    assert torch.autograd.gradcheck(run, params, fast_mode=cell_kind == "resnet")
    assert layer.backward_solution.all_converged


def test_ift_gradgradcheck_on_tanh():
    layer = implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT, **TIGHT)
    x = torch.randn(2, 3, dtype=D64, requires_grad=True)
    assert torch.autograd.gradgradcheck(layer, (x,))
    run, params = _param_fn(layer, x.detach())
    assert torch.autograd.gradgradcheck(run, params)


def test_ift_second_derivative_matches_unrolled():
    layer_ift = implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT, **TIGHT)
    layer_unr = implicit.DEQ(tanh_cell(), solver="forward", backward="unrolled", **TIGHT)
    x = torch.randn(3, 3, dtype=D64, requires_grad=True)
    hessians = []
    for layer in (layer_ift, layer_unr):
        energy = layer(x).pow(2).sum()
        (forces,) = torch.autograd.grad(energy, x, create_graph=True)
        (hv,) = torch.autograd.grad(forces.pow(2).sum(), x)
        hessians.append(hv)
    torch.testing.assert_close(hessians[0], hessians[1], rtol=1e-8, atol=1e-10)


def test_force_matching_trains():
    torch.manual_seed(0)
    cell = tanh_cell(features=6, in_features=3, scale=0.5)
    layer = implicit.DEQ(cell, solver="anderson", backward=EXACT_IFT, tol=1e-9, stop="abs",
                         max_iter=200)
    opt = torch.optim.Adam(cell.parameters(), lr=1e-2)
    x = torch.randn(8, 3, dtype=D64)
    target = torch.randn(8, 3, dtype=D64)
    losses = []
    for _ in range(25):
        xr = x.clone().requires_grad_()
        energy = layer(xr).pow(2).sum()
        (forces,) = torch.autograd.grad(energy, xr, create_graph=True)
        loss = (forces - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_ift_matches_unrolled_through_a_converged_forward():
    cell = tanh_cell(features=6, in_features=3, scale=0.6)
    x = torch.randn(4, 3, dtype=D64)
    w = torch.randn(4, 6, dtype=D64)
    grads = {}
    for backward in (EXACT_IFT, "unrolled"):
        solver = implicit.make_solver("forward", tol=0.0, max_iter=250, policy="ignore")
        layer = implicit.DEQ(cell, solver=solver, backward=backward)
        xr = x.clone().requires_grad_()
        z = layer(xr)
        assert layer.solution.n_calls == 250
        params = list(cell.parameters())
        g = torch.autograd.grad((z * w).sum(), [xr, *params])
        grads[getattr(backward, "name", backward)] = torch.cat([t.flatten() for t in g])
    err = (grads["ift"] - grads["unrolled"]).norm() / grads["unrolled"].norm()
    assert err < 1e-8


def test_unrolled_checkpoint_gives_the_same_gradient():
    x = torch.randn(3, 3, dtype=D64, requires_grad=True)
    outs = []
    for checkpoint in (False, True):
        backward = implicit.make_backward("unrolled", checkpoint=checkpoint)
        layer = implicit.DEQ(tanh_cell(), solver="forward", backward=backward, tol=1e-8)
        (g,) = torch.autograd.grad(layer(x).sum(), x)
        outs.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_unrolled_needs_an_unrollable_solver():
    with pytest.raises(ValueError, match="unrollable"):
        implicit.DEQ(tanh_cell(), solver="anderson", backward="unrolled")


def _phantom_adjoint_error(cell, x, k, lam):
    """(‖w_phantom − w‖, ‖w‖, ‖J‖₂) for a tanh cell, w recovered from ∂L/∂u = D w."""
    layer_exact = implicit.DEQ(cell, solver="forward", backward=EXACT_IFT, **TIGHT)
    phantom = implicit.make_backward("phantom", k=k, lam=lam)
    layer_ph = implicit.DEQ(cell, solver="forward", backward=phantom, **TIGHT)
    y = torch.randn(x.shape[0], cell.features, dtype=D64, generator=torch.Generator().manual_seed(1))
    grads = []
    for layer in (layer_exact, layer_ph):
        u = cell.injection(x).detach().requires_grad_()
        layer(x)  # records z* in layer.solution
        # the same cell with u as a leaf: the gradient w.r.t. u is D w (D = tanh' at z*)
        cell_u = _FixedInjection(cell, u)
        layer2 = implicit.DEQ(cell_u, solver="forward", backward=layer.backward, **TIGHT)
        z = layer2(x)
        (gu,) = torch.autograd.grad((z * y).sum(), u)
        grads.append(gu)
    z_star = layer_exact.solution.z
    d = 1 - z_star.pow(2)  # tanh' at the fixed point
    w_exact, w_ph = grads[0] / d, grads[1] / d
    jac = torch.stack([torch.autograd.functional.jacobian(
        lambda v: torch.tanh(cell.W(v) + cell.injection(x[i:i + 1])[0]), z_star[i])
        for i in range(x.shape[0])])
    norm_j = torch.linalg.matrix_norm(jac, ord=2)
    return (torch.linalg.vector_norm(w_ph - w_exact, dim=1),
            torch.linalg.vector_norm(w_exact, dim=1), norm_j)


class _FixedInjection(implicit.Cell):
    """The tanh cell with its injection replaced by a given tensor (to read ∂L/∂u)."""

    def __init__(self, cell, u):
        super().__init__()
        self.inner = cell
        self.u = u

    def injection(self, x):
        return self.u

    def update(self, z, u):
        return self.inner.update(z, u)

    def init_state(self, x):
        return self.inner.init_state(x)


@settings(max_examples=12)
@given(
    rho=st.floats(0.1, 0.9),
    k=st.integers(1, 12),
    lam=st.floats(0.2, 1.0),
    seed=st.integers(0, 2**16),
)
def test_phantom_error_bound_on_random_contractive_tanh_cells(rho, k, lam, seed):
    cell = tanh_cell(features=4, in_features=3, scale=rho, seed=seed)
    x = torch.randn(3, 3, dtype=D64, generator=torch.Generator().manual_seed(seed))
    err, norm_w, norm_j = _phantom_adjoint_error(cell, x, k, lam)
    bound = (1 - lam * (1 - norm_j)) ** k * norm_w
    assert bool((err <= bound * (1 + 1e-6) + 1e-9).all()), (err, bound)


def test_jfb_is_phantom_with_one_full_step():
    x = torch.randn(2, 3, dtype=D64, requires_grad=True)
    grads = []
    for backward in (implicit.make_backward("jfb"),
                     implicit.make_backward("phantom", k=1, lam=1.0)):
        layer = implicit.DEQ(tanh_cell(), solver="forward", backward=backward, **TIGHT)
        (g,) = torch.autograd.grad(layer(x).sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    with pytest.raises(implicit.OptionError):
        implicit.make_backward("jfb", k=3)


def test_pretraining_uses_the_pretrain_backward_first():
    layer = implicit.DEQ(tanh_cell(), solver="forward", backward=EXACT_IFT, tol=1e-10,
                         pretrain_steps=2,
                         pretrain_backward=implicit.make_backward("unrolled", depth=4))
    x = torch.randn(2, 3, dtype=D64)
    calls = []
    for _ in range(3):
        layer(x).sum().backward()
        calls.append(layer.solution.n_calls)
    assert calls[:2] == [4, 4] and calls[2] > 4 and int(layer.train_steps) == 3
    layer.eval()
    layer(x)
    assert int(layer.train_steps) == 3


@pytest.mark.parametrize("backward", ["ift", "phantom", "unrolled"])
def test_no_graph_outlives_the_step(backward):
    """After backward, nothing of the step's graph is kept alive (no cycles, no hooks left)."""
    cell = tanh_cell()
    layer = implicit.DEQ(cell, solver="forward", backward=backward, tol=1e-8)
    captured = []
    handle = cell.U.register_forward_hook(lambda mod, inp, out: captured.append(weakref.ref(out)))
    x = torch.randn(2, 3, dtype=D64, requires_grad=True)
    gc.collect()
    gc.disable()
    try:
        z = layer(x)
        z.sum().backward()
        del z
        assert captured and all(ref() is None for ref in captured)  # freed by refcount alone
    finally:
        gc.enable()
        handle.remove()
    assert not cell._forward_hooks and not cell._backward_hooks
