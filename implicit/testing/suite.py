"""The contract suite (collected only when run by ``implicit verify`` or the opt-in plugin).

Each test is parametrised over the registry by :mod:`implicit.testing.plugin` (ids = plugin
names) and draws instances from the cells' Hypothesis strategies. Convergence itself is asserted
only where it is guaranteed; elsewhere it is recorded as a Hypothesis event (see
``--hypothesis-show-statistics``).
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from implicit.registry import use_registry
from implicit.testing import checks

#: examples per case: ``IMPLICIT_VERIFY_MAX_EXAMPLES`` (``implicit verify --max-examples``), else
#: the profile ``IMPLICIT_VERIFY_PROFILE``: ``ci`` (default, 10) or ``nightly`` (100)
PROFILES = {"ci": 10, "nightly": 100}


def max_examples() -> int:
    if "IMPLICIT_VERIFY_MAX_EXAMPLES" in os.environ:
        return int(os.environ["IMPLICIT_VERIFY_MAX_EXAMPLES"])
    profile = os.environ.get("IMPLICIT_VERIFY_PROFILE", "ci")
    if profile not in PROFILES:
        raise ValueError(f"IMPLICIT_VERIFY_PROFILE must be one of {sorted(PROFILES)}, got "
                         f"{profile!r}")
    return PROFILES[profile]


MAX_EXAMPLES = max_examples()
VERIFY = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                  max_examples=MAX_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])


def _few(n: int) -> int:
    """A smaller count for the costlier tests, scaled up with the nightly profile."""
    return max(1, min(n * max(1, MAX_EXAMPLES // 10), MAX_EXAMPLES))


@settings(VERIFY)
@given(data=st.data())
def test_solver_contract(contract_solver_case, data):
    case = contract_solver_case
    with use_registry(case.registry):  # plugin names resolve in the case's registry
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
        example = case.example(data.draw, dtype)
        tols = [1e-3, 1e-5] if dtype == torch.float32 else [1e-5, 1e-9]
        tol = data.draw(st.sampled_from(tols), label="tol")
        stop = data.draw(st.sampled_from(["abs", "rel"]), label="stop")
        max_iter = data.draw(st.integers(1, 60), label="max_iter")
        converged = checks.check_solver_contract(case.registry, case.solver, example, tol=tol,
                                                 stop=stop, max_iter=max_iter)
        event(f"{case}: {'all converged' if converged else 'not all converged'}")
        checks.check_nonfinite(case.registry, case.solver, example, case.batch_independent)


@settings(VERIFY, max_examples=_few(3))
@given(data=st.data())
def test_batch_rows_match_solving_alone(contract_batch_rows_case, data):
    case = contract_batch_rows_case
    with use_registry(case.registry):  # plugin names resolve in the case's registry
        checks.check_batch_rows(case.registry, case.solver, case.example(data.draw, torch.float64))


@settings(VERIFY, max_examples=_few(4))
@given(data=st.data())
def test_gradient_contract(contract_gradient_case, data):
    case = contract_gradient_case
    with use_registry(case.registry):  # plugin names resolve in the case's registry
        checks.check_gradient_contract(case.registry, case.backward, case.solver,
                                       case.example(data.draw, torch.float64))


@settings(VERIFY, max_examples=_few(2))
@given(data=st.data())
def test_adjoint_solver_contract(contract_adjoint_case, data):
    case = contract_adjoint_case
    with use_registry(case.registry):  # plugin names resolve in the case's registry
        error = checks.check_adjoint(case.registry, case.backward, case.solver,
                                     case.example(data.draw, torch.float64),
                                     adjoint=case.adjoint)
        event(f"{case}: " + ("checked" if error is not None
                             else "no claim (a solve did not converge)"))


@settings(VERIFY, max_examples=1)
@given(data=st.data())
def test_no_leak_over_50_steps(contract_leak_case, data):
    case = contract_leak_case
    with use_registry(case.registry):  # plugin names resolve in the case's registry
        checks.check_no_leak(case.registry, case.backward, case.solver,
                             case.example(data.draw, torch.float64), steps=50)
