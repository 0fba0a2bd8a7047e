"""The `Solver` interface and the one loop that runs every solver.

A solver only says how to take a step (``init`` / ``step``); :func:`~implicit.iterate` owns iteration,
per-sample stopping, masking, best-iterate tracking, telemetry and the status of the result.
The problem is always ``z = f(z)`` on a flat batch ``z`` of shape ``(B, n)``.

Per-sample semantics (Bai et al. 2019 solve a batch jointly; we keep samples apart):

* a sample stops when its residual (``stop="abs"`` or ``"rel"``, see :mod:`implicit.solution`)
  is ``≤ tol`` (and the dtype can resolve tol there, see :data:`PRECISION`), or it becomes
  non-finite, or it diverges (abs residual, or ``‖f(z)‖``, above ``divergence_factor`` × its
  initial value); from then on its record (returned iterate, residuals, nfe, status) no
  longer changes. A non-finite or diverged sample is also held at its last iterate (the
  solver steps from there, so f is never given its non-finite or huge values); a converged
  one goes on being iterated with the batch (cheaper than masking it out of every step, and
  harmless: those rows are discarded) — unless the caller can evaluate f on a subset of the
  samples (``fn_rows``): then once at most 3/4 of the samples in the solve are active, the
  stopped ones leave it (f, and for a ``selectable`` solver its whole state and step, then
  run on the active samples only);
* ``nfe[i]`` counts calls of ``f`` made while sample i was active; ``n_calls`` counts calls of
  ``f`` on the batch and is what ``max_iter`` bounds (the first evaluation ``f(z0)`` included);
* the returned iterate of each sample is the best one seen by its stopping residual
  (``returns="best"``, the default) or its last finite one (``returns="last"``, what the
  tutorial's Anderson and scipy return); the record's residuals are those of the returned
  iterate either way.
"""

from __future__ import annotations

import abc
import contextlib
import os
import weakref
from typing import Any, Callable, ClassVar, Optional, Union

import attrs
import torch
from attrs import validators as v

from . import accelerator
from .registry import PluginError
from .solution import POLICIES, STOP_MODES, Solution, Status, apply_policy
from .state import StateSpec
from .validators import nonnegative_number, one_of, positive_int

FlatFn = Callable[[torch.Tensor], torch.Tensor]
RETURNS: tuple[str, ...] = ("best", "last")


def _compile_ok(instance, attribute, value) -> None:
    if isinstance(value, str):
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if value not in backends:
            raise ValueError(f"compile={value!r} is not a torch.compile backend; use True "
                             f"(inductor), False, or one of {sorted(backends)}")
    elif not isinstance(value, bool):
        raise TypeError(f"compile must be True, False or a torch.compile backend name, got "
                        f"{value!r}")
    if not value:
        return
    if not type(instance).static:
        raise ValueError(f"solver {instance.name!r} has no fixed-shape step, so it cannot run "
                         "compiled; compile=True works with the forward and anderson solvers")
    if instance.trace:
        raise ValueError("trace=True is not available with compile=True (the compiled solve "
                         "keep no per-step record); use one or the other")
    if getattr(instance, "safeguard", None) is True:
        raise ValueError("safeguard=True is not available with compile=True (a step cut needs "
                         "a host check per step); use safeguard=None or False")


#: the ``threads`` option's value that picks the count per solve (:func:`auto_thread_count`)
AUTO_THREADS = "auto"


def check_threads(instance, attribute, value) -> None:
    if value is not None and value != AUTO_THREADS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"threads must be None, 'auto' or a positive int, got {value!r}")
        if value < 1:
            raise ValueError(f"threads must be at least 1, got {value}")
        if instance.compile:
            raise ValueError("threads is an option of the eager loop: a compiled solve's "
                             "kernels fix their thread count when they are compiled; use one "
                             "or the other")


