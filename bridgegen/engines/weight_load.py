"""Weight load: whole HF tensors into a live megatron-core model at any parallel layout, inside
the caller's job (the inverse of ``weight_sync.WeightExport``).

``load_weights(conversion, model_chunks, weights)`` is called by every rank of the job at the
same point, on the model the caller built (wrappers unwrapped as ``weight_sync.unwrap`` does).
``weights`` is an HF folder or an iterable of ``(hf_name, tensor)``; every rank is given the
same whole tensors and keeps only its own slices: the plan the HF-folder loader uses
(``plan.weight_map.plan_tensors`` with this rank's TP / expert-TP place, layer offset and first
expert) and its transform (``plan.transforms.load_shard``) copy into each parameter exactly
the slice of its HF sources it holds. From a folder only those slices are read (``load_into``);
from an iterable each HF tensor is held until the last of this rank's parameters that need it
is filled (q, k and v; gate and up; every local expert of a stacked tensor), then dropped.

The caller's parallel state (megatron-core's ``parallel_state``) says the rank's place; nothing
global is changed. One object all-gather at the start agrees on the HF tensors some rank needs
(an HF tensor no rank needs is an error); no collective follows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bridgegen.bridge.errors import WeightError
from bridgegen.engines.weight_sync import chunk_layer_offset, unwrap
from bridgegen.engines.weights import LoadStats, load_into, quantized_parts
from bridgegen.formats.fp8 import block_size
from bridgegen.formats.safetensors import Checkpoint
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.transforms import load_shard
from bridgegen.plan.values import checked_cast, warn_if_not_finite
from bridgegen.plan.weight_map import TensorPlan, WeightMap, model_tensors, plan_tensors

Weights = str | os.PathLike[str] | Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class _Place:
    """This rank's place in the caller's parallel state."""

    tp: tuple[int, int]
    expert_tp: tuple[int, int]
    expert_offset: int

    @classmethod
    def current(cls, conversion: Conversion) -> _Place:
        from megatron.core import parallel_state as ps

        experts = int(conversion.config.values.get("num_moe_experts") or 0)
        ep_size = int(ps.get_expert_model_parallel_world_size())
        if experts % ep_size:
            raise WeightError(
                f"weight load: the config's {experts} experts do not split evenly over expert parallel size {ep_size}"
            )
        return cls(
            tp=(int(ps.get_tensor_model_parallel_rank()), int(ps.get_tensor_model_parallel_world_size())),
            expert_tp=(
                int(ps.get_expert_tensor_parallel_rank()),
                int(ps.get_expert_tensor_parallel_world_size()),
            ),
            expert_offset=int(ps.get_expert_model_parallel_rank()) * (experts // ep_size),
        )


def _plan(
    weight_map: WeightMap, models: list[torch.nn.Module], place: _Place
) -> list[tuple[TensorPlan, torch.Tensor]]:
    """Each of this rank's tensors with its plan."""
    out = []
    for index, model in enumerate(models):
        tensors = dict(model_tensors(model))
        try:
            plan = plan_tensors(
                weight_map,
                tensors.items(),
                layer_offset=chunk_layer_offset(model, index, len(models), "weight load"),
                expert_offset=place.expert_offset,
                tp=place.tp,
                expert_tp=place.expert_tp,
            )
        except WeightError as exc:
            raise WeightError(f"weight load, model chunk {index}: {exc}") from None
        out += [(entry, tensors[entry.megatron_name]) for entry in plan]
    return out


def _agree(needed: set[str], failure: Exception | None) -> set[str]:
    """The HF tensors some rank needs; a rank that could not plan stops every rank."""
    problem = None
    if failure is not None:
        lines = str(failure).strip().splitlines() or [type(failure).__name__]
        problem = lines[0] if isinstance(failure, WeightError) else f"{type(failure).__name__}: {lines[0]}"
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (sorted(needed), problem))
    if failure is not None:
        raise failure
    for rank, (_, said) in enumerate(everyone):
        if said is not None:
            raise WeightError(f"{said} (on rank {rank})")
    return {name for names, _ in everyone for name in names}


def _unexpected(weight_map: WeightMap, names: Iterable[str], wanted: set[str], where: str) -> None:
    found = [n for n in names if n not in wanted and not weight_map.ignored(n)]
    if found:
        shown = ", ".join(repr(n) for n in found[:8]) + (
            f" and {len(found) - 8} more" if len(found) > 8 else ""
        )
        raise WeightError(
            f"{where}: unexpected tensor(s) {shown}: the {weight_map.config.family} spec maps no Megatron tensor to them"
        )


