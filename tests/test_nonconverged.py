"""What a capped (non-converged) solve returns and which gradient it forms.

In real DEQ training the solves hit ``max_iter`` long before ``tol``; these tests pin the
chosen behaviour there, against references computed here (plain loops, dense Jacobians), not
with the loop or the backward under test.
"""

from __future__ import annotations

import pytest
import torch

import implicit


def _oscillating_map(z):
    # f(z) = -1.5 z + 1: forward iteration moves away from z* = 0.4, so the residual grows
    # every step and the best iterate is the first one
    return -1.5 * z + 1.0


@pytest.mark.parametrize("returns", ["best", "last"])
def test_capped_solve_returns_the_chosen_iterate(returns):
    z0 = torch.tensor([[0.0, 0.3], [0.5, 1.0]], dtype=torch.float64)
    sol = implicit.solve(_oscillating_map, z0, solver="forward", max_iter=5, policy="ignore",
                         returns=returns, divergence_factor=0.0, stop="abs", tol=1e-12)
    iterates = [z0]
    for _ in range(4):  # 5 calls of f: f(z0) and one per step
        iterates.append(_oscillating_map(iterates[-1]))
    residual = [torch.linalg.vector_norm(_oscillating_map(z) - z, dim=1) for z in iterates]
    if returns == "last":
        expected = iterates[-1]
    else:
        index = torch.stack(residual).argmin(0)
        expected = torch.stack(iterates)[index, torch.arange(2)]
    torch.testing.assert_close(sol.z, expected, rtol=0, atol=1e-12)
    truth = torch.linalg.vector_norm(_oscillating_map(sol.z) - sol.z, dim=1)
    torch.testing.assert_close(sol.abs_residual, truth, rtol=1e-12, atol=0)
    assert not sol.converged.any() and sol.status is implicit.Status.MAX_ITER


def test_last_iterate_of_a_sample_that_turns_nonfinite_is_its_last_finite_one():
    calls = []

    def f(z):
        calls.append(z.clone())
        out = 0.5 * z + 1
        if len(calls) == 3:  # the third call poisons sample 1
            out = out.clone()
            out[1] = float("nan")
        return out

    z0 = torch.zeros(2, 3, dtype=torch.float64)
    sol = implicit.solve(f, z0, solver="forward", max_iter=6, policy="ignore", returns="last")
    assert sol.sample_status.tolist() == [implicit.Status.MAX_ITER.code,
                                          implicit.Status.NONFINITE.code]
    assert torch.isfinite(sol.z).all()
    # sample 1 was last finite at the iterate the second call produced, f(f(0))... = z_1
    torch.testing.assert_close(sol.z[1], calls[1][1], rtol=0, atol=0)


def test_returns_is_validated():
    with pytest.raises(ValueError, match="returns must be one of"):
        implicit.make_solver("anderson", returns="final")


def _cell(seed=0, features=4, in_features=3, scale=0.9):
    torch.manual_seed(seed)
    cell = implicit.make_cell("tanh", features=features, in_features=in_features).double()
    with torch.no_grad():
        cell.W.weight.mul_(scale / torch.linalg.matrix_norm(cell.W.weight, ord=2))
    return cell


def _dense_gradients(cell, z, x, upstream, gain=1.0, step=False):
    """``uᵀ ∂f/∂θ`` and ``uᵀ ∂f/∂x`` at ``z`` with ``u = (I − gain · Jᵀ)⁻¹ upstream``, J
    dense; ``step``: the layer returned ``f(z)``, so ``u = y + (I − gain · Jᵀ)⁻¹ Jᵀ y`` (the
    step's own path plus the adjoint of what reaches ``z``)."""
    params = [p for p in cell.parameters()]
    grads_p, grads_x = [torch.zeros_like(p) for p in params], torch.zeros_like(x)
    for i in range(z.shape[0]):
        zi, xi = z[i].detach(), x[i].detach()
        jac = torch.autograd.functional.jacobian(lambda v: cell(v[None], xi[None])[0], zi)
        system = torch.eye(len(zi), dtype=z.dtype) - gain * jac.T
        u = (upstream[i] + torch.linalg.solve(system, jac.T @ upstream[i]) if step
             else torch.linalg.solve(system, upstream[i]))
        xi = xi.clone().requires_grad_()
        out = cell(zi[None], xi[None])[0]
        gs = torch.autograd.grad(out, [*params, xi], u)
        for acc, g in zip(grads_p, gs[:-1]):
            acc += g
        grads_x[i] = gs[-1]
    return grads_p, grads_x


