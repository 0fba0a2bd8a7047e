"""A third-party solver plugin: averaged iteration z <- (z + f(z)) / 2.

Install it (``pip install -e examples/implicit-example-solver``) and ``implicit plugins`` lists
``halving``; ``implicit verify implicit-example-solver`` checks its contracts.
"""

from typing import ClassVar

import attrs

import implicit


@attrs.frozen(kw_only=True)
class Halving(implicit.Solver):
    """Averaged fixed-point iteration z <- (z + f(z)) / 2."""

    name: ClassVar[str] = "halving"

    def step(self, fn, z, fz, state):
        z_next = 0.5 * (z + fz)
        return z_next, fn(z_next), state


@implicit.hookimpl
def implicit_register_solvers(register):
    register(implicit.SolverSpec(name="halving", factory=Halving, capabilities={"unrollable"}))
