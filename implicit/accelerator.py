"""Which code paths a tensor takes: CPU host checks, or the accelerator branches.

On CPU a host synchronisation costs nothing, so the solver loop tests "every sample done?" after
each step and takes whole-batch shortcuts (no masking copies while every sample is active),
solvers skip fix-ups when a host check says nothing failed, and the workspace pools history
buffers. On accelerators all of that would stall the device: the loop tests stopping every
``check_every = 4`` steps, fix-ups run unconditionally, and nothing is pooled.

For contributors: ``IMPLICIT_ACCELERATOR_PATHS=1`` in the environment, or the context manager
:func:`accelerator_paths`, makes CPU tensors take the accelerator branches, so CI (which has no
GPU) runs them. Results agree with the CPU branches: the same z*, ``nfe``, residuals and
statuses; only ``n_calls`` may be larger, by at most ``check_every − 1`` calls made after the
last sample stopped (the loop notices only at its next check)::

    with implicit.accelerator.accelerator_paths():
        sol = implicit.solve(f, z0, solver="anderson")   # the branches a GPU would take
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

import torch

ENV = "IMPLICIT_ACCELERATOR_PATHS"
_FORCED: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar(
    "implicit_accelerator_paths", default=None)


def forced() -> bool:
    """Whether CPU tensors are told to take the accelerator branches."""
    value = _FORCED.get()
    if value is not None:
        return value
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("", "0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV} must be 1/true/yes/on or 0/false/no/off, got {setting!r}")


def host_checks(tensor: torch.Tensor) -> bool:
    """True where a host check is free and allowed: a CPU tensor, branches not forced."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling() and not forced()


@contextlib.contextmanager
def accelerator_paths(enabled: bool = True) -> Iterator[None]:
    """Within the block, CPU tensors take the accelerator branches (``enabled=False``: they
    do not, whatever the environment says)."""
    token = _FORCED.set(enabled)
    try:
        yield
    finally:
        _FORCED.reset(token)