@pytest.mark.parametrize("readout", ["state", "step"])
def test_capped_forward_gets_the_implicit_gradient_at_the_returned_iterate(readout):
    """A forward solve stopped after 3 calls: the gradient is the damped (in training) IFT
    formula evaluated at the iterate it returned (the adjoint solved tightly), for both
    readouts."""
    cell = _cell()
    layer = implicit.DEQ(cell, solver="forward", backward=implicit.make_backward(
        "ift", tol=1e-13, max_iter=400, training_adjoint="damped"), max_iter=3,
        policy="ignore", readout=readout)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert not layer.solution.converged.any()
    z_star = layer.solution.z
    expected_out = cell(z_star, x.detach()) if readout == "step" else z_star
    torch.testing.assert_close(out.detach(), expected_out, rtol=0, atol=1e-14)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    grads_p, grads_x = _dense_gradients(cell, z_star, x, upstream,
                                        gain=1 - layer.backward.damping,
                                        step=readout == "step")
    for p, g in zip(cell.parameters(), grads_p):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(x.grad, grads_x, rtol=1e-8, atol=1e-10)


def test_step_readout_is_one_more_cell_call_and_passes_gradcheck():
    cell = _cell(scale=0.6)
    exact = implicit.make_backward("ift", damping=0.0)
    layer = implicit.DEQ(cell, solver="anderson", backward=exact, tol=1e-11, stop="abs",
                         max_iter=200, readout="step")
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    with pytest.raises(ValueError, match="readout must be one of"):
        implicit.DEQ(cell, solver="anderson", backward="ift", readout="f")


def _dense_adjoint_gradients(cell, z, x, upstream, gain):
    """``uᵀ ∂f/∂θ`` with ``u = (I − gain_i · Jᵀ)⁻¹ upstream`` per sample, J dense (``gain``: a
    number, or one per sample)."""
    params = list(cell.parameters())
    grads = [torch.zeros_like(p) for p in params]
    gains = [float(g) for g in gain] if isinstance(gain, (list, tuple)) else [gain] * len(z)
    for i in range(z.shape[0]):
        zi, xi = z[i].detach(), x[i].detach()
        jac = torch.autograd.functional.jacobian(lambda v: cell(v[None], xi[None])[0], zi)
        u = torch.linalg.solve(torch.eye(len(zi), dtype=z.dtype) - gains[i] * jac.T,
                               upstream[i])
        for acc, g in zip(grads, torch.autograd.grad(cell(zi[None], xi[None])[0], params, u)):
            acc += g
    return grads


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("damping", [0.0, 0.2, 0.7])
def test_ift_damps_its_adjoint_in_training_only(damping, training):
    """The damped formula (exact_below=0: every sample damped in training, however tight its
    forward solve)."""
    cell = _cell(scale=0.95)
    backward = implicit.make_backward("ift", tol=1e-13, max_iter=400, damping=damping,
                                      exact_below=0.0)
    layer = implicit.DEQ(cell, solver="anderson", backward=backward, tol=1e-12, stop="abs",
                         max_iter=300).train(training)
    x = torch.randn(3, 3, dtype=torch.float64)
    out = layer(x)
    assert layer.solution.all_converged
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    gain = 1 - damping if training else 1.0
    expected = _dense_adjoint_gradients(cell, layer.solution.z, x, upstream, gain)
    for p, g in zip(cell.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-10)
    assert layer.backward_solution.all_converged


