"""A deliberately broken solver plugin: it updates the iterate in place, so the caller's z0 is
modified — ``implicit verify implicit-example-broken`` must fail with a readable report."""

from typing import ClassVar

import attrs

import implicit


@attrs.frozen(kw_only=True)
class InPlace(implicit.Solver):
    """Averaged iteration that (wrongly) writes into the iterate it is given."""

    name: ClassVar[str] = "in_place"

    def step(self, fn, z, fz, state):
        z.mul_(0.5).add_(fz, alpha=0.5)  # the bug: z may be the caller's tensor
        return z, fn(z), state


@implicit.hookimpl
def implicit_register_solvers(register):
    register(implicit.SolverSpec(name="in_place", factory=InPlace))
