"""Hook specifications of the ``implicit_layers`` plugin system (pluggy).

A plugin is a module (or object) with functions marked ``@implicit.hookimpl``, made known
through the ``implicit_layers`` entry-point group::

    # pyproject.toml of your distribution
    [project.entry-points.implicit_layers]
    my_solvers = "my_package.solvers"

Each hook receives a *registrar*: call it with a spec record, once per plugin thing you provide.
The registrar validates the record and fails naming your plugin if something is wrong.
"""

from __future__ import annotations

import pluggy

PROJECT = "implicit_layers"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def implicit_register_solvers(register):
    """Register fixed-point solvers.

    Call ``register(SolverSpec(...))`` for each solver. The factory must build an
    :class:`implicit.Solver` from keyword options; it must not touch other plugins' specs or
    global torch state. Example::

        @implicit.hookimpl
        def implicit_register_solvers(register):
            register(implicit.SolverSpec(name="my_solver", factory=MySolver))
    """


@hookspec
def implicit_register_cells(register):
    """Register cells.

    Call ``register(CellSpec(...))`` for each cell family. The factory builds an ``nn.Module``
    cell from keyword options; ``strategy`` (optional) returns a Hypothesis strategy drawing a
    contractive :class:`implicit.CellExample`, so contract tests can exercise the cell.
    Example::

        @implicit.hookimpl
        def implicit_register_cells(register):
            register(implicit.CellSpec(name="my_cell", factory=MyCell, strategy=my_examples))
    """


@hookspec
def implicit_register_backwards(register):
    """Register backward strategies.

    Call ``register(BackwardSpec(...))`` for each strategy. The factory builds an
    :class:`implicit.BackwardStrategy` from keyword options. Example::

        @implicit.hookimpl
        def implicit_register_backwards(register):
            register(implicit.BackwardSpec(name="my_backward", factory=MyBackward))
    """