def test_a_tightly_solved_layer_gives_the_true_derivative_in_training_too():
    """A fresh layer is in training mode: with solves converged far below exact_below its
    gradient is the exact IFT one (gradcheck passes), and its record says nothing was damped."""
    cell = _cell(scale=0.9)
    layer = implicit.DEQ(cell, tol=1e-12, stop="abs", max_iter=300)
    assert layer.training and layer.backward.damping > 0
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    out = layer(x.detach())
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    expected = _dense_adjoint_gradients(cell, layer.solution.z, x, upstream, 1.0)
    for p, g in zip(cell.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-10)
    assert layer.backward_solution.stats["damped"] == 0


def test_training_damps_exactly_the_samples_whose_forward_solve_is_loose():
    """Per sample: a sample saturated by a large input contracts fast and is solved to 1e-13,
    one with a small input stops at the cap far above exact_below; only the second is damped."""
    cell = _cell(scale=0.97)
    backward = implicit.make_backward("ift", tol=1e-13, max_iter=400, training_adjoint="damped")
    layer = implicit.DEQ(cell, solver="forward", backward=backward, tol=1e-13, stop="abs",
                         max_iter=25, policy="ignore")
    x = torch.tensor([[0.05, -0.02, 0.01], [30.0, -30.0, 30.0]], dtype=torch.float64)
    out = layer(x)
    rel = layer.solution.rel_residual
    assert rel[0] > 1e-6 and rel[1] <= backward.exact_below  # the premise, measured
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    gains = [1 - backward.damping, 1.0]
    expected = _dense_adjoint_gradients(cell, layer.solution.z, x, upstream, gains)
    for p, g in zip(cell.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-10)
    assert layer.backward_solution.stats["damped"] == 1


def test_default_training_adjoint_is_calibrated_and_damping_selects_damped():
    """The default in training is "calibrated" (window 6); an explicit damping without a
    training_adjoint selects "damped" (damping=0: the exact adjoint in training, as before the
    default changed); an explicit training_adjoint wins."""
    backward = implicit.make_backward("ift")
    assert (backward.training_adjoint, backward.mix_window) == ("calibrated", 6)
    assert 0 < backward.damping < 1
    assert implicit.make_backward("ift", training_adjoint="averaged").mix_window == 5
    assert implicit.make_backward("ift", damping=0.0).training_adjoint == "damped"
    assert implicit.make_backward("ift", damping=0.3,
                                  training_adjoint="relaxed").training_adjoint == "relaxed"
    with pytest.raises(ValueError, match="damping must be a number in"):
        implicit.make_backward("ift", damping=1.0)
    cell = _cell()
    layer = implicit.DEQ(cell, solver="forward", backward=backward, max_iter=3,
                         policy="ignore")
    x = torch.randn(2, 3, dtype=torch.float64)
    out = layer(x)  # a fresh layer trains: f(z*), the calibrated adjoint's output
    torch.testing.assert_close(out, cell(layer.solution.z, x), rtol=0, atol=1e-14)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.solution.z, rtol=0, atol=0)


