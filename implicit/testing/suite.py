"""The contract suite (collected only when run by ``implicit verify`` or the opt-in plugin)."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from implicit.testing.checks import check_gradient_contract, check_solver_contract

MAX_EXAMPLES = int(os.environ.get("IMPLICIT_VERIFY_MAX_EXAMPLES", "10"))
VERIFY = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                  max_examples=MAX_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])


@settings(VERIFY)
@given(data=st.data())
def test_solver_contract(contract_registry, contract_solver_case, data):
    solver, cell = contract_solver_case
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    example = data.draw(contract_registry.get("cell", cell).spec.strategy(dtype=dtype),
                        label="example")
    tol = data.draw(st.sampled_from([1e-3, 1e-5] if dtype == torch.float32 else [1e-5, 1e-9]),
                    label="tol")
    stop = data.draw(st.sampled_from(["abs", "rel"]), label="stop")
    max_iter = data.draw(st.integers(1, 60), label="max_iter")
    check_solver_contract(contract_registry, solver, example, tol=tol, stop=stop,
                          max_iter=max_iter)


@settings(VERIFY, max_examples=max(1, min(4, MAX_EXAMPLES)))
@given(data=st.data())
def test_gradient_contract(contract_registry, contract_gradient_case, data):
    backward, solver, cell = contract_gradient_case
    example = data.draw(contract_registry.get("cell", cell).spec.strategy(dtype=torch.float64),
                        label="example")
    check_gradient_contract(contract_registry, backward, solver, example)
