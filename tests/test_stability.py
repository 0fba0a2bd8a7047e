"""Stability tools: Hutchinson ‖J‖_F², spectral ‖J‖₂, normalised weights held for a solve, and
the DEQ's Jacobian-regularisation options."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import implicit
from implicit.stability import (
    jacobian_frobenius,
    jacobian_spectral_norm,
    normalize_weights,
)

# the exact IFT gradient in training too (the default damps its adjoint there)
EXACT_IFT = implicit.make_backward("ift", damping=0.0)

ROOT = Path(__file__).resolve().parents[1]


def tiny_tanh(features: int, batch: int, seed: int, scale: float = 0.6):
    torch.manual_seed(seed)
    cell = implicit.make_cell("tanh", features=features, init_scale=scale).double()
    x = torch.randn(batch, features, dtype=torch.float64)
    z = torch.randn(batch, features, dtype=torch.float64)
    return cell, x, z


def dense_jacobians(fn, z: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """(B, n, n) per-sample Jacobians of a batch-independent map, densely."""
    full = torch.autograd.functional.jacobian(fn, z, create_graph=create_graph)
    idx = torch.arange(z.shape[0])
    return full[idx, :, idx, :]


@given(features=st.integers(2, 6), batch=st.integers(1, 3), seed=st.integers(0, 10_000),
       probe=st.sampled_from(["gaussian", "rademacher"]))
@settings(max_examples=25)
def test_hutchinson_is_within_its_standard_error_of_the_exact_frobenius_norm(
        features, batch, seed, probe):
    cell, x, z = tiny_tanh(features, batch, seed)
    fn = lambda s: cell(s, x)  # noqa: E731
    probes = 64
    gen = torch.Generator().manual_seed(seed)
    samples = jacobian_frobenius(fn, z, probes=probes, probe=probe, generator=gen,
                                 create_graph=False, per_probe=True)
    assert samples.shape == (probes, batch)
    exact = dense_jacobians(fn, z).pow(2).sum(dim=(1, 2)) / features
    estimate, sigma = samples.mean(0), samples.std(0)
    # a statistical bound: 3 standard errors (Rademacher probes are exact for diagonal JJᵀ)
    bound = 3 * sigma / math.sqrt(probes) + 1e-12 * (1 + exact)
    assert ((estimate - exact).abs() <= bound).all(), (estimate, exact, bound)


def test_hutchinson_gradient_reaches_the_parameters_exactly():
    """With the probes fixed, the estimate is (1/P) Σ ‖Jᵀv‖² / n: its parameter gradient must
    equal the gradient of that expression built from the dense Jacobian."""
    cell, x, z = tiny_tanh(5, 3, seed=1)
    probes = 4
    estimate = jacobian_frobenius(lambda s: cell(s, x), z, probes=probes,
                                  generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad(estimate.sum(), [cell.W.weight, cell.U.weight])

    gen = torch.Generator().manual_seed(7)
    vs = [torch.randn(z.shape, dtype=z.dtype, generator=gen) for _ in range(probes)]
    J = dense_jacobians(lambda s: cell(s, x), z, create_graph=True)
    dense = sum((torch.einsum("bi,bij->bj", v, J) ** 2).sum(1) for v in vs) / probes / 5
    want = torch.autograd.grad(dense.sum(), [cell.W.weight, cell.U.weight])
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@given(features=st.integers(2, 7), batch=st.integers(1, 3), seed=st.integers(0, 10_000))
@settings(max_examples=20)
def test_spectral_norm_estimate_matches_dense_svd(features, batch, seed):
    cell, x, z = tiny_tanh(features, batch, seed, scale=1.0)
    fn = lambda s: cell(s, x)  # noqa: E731
    estimate = jacobian_spectral_norm(fn, z, iters=1000, tol=1e-12,
                                      generator=torch.Generator().manual_seed(seed))
    exact = torch.linalg.matrix_norm(dense_jacobians(fn, z), ord=2)
    torch.testing.assert_close(estimate, exact, rtol=1e-3, atol=1e-9)


def test_spectral_norm_of_a_rotation_is_found_where_plain_power_iteration_cycles():
    """J = 0.9 × a rotation: its dominant eigenvalues are a complex pair (plain power iteration
    on J never settles), ‖J‖₂ = 0.9."""
    theta = 0.7
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)],
                        [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    z = torch.randn(4, 2, dtype=torch.float64)
    estimate = jacobian_spectral_norm(lambda s: 0.9 * s @ rot.T, z, iters=5)
    torch.testing.assert_close(estimate, torch.full((4,), 0.9, dtype=torch.float64))


def test_estimators_reject_bad_options():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="probe must be one of"):
        jacobian_frobenius(lambda s: s, z, probe="uniform")
    with pytest.raises(ValueError, match="probes must be an int >= 1"):
        jacobian_frobenius(lambda s: s, z, probes=0)
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        jacobian_spectral_norm(lambda s: s, z, iters=0)
    with pytest.raises(ValueError, match="same shape"):
        jacobian_spectral_norm(lambda s: s[:, :2], z)


def make_layer(**options):
    torch.manual_seed(0)
    cell = implicit.make_cell("tanh", features=6).double()
    return implicit.DEQ(cell, solver="anderson", backward=EXACT_IFT, tol=1e-10, **options)


def test_deq_jacobian_loss_is_differentiable_and_reported():
    layer = make_layer(jac_loss_weight=2.0, jac_probes=3)
    x = torch.randn(4, 6, dtype=torch.float64)
    z = layer(x)
    loss = layer.jacobian_loss
    assert loss.requires_grad and loss.shape == ()
    stats = layer.solution.stats["jac_frobenius"]
    assert stats.shape == (4,) and not stats.requires_grad
    torch.testing.assert_close(loss.detach(), 2.0 * stats.mean())
    (grad,) = torch.autograd.grad(loss, layer.cell.W.weight, retain_graph=True)
    assert grad.abs().max() > 0
    z.sum().backward()  # the task gradient is unaffected by the extra graph


def test_deq_jacobian_loss_frequency_and_modes():
    x = torch.randn(4, 6, dtype=torch.float64)
    never = make_layer(jac_loss_weight=1.0, jac_loss_freq=0.0)
    never(x)
    assert never.jacobian_loss is not None and float(never.jacobian_loss) == 0
    assert "jac_frobenius" not in never.solution.stats
    off = make_layer()
    off(x)
    assert off.jacobian_loss is None
    on = make_layer(jac_loss_weight=1.0)
    on.eval()
    on(x)
    assert on.jacobian_loss is None  # training only
    torch.manual_seed(3)
    half = make_layer(jac_loss_weight=1.0, jac_loss_freq=0.5)
    drawn = 0
    for _ in range(40):
        half(x)
        drawn += "jac_frobenius" in half.solution.stats
    assert 8 < drawn < 32


@pytest.mark.parametrize("option, value, message", [
    ("jac_loss_weight", -1.0, "jac_loss_weight must be a number"),
    ("jac_loss_freq", 1.5, "jac_loss_freq must be a number in"),
    ("jac_probes", 0, "jac_probes must be an int >= 1"),
    ("spectral_iters", -2, "spectral_iters must be an int >= 0"),
    ("jac_probe", "normal", "jac_probe must be one of"),
])
def test_deq_rejects_bad_stability_options(option, value, message):
    with pytest.raises(ValueError, match=message):
        make_layer(**{option: value})


def test_deq_reports_the_spectral_norm_at_the_fixed_point():
    layer = make_layer(spectral_iters=500)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        z = layer(x)
    got = layer.solution.stats["jac_spectral_norm"]
    exact = torch.linalg.matrix_norm(dense_jacobians(lambda s: layer.cell(s, x), z), ord=2)
    torch.testing.assert_close(got, exact, rtol=1e-3, atol=1e-9)
    assert (got < 1).all()  # the default tanh cell is a contraction at z*


class CountCalls(nn.Module):
    """An identity parametrization counting how often the chain is evaluated."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return w