class _Affine(torch.nn.Module):
    """z ↦ A z + x, A a parameter (a plain module: the injection is x itself)."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, z, x):
        return z @ self.A.T + x


def test_relaxed_training_adjoint_is_the_truncated_relaxed_series():
    """training_adjoint="relaxed": in training, K = max_iter − 1 steps of w ← (1 − β) w +
    β (Jᵀ w + y) from w = y, last iterate (a dense loop here), also where the series grows
    (a linear cell with the eigenvalues 1.2 and 0.5: the residual then grows, and the last
    iterate is not the best); in eval training_adjoint changes nothing."""
    cell = _Affine(torch.tensor([[0.85, 0.35, 0.0], [0.35, 0.85, 0.0], [0.0, 0.0, 0.3]],
                                dtype=torch.float64))
    backward = implicit.make_backward("ift", tol=1e-14, max_iter=12,
                                      training_adjoint="relaxed", relaxation=0.3)
    layer = implicit.DEQ(cell, solver="forward", backward=backward, tol=1e-13, stop="abs",
                         max_iter=6, policy="ignore")
    x = torch.randn(3, 3, dtype=torch.float64)
    out = layer(x)
    assert not layer.solution.converged.any()  # z* inexact: the relaxed adjoint applies
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    params = list(cell.parameters())
    expected = [torch.zeros_like(p) for p in params]
    z = layer.solution.z
    for i in range(3):
        zi, xi = z[i].detach(), x[i]
        jac = torch.autograd.functional.jacobian(lambda v: cell(v[None], xi[None])[0], zi)
        w = upstream[i].clone()
        for _ in range(backward.max_iter - 1):
            w = 0.7 * w + 0.3 * (jac.T @ w + upstream[i])
        for acc, g in zip(expected, torch.autograd.grad(cell(zi[None], xi[None])[0], params, w)):
            acc += g
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    assert layer.backward_solution.n_calls == backward.max_iter
    assert layer.backward_solution.status is implicit.Status.MAX_ITER  # by design: no warning
    # the premise: for some sample the series grows (its first residual ‖Jᵀ y‖ / ‖y‖ is at
    # most ρ(A) = 1.2), so its best iterate is an earlier one than its last
    assert float(layer.backward_solution.abs_residual.max()) > 1.2
    # in eval training_adjoint changes nothing: the adjoint solver's exact solve, as without it
    grads = {}
    for mode in ("relaxed", "damped"):
        for p in params:
            p.grad = None
        layer = implicit.DEQ(cell, solver="forward", backward=implicit.make_backward(
            "ift", tol=1e-14, max_iter=12, training_adjoint=mode), tol=1e-13, stop="abs",
            max_iter=6, policy="ignore").eval()
        (layer(x) * upstream).sum().backward()
        grads[mode] = [p.grad.clone() for p in params]
    for a, b, r in zip(grads["relaxed"], grads["damped"], expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, r, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="training_adjoint must be one of"):
        implicit.make_backward("ift", training_adjoint="neumann")


def test_averaged_training_adjoint_is_the_windowed_average_iteration():
    """training_adjoint="averaged": in training, from u = 0 (image y) each of max_iter calls
    maps the mean of the last `window` images, F ← Jᵀ mean(F) + y, and the last image is the
    adjoint (a dense loop here, also where the iteration grows: eigenvalue 1.2); a sample whose
    z* is exact gets the exact adjoint; in eval it is the adjoint solver's exact solve."""
    cell = _Affine(torch.tensor([[0.85, 0.35, 0.0], [0.35, 0.85, 0.0], [0.0, 0.0, -0.6]],
                                dtype=torch.float64))
    backward = implicit.make_backward("ift", tol=1e-14, max_iter=9, ridge=None,
                                      training_adjoint="averaged", window=3)
    layer = implicit.DEQ(cell, solver="forward", backward=backward, tol=1e-13, stop="abs",
                         max_iter=6, policy="ignore")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, dtype=torch.float64, generator=gen)
    out = layer(x)
    assert not layer.solution.converged.any()  # z* inexact: the averaged adjoint applies
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    (out * upstream).sum().backward()
    params = list(cell.parameters())
    expected = [torch.zeros_like(p) for p in params]
    jac = cell.A.detach()  # the Jacobian of z ↦ A z + x
    for i in range(3):
        images = [upstream[i].clone()]
        for _ in range(backward.max_iter):
            u = sum(images[-backward.window:]) / len(images[-backward.window:])
            images.append(jac.T @ u + upstream[i])
        w = images[-1]
        zi = layer.solution.z[i].detach()
        for acc, g in zip(expected, torch.autograd.grad(cell(zi[None], x[i][None])[0],
                                                        params, w)):
            acc += g
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    record = layer.backward_solution
    assert record.n_calls == backward.max_iter and record.status is implicit.Status.MAX_ITER
    assert record.solver == "averaged(window=3)" and record.nvjp == backward.max_iter
    # the premise: the iteration grows along the eigenvalue 1.2 (residual above its start)
    assert float(record.abs_residual.max()) > 1.0
    # in eval, the exact adjoint whatever training_adjoint says
    grads = {}
    for mode in ("averaged", "damped"):
        for p in params:
            p.grad = None
        layer = implicit.DEQ(cell, solver="forward", backward=implicit.make_backward(
            "ift", tol=1e-14, max_iter=200, solver="gmres", training_adjoint=mode),
            tol=1e-13, stop="abs", max_iter=6, policy="ignore").eval()
        (layer(x) * upstream).sum().backward()
        grads[mode] = [p.grad.clone() for p in params]
    for a, b, r in zip(grads["averaged"], grads["damped"], expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, r, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="window must be"):
        implicit.make_backward("ift", training_adjoint="averaged", window=0)


