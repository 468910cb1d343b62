"""Argument checks at the Python boundary, written once.

Every check raises before anything changes, with the argument's name and the value
received in the message (``TypeError`` for a wrong kind of value, ``ValueError`` for a
value out of range). numpy scalars are accepted wherever Python numbers are.
"""

from __future__ import annotations

import math
import os
from enum import Enum
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "OptionEnum",
    "check_bool",
    "check_callable",
    "check_device",
    "check_int",
    "check_number",
    "check_opt_int",
    "check_path",
    "is_finite_number",
    "is_int",
]

E = TypeVar("E", bound="OptionEnum")


class OptionEnum(str, Enum):
    """A string option. ``parse`` takes a member or its value and refuses anything else
    with a ``ValueError`` naming the argument (``option_name``) and the choices."""

    @classmethod
    def option_name(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def parse(cls: type[E], value: Any, name: str | None = None) -> E:
        try:
            return cls(value.value if isinstance(value, cls) else value)
        except (ValueError, TypeError):
            choices = ", ".join(repr(v.value) for v in cls)
            raise ValueError(f"{name or cls.option_name()} must be one of {choices}, got {value!r}") from None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """An int (or numpy integer, not a bool) ``>= minimum``, as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_opt_int(value: Any, name: str) -> int | None:
    """None, or an int (see :func:`check_int`)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {_describe(value)}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """A bool (or numpy bool), as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return bool(value)


def check_callable(value: Any, name: str) -> Any:
    """None or a callable, returned as it is."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {_describe(value)}")
    return value


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value: Any) -> bool:
    """A finite real number (numpy scalars too), not a bool."""
    return (
        isinstance(value, (int, float, np.floating, np.integer))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )


def check_number(value: Any, name: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> float:
    """A finite real number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), as a float."""
    ok = is_finite_number(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def check_device(value: Any, name: str = "device", optional: bool = False) -> torch.device | None:
    """A cpu or cuda ``torch.device`` from anything ``torch.device`` takes (None too with
    ``optional``)."""
    if value is None and optional:
        return None
    kinds = ("None, " if optional else "") + "'cpu' or 'cuda[:k]'"
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} must be {kinds}, got {value!r}") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be {kinds}, got {value!r}")
    return dev


def check_path(value: Any, name: str, optional: bool = False) -> str | None:
    """A ``str`` or ``os.PathLike`` (None too with ``optional``), as a str."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)):
        kind = "a str or os.PathLike" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {kind}, got {_describe(value)}")
    return os.fspath(value)
