"""implicit-layers: implicit layers (deep equilibrium models) for PyTorch.

Solvers, backward strategies and cells are plugins of the ``implicit_layers`` entry-point
group; the core here defines their interfaces, the shared solver loop, the :class:`DEQ` layer
and the registry. (Not to be confused with benfred's recommender library, which also imports
as ``implicit``.)
"""

from importlib.metadata import PackageNotFoundError, version

from . import stability
from .backward import BackwardStrategy, Problem
from .cell import Cell
from .compiled import CompiledFallbackWarning
from .deq import DEQ, EquilibriumWarning, solve
from .hookspecs import hookimpl
from .registry import (
    OptionError,
    PluginError,
    Registered,
    Registry,
    UnknownPluginError,
    get_registry,
    list_plugins,
    make_backward,
    make_cell,
    make_solver,
    use_registry,
)
from .solution import ConvergenceError, ConvergenceWarning, Solution, Status
from .solver import FlatResult, Solver, iterate
from . import accelerator, problems
from .specs import (BackwardSpec, CellExample, CellSpec, Guarantee, Instance, OptionSpec,
                    SolverSpec, StepFormula, Workload, seeded)

try:
    __version__ = version("implicit-layers")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "DEQ",
    "EquilibriumWarning",
    "BackwardSpec",
    "BackwardStrategy",
    "Cell",
    "CellExample",
    "CellSpec",
    "ConvergenceError",
    "CompiledFallbackWarning",
    "ConvergenceWarning",
    "FlatResult",
    "Guarantee",
    "StepFormula",
    "Instance",
    "OptionError",
    "OptionSpec",
    "PluginError",
    "Problem",
    "Registered",
    "Registry",
    "Solution",
    "Solver",
    "SolverSpec",
    "Status",
    "UnknownPluginError",
    "get_registry",
    "hookimpl",
    "iterate",
    "list_plugins",
    "make_backward",
    "make_cell",
    "make_solver",
    "seeded",
    "solve",
    "stability",
    "use_registry",
    "Workload",
    "accelerator",
    "problems",
]
