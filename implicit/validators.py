"""attrs validators for plugin options, with messages that name the option and the rule.

Shared by the core and the plugins so every option error reads the same way::

    beta: float = attrs.field(default=1.0, validator=number_in(0, 2, low_open=True))
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

Validator = Callable[[Any, Any, Any], None]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive_int(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


def optional_positive_int(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None:
        try:
            positive_int(instance, attribute, value)
        except ValueError:
            raise ValueError(
                f"{attribute.name} must be None or an int >= 1, got {value!r}"
            ) from None


def nonnegative_number(instance: Any, attribute: Any, value: Any) -> None:
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{attribute.name} must be a number >= 0, got {value!r}")


def optional_nonnegative_number(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (not _is_number(value) or not value >= 0):
        raise ValueError(f"{attribute.name} must be None or a number >= 0, got {value!r}")


def number_in(low: float, high: float, *, low_open: bool = False,
              high_open: bool = False) -> Validator:
    """A number in the interval from ``low`` to ``high`` (closed unless said open)."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(instance: Any, attribute: Any, value: Any) -> None:
        ok = _is_number(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
        if not ok:
            raise ValueError(f"{attribute.name} must be a number in {text}, got {value!r}")

    return check


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def check_value(name: str, value: Any, *validators: Validator) -> Any:
    """Apply attrs-style ``validators`` to a plain keyword argument ``name``; return ``value``
    (for constructors that are not attrs classes, e.g. ``DEQ``)."""
    for validator in validators:
        validator(None, _Named(name), value)
    return value


def one_of(*choices: Any) -> Validator:
    """One of ``choices``; the error names them and the closest match of a mistyped string."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value not in choices:
            names = [c for c in choices if isinstance(c, str)]
            close = (difflib.get_close_matches(value, names, n=1, cutoff=0.5)
                     if isinstance(value, str) else [])
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{attribute.name} must be one of "
                             f"{', '.join(map(repr, choices))}, got {value!r}{hint}")

    return check


def nonnegative_int(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an int >= 0, got {value!r}")
