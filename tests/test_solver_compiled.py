"""The compiled solve path (``compile=...``): same records as the eager loop, fixed budget,
no recompiles per batch, clear refusals; one real inductor compile of a DEQ training step.

(Named to run after ``tests/test_contracts.py``: once dynamo and inductor are loaded in the
process, the leak contract's scans of every live object take minutes.)"""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
import torch._dynamo

import implicit
from implicit import Status
from implicit.cell import injection_of, update_of


def _problem(batch: int = 10, n: int = 6, dtype=torch.float64):
    """z ↦ tanh(r_i W z + b_i) + d_i z: rates spread (samples stop at different steps), one
    sample pushed off (d = 1.5) and one whose map is NaN from the start."""
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(n, n, generator=gen, dtype=dtype) / n ** 0.5
    b = torch.randn(batch, n, generator=gen, dtype=dtype)
    r = torch.linspace(0.05, 0.9, batch, dtype=dtype)[:, None]
    d = torch.zeros(batch, 1, dtype=dtype)
    d[-1] = 1.5
    b[-2] = float("nan")
    return lambda z: torch.tanh(r * (z @ W.T) + b) + d * z


@pytest.mark.parametrize("name", ["forward", "anderson"])
@pytest.mark.parametrize("block", [None, 1, 4])
@pytest.mark.parametrize("stop", ["abs", "rel"])
@pytest.mark.parametrize("grad", [True, False])
def test_compiled_solve_keeps_the_eager_record(name, block, stop, grad):
    fn = _problem()
    options = dict(tol=1e-9, stop=stop, max_iter=45, policy="ignore", divergence_factor=1e3)
    eager = implicit.iterate(implicit.make_solver(name, **options), fn,
                             torch.zeros(10, 6, dtype=torch.float64))
    solver = implicit.make_solver(name, compile="aot_eager", block=block, **options)
    # without grad, the whole loop writes Anderson's histories in place (with grad, it
    # carries them): both must keep the eager record, over many turns of the m = 5 ring
    with torch.set_grad_enabled(grad):
        compiled = implicit.iterate(solver, fn, torch.zeros(10, 6, dtype=torch.float64))
    e, c = eager.solution, compiled.solution
    assert len(set(e.sample_status.tolist())) >= 2  # samples stopped in different ways
    for field in ("nfe", "sample_status", "converged"):
        assert torch.equal(getattr(c, field), getattr(e, field)), field
    torch.testing.assert_close(c.z, e.z, rtol=0, atol=1e-10, equal_nan=True)
    torch.testing.assert_close(c.abs_residual, e.abs_residual, rtol=1e-6, atol=1e-12,
                               equal_nan=True)
    assert c.status is e.status
    assert c.n_calls == e.n_calls
    if block is None:  # one while loop, stopping when every sample has
        assert c.stats["loop"] == "while" and c.stats["loop_steps"] == e.n_calls - 1
    else:  # a block's steps after every sample stopped skip their calls: the eager count
        assert c.stats["loop"] == "blocks" and c.stats["skipping_blocks"]
        assert c.stats["compiled_blocks"] >= 1
    if name == "anderson":
        assert c.stats["fallbacks"] == e.stats["fallbacks"]
        assert c.stats.get("in_place") is (None if block else not grad)


def test_compiled_solve_stays_within_the_budget():
    fn = _problem()
    solver = implicit.make_solver("anderson", compile="aot_eager", tol=0.0, max_iter=7,
                                  policy="ignore")
    sol = implicit.iterate(solver, fn, torch.zeros(10, 6, dtype=torch.float64)).solution
    # f(z0), then the while loop to the budget's last call
    assert sol.n_calls == 7 and sol.stats["loop"] == "while" and sol.stats["loop_steps"] == 6
    assert int(sol.nfe.max()) == 7 and sol.status is not Status.CONVERGED

    solver = implicit.make_solver("forward", compile="aot_eager", block=4, tol=0.0,
                                  max_iter=10, policy="ignore")
    sol = implicit.iterate(solver, fn, torch.zeros(10, 6, dtype=torch.float64)).solution
    # f(z0), two blocks of 4, then one eager step: exactly the budget
    assert sol.n_calls == 10 and sol.stats["compiled_blocks"] == 2
    assert sol.stats["eager_steps"] == 1
    assert int(sol.nfe.max()) == 10 and sol.status is not Status.CONVERGED


