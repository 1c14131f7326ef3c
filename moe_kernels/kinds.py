"""The kinds of plain values the package's arguments take, and the checks every validator shares:
a ``TypeError`` names the argument when a value is of the wrong kind, before any range check
raises its ``ValueError``. This module imports only torch (``config`` re-exports it)."""

from __future__ import annotations

import math
import numbers

import torch


def is_int(value) -> bool:
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def as_int(value) -> int | None:
    """``value`` as a Python int when it is integer-like (an int that is not a bool, a numpy
    integer, a 0-d integer tensor: read with ``.item()``, a host sync for a device tensor), else
    None (floats such as ``2.0`` included)."""
    if type(value) is int:
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype in _INT_DTYPES:
        return int(value.item())
    return None


def integer(owner: str, name: str, value) -> int:
    """:func:`as_int` of ``value``, or a ``TypeError`` naming ``owner`` and ``name``."""
    result = as_int(value)
    if result is None:
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    return result


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def real_number(owner: str, name: str, value) -> None:
    """A ``TypeError`` naming ``owner`` and ``name`` unless ``value`` is a real number (an int or a
    float, numpy's included; not a bool): the kind check before a value's range is."""
    if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__}")


def string(owner: str, name: str, value) -> None:
    """A ``TypeError`` naming ``owner`` and ``name`` unless ``value`` is a str."""
    if not isinstance(value, str):
        raise TypeError(f"{owner}: {name} must be a str, got {type(value).__name__}")


def is_finite_number(value) -> bool:
    """An int or float (not a bool) with ``|value| < inf``. Written as a comparison rather than
    ``math.isfinite`` so that it also holds for the symbolic floats of ``torch.compile(dynamic=True)``
    (and is False for NaN)."""
    return isinstance(value, (int, float, numbers.Real)) and not isinstance(value, bool) and abs(value) < math.inf
