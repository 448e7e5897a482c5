"""Pure decisions of a live-model weight sync (``engines/weight_sync.py``): what one step of
the sync moves, which Megatron name the HF conversion reads for an expert of another rank,
where each tensor sits in a packed buffer, and how steps are grouped into buckets.

No torch.distributed here: the engine does the moving.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.plan.weight_map import WeightMap

# Tensors in a packed buffer start at multiples of this many bytes, so that every one can be
# viewed in its own dtype (and stays aligned for vectorised copies).
ALIGN = 64


@dataclass(frozen=True)
class SyncTensor:
    """A whole (gathered over tensor parallelism) Megatron tensor: the name the HF conversion
    reads it under (an expert's global number, the chunk's local layer number), its shape and
    dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


@dataclass(frozen=True)
class SyncUnit:
    """One step of a sync, owned by pipeline stage ``stage`` (its model chunk ``chunk``, whose
    first layer is global layer ``layer_offset``): one Megatron tensor, or (``experts``) every
    expert tensor of one layer from every expert-parallel rank, rank by rank, each rank's in
    its own order (so in global expert order)."""

    stage: int
    chunk: int
    layer_offset: int
    tensors: tuple[SyncTensor, ...]
    experts: bool = False

    @property
    def nbytes(self) -> int:
        """The bytes of its whole tensors (what a rank holds of it at once)."""
        return sum(tensor.nbytes for tensor in self.tensors)


def renumber_expert(weight_map: WeightMap, name: str, expert: int) -> str:
    """Megatron expert tensor ``name`` (a local expert of some rank) with its expert number
    replaced by ``expert``: the name under which the same rule gives the same layer and expert
    ``expert``. Checked by matching the new name back."""
    before = weight_map.match(name)
    if before.expert is None:
        raise WeightError(f"Megatron tensor {name!r} is not an expert tensor")
    for found in reversed(list(re.finditer(r"\d+", name))):
        if int(found.group()) != before.expert:
            continue
        candidate = f"{name[: found.start()]}{expert}{name[found.end() :]}"
        try:
            after = weight_map.match(candidate)
        except WeightError:
            continue
        if after.rule is before.rule and after.layer == before.layer and after.expert == expert:
            return candidate
    raise WeightError(f"Megatron tensor {name!r}: cannot tell which number in the name is its expert")


def packed_offsets(tensors: Sequence[SyncTensor], start: int = 0) -> tuple[list[int], int]:
    """Where each tensor's bytes start in one buffer holding them all (aligned), and the
    buffer's size (the tensors placed after ``start`` bytes already used)."""
    offsets = []
    end = start
    for tensor in tensors:
        begin = -(-end // ALIGN) * ALIGN
        offsets.append(begin)
        end = begin + tensor.nbytes
    return offsets, end


def buckets(units: Sequence[SyncUnit], bucket_bytes: int) -> list[list[int]]:
    """Indexes of ``units`` in runs that one pipeline stage owns and that one packed buffer of
    at most ``bucket_bytes`` holds (a unit larger on its own is the caller's error to raise
    first; it gets a bucket of its own here)."""
    out: list[list[int]] = []
    end = 0
    for index, unit in enumerate(units):
        grown = packed_offsets(unit.tensors, start=end)[1]
        if out and units[out[-1][0]].stage == unit.stage and grown <= bucket_bytes:
            out[-1].append(index)
            end = grown
        else:
            out.append([index])
            end = packed_offsets(unit.tensors)[1]
    return out