@pytest.mark.parametrize("block", [None, 4])
def test_a_map_with_a_graph_break_runs_in_blocks_that_make_every_call(block):
    """A map dynamo cannot trace whole (here a host read) cannot run inside a torch.while_loop
    or the torch.cond that skips calls; the solve falls back to blocks that make every call
    (of 4 steps when block=None), same record."""
    A = _problem()

    def fn(z):
        if float(z.abs().sum()) < -1:  # a graph break: never true
            return z
        return A(z)

    solver = implicit.make_solver("forward", compile="aot_eager", block=block, tol=1e-8,
                                  stop="abs", max_iter=45, policy="ignore")
    implicit.compiled._TRACEABLE.pop(fn.__code__, None)  # one code for both parametrisations
    eager = implicit.iterate(attrs.evolve(solver, compile=False), fn,
                             torch.zeros(10, 6, dtype=torch.float64)).solution
    with pytest.warns(implicit.CompiledFallbackWarning,
                      match=r"map .*fn cannot be traced whole .*compiled blocks of 4 steps"):
        sol = implicit.iterate(solver, fn, torch.zeros(10, 6, dtype=torch.float64)).solution
    assert sol.stats["loop"] == "blocks" and not sol.stats["skipping_blocks"]
    with warnings.catch_warnings():  # said once per map, not at every solve
        warnings.simplefilter("error", implicit.CompiledFallbackWarning)
        again = implicit.iterate(solver, fn, torch.zeros(10, 6, dtype=torch.float64)).solution
    assert torch.equal(again.nfe, sol.nfe)
    assert sol.stats["block"] == 4
    assert torch.equal(sol.nfe, eager.nfe) and sol.n_calls >= eager.n_calls
    torch.testing.assert_close(sol.z, eager.z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("block", [None, 3])
def test_new_maps_and_batch_sizes_do_not_recompile_forever(block):
    """A DEQ makes a new closure over each batch's injection: guarded on its code, not its
    identity. A second batch size compiles once more (dynamic batch), later sizes reuse it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cell = implicit.make_cell("tanh", features=8)
    solver = implicit.make_solver("anderson", compile="eager", block=block, tol=1e-6,
                                  max_iter=20, policy="ignore")
    frames = []
    for batch in (4, 4, 6, 9, 5, 4):
        with torch.no_grad():
            u = injection_of(cell, torch.randn(batch, 8))
            implicit.iterate(solver, lambda z: update_of(cell, z, u), torch.zeros(batch, 8))
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[1] == frames[0]  # a new closure: no recompile
    assert frames[-1] <= 2 * frames[0]  # one dynamic recompile at most


def test_compiled_path_refusals_are_clear():
    with pytest.raises(ValueError, match="broyden.*no fixed-shape step.*forward and anderson"):
        implicit.make_solver("broyden", compile=True)
    with pytest.raises(ValueError, match="trace=True is not available with compile=True"):
        implicit.make_solver("anderson", compile=True, trace=True)
    with pytest.raises(ValueError, match="safeguard=True is not available"):
        implicit.make_solver("anderson", compile=True, safeguard=True)
    with pytest.raises(ValueError, match="'inductr' is not a torch.compile backend"):
        implicit.make_solver("anderson", compile="inductr")
    with pytest.raises((TypeError, ValueError), match="compile must be True, False or a torch"):
        implicit.make_solver("anderson", compile=1)


def test_a_solver_naming_a_missing_in_place_tensor_is_told_so():
    # a plugin whose static_inplace names what its static_init does not return: the loop
    # could not hold it, and would quietly carry the state instead (slower, nothing said)
    anderson = type(implicit.make_solver("anderson"))
    misnamed = attrs.frozen(kw_only=True)(
        type("Misnamed", (anderson,), {"static_inplace": ("Y", "history")}))
    solver = misnamed(compile="aot_eager", max_iter=10, policy="ignore")
    with torch.no_grad(), pytest.raises(
            implicit.PluginError, match=r"names \['history'\] in static_inplace, but its "
            r"static_init returns a dict with keys \['G', 'Y', 'count', 'fallbacks', 'gram'\]"):
        implicit.iterate(solver, _problem(), torch.zeros(10, 6, dtype=torch.float64))
    with torch.enable_grad():  # with grad nothing is held in place: the solve runs
        assert implicit.iterate(solver, _problem(), torch.zeros(10, 6, dtype=torch.float64)
                                ).solution.stats["loop"] == "while"


def test_deq_training_step_compiled_with_inductor_matches_eager():
    """The real thing: inductor compiles the forward solve and the (damped, training-mode)
    adjoint, each one while loop (the adjoint's products by torch.func.vjp), of a DEQ on a
    small tanh cell; z*, records and gradients are the eager ones within round-off."""
    torch.manual_seed(0)
    cell = implicit.make_cell("tanh", features=8)
    x = torch.randn(6, 8)
    grads, records = {}, {}
    for compiled in (False, True):
        # the adjoint compiles only when ift is given a compiled solver (by default a compiled
        # forward solver's adjoint runs eagerly: its VJPs are graph breaks)
        solver = implicit.make_solver("anderson", compile=compiled)
        # (the damped training adjoint is a solve; the calibrated one runs its own eager loop)
        backward = implicit.make_backward("ift", solver=solver if compiled else None,
                                          training_adjoint="damped")
        layer = implicit.DEQ(cell, solver=solver, backward=backward, tol=1e-5, max_iter=40)
        xr = x.clone().requires_grad_()
        z = layer(xr)
        z.square().sum().backward()
        grads[compiled] = (xr.grad, [p.grad.clone() for p in cell.parameters()])
        records[compiled] = (z.detach(), layer.solution, layer.backward_solution)
        cell.zero_grad()
    (z0, s0, b0), (z1, s1, b1) = records[False], records[True]
    assert s1.stats["loop"] == "while" and b1.stats["loop"] == "while"
    # the forward solve writes its histories in place; the adjoint's torch.func.vjp cannot be
    # compiled with them held, and it carries them instead (still one while loop)
    assert s1.stats["in_place"] is True and b1.stats["in_place"] is False
    torch.testing.assert_close(z1, z0, rtol=0, atol=1e-5)
    assert torch.equal(s1.nfe, s0.nfe) and s1.all_converged and b1.all_converged
    assert torch.equal(b1.nfe, b0.nfe)
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize("backend", ["eager", True])
def test_a_map_the_eager_loop_refuses_is_refused_compiled_too(block, backend):
    """A map that writes into its iterate, or returns another shape, gets the eager loop's
    error (its checked first call), not a fallback, and the caller's z0 is left as the eager
    loop leaves it (written once, by that checked call) — also on the default path, where the
    first call is inside the compiled solve."""
    def writes(z):
        z.mul_(0.5)
        return z + 1

    def reshapes(z):
        return torch.cat([z, z], dim=1)

    solver = implicit.make_solver("forward", compile=backend, block=block, max_iter=5)
    for fn, message in ((writes, "f wrote in place into the iterate"),
                        (reshapes, r"f returned shape \(3, 4\) for an iterate of shape")):
        implicit.compiled._TRACEABLE.pop(fn.__code__, None)
        z0, z_eager = torch.full((3, 2), 2.0), torch.full((3, 2), 2.0)
        with pytest.raises(ValueError, match=message):
            implicit.iterate(attrs.evolve(solver, compile=False, block=None), fn, z_eager)
        with warnings.catch_warnings():
            warnings.simplefilter("error", implicit.CompiledFallbackWarning)
            with pytest.raises(ValueError, match=message):
                implicit.iterate(solver, fn, z0)
        assert torch.equal(z0, z_eager)


def test_a_compiled_forward_solvers_adjoint_runs_eagerly_unless_asked():
    forward = implicit.make_solver("anderson", compile="eager")
    assert not implicit.make_backward("ift").adjoint_solver(forward).compile
    explicit = implicit.make_backward("ift", solver=forward)
    assert explicit.adjoint_solver(forward).compile == "eager"


def test_ift_compile_option_chooses_the_adjoint_loop():
    """ift(compile=...): by default a compiled forward solver's adjoint runs eagerly (its
    products by autograd); compile=True compiles it (products by torch.func.vjp, one while
    loop) also behind an eager forward solve; compile=False keeps a compiled ift solver eager.
    Damped (training) and exact (eval) adjoints give the eager gradients."""
    torch.manual_seed(0)
    cell = implicit.make_cell("tanh", features=8)
    x = torch.randn(5, 8)
    damped = {"training_adjoint": "damped"}  # a solve in training (calibrated: its own loop)
    cases = {
        "eager": ("anderson", implicit.make_backward("ift", **damped)),
        "default": (implicit.make_solver("anderson", compile="aot_eager"),
                    implicit.make_backward("ift", **damped)),
        "adjoint only": ("anderson", implicit.make_backward("ift", compile="aot_eager",
                                                            **damped)),
        "never": ("forward", implicit.make_backward(
            "ift", solver=implicit.make_solver("forward", compile="aot_eager"), compile=False,
            **damped)),
    }
    for training in (True, False):
        grads, loops = {}, {}
        for name, (solver, backward) in cases.items():
            layer = implicit.DEQ(cell, solver=solver, backward=backward, tol=1e-6, max_iter=60)
            layer.train(training)
            xr = x.clone().requires_grad_()
            layer(xr).square().sum().backward()
            grads[name] = xr.grad
            loops[name] = layer.backward_solution.stats.get("loop")
        assert loops == {"eager": None, "default": None, "adjoint only": "while", "never": None}
        for name, g in grads.items():
            torch.testing.assert_close(g, grads["eager"], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match=r"ift\(compile=True\).*'broyden' cannot be compiled"):
        layer = implicit.DEQ(cell, solver="broyden",
                             backward=implicit.make_backward("ift", compile=True))
        layer(x.clone().requires_grad_()).sum().backward()
    with pytest.raises(implicit.OptionError, match="compile must be None, True, False or a"):
        implicit.make_backward("ift", compile=1.0)


def test_a_compiled_adjoint_leaves_the_forward_solvers_thread_count_behind():
    # threads=k is for the eager loop; ift(compile=...) compiles the adjoint from the forward
    # solver, which then drops it (instead of refusing the combination), and the forward
    # solve still runs at k threads
    forward = implicit.make_solver("anderson", threads=1)
    adjoint = implicit.make_backward("ift", compile="aot_eager").adjoint_solver(forward)
    assert adjoint.compile == "aot_eager" and adjoint.threads is None
    assert implicit.make_backward("ift").adjoint_solver(forward).threads == 1  # eager: kept


def _fused_layers(name: str, **options):
    """A DEQ with a compiled solver (aot_eager: traced, no code generation) and its eager
    twin on one float64 tanh cell, whose initial state is not zeros (the fused call must start
    where the cell says)."""
    torch.manual_seed(3)
    cell = implicit.make_cell("tanh", features=12, in_features=5).double()
    zeros = cell.init_state
    cell.init_state = lambda x: zeros(x) + 0.5
    options = dict(tol=1e-8, max_iter=60, policy="ignore", **options)
    compiled = implicit.DEQ(cell, solver=implicit.make_solver(name, compile="aot_eager",
                                                              **options))
    eager = implicit.DEQ(cell, solver=implicit.make_solver(name, **options))
    return compiled, eager, torch.randn(7, 5, dtype=torch.float64) * 3


@pytest.mark.parametrize("name", ["forward", "anderson"])
def test_a_compiled_layers_forward_without_grad_is_one_call_with_the_eager_record(name):
    compiled, eager, x = _fused_layers(name)
    compiled.train()
    with torch.no_grad():
        first = compiled(x)  # the general path, which shows the map traceable
        assert "fused" not in compiled.solution.stats and compiled._fuse is True
        z = compiled(x)
        c = compiled.solution
        e_z = eager(x)
    e = eager.solution
    assert c.stats["fused"] and c.stats["loop"] == "while"
    assert z.shape == e_z.shape == (7, 12) and c.z.shape == (7, 12)
    assert len(set(e.nfe.tolist())) >= 2  # samples stopped at different steps
    for field in ("nfe", "sample_status", "converged"):
        assert torch.equal(getattr(c, field), getattr(e, field)), field
    assert c.n_calls == e.n_calls and c.status is e.status
    torch.testing.assert_close(z, e_z, rtol=0, atol=1e-12)
    torch.testing.assert_close(first, e_z, rtol=0, atol=1e-12)
    torch.testing.assert_close(c.abs_residual, e.abs_residual, rtol=1e-6, atol=1e-14)
    assert int(compiled.train_steps) == 2  # a fused forward counts as a training forward
    # with grad, the general path (the injection's graph is needed), fused again after
    z_grad = compiled(x)
    assert z_grad.requires_grad and "fused" not in compiled.solution.stats
    with torch.no_grad():
        compiled(x)
    assert compiled.solution.stats["fused"]


def test_a_fused_forward_keeps_the_policy_and_says_what_is_wrong_with_bad_input():
    compiled, _, x = _fused_layers("forward")
    # training solves converge; eval solves stop after 3 calls, which policy="raise" rejects
    layer = implicit.DEQ(compiled.cell, solver=attrs.evolve(compiled.solver, policy="raise"),
                         eval_max_iter=3)
    with torch.no_grad():
        layer(x)
        layer(x)
        assert layer.solution.stats["fused"] and layer.solution.all_converged
        layer.eval()
        with pytest.raises(implicit.ConvergenceError, match="DEQ forward solve") as raised:
            layer(x)
        rejected = raised.value.solution
        assert rejected.stats["fused"] and rejected.status is Status.MAX_ITER
        assert rejected.n_calls == 3
        # bad input: the fused call cannot trace it; the general path says what is wrong
        with pytest.raises(ValueError, match=r"expects inputs of shape .*got \(7, 4\)"):
            layer(torch.randn(7, 4, dtype=torch.float64))
        assert layer._fuse is True  # the input was wrong, not the fused call


def test_a_fused_call_that_fails_falls_back_once_with_a_warning(monkeypatch):
    compiled, eager, x = _fused_layers("anderson")
    with torch.no_grad():
        compiled(x)
        assert compiled._fuse is True

        def untraceable(cell, x, state0):
            raise NotImplementedError("nothing here traces")

        monkeypatch.setattr(implicit.deq, "_fused_problem", untraceable)
        with pytest.warns(implicit.compiled.CompiledFallbackWarning,
                          match="NotImplementedError: nothing here traces.*run them apart"):
            z = compiled(x)
        assert compiled._fuse is False and "fused" not in compiled.solution.stats
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compiled(x)  # no second warning, no second try
        torch.testing.assert_close(z, eager(x), rtol=0, atol=1e-12)
