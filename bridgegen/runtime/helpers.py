"""Named helpers that spec expressions may call (emitted as ``helpers.<name>``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def first_index(values: Sequence[Any], value: Any) -> int:
    """Index of the first ``value`` in ``values``, or ``len(values)`` if absent."""
    for index, item in enumerate(values):
        if item == value:
            return index
    return len(values)


def count(values: Sequence[Any], value: Any) -> int:
    """How many items of ``values`` equal ``value``."""
    return sum(1 for item in values if item == value)


def all_equal(values: Sequence[Any], value: Any) -> bool:
    """True if every item of ``values`` equals ``value``."""
    return all(item == value for item in values)
