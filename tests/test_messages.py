"""First contact: defaults, the version, and messages for the mistakes newcomers make."""

from __future__ import annotations

import importlib.resources

import pytest
import torch

import implicit
from implicit.cli import main


@pytest.mark.parametrize("option, value, expected", [
    ("policy", "rise", "policy must be one of 'warn', 'raise', 'ignore', got 'rise' "
                       "(did you mean 'raise'?)"),
    ("stop", "relative", "stop must be one of 'abs', 'rel', got 'relative' (did you mean 'rel'?)"),
])
def test_a_mistyped_choice_names_the_choices_and_the_closest(option, value, expected):
    with pytest.raises(ValueError) as info:
        implicit.make_solver("anderson", **{option: value})
    assert expected in str(info.value) and "Attribute(" not in str(info.value)
    cell = implicit.make_cell("tanh", features=4)
    with pytest.raises(ValueError) as info:
        implicit.DEQ(cell, **{option: value})
    assert expected in str(info.value) and "Attribute(" not in str(info.value)


def test_deq_has_recommended_defaults():
    layer = implicit.DEQ(implicit.make_cell("tanh", features=4))
    assert layer.solver.name == "anderson" and layer.backward.name == "ift"
    z = layer(torch.randn(3, 4))
    z.sum().backward()
    assert layer.solution.status is implicit.Status.CONVERGED


def test_a_solver_option_given_to_deq_points_to_solver_options():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) m\. Solver and "
                                        r"backward options go in solver_options="):
        implicit.DEQ(implicit.make_cell("tanh", features=4), m=10)


@pytest.mark.parametrize("x, named", [
    (torch.ones(3, 4, dtype=torch.int64), r"x has dtype torch.int64 \(an integer tensor\) but "
                                          r"the cell's parameters are torch.float32"),
    (torch.ones(3, 4, dtype=torch.float64), r"x has dtype torch.float64 but the cell's "
                                            r"parameters are torch.float32; make them the same"),
])
def test_an_input_of_another_dtype_says_so(x, named):
    layer = implicit.DEQ(implicit.make_cell("tanh", features=4))
    with pytest.raises(TypeError, match=named):
        layer(x)


def test_an_input_on_another_device_says_so():
    class OnAnotherDevice(torch.nn.Module):  # parameters on "meta", x on the CPU
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4, device="meta")

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    layer = implicit.DEQ(OnAnotherDevice())
    with pytest.raises(ValueError, match="x is on cpu but the cell's parameters are on meta"):
        layer(torch.ones(3, 4))


def test_a_misspelt_adjoint_solver_fails_when_the_backward_is_made():
    with pytest.raises(implicit.UnknownPluginError, match="gmress"):
        implicit.make_backward("ift", solver="gmress")


def test_cli_number_options_say_what_they_expected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--tol", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "expected a number >= 0 (e.g. 1e-4), got 'abc'" in err and "_nonnegative" not in err
    with pytest.raises(SystemExit):
        main(["bench", "--max-iter", "ten"])
    assert "expected a whole number >= 1, got 'ten'" in capsys.readouterr().err


def test_version_and_typed_package(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"implicit-layers {implicit.__version__}") and "torch" in out
    assert importlib.resources.files("implicit").joinpath("py.typed").is_file()
