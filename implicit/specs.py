"""What a plugin registers: frozen spec records with a factory, capabilities and option schema.

The option schema is read from the factory (attrs fields, or keyword parameters of a function or
class ``__init__``) unless given explicitly; :func:`implicit.make_solver` and friends check user
options against it, with a did-you-mean for misspellings.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

import attrs
import torch
from attrs import validators as v
from .validators import one_of

#: Capabilities a plugin may declare, per kind. A typo in a capability is a registration error.
KNOWN_CAPABILITIES: Mapping[str, frozenset[str]] = {
    "solver": frozenset(
        {
            "linear_only",  # only valid for affine maps (e.g. GMRES on the IFT adjoint)
            "contraction_convergent",  # provably converges on a contraction (Banach iteration)
            "unrollable",  # out-of-place steps: may run under autograd (unrolled backward)
            "uses_jvp",  # takes Jacobian-vector products of f
            "uses_vjp",  # takes vector-Jacobian products of f
        }
    ),
    "cell": frozenset(
        {
            "batch_independent",  # row i of f(z, x) depends on row i of z and x only
            "forward_ad",  # torch.func.jvp works through the cell
            "tuple_state",  # the state is a tuple of tensors
            "stochastic",  # random in train mode (e.g. variational dropout)
            "lipschitz_bounded",  # its strategy's examples carry a Lipschitz bound L < 1
        }
    ),
    "backward": frozenset(
        {
            "second_order",  # gives correct second derivatives
            "backprop_through_iterates",  # the gradient of the solver's own iterates (unrolled)
            "exact",  # the gradient is exact up to the solver tolerances (vs approximate)
            "adjoint_solver",  # takes a `solver` option: the solver of its adjoint problem
        }
    ),
}
DEVICES = frozenset({"cpu", "cuda"})
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class _Required:
    """Marker for an option without a default."""

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@attrs.frozen(kw_only=True)
class OptionSpec:
    """One option of a plugin: name, default (:data:`~implicit.specs.REQUIRED` when none), type, doc."""

    name: str
    default: Any = REQUIRED
    annotation: str = ""
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default!r}"
        kind = f": {self.annotation}" if self.annotation else ""
        return f"{self.name}{kind} ({default})"


def options_of(factory: Callable) -> Optional[dict[str, OptionSpec]]:
    """Read the option schema of ``factory``; ``None`` if it takes ``**kwargs`` (not readable)."""
    if inspect.isclass(factory) and attrs.has(factory):
        return {
            f.alias: OptionSpec(
                name=f.alias,
                default=_attrs_default(f.default),
                annotation=_annotation(f.type),
            )
            for f in attrs.fields(factory)
            if f.init
        }
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    options = {}
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            default = REQUIRED if p.default is p.empty else p.default
            annotation = "" if p.annotation is p.empty else _annotation(p.annotation)
            options[p.name] = OptionSpec(name=p.name, default=default, annotation=annotation)
    return options


def _attrs_default(default: Any) -> Any:
    if default is attrs.NOTHING:
        return REQUIRED
    if isinstance(default, attrs.Factory) and not default.takes_self:
        return default.factory()
    return default


def _annotation(tp: Any) -> str:
    if tp is None:
        return ""
    if isinstance(tp, str):
        return tp
    return getattr(tp, "__name__", None) or str(tp)


def _frozenset_of_str(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset({value})
    return frozenset(value)


def _check_name(instance, attribute, value):
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"name must be lower_snake_case (letters, digits, '_', starting with a letter), "
            f"got {value!r}"
        )


def _check_factory(instance, attribute, value):
    if not callable(value):
        raise TypeError(f"factory must be callable, got {type(value).__name__}")


def _check_capabilities(instance, attribute, value):
    known = KNOWN_CAPABILITIES[instance.kind]
    unknown = sorted(value - known)
    if unknown:
        raise ValueError(
            f"unknown {instance.kind} capabilities {unknown}; known: {sorted(known)}"
        )


def _check_requires(instance, attribute, value):
    partner = {"solver": "cell", "backward": "solver", "cell": None}[instance.kind]
    if value and partner is None:
        raise ValueError("a cell spec cannot require capabilities of another plugin")
    if partner is not None:
        unknown = sorted(value - KNOWN_CAPABILITIES[partner])
        if unknown:
            raise ValueError(
                f"requires unknown {partner} capabilities {unknown}; "
                f"known: {sorted(KNOWN_CAPABILITIES[partner])}"
            )


def _check_devices(instance, attribute, value):
    if not value or not value <= DEVICES:
        raise ValueError(f"devices must be a non-empty subset of {sorted(DEVICES)}, got {value}")


def _check_options(instance, attribute, value):
    if value is None:
        return
    for key, opt in value.items():
        if not isinstance(opt, OptionSpec) or opt.name != key:
            raise TypeError(f"options[{key!r}] must be an OptionSpec named {key!r}")
    accepted = options_of(instance.factory)
    if accepted is not None:
        extra = sorted(set(value) - set(accepted))
        if extra:
            raise ValueError(f"options {extra} are not accepted by the factory {instance.factory}")


@attrs.frozen(kw_only=True)
class PluginSpec:
    """Common fields of what plugins register.

    Attributes:
        name: the name users pass to ``make_*`` / ``DEQ`` (lower_snake_case, unique per kind).
        factory: builds the thing from keyword options.
        capabilities: what it can do (see :data:`~implicit.specs.KNOWN_CAPABILITIES`).
        requires: capabilities it needs of its partner (a backward of the solver, a solver of
            the cell); combinations that lack them are not built by the test matrix or bench.
        devices: where it runs.
        options: option schema; read from the factory when omitted.
        summary: one line for listings; the factory's docstring's first line when omitted.
        equivalents: how other libraries name the same thing, for ``implicit bench --compare``
            (e.g. ``{"torchdeq": "anderson"}`` for a solver, ``{"torchdeq": {"ift": True}}``
            for a backward: the keyword arguments of ``torchdeq.get_deq``).
        option_strategy: for the contract suite, a callable returning a Hypothesis strategy of
            option dicts (keys from the schema) covering the options' valid space; every
            contract of the plugin draws its options from it (imported lazily: Hypothesis is a
            test dependency). ``None``: only the defaults are exercised, and the report says so.
    """

    kind: ClassVar[str] = "plugin"

    name: str = attrs.field(validator=_check_name)
    factory: Callable = attrs.field(validator=_check_factory)
    capabilities: frozenset[str] = attrs.field(
        factory=frozenset, converter=_frozenset_of_str, validator=_check_capabilities
    )
    requires: frozenset[str] = attrs.field(
        factory=frozenset, converter=_frozenset_of_str, validator=_check_requires
    )
    devices: frozenset[str] = attrs.field(
        default=DEVICES, converter=_frozenset_of_str, validator=_check_devices
    )
    options: Optional[Mapping[str, OptionSpec]] = attrs.field(
        default=None, validator=_check_options
    )
    summary: str = attrs.field(default="", validator=v.instance_of(str))
    equivalents: Mapping[str, Any] = attrs.field(
        factory=dict, converter=dict, validator=v.deep_mapping(v.instance_of(str), lambda *a: None)
    )
    option_strategy: Optional[Callable[[], Any]] = attrs.field(
        default=None, validator=v.optional(v.is_callable())
    )

    @property
    def option_schema(self) -> Mapping[str, OptionSpec]:
        """The declared options, else those read from the factory (empty if unreadable)."""
        if self.options is not None:
            return self.options
        return options_of(self.factory) or {}

    @property
    def schema_known(self) -> bool:
        """False when the factory takes ``**kwargs`` and no schema was declared."""
        return self.options is not None or options_of(self.factory) is not None

    @property
    def description(self) -> str:
        if self.summary:
            return self.summary
        doc = inspect.getdoc(self.factory) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


#: the problem classes an efficacy :class:`~implicit.specs.Guarantee` can be stated on
GUARANTEE_PROBLEMS: Mapping[str, str] = {
    "linear": "f(z) = A z + b per sample, float64, ‖A‖₂ = L < 1 (so I − A is nonsingular, "
              "condition number ≤ (1 + L)/(1 − L)), state dimension n ≤ 6",
    "contraction": "a cell drawn by its family's strategy with a known Lipschitz bound L < 1",
    "linear_float32": "f(z) = A z + b per sample computed in float32, ‖A‖₂ = L < 1, state "
                      "dimension n ≤ 6 (the paths a solver takes only below float64)",
}


@attrs.frozen(kw_only=True)
class Instance:
    """What an efficacy bound may read about the drawn problem: state dimension ``n``, the
    Lipschitz bound ``lipschitz`` (``‖A‖₂`` for a linear map), the largest initial residual
    ``r0 = max_i ‖f(z0_i) − z0_i‖``, the absolute tolerance ``tol`` of the solve (``stop="abs"``)
    and a bound ``scale`` on ``‖f(z0)‖`` (for the round-off floor)."""

    n: int
    lipschitz: float
    r0: float
    tol: float
    scale: float = 1.0
    dtype: torch.dtype = torch.float64


def _check_problem(instance, attribute, value):
    if value not in GUARANTEE_PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(GUARANTEE_PROBLEMS)}, got {value!r}")


@attrs.frozen(kw_only=True)
class Guarantee:
    """An efficacy claim: a theorem about the solver that the contract suite checks.

    On every problem of the class ``problem`` (see :data:`~implicit.specs.GUARANTEE_PROBLEMS`), built with the
    options ``options(instance, drawn)`` (the drawn ones, changed where the theorem's hypotheses
    need it, e.g. Anderson's ``m ≥ n + 1``), a solve with ``stop="abs"`` and tolerance ``instance.tol``
    converges every sample within ``calls(solver, instance)`` calls of f. ``calls`` returns
    ``None`` when the hypotheses do not hold for these options (the case is then counted as no
    claim, and a case with too few claims fails as vacuous). ``statement`` is the theorem with
    its source and the slack allowed for finite precision, as the report shows it.

    Example (a solver that finds the root of a linear map in one Newton step)::

        Guarantee(problem="linear", statement="one Newton step is exact on an affine map",
                  calls=lambda solver, inst: 2)
    """

    problem: str = attrs.field(validator=_check_problem)
    calls: Callable[[Any, Instance], Optional[int]] = attrs.field(validator=v.is_callable())
    statement: str = attrs.field(validator=v.instance_of(str))
    options: Callable[[Instance, Mapping[str, Any]], Mapping[str, Any]] = attrs.field(
        default=lambda instance, drawn: drawn, validator=v.is_callable()
    )


def _check_guarantees(instance, attribute, value):
    for key, guarantee in value.items():
        if not isinstance(key, str) or not _NAME.match(key):
            raise ValueError(f"guarantee names must be lower_snake_case, got {key!r}")
        if not isinstance(guarantee, Guarantee):
            raise TypeError(f"guarantees[{key!r}] must be an implicit.Guarantee, got "
                            f"{type(guarantee).__name__}")


@attrs.frozen(kw_only=True)
class StepFormula:
    """A solver's step as a documented formula: the contract suite's reference for its
    options (an option the step ignores then shows).

    ``step(solver, zs, fzs)``: the next iterate of one sample from its iterates so far ``zs``
    and their values ``fzs`` (``(k + 1, n)`` float64 tensors, oldest first), written directly
    from the formula the solver documents — not by calling the solver — or ``None`` where the
    formula does not cover this history (the step is then not checked). ``options(drawn)``:
    the drawn options changed where the formula needs it (e.g. no safeguard, whose cuts the
    formula leaves out). ``statement``: the formula, as the report shows it.

    Example (plain fixed-point iteration)::

        StepFormula(statement="z_next = f(z)", step=lambda solver, zs, fzs: fzs[-1])
    """

    step: Callable[[Any, torch.Tensor, torch.Tensor], Optional[torch.Tensor]] = attrs.field(
        validator=v.is_callable())
    statement: str = attrs.field(validator=v.instance_of(str))
    options: Callable[[Mapping[str, Any]], Mapping[str, Any]] = attrs.field(
        default=lambda drawn: drawn, validator=v.is_callable())


@attrs.frozen(kw_only=True)
class SolverSpec(PluginSpec):
    """A fixed-point solver; the factory returns an :class:`implicit.Solver`.

    ``guarantees`` names the theorems the solver claims (:class:`~implicit.specs.Guarantee`); each one gets an
    efficacy contract. ``step_formula`` (:class:`~implicit.specs.StepFormula`) states the step
    itself, so that the contract suite can check that every drawn option takes effect. A solver that claims none is told so by ``implicit verify --report``:
    its contracts then certify honesty (truthful records, budgets), not that it ever converges.
    """

    kind: ClassVar[str] = "solver"

    guarantees: Mapping[str, Guarantee] = attrs.field(
        factory=dict, converter=dict, validator=_check_guarantees
    )
    #: the step as a documented formula (:class:`~implicit.specs.StepFormula`): the ``step``
    #: contract checks every step of a solve against it, with the drawn options
    step_formula: Optional[StepFormula] = attrs.field(
        default=None, validator=v.optional(v.instance_of(StepFormula)))


@attrs.frozen(kw_only=True)
class BackwardSpec(PluginSpec):
    """A backward strategy; the factory returns an :class:`implicit.BackwardStrategy`.

    ``adjoint_error_bound(strategy, jacobian_norm)``: for approximate strategies, a documented
    bound on ``‖w̃ − w‖ / ‖w‖``, where ``w = (I − Jᵀ)⁻¹ y`` is the exact adjoint, ``w̃`` the one
    the strategy's gradient implies and ``jacobian_norm = ‖J‖₂`` at ``z*``. The contract suite
    checks it (exact strategies are checked against 0).
    """

    kind: ClassVar[str] = "backward"

    adjoint_error_bound: Optional[Callable[[Any, float], float]] = attrs.field(
        default=None, validator=v.optional(v.is_callable())
    )
    #: ``adjoint_formula(strategy, J, y)``: the adjoint the strategy's gradient implies, as a
    #: dense expression of the ``(n, n)`` Jacobian at ``z*`` and the ``(n,)`` upstream gradient
    #: (e.g. phantom's ``λ Σ_{j<k} (Mᵀ)ʲ y``); the contract suite checks the strategy against it
    #: for its drawn options, which a bound alone cannot (it cannot tell two approximations apart)
    adjoint_formula: Optional[Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]] = (
        attrs.field(default=None, validator=v.optional(v.is_callable())))
    #: ``training_adjoint(strategy)``: for a strategy whose adjoint differs in training, how
    #: to pin it down: ``None`` (no claim for these options) or ``(strategy', formula)``, where
    #: ``strategy'`` is the strategy with its adjoint solve made deterministic (a tolerance and
    #: a budget) and ``formula(J, y)`` the adjoints its training gradient implies at an inexact
    #: ``z*``, from the ``(B, n, n)`` Jacobians and the ``(B, n)`` upstream gradients of the
    #: batch (e.g. ift's damped ``(I − (1 − δ) Jᵀ)⁻¹ y``)
    training_adjoint: Optional[Callable[[Any], Any]] = attrs.field(
        default=None, validator=v.optional(v.is_callable()))


def _check_shape(instance, attribute, value):
    if not all(isinstance(d, int) and d >= 1 for d in value):
        raise ValueError(f"{attribute.name} must be a tuple of positive ints, got {value!r}")


@attrs.frozen(kw_only=True)
class Workload:
    """A standard benchmark problem a cell family contributes to ``implicit bench``.

    The cell is ``make_cell(<family>, **cell_options)``; the input is ``make_input(batch, dtype,
    device, generator)`` when given, else standard normal of shape ``(batch, *input_shape)``.
    ``quick`` workloads make up the pruned ``--quick`` matrix (< 2 minutes on 2 CPU cores).
    """

    name: str = attrs.field(validator=_check_name)
    cell_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    input_shape: tuple[int, ...] = attrs.field(converter=tuple, validator=_check_shape)
    batch: int = attrs.field(default=32, validator=[v.instance_of(int), v.gt(0)])
    quick: bool = True
    make_input: Optional[Callable[..., Any]] = attrs.field(
        default=None, validator=v.optional(v.is_callable())
    )
    description: str = ""


@attrs.frozen(kw_only=True)
class CellSpec(PluginSpec):
    """A cell family; the factory returns an ``nn.Module`` cell.

    ``strategy(dtype)`` returns a Hypothesis strategy drawing a contractive
    :class:`~implicit.specs.CellExample` of this family in that dtype (imported lazily: Hypothesis is a test
    dependency, not a runtime one). ``workloads`` are the family's standard benchmark problems.
    """

    kind: ClassVar[str] = "cell"

    strategy: Optional[Callable[..., Any]] = attrs.field(
        default=None, validator=v.optional(v.is_callable())
    )
    #: ``"cheap"`` cells get the full solver × backward gradient matrix in the contract suite;
    #: ``"costly"`` ones (convolutions, attention) are checked with the primary solver only
    contract_cost: str = attrs.field(default="cheap", validator=one_of("cheap", "costly"))
    workloads: tuple[Workload, ...] = attrs.field(
        default=(), converter=tuple, validator=v.deep_iterable(v.instance_of(Workload))
    )


@attrs.frozen(kw_only=True, eq=False)
class CellExample:
    """A drawn cell instance with an input, for contract tests and benchmarks.

    ``lipschitz`` bounds the Lipschitz constant of z ↦ f(z, x) in the 2-norm of the flattened
    per-sample state (``< 1`` means contractive); ``None`` when unknown.
    """

    cell: Any
    x: Any
    z0: Any = None
    lipschitz: Optional[float] = None


SPEC_TYPES: Mapping[str, type[PluginSpec]] = {
    "solver": SolverSpec,
    "cell": CellSpec,
    "backward": BackwardSpec,
}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[torch.Generator]:
    """For cell strategies: inside the block the global torch RNG (which module constructors
    draw initial weights from) is seeded with ``seed`` and restored afterwards, so drawing an
    example never disturbs the caller's random stream; yields a generator with the same seed
    for the inputs. Example::

        with implicit.seeded(seed) as gen:
            cell = MyCell(4).to(dtype)
            x = torch.randn(batch, 4, generator=gen, dtype=dtype)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)
