"""The plugin registry: a pluggy manager, the registrars it hands to hooks, and lookups.

Plugins are loaded from the ``implicit_layers`` entry-point group (first-party ones too). Two
environment variables restrict that, matched against entry-point names and distribution names:

* ``IMPLICIT_LAYERS_PLUGINS`` — comma-separated allow-list; when set, only these load
  (``IMPLICIT_LAYERS_PLUGINS=`` loads none);
* ``IMPLICIT_LAYERS_DISABLE_PLUGINS`` — comma-separated block-list.

Tests build their own :class:`Registry` and never depend on the process-wide one.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib.metadata
import os
import threading
from typing import Any, Iterator, Optional

import attrs
import pluggy

from . import hookspecs
from .specs import SPEC_TYPES, PluginSpec

ENTRY_POINT_GROUP = "implicit_layers"
ENV_ALLOW = "IMPLICIT_LAYERS_PLUGINS"
ENV_DISABLE = "IMPLICIT_LAYERS_DISABLE_PLUGINS"
KINDS: tuple[str, ...] = ("solver", "cell", "backward")
_HOOKS = {
    "solver": "implicit_register_solvers",
    "cell": "implicit_register_cells",
    "backward": "implicit_register_backwards",
}


class PluginError(RuntimeError):
    """A plugin failed to load, registered something malformed, or declares what its code
    does not keep (e.g. a solver's ``static_inplace`` naming a key its ``static_init`` lacks)."""


class UnknownPluginError(LookupError):
    """No plugin of that kind and name is registered."""


class OptionError(ValueError):
    """Options given to ``make_*`` do not fit the plugin's option schema."""


@attrs.frozen(kw_only=True)
class Registered:
    """A registered spec and where it came from."""

    spec: PluginSpec
    plugin: str
    distribution: Optional[str] = None
    version: Optional[str] = None

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def name(self) -> str:
        return self.spec.name

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "capabilities": sorted(self.spec.capabilities),
            "requires": sorted(self.spec.requires),
            "devices": sorted(self.spec.devices),
            "options": {k: o.describe() for k, o in self.spec.option_schema.items()},
            "summary": self.spec.description,
        }


