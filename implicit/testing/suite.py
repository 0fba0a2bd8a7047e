"""The contract suite (collected only when run by ``implicit verify`` or the opt-in plugin).

Each test is parametrised over the registry by :mod:`implicit.testing.plugin` (ids = plugin
names) and draws instances — and each plugin's options, from its declared ``option_strategy``
— with Hypothesis. Every case counts what it claimed on its examples (a
:class:`~implicit.testing.claims.Tally`) and fails as *vacuous* when a required claim was made
on fewer than half of them; ``implicit verify --report`` prints the counts.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from implicit.registry import use_registry
from implicit.testing import checks, loop
from implicit.testing.claims import Tally, record

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


def shrink() -> bool:
    """``IMPLICIT_VERIFY_SHRINK=0`` (``implicit verify --no-shrink``): report the first failing
    example instead of a minimal one — much faster when a plugin is broken."""
    value = os.environ.get("IMPLICIT_VERIFY_SHRINK", "1").strip().lower()
    if value not in ("0", "false", "no", "off", "1", "true", "yes", "on"):
        raise ValueError(f"IMPLICIT_VERIFY_SHRINK must be 1/true/yes/on or 0/false/no/off, got "
                         f"{value!r}")
    return value in ("1", "true", "yes", "on")


MAX_EXAMPLES = max_examples()
SHRINK = shrink()
VERIFY = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                  max_examples=MAX_EXAMPLES, suppress_health_check=[HealthCheck.too_slow],
                  phases=[p for p in Phase if SHRINK or p is not Phase.shrink])


def _few(n: int) -> int:
    """A smaller count for the costlier tests, scaled up with the nightly profile."""
    return max(1, min(n * max(1, MAX_EXAMPLES // 10), MAX_EXAMPLES))


def _halved_if_costly(case, examples: int) -> int:
    """Half the examples (at least 1) on a cell declaring ``contract_cost="costly"`` (large
    states, slow solves: the multiscale cell's Newton–Krylov cases took 20–27 s at full count)."""
    if case.cell and case.cell in {e.name for e in case.registry.entries("cell")} and \
            case.registry.get("cell", case.cell).spec.contract_cost == "costly":
        return max(1, examples // 2)
    return examples


def _run(case, contract: str, examples: int, body: Callable, required: Iterable[str]) -> None:
    """Run ``body(data, tally)`` on ``examples`` drawn examples, then fail the case if a
    ``required`` claim was made on fewer than half of them; record the tally."""
    tally = Tally(case=str(case), contract=contract)

    @settings(VERIFY, max_examples=examples)
    @given(data=st.data())
    def run(data):
        tally.example()
        with use_registry(case.registry):  # plugin names resolve in the case's registry
            body(data, tally)

    try:
        run()
        tally.require(required)
    except BaseException:
        tally.failed = True
        raise
    finally:
        record(tally)  # a failing case is reported with what it had claimed


def test_solver_contract(contract_solver_case):
    case = contract_solver_case

    def body(data, tally):
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
        example = case.example(data.draw, dtype)
        tols = [1e-3, 1e-5] if dtype == torch.float32 else [1e-5, 1e-9]
        tol = data.draw(st.sampled_from(tols), label="tol")
        stop = data.draw(st.sampled_from(["abs", "rel"]), label="stop")
        max_iter = data.draw(st.integers(1, 60), label="max_iter")
        options = case.options(data.draw)
        checks.check_solver_contract(case.registry, case.solver, example, tol=tol, stop=stop,
                                     max_iter=max_iter, options=options, tally=tally)
        # and on a budget of 1–5 calls: its edge (a step that would overrun it, a last call
        # too few for a step of a solver that needs several) is where budget bugs live
        small = data.draw(st.integers(1, 5), label="small max_iter")
        edge = Tally()
        checks.check_solver_contract(case.registry, case.solver, example, tol=tol, stop=stop,
                                     max_iter=small, options=options, tally=edge)
        tally.absorb(edge, "@max_iter<=5")

    examples = min(MAX_EXAMPLES, checks.COMPILED_EXAMPLES) if case.compiled else MAX_EXAMPLES
    _run(case, "solver", _halved_if_costly(case, examples), body,
         required=["truthful_record", "stops_when_done"])


def test_fault_mid_solve(contract_fault_case):
    case = contract_fault_case

    def body(data, tally):
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
        example = case.example(data.draw, dtype)
        checks.check_fault(case.registry, case.solver, example,
                           at_call=data.draw(st.integers(1, 6), label="at_call"),
                           fault=data.draw(st.sampled_from(checks.FAULTS), label="fault"),
                           independent=case.batch_independent,
                           options=case.options(data.draw), tally=tally)

    _run(case, "fault", _few(5), body, required=["fault_reported"])


def test_batch_rows_match_solving_alone(contract_batch_rows_case):
    case = contract_batch_rows_case

    def body(data, tally):
        checks.check_batch_rows(case.registry, case.solver,
                                case.example(data.draw, torch.float64),
                                options=case.options(data.draw), tally=tally)

    _run(case, "batch_rows", _halved_if_costly(case, _few(3)), body, required=["rows_match"])


def test_efficacy(contract_efficacy_case):
    case = contract_efficacy_case
    guarantee = checks.guarantees_of(case.registry.get("solver", case.solver).spec)[
        case.guarantee]

    def body(data, tally):
        options = case.options(data.draw)
        if guarantee.problem in ("linear", "linear_float32"):
            single = guarantee.problem == "linear_float32"
            n = data.draw(st.integers(1, 6), label="n")
            lipschitz = data.draw(st.floats(0.1, 0.9 if single else 0.99), label="L")
            fn, z0 = checks.linear_problem(n, lipschitz,
                                           batch=data.draw(st.integers(1, 3), label="batch"),
                                           seed=data.draw(st.integers(0, 2**16), label="seed"),
                                           dtype=torch.float32 if single else torch.float64)
            factor = data.draw(st.sampled_from([1e-2, 1e-3, 1e-4] if single
                                               else [1e-8, 1e-6, 1e-4]), label="tol / r0")
        else:
            dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
            fn, z0, lipschitz = checks.contraction_problem(case.example(data.draw, dtype))
            if lipschitz is None:
                tally.no_claim("efficacy", "the cell's strategy gives no Lipschitz bound")
                return
            factor = data.draw(st.sampled_from([1e-2, 1e-4] if dtype == torch.float32
                                               else [1e-4, 1e-8]), label="tol / r0")
        checks.check_efficacy(case.registry, case.solver, case.guarantee, fn, z0,
                              lipschitz=lipschitz, tol_factor=factor, options=options,
                              tally=tally)

    examples = min(MAX_EXAMPLES, checks.COMPILED_EXAMPLES) if case.compiled else MAX_EXAMPLES
    _run(case, "efficacy", examples, body, required=["efficacy"])


def test_gradient_contract(contract_gradient_case):
    case = contract_gradient_case
    spec = case.registry.get("backward", case.backward).spec
    required = ["gradient"] + (["adjoint"] if "exact" in spec.capabilities
                               or spec.adjoint_error_bound or spec.adjoint_formula else [])

    def body(data, tally):
        example = case.example(data.draw, torch.float64)
        solver_options = case.options(data.draw)
        backward_options = case.options(data.draw, kind="backward")
        checks.check_gradient_contract(case.registry, case.backward, case.solver, example,
                                       solver_options=solver_options,
                                       backward_options=backward_options, tally=tally)
        if "second_order" in spec.capabilities:
            checks.check_second_order(case.registry, case.backward, case.solver, example,
                                      solver_options=solver_options,
                                      backward_options=backward_options, tally=tally)
        if "backprop_through_iterates" in spec.capabilities:
            checks.check_backprop_through_iterates(case.registry, case.backward, case.solver,
                                                   example, solver_options=solver_options,
                                                   tally=tally)

    _run(case, "gradient", _halved_if_costly(case, _few(4)), body, required=required)


def test_adjoint_solver_contract(contract_adjoint_case):
    case = contract_adjoint_case

    def body(data, tally):
        checks.check_adjoint(case.registry, case.backward, case.solver,
                             case.example(data.draw, torch.float64), adjoint=case.adjoint,
                             tally=tally)

    _run(case, "adjoint", _few(2), body, required=["adjoint"])


def test_no_leak_over_50_steps(contract_leak_case):
    case = contract_leak_case

    def body(data, tally):
        checks.check_no_leak(case.registry, case.backward, case.solver,
                             case.example(data.draw, torch.float64), steps=50)
        tally.claim("no_leak")

    _run(case, "leak", 1, body, required=["no_leak"])


def test_loop_rules(contract_loop_case):
    case = contract_loop_case

    def body(data, tally):
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
        eps = torch.finfo(dtype).eps
        stop = data.draw(st.sampled_from(["abs", "rel"]), label="stop")
        tols = [1e-3, 1e-5] if dtype == torch.float32 else [1e-5, 1e-9]
        tol = data.draw(st.sampled_from(tols + ([eps / 4] if stop == "rel" else [])),
                        label="tol")
        example = data.draw(loop.loop_examples(dtype, stop, tol), label="example")
        loop.check_loop(case.registry, case.solver, example, tol=tol, stop=stop,
                        max_iter=data.draw(st.integers(1, 40), label="max_iter"),
                        factor=data.draw(st.sampled_from([1e8, 10.0, 3.0]),
                                         label="divergence_factor"),
                        returns=data.draw(st.sampled_from(["best", "last"]), label="returns"),
                        options=case.options(data.draw), tally=tally)

    _run(case, "loop", MAX_EXAMPLES, body, required=["rules"])


def test_compaction(contract_compaction_case):
    case = contract_compaction_case

    def body(data, tally):
        loop.check_compaction(case.registry, case.solver, case.example(data.draw, torch.float64),
                              training=data.draw(st.booleans(), label="training"),
                              tol=data.draw(st.sampled_from([1e-6, 1e-9]), label="tol"),
                              options=case.options(data.draw), tally=tally)

    _run(case, "compaction", _few(4), body, required=["same_record"])


def test_step_formula(contract_step_case):
    case = contract_step_case

    def body(data, tally):
        loop.check_step_formula(case.registry, case.solver,
                                n=data.draw(st.integers(1, 12), label="n"),
                                batch=data.draw(st.integers(1, 3), label="batch"),
                                lipschitz=data.draw(st.floats(0.1, 0.99), label="L"),
                                seed=data.draw(st.integers(0, 2**16), label="seed"),
                                steps=data.draw(st.integers(1, 40), label="steps"),
                                options=case.options(data.draw), tally=tally)

    # cheap (a few small affine solves): 5x the examples, so that the rarer histories (a
    # restart of a limited memory) are drawn in every run
    _run(case, "step", 5 * MAX_EXAMPLES, body, required=["step_formula"])


def test_safeguard(contract_safeguard_case):
    case = contract_safeguard_case

    def body(data, tally):
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
        stop = data.draw(st.sampled_from(["abs", "rel"]), label="stop")
        tol = data.draw(st.sampled_from([1e-3, 1e-5] if dtype == torch.float32
                                        else [1e-5, 1e-9]), label="tol")
        example = data.draw(loop.loop_examples(dtype, stop, tol, blowup=True), label="example")
        loop.check_safeguard(case.registry, case.solver, example, tol=tol, stop=stop,
                             max_iter=data.draw(st.integers(6, 60), label="max_iter"),
                             max_cuts=data.draw(st.sampled_from([1, 2, 8]), label="max_cuts"),
                             options=case.options(data.draw), tally=tally)

    _run(case, "safeguard", MAX_EXAMPLES, body, required=["safeguard"])
