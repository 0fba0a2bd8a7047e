"""A gallery of broken plugins: each carries one bug a developer could plausibly write, of a
different kind, and ``implicit verify implicit-example-gallery`` must reject each one, by the
contract named here (the test ``tests/test_verify.py`` checks it):

=================== ========================================================= ================
plugin              bug                                                       caught by
=================== ========================================================= ================
``sloppy_damped``   the damped branch (``beta != 1``) returns the old f(z)    solver (drawn
                    with the new iterate, so the record claims convergence    options; the
                                                                              default is fine)
``lagged_anderson`` appends the newest residual after mixing: the mix never   efficacy (linear
                    sees it, so the claimed finite termination fails          termination)
``nan_to_num``      "protects" the solve by replacing NaN/Inf in f(z) with 0: fault
                    the sample then looks finite and is never reported
``batch_anderson``  one set of mixing weights for the whole batch (a summed   batch_rows
                    Gram matrix), so a sample's answer depends on the others
``ift_transposed``  solves the adjoint w = J w + y with JVPs instead of       gradient
                    w = Jᵀ w + y
``short_phantom``   takes k - 1 damped steps where its documented formula     gradient (its
                    sums k terms                                              adjoint formula)
``sign_richardson`` a linear (adjoint) solver stepping against the residual:  adjoint (every
                    it never converges, so no adjoint claim is ever made      case vacuous)
``history_keeping`` keeps every output "for debugging": memory grows per step leak
=================== ========================================================= ================
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import implicit


# -- solvers ------------------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class SloppyDamped(implicit.Solver):
    """Damped fixed-point iteration z <- (1 - beta) z + beta f(z)."""

    name: ClassVar[str] = "sloppy_damped"
    beta: float = 1.0

    def step(self, fn, z, fz, state):
        if self.beta == 1:
            return fz, fn(fz), state
        z_next = torch.lerp(z, fz, float(self.beta))
        fn(z_next)  # the bug: evaluated, but the stale value is handed back
        return z_next, fz, state


def _beta_options():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({"beta": st.sampled_from([1.0, 0.5, 0.8])})


@attrs.frozen(kw_only=True)
class LaggedAnderson(implicit.Solver):
    """Anderson acceleration with history m (undamped, tiny ridge)."""

    name: ClassVar[str] = "lagged_anderson"
    m: int = 8

    def init(self, z, fz):
        return {"Y": [], "G": []}

    def step(self, fn, z, fz, state):
        g = fz - z
        if state["G"]:
            G = torch.stack(state["G"], dim=1)  # (B, k, n)
            gram = G @ G.transpose(1, 2)
            gram = gram + 1e-12 * gram.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] \
                * torch.eye(G.shape[1], dtype=G.dtype)
            w = torch.linalg.solve(gram, torch.ones(G.shape[:2] + (1,), dtype=G.dtype))
            alpha = w / w.sum(dim=1, keepdim=True)
            z_next = (alpha.transpose(1, 2) @ torch.stack(state["Y"], dim=1)).squeeze(1)
        else:
            z_next = fz
        # the bug: the newest pair is stored after the mix, so the mix lags one step behind
        state["Y"] = (state["Y"] + [fz])[-self.m:]
        state["G"] = (state["G"] + [g])[-self.m:]
        return z_next, fn(z_next), state


def _lagged_calls(solver, inst):
    if solver.m < inst.n + 1 or inst.tol < 1e-8 * inst.r0:
        return None
    return inst.n + 4 + inst.n // 2  # as the built-in Anderson claims


@attrs.frozen(kw_only=True)
class NanToNum(implicit.Solver):
    """Fixed-point iteration that keeps the iterate finite."""

    name: ClassVar[str] = "nan_to_num"

    def step(self, fn, z, fz, state):
        z_next = torch.nan_to_num(fz, nan=0.0, posinf=0.0, neginf=0.0)
        return z_next, torch.nan_to_num(fn(z_next), nan=0.0, posinf=0.0, neginf=0.0), state


@attrs.frozen(kw_only=True)
class BatchAnderson(implicit.Solver):
    """Anderson acceleration (m = 3) with weights shared across the batch."""

    name: ClassVar[str] = "batch_anderson"
    m: int = 3

    def init(self, z, fz):
        return {"Y": [], "G": []}

    def step(self, fn, z, fz, state):
        state["Y"] = (state["Y"] + [fz])[-self.m:]
        state["G"] = (state["G"] + [fz - z])[-self.m:]
        G = torch.stack(state["G"], dim=1)
        gram = torch.einsum("bin,bjn->ij", G, G)  # the bug: summed over the batch
        gram = gram + 1e-8 * gram.trace() * torch.eye(len(state["G"]), dtype=G.dtype)
        w = torch.linalg.solve(gram, torch.ones(len(state["G"]), 1, dtype=G.dtype))
        alpha = (w / w.sum()).squeeze(1)
        z_next = torch.einsum("i,bin->bn", alpha, torch.stack(state["Y"], dim=1))
        return z_next, fn(z_next), state


@attrs.frozen(kw_only=True)
class SignRichardson(implicit.Solver):
    """Richardson iteration for affine maps (the IFT adjoint): z <- z + omega (f(z) - z)."""

    name: ClassVar[str] = "sign_richardson"
    omega: float = 0.9

    def step(self, fn, z, fz, state):
        z_next = z - self.omega * (fz - z)  # the bug: the sign of the correction
        return z_next, fn(z_next), state


# -- backward strategies --------------------------------------------------------------------------

def _partials(inputs):
    return [t if t.grad_fn is None else t.detach().requires_grad_(t.requires_grad)
            for t in inputs]


class _TransposedAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_star, problem, *inputs):
        ctx.problem = problem
        ctx.save_for_backward(z_star, *inputs)
        return z_star.clone()

    @staticmethod
    def backward(ctx, y):
        z_star, *inputs = ctx.saved_tensors
        problem = ctx.problem
        with torch.enable_grad():
            partial = _partials(inputs)
            z = z_star.detach().requires_grad_()
            fz = problem.fn_with(z, partial)

            def jvp(v):  # the bug: J v (a JVP) where the adjoint needs Jᵀ v
                return torch.autograd.functional.jvp(lambda s: problem.fn_with(s, partial),
                                                     z_star.detach(), v)[1]

            w = y
            for _ in range(500):
                w_next = jvp(w) + y
                done = float((w_next - w).norm()) <= 1e-12 * float(y.norm() + 1e-300)
                w = w_next
                if done:
                    break
            needs = ctx.needs_input_grad[2:]
            wanted = [t for t, need in zip(partial, needs) if need]
            grads = iter(torch.autograd.grad(fz, wanted, w, allow_unused=True))
        return (None, None, *[next(grads) if need else None for need in needs])


@attrs.frozen(kw_only=True)
class TransposedIFT(implicit.BackwardStrategy):
    """Implicit-function-theorem gradient with a fixed-point adjoint solve."""

    name: ClassVar[str] = "ift_transposed"

    def __call__(self, problem, solver):
        result = self.solve_without_graph(problem, solver)
        if not problem.needs_graph:
            return result
        return attrs.evolve(result, z=_TransposedAdjoint.apply(result.z, problem,
                                                               *problem.inputs))


@attrs.frozen(kw_only=True)
class ShortPhantom(implicit.BackwardStrategy):
    """Phantom gradient: backprop through k damped steps from z*."""

    name: ClassVar[str] = "short_phantom"
    k: int = 5
    lam: float = 0.8

    def __call__(self, problem, solver):
        result = self.solve_without_graph(problem, solver)
        if not problem.needs_graph:
            return result
        z = result.z
        for _ in range(1, self.k):  # the bug: k - 1 steps
            z = torch.lerp(z, problem.fn(z), float(self.lam))
        return attrs.evolve(result, z=z)


def _phantom_formula(strategy, jac, y):
    """lam Σ_{j<k} (Mᵀ)^j y with M = (1 - lam) I + lam J (the documented phantom adjoint)."""
    m_t = (1 - strategy.lam) * torch.eye(jac.shape[0], dtype=jac.dtype) + strategy.lam * jac.T
    total, term = torch.zeros_like(y), y
    for _ in range(strategy.k):
        total, term = total + term, m_t @ term
    return strategy.lam * total


def _phantom_bound(strategy, norm):
    return (1 - strategy.lam * (1 - norm)) ** strategy.k


_HISTORY: list = []


@attrs.frozen(kw_only=True)
class HistoryKeeping(implicit.BackwardStrategy):
    """Jacobian-free gradient (one step of f at z*), keeping outputs for inspection."""

    name: ClassVar[str] = "history_keeping"

    def __call__(self, problem, solver):
        result = self.solve_without_graph(problem, solver)
        if not problem.needs_graph:
            return result
        z = problem.fn(result.z)
        _HISTORY.append(z)  # the bug: every step's output (and its graph) stays alive
        return attrs.evolve(result, z=z)


@implicit.hookimpl
def implicit_register_solvers(register):
    register(implicit.SolverSpec(name="sloppy_damped", factory=SloppyDamped,
                                 option_strategy=_beta_options))
    register(implicit.SolverSpec(
        name="lagged_anderson", factory=LaggedAnderson,
        guarantees={"linear_termination": implicit.Guarantee(
            problem="linear", calls=_lagged_calls,
            options=lambda inst, drawn: {**drawn, "m": max(8, inst.n + 1)},
            statement="Walker & Ni 2011: with m >= n + 1 exact after n + 2 calls (+ slack)")}))
    register(implicit.SolverSpec(name="nan_to_num", factory=NanToNum))
    register(implicit.SolverSpec(name="batch_anderson", factory=BatchAnderson))
    register(implicit.SolverSpec(name="sign_richardson", factory=SignRichardson,
                                 capabilities={"linear_only"}))


@implicit.hookimpl
def implicit_register_backwards(register):
    register(implicit.BackwardSpec(name="ift_transposed", factory=TransposedIFT,
                                   capabilities={"exact"}))
    register(implicit.BackwardSpec(name="short_phantom", factory=ShortPhantom,
                                   adjoint_formula=_phantom_formula,
                                   adjoint_error_bound=_phantom_bound))
    register(implicit.BackwardSpec(name="history_keeping", factory=HistoryKeeping))