def _split_env(value: Optional[str]) -> Optional[set[str]]:
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def did_you_mean(word: str, candidates: Any) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry:
    """Holds a pluggy manager and what its plugins registered."""

    def __init__(self) -> None:
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)
        self._entries: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_entry_points(
        cls, *, allow: Optional[set[str]] = None, disable: Optional[set[str]] = None
    ) -> Registry:
        """A registry with the installed ``implicit_layers`` entry points loaded.

        ``allow``/``disable`` default to the environment variables (see module doc).
        """
        registry = cls()
        registry.load_entry_points(allow=allow, disable=disable)
        return registry

    def load_entry_points(
        self, *, allow: Optional[set[str]] = None, disable: Optional[set[str]] = None
    ) -> None:
        allow = _split_env(os.environ.get(ENV_ALLOW)) if allow is None else allow
        disable = _split_env(os.environ.get(ENV_DISABLE)) if disable is None else disable
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            keys = {ep.name, dist_name} - {None}
            if allow is not None and not keys & allow:
                continue
            if disable and keys & disable:
                continue
            if self.plugin_manager.has_plugin(ep.name):
                continue  # the same entry point seen twice (e.g. duplicate sys.path entries)
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} (from {dist_name or 'unknown distribution'}) failed "
                    f"to import {ep.value!r}: {exc}. Uninstall it or block it with "
                    f"{ENV_DISABLE}={ep.name}"
                ) from exc
            self.register_plugin(
                module,
                name=ep.name,
                distribution=dist_name,
                version=dist.version if dist is not None else None,
            )

    def register_plugin(
        self,
        plugin: object,
        *,
        name: Optional[str] = None,
        distribution: Optional[str] = None,
        version: Optional[str] = None,
    ) -> str:
        """Register a plugin object/module and collect what its hooks register."""
        plugin_name = self.plugin_manager.register(plugin, name=name)
        if plugin_name is None:
            raise PluginError(f"plugin {name or plugin!r} is blocked in this plugin manager")
        for kind, hook_name in _HOOKS.items():
            caller = getattr(self.plugin_manager.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                register = _Registrar(self, kind, plugin_name, distribution, version)
                kwargs = {arg: register for arg in impl.argnames}
                try:
                    impl.function(**kwargs)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"plugin {plugin_name!r} failed in {hook_name}: {exc}"
                    ) from exc
        return plugin_name

    # -- lookups -------------------------------------------------------------------------
    def entries(self, kind: Optional[str] = None) -> list[Registered]:
        """What is registered (of one kind, or all), sorted by kind then name."""
        kinds = KINDS if kind is None else (self._check_kind(kind),)
        return [self._entries[k][n] for k in kinds for n in sorted(self._entries[k])]

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[self._check_kind(kind)])

    def get(self, kind: str, name: str) -> Registered:
        table = self._entries[self._check_kind(kind)]
        if not isinstance(name, str):
            raise TypeError(f"a {kind} name must be a string, got {type(name).__name__}")
        if name not in table:
            available = ", ".join(sorted(table)) or "none registered"
            raise UnknownPluginError(
                f"no {kind} named {name!r}{did_you_mean(name, table)}; available: {available}. "
                f"Is the plugin that provides it installed (see `implicit plugins`)?"
            )
        return table[name]

    def make(self, kind: str, name: str, **options: Any) -> Any:
        """Build the ``kind`` plugin ``name`` with ``options`` checked against its schema."""
        entry = self.get(kind, name)
        schema = entry.spec.option_schema
        for key in options:
            if entry.spec.schema_known and key not in schema:
                known = ", ".join(sorted(schema)) or "none"
                raise OptionError(
                    f"{kind} {name!r} got an unknown option {key!r}"
                    f"{did_you_mean(key, schema)}; its options are: {known}"
                )
        missing = [o.name for o in schema.values() if o.required and o.name not in options]
        if missing:
            raise OptionError(f"{kind} {name!r} needs the option(s) {', '.join(missing)}")
        try:
            return entry.spec.factory(**options)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"{kind} {name!r}: {exc}") from exc

    @staticmethod
    def _check_kind(kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return kind

    def _add(self, registered: Registered) -> None:
        table = self._entries[registered.kind]
        existing = table.get(registered.name)
        if existing is not None:
            raise PluginError(
                f"plugin {registered.plugin!r} registered {registered.kind} "
                f"{registered.name!r}, which plugin {existing.plugin!r} already registered; "
                "names must be unique per kind"
            )
        table[registered.name] = registered


@attrs.frozen
class _Registrar:
    """The ``register`` callable a hook receives: validates and records one spec."""

    registry: Registry
    kind: str
    plugin: str
    distribution: Optional[str]
    version: Optional[str]

    def __call__(self, spec: PluginSpec) -> None:
        expected = SPEC_TYPES[self.kind]
        if not isinstance(spec, expected):
            raise PluginError(
                f"plugin {self.plugin!r}: {_HOOKS[self.kind]} must register "
                f"{expected.__name__} records, got {type(spec).__name__}"
            )
        self.registry._add(
            Registered(
                spec=spec,
                plugin=self.plugin,
                distribution=self.distribution,
                version=self.version,
            )
        )


# -- the process-wide registry ---------------------------------------------------------------
_default: Optional[Registry] = None
_default_lock = threading.Lock()
_current: contextvars.ContextVar[Optional[Registry]] = contextvars.ContextVar(
    "implicit_registry", default=None
)


def get_registry() -> Registry:
    """The registry in use: the one set by :func:`use_registry`, else the process-wide one
    (loaded from entry points on first use)."""
    current = _current.get()
    if current is not None:
        return current
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry.from_entry_points()
        return _default


@contextlib.contextmanager
def use_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the one name lookups use inside the ``with`` block."""
    token = _current.set(registry)
    try:
        yield registry
    finally:
        _current.reset(token)


def make_solver(name: str, **options: Any):
    """Build the registered solver ``name``, e.g. ``make_solver("forward", beta=0.5)``."""
    return get_registry().make("solver", name, **options)


def make_cell(name: str, **options: Any):
    """Build the registered cell ``name``, e.g. ``make_cell("tanh", features=64)``."""
    return get_registry().make("cell", name, **options)


def make_backward(name: str, **options: Any):
    """Build the registered backward strategy ``name``, e.g. ``make_backward("ift")``."""
    return get_registry().make("backward", name, **options)


def list_plugins(kind: Optional[str] = None) -> list[Registered]:
    """What is registered in the registry in use (see :func:`get_registry`)."""
    return get_registry().entries(kind)