def test_parametrization_walk_agrees_with_torch_on_nested_shared_and_removed_ones():
    # the DEQ's per-forward check (a walk over _modules) against torch's is_parametrized on
    # every submodule: deep nesting, a submodule shared twice, a None child, and removal
    from implicit.stability import _has_parametrizations, parametrized_tensors

    def torch_says(module):
        return any(parametrize.is_parametrized(m) for m in module.modules())

    inner = nn.Linear(3, 3)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Sequential(nn.Tanh(), nn.Sequential(inner)), shared, shared)
    model.register_module("empty", None)
    assert _has_parametrizations(model) is torch_says(model) is False
    parametrize.register_parametrization(inner, "weight", CountCalls())
    assert _has_parametrizations(model) is torch_says(model) is True
    parametrize.remove_parametrizations(inner, "weight")
    assert _has_parametrizations(model) is torch_says(model) is False
    parametrize.register_parametrization(shared, "bias", CountCalls())
    assert _has_parametrizations(model) is torch_says(model) is True
    assert set(parametrized_tensors(model)) == {"1.bias"}


@pytest.mark.parametrize("backward", ["ift", "phantom", "unrolled"])
def test_spectral_norm_weight_is_computed_once_per_forward_and_held(backward):
    torch.manual_seed(0)
    cell = normalize_weights(implicit.make_cell("tanh", features=6).double(), "spectral")
    counter = CountCalls()
    parametrize.register_parametrization(cell.W, "weight", counter)
    solver = "forward" if backward == "unrolled" else "anderson"
    layer = implicit.DEQ(cell, solver=solver, backward=backward, tol=1e-8, max_iter=200)
    layer.train()
    u_before = cell.W.parametrizations.weight[0]._u.clone()
    counter.calls = 0  # registration evaluates the chain once
    x = torch.randn(3, 6, dtype=torch.float64)
    z = layer(x)
    z.sum().backward()
    assert layer.solution.n_calls > 3
    assert counter.calls == 1  # one evaluation for the solve, its injection and the backward
    assert not torch.equal(cell.W.parametrizations.weight[0]._u, u_before)  # one power step
    original = cell.W.parametrizations.weight.original
    assert original.grad is not None and original.grad.abs().max() > 0
    assert layer.solution.converged.all()


