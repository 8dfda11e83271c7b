"""Checks for the fields of a command a card receives: every index and size, before it is used.

Each check returns the value or raises ``FieldError`` naming the field, the
value and what it should be, so that the host's caller reads what was wrong.
"""
from __future__ import annotations

MAX_DIMS = 8
MAX_NAME = 256


class FieldError(ValueError):
    """A command field that is missing, of the wrong type, or out of range."""


def integer(h: dict, key: str, lo: int | None = None, hi: int | None = None, default=None) -> int:
    """``h[key]`` as an int in [lo, hi) (booleans are not ints here)."""
    v = h.get(key, default)
    if type(v) is not int:
        raise FieldError(f"{key} must be an int, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        raise FieldError(f"{key} is {v}; it must be in [{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'})")
    return v


def text(h: dict, key: str) -> str:
    v = h.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        raise FieldError(f"{key} must be a string of 1..{MAX_NAME} characters, got {v!r:.80}")
    return v


def shape(h: dict, key: str = "shape") -> list[int]:
    """A tensor shape: a list of at most MAX_DIMS ints, each >= 0."""
    v = h.get(key)
    if not isinstance(v, list) or len(v) > MAX_DIMS:
        raise FieldError(f"{key} must be a list of at most {MAX_DIMS} sizes, got {v!r:.80}")
    for i, d in enumerate(v):
        if type(d) is not int or d < 0:
            raise FieldError(f"{key}[{i}] is {d!r}; a size must be an int >= 0")
    return v

