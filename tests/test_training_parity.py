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