def test_averaged_training_adjoint_converges_to_the_exact_adjoint_and_stops():
    """For ρ(J) < 1 the averaged iteration converges to w = (I − Jᵀ)⁻¹ y: given calls enough it
    meets its tol per sample (each stops, records CONVERGED) and the gradient is the exact one."""
    cell = _Affine(torch.tensor([[0.5, 0.2, 0.0], [0.1, -0.4, 0.0], [0.0, 0.3, 0.6]],
                                dtype=torch.float64))
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = {}
    for mode in ("averaged", "exact"):
        for p in cell.parameters():
            p.grad = None
        backward = (implicit.make_backward("ift", tol=1e-12, max_iter=400, ridge=None,
                                           training_adjoint="averaged")
                    if mode == "averaged" else implicit.make_backward("ift", damping=0.0,
                                                                      tol=1e-13, max_iter=100))
        layer = implicit.DEQ(cell, solver="forward", backward=backward, tol=1e-4, max_iter=5,
                             policy="ignore")
        layer(x).sum().backward()
        grads[mode] = [p.grad.clone() for p in cell.parameters()]
        if mode == "averaged":
            record = layer.backward_solution
            assert record.status is implicit.Status.CONVERGED
            assert record.n_calls < 400 and bool((record.nfe <= record.n_calls).all())
    for a, b in zip(grads["averaged"], grads["exact"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_averaged_training_adjoint_ridge_regularises_by_the_batch_scale():
    """ridge=κ: sample i's mix is regularised by κ · mean_j ‖y_j‖² (in its own units,
    κ mean_j ‖y_j‖² / ‖y_i‖²), so a sample with a large gradient is mixed by Anderson's weights
    and one with a small gradient averaged (a per-sample numpy loop here); scaling the loss
    scales the gradient and changes nothing else."""
    import numpy as np

    cell = _Affine(torch.tensor([[0.85, 0.35, 0.0], [0.35, 0.85, 0.0], [0.0, 0.0, -0.6]],
                                dtype=torch.float64))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 3, dtype=torch.float64, generator=gen)
    upstream = torch.randn(3, 3, dtype=torch.float64, generator=gen)
    upstream = upstream * torch.tensor([[0.01], [1.0], [3.0]], dtype=torch.float64)
    grads = []
    for loss_scale in (1.0, 1024.0):
        cell.A.grad = None
        backward = implicit.make_backward("ift", tol=1e-14, max_iter=7, window=3,
                                          ridge=2.0, training_adjoint="averaged")
        layer = implicit.DEQ(cell, solver="forward", backward=backward, tol=1e-13,
                             stop="abs", max_iter=4, policy="ignore")
        (layer(x) * upstream * loss_scale).sum().backward()
        grads.append(cell.A.grad.clone() / loss_scale)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)
    jac = cell.A.detach().numpy()
    z = layer.solution.z.detach()
    norms = upstream.norm(dim=1).numpy()
    expected = torch.zeros_like(cell.A)
    for i in range(3):
        y = upstream[i].numpy() / norms[i]
        ridge = 2.0 * np.mean(norms ** 2) / norms[i] ** 2
        points, images = [np.zeros(3)], [y]
        for _ in range(7):
            F, U = np.array(images[-3:]), np.array(points[-3:])
            G = F - U
            weights = np.linalg.solve(G @ G.T + ridge * np.eye(len(F)), np.ones(len(F)))
            u = (weights / weights.sum()) @ F
            points.append(u)
            images.append(jac.T @ u + y)
        expected += torch.outer(torch.from_numpy(images[-1] * norms[i]), z[i])
    torch.testing.assert_close(grads[0], expected, rtol=1e-10, atol=1e-14)
    # a huge ridge is the plain average (ridge=None), which a small one is not
    plain = {}
    for ridge in (1e12, None):
        cell.A.grad = None
        layer = implicit.DEQ(cell, solver="forward", backward=implicit.make_backward(
            "ift", tol=1e-14, max_iter=7, window=3, ridge=ridge, training_adjoint="averaged"),
            tol=1e-13, stop="abs", max_iter=4, policy="ignore")
        (layer(x) * upstream).sum().backward()
        plain[ridge] = cell.A.grad.clone()
    torch.testing.assert_close(plain[1e12], plain[None], rtol=1e-8, atol=1e-12)
    assert not torch.allclose(grads[0], plain[None], rtol=1e-3, atol=1e-8)
    with pytest.raises(ValueError, match="ridge must be None .* or a positive number"):
        implicit.make_backward("ift", training_adjoint="averaged", ridge=0.0)