@attrs.frozen(kw_only=True)
class Solver(abc.ABC):
    """Base class of fixed-point solvers for ``z = f(z)``.

    Subclasses are ``@attrs.frozen(kw_only=True)`` classes adding their own options and
    implementing :meth:`step` (and :meth:`init` when they keep state such as a history).
    The options below are shared by every solver and consumed by :func:`~implicit.iterate`.

    Rules for ``step``: call ``fn`` (an :class:`~implicit.solver.Evaluator`: it counts calls and knows the
    remaining budget) on the whole batch, at least once and at most ``fn.remaining`` times (a
    step that makes no call, or a call past the budget, is a :class:`~implicit.PluginError`
    naming the solver: the budget counts calls, so a step without one could repeat forever);
    never write in place into the tensors you are given (they may be the caller's); return the
    next iterate and ``fn`` of it. Rows of samples that are no longer active are discarded by
    the loop. A step that needs more than one call to do its work (a Krylov cycle) declares
    how many in :attr:`min_step_calls`.

    ``uses_residual``: a solver whose step needs ``g = f(z) − z`` sets this class attribute; the
    loop, which computes ``g`` for its stopping test anyway, then passes it as ``step(..., g=g)``
    (one pass over the state saved per step: these solvers are memory-bound on large states).

    A solver that computes ``g_next = f(z_next) − z_next`` anyway (Anderson writes it straight
    into its history) may return it as a fourth element, ``(z_next, fz_next, state, g_next)``;
    the loop then uses it instead of computing it again. It must be exactly that difference.

    ``release(state)`` is called once when a solve is over (buffers given back to
    :data:`implicit.workspace.workspace`, say); the state is not used afterwards.

    ``returns``: which iterate of a sample that stops without converging is returned,
    ``"best"`` by its stopping residual (default) or ``"last"`` (its latest finite one).

    ``check_every``: test "all samples done?" (a host synchronisation) every this many steps;
    default 1 on CPU and 4 on other devices (a few wasted, discarded steps at the end cost less
    than a sync per step).
    """

    name: ClassVar[str] = "solver"
    uses_residual: ClassVar[bool] = False
    #: whether :meth:`select` cuts a state to a subset of its samples
    selectable: ClassVar[bool] = False
    #: whether :meth:`static_init` / :meth:`static_step` give a fixed-shape step (compile=True)
    static: ClassVar[bool] = False
    #: keys of :meth:`static_init`'s dict whose tensors :meth:`static_step` may update by
    #: writing into them, when it is called with ``inplace=True`` (e.g. Anderson's histories);
    #: checked against :meth:`static_init` before a compiled solve (a :class:`~implicit.PluginError`)
    static_inplace: ClassVar[tuple[str, ...]] = ()
    #: the calls of f one :meth:`step` needs to do its work (at least 1): the loop starts a
    #: step only while the budget has this many calls left, and a solve that ends with fewer
    #: left and samples still active records them in ``Solution.stats["unused_calls"]``
    #: (GMRES: 2, a Krylov product and f at the new iterate, so ``max_iter=2`` evaluates
    #: ``f(z0)`` and takes no step). A step may still make fewer when it has less to do
    min_step_calls: ClassVar[int] = 1

    tol: float = attrs.field(default=1e-4, validator=nonnegative_number)
    max_iter: int = attrs.field(default=50, validator=positive_int)
    stop: str = attrs.field(default="rel", validator=one_of(*STOP_MODES))
    policy: str = attrs.field(default="warn", validator=one_of(*POLICIES))
    divergence_factor: float = attrs.field(default=1e8, validator=nonnegative_number)
    trace: bool = attrs.field(default=False, validator=v.instance_of(bool))
    returns: str = attrs.field(default="best", validator=one_of(*RETURNS))
    check_every: Optional[int] = attrs.field(
        default=None, validator=v.optional(positive_int)
    )
    #: run the solve ``torch.compile``-d (:mod:`implicit.compiled`; solvers with ``static =
    #: True``): True (inductor) or the name of a torch.compile backend ("eager", "aot_eager":
    #: tracing without code generation)
    compile: Union[bool, str] = attrs.field(default=False, validator=_compile_ok)
    #: how a compiled solve runs; None (the default) runs the whole solve as one compiled
    #: ``torch.while_loop``, stops tested on the device after every step, and an int k runs
    #: compiled blocks of k steps, the test on the host between blocks
    block: Optional[int] = attrs.field(default=None, validator=v.optional(positive_int))
    #: torch's intra-op thread count while the solve runs on CPU (the eager loop), given back
    #: afterwards: None (the default; ``newton_krylov``'s is ``"auto"``) leaves torch's
    #: setting alone; an int sets it; ``"auto"`` takes, at the start of each solve, torch's
    #: count less the CPUs that other processes' runnable threads hold at that moment
    #: (:func:`implicit.solver.auto_thread_count`; at least 1). The count a solve ran at is in
    #: ``Solution.stats["threads"]``. With one busy process beside it on the 2-core machine,
    #: each solver's loaded solve ran 1.7–3.3× faster on 1 thread than on torch's 2
    #: (``benchmarks/contention.py --threads torch,auto``); idle, "auto" kept 2. The count is
    #: process-wide: other threads of the process see it meanwhile, and a different count may
    #: round reductions differently. An int is refused with compile=True (``ift(compile=...)``
    #: leaves it off the adjoint it compiles); ``"auto"`` is ignored there (compiled kernels
    #: fix their own)
    threads: Union[None, int, str] = attrs.field(default=None, validator=check_threads)

    def init(self, z: torch.Tensor, fz: torch.Tensor) -> Any:
        """Algorithm state after the first evaluation ``fz = f(z)``; default: none."""
        return None

    @abc.abstractmethod
    def step(
        self, fn: FlatFn, z: torch.Tensor, fz: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Take one step from ``z`` (with ``fz = f(z)``); return ``(z_next, f(z_next), state)``."""

    def select(self, state: Any, keep: torch.Tensor) -> Any:
        """The state of the samples ``keep`` only (a ``(k,)`` int64 index into the batch,
        increasing): the loop drops samples that have stopped from the solve (see
        :func:`~implicit.iterate`'s ``fn_rows``). A solver whose samples are solved apart supports it by
        setting ``selectable = True`` and returning its state with every per-sample tensor cut
        to those rows; counts it reports in :meth:`stats` must keep the dropped samples' share.
        The given state is not used afterwards (its buffers may be given back)."""
        raise NotImplementedError(f"solver {self.name!r} cannot drop samples from its state")

    def stats(self, state: Any) -> dict:
        """Solver-specific telemetry read from the final state (e.g. fallback counts)."""
        return {}

    def static_init(self, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> Any:
        """The fixed-shape state of the compiled path (:mod:`implicit.compiled`): tensors
        only, whose shapes do not change over the solve (a dict where :attr:`static_inplace`
        names some of its keys). Default: no state."""
        return ()

    def static_step(self, fn: FlatFn, z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor,
                    state: Any, active: torch.Tensor, inplace: bool = False):
        """One step of the compiled path: exactly one call of ``fn`` on the whole batch, no
        host synchronisation, no Python value that changes from step to step, and no write into
        the tensors of ``state`` (the step runs inside a ``torch.while_loop``); returns
        ``(z_next, fz_next, g_next, state)`` with ``g_next = fz_next − z_next``. ``active``:
        the ``(B,)`` mask of samples the loop still counts.

        ``inplace=True`` (only for a solver that names keys in :attr:`static_inplace`): the
        tensors under those keys are held by the loop, not carried, and the step updates them
        by writing into them, returning them under the same keys. The whole-solve loop does
        this when grad is off (a ``torch.while_loop`` body may then write into tensors it
        closes over): a history of ``m`` slots then costs one slot's write a step, not a
        rebuilt copy of all ``m``."""
        raise NotImplementedError(f"solver {self.name!r} has no fixed-shape step")

    def static_stats(self, state: Any) -> dict:
        """Telemetry from the compiled path's final state; default: none."""
        return {}

    def release(self, state: Any) -> None:
        """The solve is over: free what ``state`` holds; default: nothing to do."""


class Evaluator:
    """``f`` as solvers see it: counts calls, checks shapes, knows the remaining budget.

    A solver that makes several calls in one step (a line search) must stop trying when
    ``remaining`` is 0, so ``n_calls`` never exceeds ``max_iter``.
    """

    def __init__(self, fn: FlatFn, budget: int,
                 fn_rows: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 owner: str = "") -> None:
        self.fn = fn
        # the solver whose calls these are, for messages ("" outside a solve)
        self.owner = owner
        self.fn_rows = fn_rows
        # set by the loop: the samples f is evaluated on (None: all); see `iterate`'s fn_rows
        self.rows: Optional[torch.Tensor] = None
        # set by the loop once it has dropped stopped samples from the solve: the samples (of
        # the caller's batch) that the iterates' rows are; f is then fn_rows on them
        self.work: Optional[torch.Tensor] = None
        self.budget = budget
        self.calls = 0
        # A solver whose samples make different numbers of calls within one step (per-sample
        # scipy solves) sets this (B,) tensor for the step; the loop then counts nfe from it.
        self.sample_calls: Optional[torch.Tensor] = None
        # Set by the loop before each step: the (B,) mask of samples it still counts, and the
        # (B,) ‖f(z) − z‖ and ‖f(z)‖ of the iterate the step starts from (a safeguard compares
        # against them); None outside the loop (a fixed-iteration block)
        self.active: Optional[torch.Tensor] = None
        self.residual: Optional[torch.Tensor] = None
        self.scale: Optional[torch.Tensor] = None
        # set by the loop while samples are held: ``(mask, z)``, the (B,) held samples and the
        # iterate whose rows they are held at; f is given those rows in their place, whatever
        # the solver proposes for them (its state may hold their non-finite or huge values)
        self.hold: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._last: Optional[weakref.ref] = None  # the latest value of f, while it is alive
        self._last_version: Optional[int] = None

    @property
    def remaining(self) -> int:
        return self.budget - self.calls

    def uncounted(self, z: torch.Tensor) -> torch.Tensor:
        """f off the budget, for directional derivatives (Newton–Krylov's products): the full
        batch, held samples at their held iterate as in a counted call."""
        if self.hold is not None and self.hold[1].shape == z.shape:
            z = torch.where(self.hold[0].unsqueeze(1), self.hold[1], z)
        return self.fn(z)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        checked = not torch.compiler.is_compiling()
        if checked and self.calls >= self.budget:
            who = f"solver {self.owner!r}" if self.owner else "the solver"
            raise PluginError(
                f"{who} called f past its budget: max_iter={self.budget} calls were all made "
                "(f(z0) included); a step must check fn.remaining before each call, and a solver "
                "whose step needs several declares how many in Solver.min_step_calls")
        self.calls += 1
        version = _version_of(z) if checked else None
        given = z
        if self.hold is not None and self.hold[1].shape == z.shape:
            z = torch.where(self.hold[0].unsqueeze(1), self.hold[1], z)
        if self.rows is not None:
            out = self._on_rows(z, self.rows)
        elif self.work is not None:
            out = self.fn_rows(z, self.work)
        else:
            out = self.fn(z)
        if not isinstance(out, torch.Tensor) or out.shape != z.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"f returned shape {shape} for an iterate of shape {tuple(z.shape)}; "
                "f must map a state to a state of the same shape"
            )
        if checked:
            self._check_no_writes(given, version, out)
        return out

    def _on_rows(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """f on the samples in ``rows`` only; the other rows of the result are ``z``'s own (a
        stand-in the loop never records: those samples have stopped)."""
        out = self.fn_rows(z.index_select(0, rows),
                           rows if self.work is None else self.work.index_select(0, rows))
        if not isinstance(out, torch.Tensor) or out.shape != (rows.numel(), z.shape[1]):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"fn_rows returned shape {shape} for {rows.numel()} rows of an "
                             f"iterate of shape {tuple(z.shape)}")
        return z.index_copy(0, rows, out)

    def _check_no_writes(self, z: torch.Tensor, version: Optional[int],
                         out: torch.Tensor) -> None:
        """Solvers keep earlier iterates and values of f by reference (Anderson's history, the
        best iterate), so f writing into either would silently corrupt the solve: detected by
        the tensors' version counters (bumped by every in-place write; inference-mode tensors
        have none and are not checked)."""
        advice = ("solvers keep earlier iterates and values of f by reference, so f (the cell's "
                  "update) must return new tensors: use out-of-place operations")
        if version is not None and _version_of(z) != version:
            raise ValueError(f"f wrote in place into the iterate it was given; {advice}")
        last = self._last() if self._last is not None else None
        if last is not None and _version_of(last) != self._last_version:
            raise ValueError("f wrote into a tensor it returned on an earlier call (an output "
                             f"buffer reused across calls); {advice}")
        self._last, self._last_version = weakref.ref(out), _version_of(out)


def _version_of(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter (bumped by in-place writes); None for inference-mode tensors."""
    return None if t.is_inference() else t._version


def residuals(z: torch.Tensor, fz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``‖f(z) − z‖`` and ``‖f(z) − z‖ / ‖f(z)‖`` of flat ``(B, n)`` tensors.

    ``0 / 0`` counts as 0 (z = f(z) = 0 is a fixed point); ``x / 0`` is huge, never converged.
    """
    return residual_norms(fz - z, fz)


def residual_norms(g: torch.Tensor, fz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`residuals` from a precomputed ``g = f(z) − z``."""
    abs_res, rel_res, _ = _norms(g, fz)
    return abs_res, rel_res


def _norms(g: torch.Tensor, fz: torch.Tensor):
    abs_res = torch.linalg.vector_norm(g, dim=1)
    scale = torch.linalg.vector_norm(fz, dim=1)
    return abs_res, abs_res / scale.clamp_min(torch.finfo(scale.dtype).tiny), scale


#: ``f(z) − z`` cannot be resolved below ``PRECISION · eps · ‖f(z)‖`` (one rounding of a vector
#: of that size; near a fixed point ``‖z‖ ≈ ‖f(z)‖``): at ``‖z‖ = 8e17`` in float64 a residual
#: of 0 says nothing about a true ``‖f(z) − z‖`` of 28. A residual below the tolerance is a
#: convergence claim only where this floor is below the tolerance too; otherwise the sample
#: goes on (and may end MAX_ITER), and the record's summary says "tolerance below attainable
#: precision". For ``stop="rel"`` the floor is ``PRECISION · eps``.
PRECISION = 1.0


def precision_floor(stop: str, scale: torch.Tensor) -> torch.Tensor | float:
    """The smallest ``abs`` (per sample, from ``scale = ‖f(z)‖``) or ``rel`` residual that the
    dtype of ``scale`` can resolve."""
    eps = torch.finfo(scale.dtype).eps
    return PRECISION * eps * scale if stop == "abs" else PRECISION * eps


def _meets(metric: torch.Tensor, scale: torch.Tensor, tol: float, stop: str):
    """``(met, imprecise)``: samples whose residual is ≤ tol where the dtype resolves tol, and
    those whose residual is ≤ tol only below that resolution (``None``: there can be none —
    a relative tolerance the dtype resolves, the common case, costs one comparison)."""
    below = metric <= tol
    floor = precision_floor(stop, scale)
    if stop != "abs":
        return (below, None) if floor <= tol else (torch.zeros_like(below), below)
    precise = floor <= tol
    return below & precise, below & ~precise


@attrs.frozen(kw_only=True, eq=False)
class FlatResult:
    """What :func:`~implicit.iterate` returns: the best iterate (keeps autograd history) and its record."""

    z: torch.Tensor
    solution: Solution


def runnable_elsewhere() -> Optional[int]:
    """Threads of other processes runnable on this machine right now (running or waiting for a
    CPU), from Linux's ``/proc``: the kernel's count of runnable threads (``/proc/loadavg``)
    less this process's own runnable ones. None where ``/proc`` cannot say (not Linux)."""
    try:
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        own = 0
        with os.scandir("/proc/self/task") as tasks:
            for task in tasks:
                with open(os.path.join(task.path, "stat")) as f:
                    stat = f.read()
                # "pid (comm) S ...": the state follows the last parenthesis (comm may hold any)
                own += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, runnable - own)


def auto_thread_count(default: int) -> int:
    """``threads="auto"``: torch's count ``default``, less the CPUs that other processes'
    runnable threads (:func:`runnable_elsewhere`) leave this one short of, and at least 1.
    An OpenMP team of more threads than free CPUs waits at every barrier for a thread the
    kernel has descheduled: on the 2-core machine with one busy process beside it, each of
    the library's solvers ran its loaded solve 1.7–3.3× as fast on 1 thread as on 2
    (``benchmarks/results/cpu-contention``, runs 5 and 6). One sample of the machine per
    solve, about 40 µs (measured: 37 µs)."""
    busy = runnable_elsewhere()
    if busy is None:
        return default
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or default
    return max(1, min(default, cpus - busy))


@contextlib.contextmanager
def _thread_count(threads: Union[int, str], z0: torch.Tensor):
    """The solver's ``threads`` option for one solve on CPU: torch's intra-op thread count
    set to it (or to :func:`auto_thread_count` for ``"auto"``), and given back afterwards
    (also when the solve raises). Yields the count the solve runs at (None off the CPU)."""
    if z0.device.type != "cpu":
        yield None
        return
    default = torch.get_num_threads()
    if threads == AUTO_THREADS:
        threads = auto_thread_count(default)
    if threads == default:
        yield threads
        return
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(default)


def iterate(
    solver: Solver,
    fn: FlatFn,
    z0: torch.Tensor,
    *,
    spec: StateSpec | None = None,
    what: str = "solve",
    fn_rows: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> FlatResult:
    """Run ``solver`` on ``z = fn(z)`` from ``z0`` (``(B, n)``) under the caller's grad mode.

    Out-of-place throughout, so it may run under autograd (unrolled differentiation). The
    record's ``z`` is the best iterate, detached, unflattened with ``spec`` when given. The
    solver's failure policy is applied to the record (``what`` names the solve in messages).

    ``fn_rows(z_rows, rows)``, when given, is ``fn`` evaluated on the samples ``rows`` (a
    ``(k,)`` int64 index) only — possible when sample i of ``fn`` depends on sample i alone.
    Once at most :data:`~implicit.solver.COMPACT_BELOW` of the batch is still active, the loop evaluates ``f``
    on the active samples only (on CPU, where the index is free to compute): in DEQ training
    most samples converge well before the slowest one, and their share of every cell call is
    work nobody reads. A solver that can cut its state to a subset of its samples
    (``selectable``: forward, Anderson, Broyden) then drops the stopped samples from the
    solve altogether — its history, mixing and the loop's bookkeeping shrink with the active
    set, each time it falls to 3/4 of the samples still in the solve (on MNIST-1D training,
    4% of a step's time; one-process A/B at step 150). The record is the same (up to the
    cell's rounding on a smaller batch).
    """
    if z0.dim() != 2:
        raise ValueError(f"iterate works on flat (B, n) states, got shape {tuple(z0.shape)}")
    if solver.compile:
        # the compiled loop builds on this module's names: imported here, not at the top
        from .compiled import iterate_compiled

        return iterate_compiled(solver, fn, z0, spec=spec, what=what)
    if solver.threads is None:  # torch's setting: no context to enter
        return _iterate(solver, fn, z0, spec, what, fn_rows)
    with _thread_count(solver.threads, z0) as threads:
        result = _iterate(solver, fn, z0, spec, what, fn_rows)
    if threads is not None:  # the count the solve ran at (CPU)
        result.solution.stats["threads"] = threads
    return result


def _iterate(solver: Solver, fn: FlatFn, z0: torch.Tensor, spec: StateSpec | None, what: str,
             fn_rows: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
             ) -> FlatResult:
    """The eager loop of :func:`iterate`."""
    counted = Evaluator(fn, budget=solver.max_iter, fn_rows=fn_rows, owner=solver.name)
    # a step is started only while the budget can pay for the calls it needs
    step_calls_min = _min_step_calls(solver)
    # On CPU a host check costs nothing, so whole-batch shortcuts (skip the masking copies
    # while every sample is active) pay; on accelerators we avoid the synchronisations.
    host_checks = accelerator.host_checks(z0)
    check_every = solver.check_every or (1 if host_checks else 4)

    tol = float(solver.tol)
    z = z0
    fz = counted(z)
    g = fz - z
    abs_res, rel_res, scale = _norms(g, fz)
    metric = abs_res if solver.stop == "abs" else rel_res
    # a NaN/Inf anywhere in z or f(z) makes ‖f(z) − z‖ non-finite
    finite = torch.isfinite(abs_res)
    # a residual below tol counts only where the dtype can resolve tol (see PRECISION)
    met, imprecise = _meets(metric, scale, tol, solver.stop)
    imprecise = finite & imprecise if imprecise is not None else torch.zeros_like(finite)
    converged = finite & met
    nonfinite = ~finite
    diverged = torch.zeros_like(converged)
    active = ~(converged | nonfinite)
    held = nonfinite.clone()  # samples whose iterate no longer changes (see the loop's end)
    if not bool(finite.all()):
        # a sample whose f(z0) is not finite is held at z0 from the start: the solver steps
        # from f(z0) := z0 there (a zero residual), never from the non-finite value, so f is
        # not given it (its record keeps the non-finite residuals)
        fz = torch.where(finite.unsqueeze(1), fz, z)
        g = fz - z
        counted.hold = (held, z.detach())
    nfe = torch.ones(z.shape[0], dtype=torch.int64, device=z.device)
    best = _Best(z=z, abs_res=abs_res, rel_res=rel_res, stop_abs=solver.stop == "abs")
    # divergence is judged against the initial residual: a solver that wanders off from a
    # nearly converged iterate may come back, one whose residual explodes past the start won't
    start_abs = torch.where(finite, abs_res, torch.full_like(abs_res, float("inf")))
    limit = solver.divergence_factor * start_abs if solver.divergence_factor > 0 else None
    # the iterate's growth too: a solver can run off with a bounded (or rounded-away) residual,
    # as Broyden once did to ‖z‖ = 8e17 with ‖g‖ ≈ 60; ‖f(z)‖ is computed anyway
    start_size = torch.where(finite, torch.maximum(scale, abs_res),
                             torch.full_like(abs_res, float("inf")))
    size_limit = solver.divergence_factor * start_size if limit is not None else None
    trace = [metric.detach()] if solver.trace else None
    state = solver.init(z, fz)
    keep_last = solver.returns == "last"
    # with fn_rows and a solver that can cut its state, the loop drops stopped samples from
    # the solve (state, iterates, solver work) once they are a quarter of it; their records
    # wait in `home` (full batch) and `work` says which samples the remaining rows are
    shrinking = (fn_rows is not None and host_checks and solver.selectable and trace is None
                 and z.shape[0] > 1)
    home: Optional[dict] = None
    work: Optional[torch.Tensor] = None

    step_index = 0
    while counted.remaining >= step_calls_min:
        if step_index % check_every == 0 and not bool(active.any()):
            break
        step_index += 1
        calls_before = counted.calls
        counted.active, counted.residual, counted.scale = active, abs_res, scale
        out = (solver.step(counted, z, fz, state, g=g) if solver.uses_residual
               else solver.step(counted, z, fz, state))
        z_new, fz_new, state = out[:3]
        step_calls = counted.calls - calls_before
        if step_calls == 0 and bool(active.any()):
            # the budget counts calls: a step that makes none could repeat forever (with no
            # sample active it is one of the few steps before the loop's next "all done?"
            # test, check_every, and the loop ends there)
            raise PluginError(
                f"solver {solver.name!r} took a step that made no call of f (after "
                f"{calls_before} of max_iter={solver.max_iter} calls); the budget counts calls, "
                "so such a step could repeat forever: a step must call f at least once, and a "
                "solver whose step needs several calls to do its work declares how many in "
                "Solver.min_step_calls, so that the loop does not start it with fewer left")
        if counted.sample_calls is not None:
            nfe.add_(active.long() * counted.sample_calls)
            counted.sample_calls = None
        else:
            nfe.add_(active if step_calls == 1 else active.long() * step_calls)

        g_new = out[3] if len(out) == 4 else fz_new - z_new
        abs_new, rel_new, scale_new = _norms(g_new, fz_new)
        metric_new = abs_new if solver.stop == "abs" else rel_new
        finite_new = torch.isfinite(abs_new)
        ok = active & finite_new
        improved = ok if keep_last else ok & (metric_new < best.metric)
        if host_checks and bool(improved.all()):
            best = _Best(z=z_new, abs_res=abs_new, rel_res=rel_new, stop_abs=best.stop_abs)
        else:
            best = best.where(improved, z_new, abs_new, rel_new)

        # the masks below nest (going ⊆ ok ⊆ active), so each split is one xor
        met_new, imprecise_new = _meets(metric_new, scale_new, tol, solver.stop)
        if imprecise_new is not None:
            imprecise |= ok & imprecise_new
        going = ok & ~met_new  # still active unless it diverged
        newly_converged = ok ^ going
        newly_nonfinite = active ^ ok
        # beyond the divergence limits: by the residual or by the iterate's size
        over = (abs_new > limit) | (scale_new > size_limit) if limit is not None else None
        newly_diverged = going & over if over is not None else None
        if newly_diverged is not None:
            going = going ^ newly_diverged
        if trace is not None:
            trace.append(torch.where(active, metric_new, trace[-1]).detach())

        # Converged samples go on iterating with the batch (their record is fixed: the best
        # iterate, nfe and status follow active samples only), which spares three masking
        # copies of the state per step once any sample has converged. A sample that is or
        # goes non-finite or beyond the divergence limits is held at its last iterate
        # instead, so that f is never given those values (a cell that mixes samples,
        # BatchNorm in training, would spread them to the others).
        blown = ~finite_new if over is None else ~finite_new | over
        held = held | (blown & ~going)
        if host_checks and not bool(held.any()):
            z, fz, g, abs_res, scale = z_new, fz_new, g_new, abs_new, scale_new
        else:
            keep = (~held).unsqueeze(1)
            z = torch.where(keep, z_new, z)
            fz = torch.where(keep, fz_new, fz)
            g = torch.where(keep, g_new, g) if solver.uses_residual else None
            abs_res = torch.where(held, abs_res, abs_new)
            scale = torch.where(held, scale, scale_new)
            counted.hold = (held, z.detach())
        converged |= newly_converged
        nonfinite |= newly_nonfinite
        if newly_diverged is not None:
            diverged |= newly_diverged
        if shrinking:
            keep = _kept_rows(going)
            if keep is not None:  # drop the stopped samples from the solve
                records = _records(nfe, converged, nonfinite, diverged, imprecise, best, scale)
                home = _put_home(home, work, records)
                work = keep if work is None else work.index_select(0, keep)
                counted.work = work
                nfe, converged, nonfinite, diverged, imprecise, best_z, best_abs, best_rel, \
                    scale = (t.index_select(0, keep) for t in records.values())
                best = _Best(z=best_z, abs_res=best_abs, rel_res=best_rel,
                             stop_abs=best.stop_abs)
                z, fz, abs_res, going = (t.index_select(0, keep) for t in (z, fz, abs_res, going))
                g = g.index_select(0, keep) if g is not None else None
                held = torch.zeros_like(going)
                counted.hold = None
                if limit is not None:
                    limit, size_limit = limit.index_select(0, keep), size_limit.index_select(0, keep)
                state = solver.select(state, keep)
        elif fn_rows is not None and host_checks:
            counted.rows = _compact_rows(going, counted.rows, active)
        active = going

    if work is not None:  # the samples still in the solve go back to their places
        home = _put_home(home, work, _records(nfe, converged, nonfinite, diverged, imprecise,
                                              best, scale))
        nfe, converged, nonfinite, diverged, imprecise, best_z, best_abs, best_rel, scale = \
            home.values()
        best = _Best(z=best_z, abs_res=best_abs, rel_res=best_rel, stop_abs=best.stop_abs)

    codes = torch.full_like(nfe, Status.MAX_ITER.code)
    codes = torch.where(diverged, Status.DIVERGED.code, codes)
    codes = torch.where(nonfinite, Status.NONFINITE.code, codes)
    codes = torch.where(converged, Status.CONVERGED.code, codes)
    codes = codes.to(torch.int8)
    worst = Status.from_code(int(codes.max())) if codes.numel() else Status.CONVERGED
    # loop_steps: steps taken; n_calls − 1 of them exactly when every step made one call
    stats = {**solver.stats(state), "loop_steps": step_index}
    if 0 < counted.remaining < step_calls_min and bool(active.any()):
        # the budget's last calls could not pay for a step: the record says so
        stats["unused_calls"] = counted.remaining
        stats["min_step_calls"] = step_calls_min
    below_precision = imprecise & ~converged
    if bool(below_precision.any()):
        stats["below_precision"] = int(below_precision.sum())
        stats["precision_scale"] = float(scale.detach()[below_precision].max())
    solver.release(state)
    record = Solution(
        z=spec.unflatten(best.z.detach()) if spec is not None else best.z.detach(),
        nfe=nfe,
        abs_residual=best.abs_res.detach(),
        rel_residual=best.rel_res.detach(),
        converged=converged,
        sample_status=codes,
        n_calls=counted.calls,
        status=worst,
        tol=tol,
        stop=solver.stop,
        solver=solver.name,
        trace=torch.stack(trace) if trace is not None else None,
        stats=stats,
        njvp=int(stats.get("njvp", 0)),
    )
    apply_policy(record, solver.policy, what=what)
    return FlatResult(z=best.z, solution=record)


def _min_step_calls(solver: Solver) -> int:
    """The solver's declared :attr:`Solver.min_step_calls`, checked (a positive int)."""
    count = type(solver).min_step_calls
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PluginError(f"solver {solver.name!r} declares min_step_calls={count!r}; it must be "
                          "a positive int, the calls of f one step needs to do its work")
    return count


#: the loop evaluates f on the active samples only once at most this share of the batch is
#: active (and the caller gave it ``fn_rows``); the gather and scatter cost two passes over
#: the state, which a convolutional cell repays at any share, a tiny one below ~0.7
COMPACT_BELOW = 0.75


def _kept_rows(going: torch.Tensor) -> Optional[torch.Tensor]:
    """The samples to keep in the solve (an index into its rows) once at most COMPACT_BELOW of
    them are still active, else None (keep them all)."""
    count = int(going.sum())
    if count == 0 or count > COMPACT_BELOW * going.numel():
        return None
    return going.nonzero().squeeze(1)


def _records(nfe, converged, nonfinite, diverged, imprecise, best: "_Best", scale) -> dict:
    """The per-sample tensors a solve's record is made of (``scale``: ‖f(z)‖ of the current
    iterate, for the precision note)."""
    return {"nfe": nfe, "converged": converged, "nonfinite": nonfinite, "diverged": diverged,
            "imprecise": imprecise, "z": best.z, "abs": best.abs_res, "rel": best.rel_res,
            "scale": scale}


def _put_home(home: Optional[dict], work: Optional[torch.Tensor], records: dict) -> dict:
    """The full batch's records with the rows of the samples ``work`` replaced by
    ``records`` (out of place: an unrolled solve differentiates through the best iterate)."""
    if work is None:
        return dict(records)
    return {k: home[k].index_copy(0, work, v) for k, v in records.items()}


def _compact_rows(going: torch.Tensor, rows: Optional[torch.Tensor],
                  active: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows to evaluate f on after this step: the active samples' index once they are at
    most COMPACT_BELOW of the batch, else None (all); recomputed only when the active set
    changed this step (``rows`` is returned unchanged otherwise)."""
    count = int(going.sum())
    if count == 0 or count > COMPACT_BELOW * going.numel():
        return None
    if rows is not None and bool(torch.equal(going, active)):
        return rows
    return going.nonzero().squeeze(1)


def step_block(solver: Solver, fn: FlatFn, z: torch.Tensor, fz: torch.Tensor, state: Any,
               steps: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``steps`` steps of ``solver`` from ``(z, fz = fn(z), state)`` with no stopping test, no
    masking and no record: a fixed-iteration block without host synchronisation, the unit to
    hand to ``torch.compile`` (``compile_block``). Stops, per-sample records and telemetry
    stay outside, in :func:`~implicit.iterate`. ``state`` is ``solver.init(z, fz)`` or a previous
    block's."""
    counted = fn if isinstance(fn, Evaluator) else Evaluator(fn, budget=steps * 1_000)
    g = None
    for _ in range(steps):
        if solver.uses_residual:
            out = solver.step(counted, z, fz, state, g=fz - z if g is None else g)
        else:
            out = solver.step(counted, z, fz, state)
        z, fz, state = out[:3]
        g = out[3] if len(out) == 4 else None
    return z, fz, state


def compile_block(solver: Solver, fn: FlatFn, steps: int, **compile_options: Any):
    """``torch.compile`` of :func:`step_block` for ``solver`` and ``fn`` (``steps`` fixed):
    ``block(z, fz, state) -> (z, fz, state)``; ``torch._dynamo.explain`` reports no graph
    break for the built-in forward and Anderson solvers on the built-in cells."""

    def block(z: torch.Tensor, fz: torch.Tensor, state: Any):
        return step_block(solver, fn, z, fz, state, steps)

    return torch.compile(block, **compile_options)


@attrs.frozen(eq=False)
class _Best:
    """Per-sample best iterate by the stopping residual (``abs_res`` or ``rel_res``)."""

    z: torch.Tensor
    abs_res: torch.Tensor
    rel_res: torch.Tensor
    stop_abs: bool

    @property
    def metric(self) -> torch.Tensor:
        return self.abs_res if self.stop_abs else self.rel_res

    def where(self, mask, z, abs_res, rel_res) -> _Best:
        return _Best(
            z=torch.where(mask.unsqueeze(1), z, self.z),
            abs_res=torch.where(mask, abs_res, self.abs_res),
            rel_res=torch.where(mask, rel_res, self.rel_res),
            stop_abs=self.stop_abs,
        )

