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


def moe_layer_pattern(num_layers: int, sparse_step: int, dense_layers: Sequence[int]) -> list[int]:
    """Megatron's ``moe_layer_freq`` list: 1 where layer i is MoE (HF's decoder_sparse_step rule)."""
    return [0 if i in dense_layers or (i + 1) % sparse_step != 0 else 1 for i in range(num_layers)]


def sparse_step(pattern: Sequence[int]) -> int:
    """The HF ``decoder_sparse_step`` that explains ``pattern`` (1 unless MoE layers are periodic)."""
    moe = [i for i, flag in enumerate(pattern) if flag]
    if not moe:
        return 1
    step = moe[0] + 1
    return step if all((i + 1) % step == 0 for i in moe) else 1


def dense_layers(pattern: Sequence[int], step: int) -> list[int]:
    """Layers that the step rule would make MoE but ``pattern`` keeps dense (HF ``mlp_only_layers``)."""
    return [i for i, flag in enumerate(pattern) if not flag and (i + 1) % step == 0]


def range_list(n: int) -> list[int]:
    """``[0, 1, ..., n - 1]``."""
    return list(range(n))


def sliding_layer_types(num_layers: int, full_every: int) -> list[str]:
    """HF ``layer_types`` with one full-attention layer after every ``full_every - 1`` sliding
    ones (megatron-core's int ``window_attn_skip_freq``)."""
    return ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention" for i in range(num_layers)]


def full_attention_every(layer_types: Sequence[str] | None, declared: int) -> int | None:
    """The ``full_every`` whose ``sliding_layer_types`` are ``layer_types``: ``declared`` when it
    fits (or there are no layer_types), else the smallest that fits; None when none does."""
    if layer_types is None:
        return declared
    wanted = list(layer_types)
    candidates: list[int] = [declared, *range(1, len(wanted) + 2)]
    return next((every for every in candidates if sliding_layer_types(len(wanted), every) == wanted), None)


def flags_where(values: Sequence[Any], value: Any) -> list[int]:
    """1 where an item of ``values`` equals ``value``, else 0 (e.g. HF ``layer_types`` ->
    Megatron's ``window_attn_skip_freq`` list)."""
    return [1 if item == value else 0 for item in values]


def choose_each(flags: Sequence[Any], if_set: Any, if_unset: Any) -> list[Any]:
    """``if_set`` where a flag is true, else ``if_unset`` (the inverse of ``flags_where``)."""
    return [if_set if flag else if_unset for flag in flags]
