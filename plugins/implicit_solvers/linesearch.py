"""Per-sample backtracking on ‖f(z) − z‖, shared by the quasi-Newton and Newton solvers.

Not a plugin (it registers nothing): a helper of the ``implicit_solvers`` family.
"""

from __future__ import annotations

import torch


def backtrack(fn, z: torch.Tensor, direction: torch.Tensor, z_next: torch.Tensor,
              fz_next: torch.Tensor, g_norm: torch.Tensor, halvings: int):
    """Halve the step ``z + t · direction`` of each sample whose residual did not decrease
    (Armijo-style: ``‖g(z_next)‖ > (1 − 1e-4 t) ‖g(z)‖``), at most ``halvings`` times and never
    past ``fn.remaining``. ``(z_next, fz_next)`` is the full step and its value; returns the
    accepted ``(z_next, fz_next)`` and the number of extra calls of ``fn`` made."""
    step = torch.ones_like(g_norm)
    calls = 0
    for _ in range(halvings):
        worse = torch.linalg.vector_norm(fz_next - z_next, dim=1) > (1 - 1e-4 * step) * g_norm
        if fn.remaining <= 0 or not bool(worse.any()):
            break
        step = torch.where(worse, step / 2, step)
        trial = z + step[:, None] * direction
        f_trial = fn(trial)
        calls += 1
        z_next = torch.where(worse[:, None], trial, z_next)
        fz_next = torch.where(worse[:, None], f_trial, fz_next)
    return z_next, fz_next, calls