def _calibrated_reference(jac, y, unit, ridge, window, calls, lowest=True):
    """The calibrated adjoint of one sample (numpy): the averaged iteration in units of its
    ‖y‖, ridge κ·unit/‖y‖², returning the image of lowest ‖F − u‖/‖F‖ from the second call
    (``lowest=False``: the last image)."""
    import numpy as np

    size = np.linalg.norm(y)
    target = y / size
    c = ridge * unit / size ** 2
    points, images = [np.zeros_like(target)], [target]
    kept, kept_rel = None, np.inf
    for call in range(1, calls + 1):
        F, U = np.array(images[-window:]), np.array(points[-window:])
        G = F - U
        weights = np.linalg.solve(G @ G.T + c * np.eye(len(F)), np.ones(len(F)))
        u = (weights / weights.sum()) @ F
        points.append(u)
        images.append(jac.T @ u + target)
        rel = np.linalg.norm(images[-1] - u) / np.linalg.norm(images[-1])
        if call <= 2 or rel < kept_rel or not lowest:
            kept, kept_rel = images[-1], rel
    return kept * size


def _growing_problem(seed):
    """A linear cell's matrix with the eigenvalue 1.2 (the averaged iteration grows, so its
    lowest-residual image is not its last), two batches of inputs, and two upstream gradients
    a hundred times apart in size."""
    A = torch.tensor([[0.85, 0.35, 0.0], [0.35, 0.85, 0.0], [0.0, 0.0, -0.6]],
                     dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(3, 3, dtype=torch.float64, generator=gen) for _ in range(2)]
    ups = [torch.randn(3, 3, dtype=torch.float64, generator=gen),
           0.01 * torch.randn(3, 3, dtype=torch.float64, generator=gen)]
    return A, xs, ups


def test_calibrated_training_adjoint_is_torchdeqs_gradient_made_scale_free():
    """training_adjoint="calibrated": in training the layer returns f(z*) with the graph of
    that step; the gradient is (∂f/∂θ at z*)ᵀ w with w the averaged iteration (Jacobian at
    f(z*)) returning its lowest-residual image, the ridge in units of the first training
    batch's mean ‖y‖² — kept for later batches; scaling every loss by c changes nothing but
    the gradients' scale; in eval it is the exact adjoint at z*."""
    import numpy as np

    A, xs, ups = _growing_problem(8)
    runs = []
    for loss_scale in (1.0, 64.0):
        cell = _Affine(A)
        backward = implicit.make_backward("ift", tol=1e-14, max_iter=8, window=3, ridge=2.0,
                                          training_adjoint="calibrated")
        layer = implicit.DEQ(cell, solver="forward", backward=backward, tol=1e-13,
                             stop="abs", max_iter=4, policy="ignore")
        grads, chosen = [], []
        for x, up in zip(xs, ups):
            cell.A.grad = None
            out = layer(x)
            z = layer.solution.z.detach()
            assert not layer.solution.converged.any()
            torch.testing.assert_close(out, z @ A.T + x, rtol=1e-12, atol=1e-14)  # f(z*)
            (out * up * loss_scale).sum().backward()
            grads.append(cell.A.grad.clone() / loss_scale)
            chosen.append(z)
        runs.append((grads, chosen, layer))
    (grads, zs, first), (scaled, _, _) = runs
    for a, b in zip(grads, scaled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)
    unit = float((ups[0] ** 2).sum(dim=1).mean())  # the first batch's mean ‖y‖²
    memory = first.state_dict()["_extra_state"]["backward_memory"]
    assert memory == {"ift:calibrated": {"mean_square": pytest.approx(unit)}}
    jac = A.numpy()
    lowest_differs = False
    for grad, z, up in zip(grads, zs, ups):
        expected = torch.zeros_like(A)
        for i in range(3):
            w = _calibrated_reference(jac, up[i].numpy(), unit, 2.0, 3, 8)
            expected += torch.outer(torch.from_numpy(w), z[i])
            last = _calibrated_reference(jac, up[i].numpy(), unit, 2.0, 3, 8, lowest=False)
            lowest_differs |= not np.allclose(w, last)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-14)
    assert lowest_differs
    # in eval: the exact adjoint at z*, output z*
    layer.eval()
    cell = layer.cell
    cell.A.grad = None
    out = layer(xs[0])
    torch.testing.assert_close(out, layer.solution.z, rtol=0, atol=0)


