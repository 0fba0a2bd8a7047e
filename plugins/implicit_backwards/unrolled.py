"""Unrolled differentiation: run the solver itself under autograd.

Memory grows with the number of solver iterations (the whole trajectory is kept), unlike
``ift``/``phantom``; in exchange the gradient is the exact derivative of the computed iterate —
with a converged forward it matches ``ift``, which makes it the reference. ``checkpoint=True``
recomputes each cell evaluation in backward (``torch.utils.checkpoint``, ``use_reentrant=False``)
so only the iterates are stored. ``depth=N`` runs exactly N calls of the cell regardless of the
tolerance: a weight-tied N-layer network, the deq repo's "pre-training" mode (see
``DEQ(pretrain_steps=..., pretrain_backward=...)``).

Only solvers declaring the ``unrollable`` capability (out-of-place steps) can run under it.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import attrs
import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import implicit
from implicit.validators import optional_positive_int


@attrs.frozen(kw_only=True)
class Unrolled(implicit.BackwardStrategy):
    """Backprop through the solver's iterations (memory O(iterations)); optional checkpointing."""

    name: ClassVar[str] = "unrolled"

    checkpoint: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    depth: Optional[int] = attrs.field(default=None, validator=optional_positive_int)

    def __call__(self, problem: implicit.Problem, solver: implicit.Solver) -> implicit.FlatResult:
        if self.depth is not None:
            solver = attrs.evolve(solver, tol=0.0, max_iter=self.depth, policy="ignore",
                                  divergence_factor=0.0)
        fn = problem.fn
        if self.checkpoint and problem.needs_graph:
            def fn(z: torch.Tensor) -> torch.Tensor:  # noqa: F811
                return torch_checkpoint(problem.fn, z, use_reentrant=False)

        with torch.set_grad_enabled(problem.needs_graph):
            return implicit.iterate(solver, fn, problem.z0, spec=problem.spec, what=problem.what)


def _options():
    from hypothesis import strategies as st

    # depth truncates the unrolling (not exact), so the exact contracts draw checkpoint only
    return st.fixed_dictionaries({"checkpoint": st.booleans()})


@implicit.hookimpl
def implicit_register_backwards(register):
    register(
        implicit.BackwardSpec(
            name="unrolled",
            factory=Unrolled,
            capabilities={"exact", "second_order", "backprop_through_iterates"},
            requires={"unrollable"},
            option_strategy=_options,
        )
    )
