"""The shipped contract suite (`implicit.testing`) over every registered built-in combination.

This is `implicit verify` with no selection — the same run a third-party author puts in CI — so
CI checks every property of the suite (truthful records, budgets, structure, determinism, NaN
reporting, batch rows, gradients vs finite differences and dense adjoints, phantom's bound, no
leaks) for all built-in solvers × cells × backwards.
"""

from __future__ import annotations

import implicit
from implicit.cli import verify
from implicit.testing import matrix


def test_every_builtin_combination_has_contract_cases():
    registry = implicit.get_registry()
    cases = matrix(registry)
    names = {kind: {str(c) for c in found} for kind, found in cases.items()}
    for solver in registry.names("solver"):
        if "linear_only" in registry.get("solver", solver).spec.capabilities:
            assert any(f"adjoint={solver}]" in n for n in names["adjoint"])
            # the record, budget and fault contracts on the suite's own affine problem
            for kind in ("solver", "fault", "batch_rows"):
                assert f"{solver}-affine" in names[kind], (kind, solver)
        else:
            assert any(n.startswith(f"{solver}-") for n in names["solver"])
    for backward in registry.names("backward"):
        assert any(n.startswith(f"{backward}-") for n in names["gradient"])
    # every built-in solver claims a theorem, and gets its efficacy contract
    for solver in registry.names("solver"):
        assert any(n.startswith(f"{solver}-") for n in names["efficacy"]), solver
    # every exact backward runs with every solver it can take, on the cheap cells
    for solver in ("anderson", "broyden", "newton_krylov"):
        assert f"ift-{solver}-tanh" in names["gradient"]
    assert all(cases.values())


def test_implicit_verify_passes_on_all_builtins(capsys):
    assert verify(max_examples=10) == 0
    out = capsys.readouterr().out
    assert "failed" not in out