def load_weights(
    conversion: Conversion,
    model_chunks: Sequence[Any] | torch.nn.Module,
    weights: Weights,
    *,
    allow_lossy_casts: bool = True,
) -> LoadStats:
    """Fill this rank's model chunks (one per virtual pipeline stage, in order; wrappers and
    bridgegen ``ModelChunk``s unwrapped) from whole HF tensors: an HF folder, or an iterable of
    ``(hf_name, tensor)`` giving every rank the same tensors, each once, in any order.
    Collective. Without ``allow_lossy_casts`` a tensor the parameter's dtype cannot hold
    exactly is an error. Returns what this rank read (its slices' bytes)."""
    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    if not chunks:
        raise WeightError("weight load: no model chunks given")
    weight_map = conversion.weight_map()
    plan: list[tuple[TensorPlan, torch.Tensor]] = []
    failure: Exception | None = None
    try:
        models = [unwrap(chunk) for chunk in chunks]
        place = _Place.current(conversion)
        plan = _plan(weight_map, models, place)
    except Exception as exc:  # noqa: BLE001 - said to every rank before any raises
        failure = exc
    wanted = _agree({name for entry, _ in plan for name in entry.hf_names}, failure)
    if isinstance(weights, (str, os.PathLike)):
        return _from_folder(conversion, weight_map, models, place, weights, wanted, allow_lossy_casts)
    return _from_tensors(weight_map, plan, weights, wanted, allow_lossy_casts)


def _from_folder(
    conversion: Conversion,
    weight_map: WeightMap,
    models: list[torch.nn.Module],
    place: _Place,
    folder: str | os.PathLike[str],
    wanted: set[str],
    allow_lossy_casts: bool,
) -> LoadStats:
    """``load_into`` for each chunk: only this rank's slices are read from the files."""
    checkpoint = Checkpoint.open(folder)
    checkpoint.allow_lossy_casts = allow_lossy_casts
    _unexpected(weight_map, checkpoint.names(), wanted | quantized_parts(wanted), str(checkpoint.folder))
    parts = [
        load_into(
            weight_map,
            model,
            checkpoint,
            layer_offset=chunk_layer_offset(model, index, len(models), "weight load"),
            tp=place.tp,
            expert_offset=place.expert_offset,
            expert_tp=place.expert_tp,
            check_unused=False,
            fp8_block=block_size(conversion.config.hf_passthrough),
        )
        for index, model in enumerate(models)
    ]
    return LoadStats.total(parts)


def _from_tensors(
    weight_map: WeightMap,
    plan: list[tuple[TensorPlan, torch.Tensor]],
    weights: Iterable[tuple[str, torch.Tensor]],
    wanted: set[str],
    allow_lossy_casts: bool,
) -> LoadStats:
    """Fill each planned tensor once all its HF sources have come; drop each HF tensor after
    the last of this rank's tensors that needs it."""
    users: dict[str, list[int]] = {}
    for index, (entry, _) in enumerate(plan):
        for name in entry.hf_names:
            users.setdefault(name, []).append(index)
    waiting = [len(set(entry.hf_names)) for entry, _ in plan]
    left = {name: len(indices) for name, indices in users.items()}
    held: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    stats = LoadStats()
    for name, tensor in weights:
        if name in seen:
            raise WeightError(f"weight load: HF tensor {name!r} given twice")
        seen.add(name)
        _unexpected(weight_map, [name], wanted, "weight load")
        if name not in users:
            continue
        if not tensor.dtype.is_floating_point:
            raise WeightError(
                f"weight load: HF tensor {name!r} has dtype {tensor.dtype}; expected floating point"
            )
        held[name] = tensor
        for index in dict.fromkeys(users[name]):
            waiting[index] -= 1
            if waiting[index] == 0:
                entry, target = plan[index]
                stats.bytes_requested += _fill(entry, target, held, allow_lossy_casts)
                stats.tensors += 1
                for source in dict.fromkeys(entry.hf_names):
                    left[source] -= 1
                    if left[source] == 0:
                        del held[source]
    missing = sorted(
        {name for (entry, _), count in zip(plan, waiting, strict=True) if count for name in entry.hf_names}
        - seen
    )
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise WeightError(f"weight load: missing HF tensor(s) {shown}, needed by this rank's parameters")
    stats.hf_tensors_used = len(users)
    return stats


def _fill(entry: TensorPlan, target: torch.Tensor, held: dict[str, torch.Tensor], allow_lossy: bool) -> int:
    """Copy this rank's slice of ``entry``'s HF sources into ``target``; the bytes read."""
    hf_names = entry.hf_names
    what = f"HF {', '.join(repr(n) for n in hf_names)}"
    read_bytes = 0

    def read(part: torch.Tensor) -> torch.Tensor:
        nonlocal read_bytes
        if part.dtype != target.dtype:  # checked only; the transform casts as it copies
            checked_cast(part, target.dtype, allow_lossy, what)
        read_bytes += part.numel() * part.element_size()
        return part

    rule = entry.matched.rule
    try:
        with torch.no_grad():
            load_shard(
                entry.kind,
                target.data,
                [entry.matched.select(held[name]) for name in hf_names],
                hf_names,
                entry.layout,
                read,
                rule.norm_offset,
                rule.gate_up,
                value=rule.value,
            )
    except WeightError as exc:
        raise WeightError(f"weight load: {exc} (loading Megatron {entry.megatron_name!r})") from None
    warn_if_not_finite(target.data, f"weight load: Megatron {entry.megatron_name!r} (from {what})")
    return read_bytes
