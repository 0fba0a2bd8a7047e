"""The record every solve returns, its status enum, and the failure policy.

Residuals are per sample, measured on the flattened state of each sample:

* ``abs_residual[i] = ‖f(z_i) − z_i‖₂``
* ``rel_residual[i] = ‖f(z_i) − z_i‖₂ / ‖f(z_i)‖₂`` (``0/0`` counts as ``0``)

``converged[i]`` is true exactly when the residual named by ``stop`` is finite and ``≤ tol``
for the returned ``z`` — recomputing it from ``z`` gives the same answer (up to the round-off of
one more evaluation of ``f``).
"""

from __future__ import annotations

import enum
import warnings
from typing import Literal, Optional

import attrs
import torch

Policy = Literal["warn", "raise", "ignore"]
POLICIES: tuple[str, ...] = ("warn", "raise", "ignore")
StopMode = Literal["abs", "rel"]
STOP_MODES: tuple[str, ...] = ("abs", "rel")


class Status(enum.Enum):
    """Outcome of a solve; each member carries a human message (``status.message``).

    Per-sample codes in :attr:`Solution.sample_status` are the members' ``code`` values.
    The batch status is the worst sample status (non-finite > diverged > max_iter > converged).
    """

    CONVERGED = (0, "converged: every sample met the tolerance")
    MAX_ITER = (1, "max_iter reached before every sample met the tolerance")
    DIVERGED = (2, "diverged: the residual grew far beyond the initial one")
    NONFINITE = (3, "non-finite: NaN or Inf appeared in the iterate or in f(z)")

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message

    @classmethod
    def from_code(cls, code: int) -> Status:
        try:
            return _BY_CODE[code]
        except KeyError:
            raise ValueError(f"no Status with code {code}") from None


_BY_CODE = {member.code: member for member in Status}


class ConvergenceWarning(RuntimeWarning):
    """A solve ended without every sample meeting the tolerance (policy ``"warn"``)."""


class ConvergenceError(RuntimeError):
    """A solve ended without every sample meeting the tolerance (policy ``"raise"``)."""

    def __init__(self, message: str, solution: Solution) -> None:
        super().__init__(message)
        self.solution = solution


def _tensor(*, dtype: torch.dtype | None = None):
    validators = [attrs.validators.instance_of(torch.Tensor)]
    if dtype is not None:
        validators.append(_has_dtype(dtype))
    return attrs.field(validator=validators)


def _has_dtype(dtype: torch.dtype):
    def check(instance, attribute, value):
        if value.dtype != dtype:
            raise TypeError(f"Solution.{attribute.name} must be {dtype}, got {value.dtype}")

    return check


@attrs.frozen(kw_only=True, eq=False)
class Solution:
    """Record of one solve (forward or adjoint). Tensors are detached.

    Attributes:
        z: the returned iterate — a tensor or tuple of tensors shaped like the state.
        nfe: ``(B,)`` int64; evaluations of ``f`` while sample i was still active.
        abs_residual, rel_residual: ``(B,)`` residuals of the returned ``z`` (see module doc).
        converged: ``(B,)`` bool; the residual named by ``stop`` is ``≤ tol``.
        sample_status: ``(B,)`` int8 :class:`Status` codes per sample.
        n_calls: calls of ``f`` on the whole batch (the cost; bounded by ``max_iter``).
        njvp, nvjp: Jacobian-vector / vector-Jacobian products taken by the solver.
        status: the batch :class:`Status` (worst sample).
        tol, stop: the criterion the solve used.
        solver: name of the solver that ran.
        trace: optional ``(n_steps + 1, B)`` stopping residual (``abs``/``rel`` as ``stop``)
            of the current iterate after each step, when asked for.
        stats: solver-specific telemetry counters (e.g. fallbacks), and the loop's:
            ``loop_steps``; ``unused_calls`` and ``min_step_calls`` when the budget's last calls
            could not pay for one more step of a solver whose steps make several calls.
    """

    z: object
    nfe: torch.Tensor = _tensor(dtype=torch.int64)
    abs_residual: torch.Tensor = _tensor()
    rel_residual: torch.Tensor = _tensor()
    converged: torch.Tensor = _tensor(dtype=torch.bool)
    sample_status: torch.Tensor = _tensor(dtype=torch.int8)
    n_calls: int = attrs.field(validator=attrs.validators.instance_of(int))
    njvp: int = 0
    nvjp: int = 0
    status: Status = attrs.field(validator=attrs.validators.instance_of(Status))
    tol: float
    stop: str
    solver: str = ""
    trace: Optional[torch.Tensor] = None
    stats: dict = attrs.field(factory=dict)

    @property
    def residual(self) -> torch.Tensor:
        """The per-sample residual the stopping rule used (``abs`` or ``rel``)."""
        return self.abs_residual if self.stop == "abs" else self.rel_residual

    @property
    def message(self) -> str:
        return self.status.message

    @property
    def all_converged(self) -> bool:
        return self.status is Status.CONVERGED

    def summary(self) -> str:
        """One line for logs and error messages."""
        n = self.converged.numel()
        n_ok = int(self.converged.sum())
        worst = self.residual.max().item() if n else 0.0
        line = (
            f"{self.status.message} [{self.solver or 'solver'}: {n_ok}/{n} samples converged, "
            f"worst {self.stop} residual {worst:.3e} vs tol {self.tol:.1e}, "
            f"{self.n_calls} calls of f]"
        )
        if self.stats.get("unused_calls"):
            line += (f"; the last {self.stats['unused_calls']} call(s) of max_iter went unused: "
                     f"a {self.solver or 'solver'} step needs "
                     f"{self.stats['min_step_calls']} calls; raise max_iter")
        if self.stats.get("below_precision"):
            line += (f"; tolerance below attainable precision at ‖f(z)‖ = "
                     f"{self.stats['precision_scale']:.3g} for {self.stats['below_precision']} "
                     f"sample(s): their residual met tol only within rounding "
                     f"(implicit.solver.PRECISION · eps · ‖f(z)‖ for stop='abs', "
                     f"PRECISION · eps for 'rel'); use a looser tol, float64, or stop='rel'")
        return line


def apply_policy(solution: Solution, policy: str, *, what: str = "solve") -> None:
    """Warn, raise or stay quiet about a solve that did not converge, as ``policy`` says."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if solution.status is Status.CONVERGED or policy == "ignore":
        return
    message = f"{what} did not converge: {solution.summary()}"
    if policy == "raise":
        raise ConvergenceError(message, solution)
    warnings.warn(
        message + " (set policy='raise' to make this an error, or 'ignore' to silence it)",
        ConvergenceWarning,
        stacklevel=3,
    )
