"""Limited-memory "good" Broyden on the inverse Jacobian (Broyden 1965; DEQ slides,
../shared/seeds/000; Bai et al. 2019).

Root-finding on ``g(z) = f(z) − z``. ``B ≈ J_g⁻¹`` starts at ``B₀ = −I`` (so the first step is
a plain fixed-point step) and after each step takes the rank-one update that satisfies the
secant condition ``B Δg = Δz`` and changes ``B`` least in the direction ``Δzᵀ B``:

    B ← B + (Δz − B Δg) Δzᵀ B / (Δzᵀ B Δg)

``B = −I + U Vᵀ`` is kept as ``memory`` rank-one terms per sample; when they are used up the
approximation restarts from ``B₀ = −I`` (counted in ``stats["restarts"]``). Overwriting the
oldest term instead, as the deq repo does, leaves a ``B`` that satisfies no secant condition in
particular, and on stiff cells (the MDEQ fixture of our tests) it blew up near convergence. A sample whose denominator is ~0 skips the update
(counted in ``Solution.stats["skipped_updates"]``). The optional backtracking line search halves
the step per sample while ``‖g‖`` does not decrease, using at most ``ls_steps`` extra calls of f
and never more than the remaining budget. The loop returns each sample's best iterate.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import attrs
import torch

import implicit
from implicit.validators import positive_int
from implicit.workspace import workspace

from .linesearch import backtrack
from .rows import combine, dots


def broyden_update(
    U: torch.Tensor,
    VT: torch.Tensor,
    used: int,
    slot: int,
    dz: torch.Tensor,
    b_dg: torch.Tensor,
    dg: torch.Tensor,
) -> torch.Tensor:
    """Write the update for ``(Δz, Δg)`` into row ``slot`` of ``U`` and ``VT`` (both
    ``(B, L, n)``: ``B = −I + Σ_i u_i v_iᵀ``), given ``used`` rows in use and ``b_dg = B Δg``
    under the current B; return the ``(B,)`` mask of samples that moved but whose update was
    skipped (denominator ~0)."""
    vT = rmatvec(U[:, :used], VT[:, :used], dz)  # Δzᵀ B
    denom = dots(dg, vT.unsqueeze(1))[:, 0]  # batched dot as a (1, n) @ (n, 1) gemm
    tiny = torch.finfo(dz.dtype).eps * (
        torch.linalg.vector_norm(vT, dim=1) * torch.linalg.vector_norm(dg, dim=1)
    )
    skip = ~(denom.abs() > tiny) | ~torch.isfinite(denom)
    moved = torch.linalg.vector_norm(dz, dim=1) > 0  # finished samples are frozen: Δz = 0
    keep = (~skip).to(dz.dtype)
    safe = torch.where(skip, torch.ones_like(denom), denom)
    if torch.compiler.is_compiling():  # dynamo cannot trace out= into a strided slice
        U[:, slot] = (dz - b_dg) * (keep / safe)[:, None]
        VT[:, slot] = vT * keep[:, None]
    else:  # eager: write straight into the history (these steps are memory-bound)
        torch.mul(dz - b_dg, (keep / safe)[:, None], out=U[:, slot])
        torch.mul(vT, keep[:, None], out=VT[:, slot])
    return skip & moved


def matvec(U: torch.Tensor, VT: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``B x`` for ``B = −I + Σ_i u_i v_iᵀ`` (rows of ``U``, ``VT``: ``(B, k, n)``)."""
    return combine(dots(x, VT), U, base=x, base_scale=-1.0)  # −x + Σ_i (v_i · x) u_i


def rmatvec(U: torch.Tensor, VT: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``xᵀ B`` for ``B = −I + Σ_i u_i v_iᵀ``, as a ``(B, n)`` tensor."""
    return combine(dots(x, U), VT, base=x, base_scale=-1.0)  # −x + Σ_i (x · u_i) v_i


@attrs.define
class BroydenState:
    U: torch.Tensor  # (B, L, n) rows u_i
    VT: torch.Tensor  # (B, L, n) rows v_i
    used: int
    restarts: int
    prev_z: Optional[torch.Tensor]
    prev_g: Optional[torch.Tensor]
    prev_bg: Optional[torch.Tensor]  # B g at the previous iterate (the B it stepped with)
    skipped: torch.Tensor  # (B,) int64
    ls_calls: int


@attrs.frozen(kw_only=True)
class Broyden(implicit.Solver):
    """Limited-memory good Broyden (inverse Jacobian, B0 = -I), optional line search."""

    name: ClassVar[str] = "broyden"
    uses_residual: ClassVar[bool] = True

    memory: int = attrs.field(default=30, validator=positive_int)
    line_search: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    ls_steps: int = attrs.field(default=3, validator=positive_int)

    def init(self, z: torch.Tensor, fz: torch.Tensor) -> BroydenState:
        b, n = z.shape
        return BroydenState(
            # rows beyond `used` are never read; the buffers are reused across solves on CPU
            U=workspace.empty(b, self.memory, n, like=z),
            VT=workspace.empty(b, self.memory, n, like=z),
            used=0,
            restarts=0,
            prev_z=None,
            prev_g=None,
            prev_bg=None,
            skipped=torch.zeros(b, dtype=torch.int64, device=z.device),
            ls_calls=0,
        )

    def step(self, fn, z, fz, state: BroydenState, g=None):
        if g is None:
            g = fz - z
        if state.used == self.memory:  # memory full: restart from B = −I
            state.used = 0
            state.restarts += 1
            state.prev_z = None
        b_g = matvec(state.U[:, : state.used], state.VT[:, : state.used], g)  # B g, current B
        if state.prev_z is not None:
            # B Δg = B g − B g_prev under the current B: no second pass over the history
            slot = state.used
            dz, dg = z - state.prev_z, g - state.prev_g
            skip = broyden_update(state.U, state.VT, state.used, slot, dz,
                                  b_g - state.prev_bg, dg)
            state.skipped += skip
            state.used += 1
            # B_new g = B g + u (vᵀ g)
            coeff = dots(g, state.VT[:, slot : slot + 1])[:, 0]
            b_g = torch.addcmul(b_g, state.U[:, slot], coeff[:, None])
        state.prev_z, state.prev_g, state.prev_bg = z, g, b_g
        z_next = z - b_g  # the quasi-Newton step −B g
        fz_next = fn(z_next)
        if self.line_search:
            z_next, fz_next, calls = backtrack(fn, z, -b_g, z_next, fz_next,
                                               torch.linalg.vector_norm(g, dim=1),
                                               halvings=self.ls_steps)
            state.ls_calls += calls
        return z_next, fz_next, state

    def stats(self, state: BroydenState) -> dict:
        return {"skipped_updates": int(state.skipped.sum()), "line_search_calls": state.ls_calls,
                "restarts": state.restarts}

    def release(self, state: BroydenState) -> None:
        workspace.give(state.U, state.VT)


@implicit.hookimpl
def implicit_register_solvers(register):
    register(
        implicit.SolverSpec(name="broyden", factory=Broyden, equivalents={"torchdeq": "broyden"})
    )