def test_weight_normalised_cell_has_exact_ift_gradients():
    torch.manual_seed(0)
    cell = normalize_weights(implicit.make_cell("tanh", features=4).double(), "weight")
    layer = implicit.DEQ(cell, solver="anderson", backward=EXACT_IFT, tol=1e-12, max_iter=200)
    x = torch.randn(2, 4, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    assert any("original0" in n for n in names) and any("original1" in n for n in names)
    params = dict(layer.named_parameters())

    def output(*values):
        return torch.func.functional_call(layer, dict(zip(params, values)), (x,))

    assert torch.autograd.gradcheck(output, tuple(p.detach().requires_grad_() for p in
                                                  params.values()))


def test_hook_based_spectral_norm_is_flagged():
    cell = implicit.make_cell("tanh", features=4)
    nn.utils.spectral_norm(cell.W)
    with pytest.warns(implicit.EquilibriumWarning, match="parametrizations.spectral_norm"):
        implicit.DEQ(cell, solver="forward", backward=EXACT_IFT)


def test_normalize_weights_rejects_bad_input():
    with pytest.raises(ValueError, match="kind must be"):
        normalize_weights(implicit.make_cell("tanh", features=4), "batch")
    with pytest.raises(ValueError, match="no Linear"):
        normalize_weights(nn.Tanh())


def test_jacobian_term_shortens_the_forward_solves_after_training():
    """The benchmark script's experiment at reduced size: the same tanh DEQ trained with the
    Jacobian term needs fewer forward calls to tolerance than without it."""
    spec = importlib.util.spec_from_file_location(
        "jacobian_regularization", ROOT / "benchmarks" / "jacobian_regularization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plain = module.train(0.0, steps=100, features=32, seed=0, lr=3e-3)
    regularised = module.train(10.0, steps=100, features=32, seed=0, lr=3e-3)
    assert regularised["frobenius_mean"] < plain["frobenius_mean"]
    assert regularised["n_calls_eval"] < plain["n_calls_eval"]
