"""The training-parity benchmark's pieces: the tutorial's Anderson as written there, the variant
parser, and a short side-by-side run on digits (the MNIST-1D runs are the benchmark itself)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location(
        "training_parity", ROOT / "benchmarks" / "training_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorial_anderson_solves_a_linear_contraction(parity):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a *= 0.9 / torch.linalg.matrix_norm(a, ord=2)
    b = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - a, b.T).T
    for keep in ("last", "best"):
        z, res = parity.tutorial_anderson(lambda z: z @ a.T + b, torch.zeros_like(b), lam=1e-12,
                                          tol=1e-10, max_iter=40, keep=keep)
        torch.testing.assert_close(z, exact, rtol=1e-9, atol=1e-9)
        assert res[-1] < 1e-10


def test_tutorial_anderson_with_a_dominant_ridge_averages(parity):
    """The accident the benchmark found: with the absolute ridge far above ‖g‖², the mix is
    the plain average of the stored f(x) (uniform weights)."""
    b = 1e-4 * torch.ones(1, 3, dtype=torch.float64)
    stats = {}
    z, _ = parity.tutorial_anderson(lambda z: 0.5 * z + b, torch.zeros_like(b), lam=1e-4,
                                    tol=0.0, max_iter=3, stats=stats)
    # iterates: x0 = 0, x1 = f(0) = b; then x2 = (f(x0) + f(x1)) / 2 = (b + 1.5 b) / 2
    torch.testing.assert_close(z, 1.25 * b, rtol=1e-3, atol=0)
    assert stats["ridge_share"] > 0.99


def test_variants_parse_and_reject_unknown_names(parity):
    assert parity.parse_variant("implicit:backward.damping=0.2,readout=step") == (
        "implicit", {"backward.damping": 0.2, "readout": "step"})
    with pytest.raises(SystemExit, match="unknown variant"):
        parity.parse_variant("tutorail")
    with pytest.raises(SystemExit, match="key=value"):
        parity.parse_variant("implicit:readout")


def test_side_by_side_run_on_digits(parity, tmp_path):
    runs = [parity.train(v, data="digits", epochs=2, seed=0, channels=8, inner_channels=16,
                         diagnose_every=10, log=lambda *a: None)
            for v in ("tutorial", "implicit")]
    for run in runs:
        assert run["test_accuracy"] > 0.3 and len(run["history"]) == 2  # chance: 0.1
        assert 0 < run["diagnostics"][0]["rho_mean"] < 2
    summary = parity.summarize(runs)
    assert set(summary) == {"tutorial", "implicit"}
    parity.plot(runs, tmp_path / "curves.png", "digits")
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("data, dims, length", [("mnist1d", 1, 40), ("digits", 2, 8)])
@pytest.mark.parametrize("norm, head", [("batch", "flatten"), ("group", "pool")])
def test_model_axes_build_the_model_asked_for(parity, data, dims, length, norm, head):
    model = parity.build_model("implicit", {}, dims=dims, length=length, seed=0, channels=8,
                               inner_channels=16, norm=norm, head=head, groups=4,
                               stem_kernel=5)
    norms = [m for m in model if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm1d,
                                                torch.nn.BatchNorm2d))]
    assert len(norms) == 2 and all(isinstance(m, torch.nn.GroupNorm) == (norm == "group")
                                   for m in norms)
    assert model[0].kernel_size[0] == 5
    positions = 4 if head == "pool" else (length // 4) ** dims
    assert model[-1].in_features == 8 * positions
    x = torch.randn(2, 1, *([length] * dims))
    assert model.eval()(x).shape == (2, 10)


def test_half_swaps_keep_the_other_half(parity):
    """tutorial:forward=implicit solves with the library (per-sample stop), the rest the
    tutorial's; implicit:forward=tutorial hands the tutorial's z* to a one-call DEQ."""
    torch.manual_seed(0)
    cell = parity.implicit.make_cell("tanh", features=6, in_features=6)
    x = torch.randn(4, 6)
    swapped = parity.tutorial_layer(cell, forward="implicit", tol=1e-6, max_iter=60)
    z = swapped(x)
    torch.testing.assert_close(z, cell(swapped.z_star, x))  # the tutorial's f(z*) readout
    assert float((cell(z, x) - z).detach().norm(dim=1).max()) < 1e-4
    other = parity.implicit_layer(cell, forward="tutorial", tol=1e-6, max_iter=60)
    out = other(x)
    assert other.deq.solution.n_calls == 1  # z* came from the tutorial's solve
    assert out.requires_grad
    out.sum().backward()
    assert all(p.grad is not None for p in cell.parameters())


@pytest.fixture(scope="module")
def family():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "training_family", ROOT / "benchmarks" / "training_family.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_family_collects_cached_runs_into_the_table(family, tmp_path):
    setup = next(iter(family.FAMILY))
    for seed, (tut, ours, secs) in enumerate([(0.95, 0.96, 50.0), (0.93, 0.90, 40.0)]):
        for variant, acc, t in (("tutorial", tut, 100.0), ("implicit", ours, secs)):
            family.run_path(tmp_path, setup, variant, 10, seed).write_text(
                '{"test_accuracy": %r, "train_seconds": %r}' % (acc, t))
    found = family.collect(tmp_path, [setup], ["tutorial", "implicit"], 10, [0, 1, 2])
    ours = found[setup]["implicit"]
    assert ours["seeds"] == [0, 1] and ours["accuracy_mean"] == pytest.approx(93.0)
    assert ours["time_ratio_to_tutorial"] == pytest.approx(0.45)
    row = family.table(found, ["tutorial", "implicit"]).splitlines()[2]
    assert row.startswith(f"| {setup} | 94.0 ± 1.4 (2) | 93.0 ± 4.2 (2) | -1.0 |")