def test_calibrated_training_adjoint_refuses_create_graph_and_tight_solves_are_exact():
    """The calibrated adjoint is first order: backward with create_graph=True through a loose
    solve in training raises an error that names the way out; a layer whose forward solve is
    at or below exact_below gets the exact adjoint, whose second derivative equals backprop
    through the unrolled iterations."""
    cell = _cell(scale=0.6)
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loose = implicit.DEQ(cell, solver="forward", max_iter=3, policy="ignore")
    xr = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="training_adjoint='damped'"):
        torch.autograd.grad(loose(xr).pow(2).sum(), xr, create_graph=True)
    hessians = []
    for backward in ("ift", "unrolled"):
        layer = implicit.DEQ(cell, solver="forward", backward=backward, tol=1e-14, stop="abs",
                             max_iter=200)
        assert layer.training
        xr = x.clone().requires_grad_()
        (forces,) = torch.autograd.grad(layer(xr).pow(2).sum(), xr, create_graph=True)
        hessians.append(torch.autograd.grad(forces.pow(2).sum(), xr)[0])
    torch.testing.assert_close(hessians[0], hessians[1], rtol=1e-8, atol=1e-10)


def test_calibrated_unit_is_the_layers_and_survives_a_state_dict_round_trip():
    """The calibrated ridge's unit is fixed by a layer's first training batch and saved in its
    state_dict: a fresh layer loaded from it forms the same gradient on the next batch as the
    original (a fresh layer that is not loaded calibrates on that batch instead, and differs);
    two layers sharing one strategy keep their own units; a state_dict without the extra state
    (saved before it existed) loads."""
    A, xs, ups = _growing_problem(5)
    shared = implicit.make_backward("ift", max_iter=8, window=3)

    def layer():
        return implicit.DEQ(_Affine(A), solver="forward", backward=shared, tol=1e-13,
                            stop="abs", max_iter=4, policy="ignore")

    def grad(net, x, up):
        net.cell.A.grad = None
        (net(x) * up).sum().backward()
        return net.cell.A.grad.clone()

    first = layer()
    grad(first, xs[0], ups[0])
    state = first.state_dict()
    unit = state["_extra_state"]["backward_memory"]["ift:calibrated"]["mean_square"]
    assert unit == pytest.approx(float((ups[0] ** 2).sum(dim=1).mean()))
    resumed, fresh = layer(), layer()
    resumed.load_state_dict(state)
    want = grad(first, xs[1], ups[1])
    torch.testing.assert_close(grad(resumed, xs[1], ups[1]), want, rtol=0, atol=0)
    assert not torch.allclose(grad(fresh, xs[1], ups[1]), want)  # calibrated on batch 2
    fresh_unit = fresh.state_dict()["_extra_state"]["backward_memory"]["ift:calibrated"]
    assert fresh_unit["mean_square"] != pytest.approx(unit)  # the shared strategy's layers
    old = {k: v for k, v in state.items() if k != "_extra_state"}
    reloaded = layer()
    reloaded.load_state_dict(old)  # strict
    assert reloaded.state_dict()["_extra_state"] == {"backward_memory": {}}
