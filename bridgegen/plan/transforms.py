"""The weight-map primitives: for each kind, HF tensors -> one rank's Megatron shard, and the
full Megatron tensor -> HF tensors.

Import functions take zero-copy views of the HF tensors and a destination (the rank's
parameter) and copy into it exactly the slice that rank owns, so nothing else is read.
Export functions take the whole Megatron tensor (gathered over TP where needed) and return
views of it, one per HF tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.weight_rules import GateUp, WeightKind


@dataclass(frozen=True)
class Layout:
    """What a transform needs to know about the model and the rank it fills."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tp_rank: int = 0
    tp_size: int = 1


Read = Callable[[torch.Tensor], torch.Tensor]  # records a slice as read, returns it


def _chunk(size: int, layout: Layout, what: str) -> slice:
    if size % layout.tp_size:
        raise WeightError(
            f"{what}: dimension {size} does not split evenly over tensor parallel size {layout.tp_size}"
        )
    step = size // layout.tp_size
    return slice(layout.tp_rank * step, (layout.tp_rank + 1) * step)


def _check_shape(name: str, got: torch.Size | tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise WeightError(f"{name}: shape {list(got)} does not match the expected {list(expected)}")


def load_shard(
    kind: WeightKind,
    dest: torch.Tensor,
    sources: list[torch.Tensor],
    hf_names: tuple[str, ...],
    layout: Layout,
    read: Read,
    norm_offset: float = 0.0,
    gate_up: GateUp = GateUp.stacked,
    *,
    value: float = 0.0,
) -> None:
    """Fill ``dest`` (this rank's Megatron shard) from the HF ``sources`` (views, in Megatron's
    orientation); a constant tensor with ``value``."""
    if kind is WeightKind.constant:
        dest.fill_(value)
        return
    if kind is WeightKind.fused_qkv:
        q_rows = layout.num_attention_heads * layout.head_dim
        kv_rows = layout.num_query_groups * layout.head_dim
        _check_shape(hf_names[0], sources[0].shape[:1], (q_rows + 2 * kv_rows,))
        q = sources[0][:q_rows]
        k = sources[0][q_rows : q_rows + kv_rows]
        v = sources[0][q_rows + kv_rows :]
        return load_shard(WeightKind.qkv, dest, [q, k, v], hf_names * 3, layout, read)
    if kind is WeightKind.fused_gate_up and gate_up is GateUp.interleaved:
        return _load_interleaved_gate_up(dest, sources[0], hf_names[0], layout, read)
    if kind is WeightKind.fused_gate_up:
        gate, up = sources[0].chunk(2)
        return load_shard(WeightKind.gate_up, dest, [gate, up], hf_names * 2, layout, read)

    if kind is WeightKind.replicated:
        _check_shape(hf_names[0], sources[0].shape, tuple(dest.shape))
        part = read(sources[0])
    elif kind is WeightKind.column:
        rows = _chunk(sources[0].shape[0], layout, hf_names[0])
        _check_shape(hf_names[0], (rows.stop - rows.start, *sources[0].shape[1:]), tuple(dest.shape))
        part = read(sources[0][rows])
    elif kind is WeightKind.row:
        if sources[0].dim() != 2:
            raise WeightError(
                f"{hf_names[0]}: a row-parallel tensor must be 2-D, got shape {list(sources[0].shape)}"
            )
        cols = _chunk(sources[0].shape[1], layout, hf_names[0])
        _check_shape(hf_names[0], (sources[0].shape[0], cols.stop - cols.start), tuple(dest.shape))
        part = read(sources[0][:, cols])
    elif kind is WeightKind.vocab:
        source = sources[0]
        padded_rows = dest.shape[0] * layout.tp_size
        if source.shape[0] != layout.vocab_size:
            raise WeightError(
                f"{hf_names[0]}: {source.shape[0]} rows, but the config's vocab_size is {layout.vocab_size}"
            )
        _check_shape(hf_names[0], source.shape[1:], tuple(dest.shape[1:]))
        start = layout.tp_rank * dest.shape[0]
        stop = min(start + dest.shape[0], layout.vocab_size)
        if padded_rows < layout.vocab_size:
            raise WeightError(
                f"{hf_names[0]}: padded vocab {padded_rows} is smaller than vocab_size {layout.vocab_size}"
            )
        if stop > start:
            dest[: stop - start].copy_(read(source[start:stop]))
        dest[max(stop - start, 0) :].zero_()
        return
    elif kind is WeightKind.qkv:
        _load_qkv(dest, sources, hf_names, layout, read)
        return
    elif kind is WeightKind.gate_up:
        gate, up = sources
        _check_shape(hf_names[1], up.shape, tuple(gate.shape))
        rows = _chunk(gate.shape[0], layout, hf_names[0])
        half = rows.stop - rows.start
        _check_shape(hf_names[0], (2 * half, *gate.shape[1:]), tuple(dest.shape))
        dest[:half].copy_(read(gate[rows]))
        dest[half:].copy_(read(up[rows]))
        return
    else:  # pragma: no cover - the enum is closed
        raise AssertionError(kind)
    if norm_offset:
        if dest.dtype != torch.float32:
            # 1 + w in bf16 keeps ~8 bits of w: the export could not give w back.
            raise WeightError(
                f"{hf_names[0]}: norm_offset into a {dest.dtype} parameter loses bits of the weight; "
                "such a norm must be kept in float32 (or use layernorm_zero_centered_gamma)"
            )
        shifted = part.to(torch.float32) + norm_offset
        lossy = int(torch.count_nonzero(shifted - norm_offset != part.to(torch.float32)))
        if lossy:
            # w + 1 rounds w to the spacing of numbers near 1: the export could not give w back.
            raise WeightError(
                f"{hf_names[0]}: norm_offset {norm_offset} loses bits of {lossy} of {part.numel()} entries "
                "even in float32; spell the norm with layernorm_zero_centered_gamma instead"
            )
        dest.copy_(shifted)
    else:
        dest.copy_(part)


def verbatim_rows(
    kind: WeightKind,
    dest_shape: tuple[int, ...],
    sources: list[torch.Tensor],
    layout: Layout,
    norm_offset: float = 0.0,
    gate_up: GateUp = GateUp.stacked,
) -> list[torch.Tensor] | None:
    """The views of ``sources`` whose concatenation along dim 0 is what ``load_shard`` fills a
    ``dest_shape`` shard with, when the transform only picks whole rows (a replicated or column
    tensor, a row tensor at TP 1, a vocabulary shard without padding, stacked gate/up): such a
    shard can be written straight from its sources' bytes. None when the transform computes or
    rearranges (QKV, interleaved gate/up, a norm offset, padding, a row tensor's column slice).
    Shapes are ``load_shard``'s to check."""
    if norm_offset or kind is WeightKind.constant:
        return None
    if kind is WeightKind.fused_gate_up and gate_up is GateUp.stacked:
        return verbatim_rows(WeightKind.gate_up, dest_shape, list(sources[0].chunk(2)), layout)
    if kind is WeightKind.replicated or (kind is WeightKind.row and layout.tp_size == 1):
        return [sources[0]]
    if kind is WeightKind.column:
        return [sources[0][_chunk(sources[0].shape[0], layout, "column")]]
    if kind is WeightKind.vocab:
        start = layout.tp_rank * dest_shape[0]
        stop = min(start + dest_shape[0], layout.vocab_size)
        return [sources[0][start:stop]] if stop - start == dest_shape[0] else None
    if kind is WeightKind.gate_up:
        rows = _chunk(sources[0].shape[0], layout, "gate_up")
        return [sources[0][rows], sources[1][rows]]
    return None


def _owned_gate_rows(fused: torch.Tensor, layout: Layout, name: str) -> slice:
    """The gate (equally, up) rows this rank owns of a fused gate/up tensor."""
    if fused.dim() == 0 or fused.shape[0] % 2:
        raise WeightError(f"{name}: fused gate/up needs an even dim 0, got shape {list(fused.shape)}")
    return _chunk(fused.shape[0] // 2, layout, name)


def interleave_gate_up(stacked: torch.Tensor) -> torch.Tensor:
    """[gate; up] -> rows gate[0], up[0], gate[1], up[1], ... (a copy)."""
    return torch.stack(stacked.chunk(2), dim=1).flatten(0, 1)


def _load_interleaved_gate_up(
    dest: torch.Tensor, fused: torch.Tensor, name: str, layout: Layout, read: Read
) -> None:
    """Rank r's gate rows and up rows alternate in one contiguous run of the interleaved tensor."""
    rows = _owned_gate_rows(fused, layout, name)
    half = rows.stop - rows.start
    _check_shape(name, (2 * half, *fused.shape[1:]), tuple(dest.shape))
    part = read(fused[2 * rows.start : 2 * rows.stop])
    dest[:half].copy_(part[0::2])
    dest[half:].copy_(part[1::2])


def _load_qkv(
    dest: torch.Tensor, sources: list[torch.Tensor], hf_names: tuple[str, ...], layout: Layout, read: Read
) -> None:
    q, k, v = sources
    groups, dim = layout.num_query_groups, layout.head_dim
    per_group = layout.num_attention_heads // groups
    rest = tuple(q.shape[1:])
    _check_shape(hf_names[0], q.shape, (layout.num_attention_heads * dim, *rest))
    _check_shape(hf_names[1], k.shape, (groups * dim, *rest))
    _check_shape(hf_names[2], v.shape, (groups * dim, *rest))
    local = _chunk(groups, layout, f"{hf_names[0]} (query groups)")
    count = local.stop - local.start
    _check_shape(
        f"{hf_names[0]} (fused qkv shard)", tuple(dest.shape), (count * (per_group + 2) * dim, *rest)
    )
    blocks = dest.view(count, per_group + 2, dim, *rest)
    blocks[:, :per_group].copy_(read(q.view(groups, per_group, dim, *rest)[local]))
    blocks[:, per_group].copy_(read(k.view(groups, dim, *rest)[local]))
    blocks[:, per_group + 1].copy_(read(v.view(groups, dim, *rest)[local]))


def split_full(
    kind: WeightKind,
    full: torch.Tensor,
    layout: Layout,
    norm_offset: float = 0.0,
    gate_up: GateUp = GateUp.stacked,
) -> list[torch.Tensor]:
    """The HF tensors held by a whole (TP-gathered) Megatron tensor, as views where possible (in
    Megatron's orientation); none for a constant tensor (see ``constant_mismatches``)."""
    if kind is WeightKind.constant:
        return []
    if kind in (WeightKind.replicated, WeightKind.column, WeightKind.row):
        return [full.to(torch.float32) - norm_offset if norm_offset else full]
    if kind is WeightKind.vocab:
        return [full[: layout.vocab_size]]
    if kind in (WeightKind.qkv, WeightKind.fused_qkv):
        groups, dim = layout.num_query_groups, layout.head_dim
        per_group = layout.num_attention_heads // groups
        rest = tuple(full.shape[1:])
        blocks = full.view(groups, per_group + 2, dim, *rest)
        q = blocks[:, :per_group].reshape(groups * per_group * dim, *rest)
        k = blocks[:, per_group].reshape(groups * dim, *rest)
        v = blocks[:, per_group + 1].reshape(groups * dim, *rest)
        return [torch.cat([q, k, v])] if kind is WeightKind.fused_qkv else [q, k, v]
    if kind is WeightKind.fused_gate_up:
        return [interleave_gate_up(full) if gate_up is GateUp.interleaved else full]
    if kind is WeightKind.gate_up:
        return list(full.chunk(2))
    raise AssertionError(kind)  # pragma: no cover


def tp_partition_dim(kind: WeightKind) -> int | None:
    """The dim a Megatron tensor of this kind is split on over TP (None: replicated)."""
    if kind in (WeightKind.replicated, WeightKind.constant):
        return None
    if kind is WeightKind.row:
        return 1
    return 0


def gather_tp_shards(kind: WeightKind, shards: list[torch.Tensor]) -> torch.Tensor:
    """Reassemble the whole Megatron tensor from its TP shards (in rank order)."""
    dim = tp_partition_dim(kind)
    if dim is None or len(shards) == 1:
        return shards[0]
    if kind in (WeightKind.gate_up, WeightKind.fused_gate_up):
        gates, ups = zip(*(shard.chunk(2) for shard in shards), strict=True)
        return torch.cat([*gates, *ups])
    return torch.cat(shards, dim=dim)


def shard_writes(
    kind: WeightKind,
    local: torch.Tensor,
    targets: list[torch.Tensor],
    hf_names: tuple[str, ...],
    layout: Layout,
    norm_offset: float = 0.0,
    gate_up: GateUp = GateUp.stacked,
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The inverse of ``load_shard``: (index into ``targets``, slice of that HF tensor, data)
    triples that write this rank's Megatron shard into the parts of the HF tensors it owns.

    ``targets`` may be real tensors or meta tensors standing for regions of an output file
    (their views' offsets and strides then say where the bytes go). Every rank of a TP group
    calls this for its own shard; together they cover each HF element exactly once, with no
    communication. Replicated tensors are written by one rank only (the caller decides which).
    """
    if kind is WeightKind.fused_qkv:
        q_rows = layout.num_attention_heads * layout.head_dim
        kv_rows = layout.num_query_groups * layout.head_dim
        target = targets[0]
        parts = [target[:q_rows], target[q_rows : q_rows + kv_rows], target[q_rows + kv_rows :]]
        return [
            (0, view, data)
            for _, view, data in shard_writes(WeightKind.qkv, local, parts, hf_names * 3, layout)
        ]
    if kind is WeightKind.fused_gate_up and gate_up is GateUp.interleaved:
        rows = _owned_gate_rows(targets[0], layout, hf_names[0])
        return [(0, targets[0][2 * rows.start : 2 * rows.stop], interleave_gate_up(local))]
    if kind is WeightKind.fused_gate_up:
        gate, up = targets[0].chunk(2)
        return [
            (0, view, data)
            for _, view, data in shard_writes(WeightKind.gate_up, local, [gate, up], hf_names * 2, layout)
        ]
    if kind is WeightKind.replicated:
        return [(0, targets[0], local.to(torch.float32) - norm_offset if norm_offset else local)]
    if kind is WeightKind.column:
        return [(0, targets[0][_chunk(targets[0].shape[0], layout, hf_names[0])], local)]
    if kind is WeightKind.row:
        return [(0, targets[0][:, _chunk(targets[0].shape[1], layout, hf_names[0])], local)]
    if kind is WeightKind.vocab:
        start = layout.tp_rank * local.shape[0]
        stop = min(start + local.shape[0], layout.vocab_size)
        return [(0, targets[0][start:stop], local[: stop - start])] if stop > start else []
    if kind is WeightKind.qkv:
        q, k, v = targets
        groups, dim = layout.num_query_groups, layout.head_dim
        per_group = layout.num_attention_heads // groups
        rest = tuple(q.shape[1:])
        owned = _chunk(groups, layout, f"{hf_names[0]} (query groups)")
        blocks = local.view(owned.stop - owned.start, per_group + 2, dim, *rest)
        return [
            (0, q.view(groups, per_group, dim, *rest)[owned], blocks[:, :per_group]),
            (1, k.view(groups, dim, *rest)[owned], blocks[:, per_group]),
            (2, v.view(groups, dim, *rest)[owned], blocks[:, per_group + 1]),
        ]
    if kind is WeightKind.gate_up:
        gate, up = targets
        rows = _chunk(gate.shape[0], layout, hf_names[0])
        half = rows.stop - rows.start
        return [(0, gate[rows], local[:half]), (1, up[rows], local[half:])]
    raise AssertionError(kind)  # pragma: no cover - the enum is closed


def constant_mismatches(tensor: torch.Tensor, value: float) -> int:
    """How many entries of a constant Megatron tensor differ from its ``value`` (0 on meta)."""
    if tensor.is_meta:
        return 0
    return int(torch.count_nonzero(tensor.detach() != value))


def store_shard(
    kind: WeightKind,
    local: torch.Tensor,
    targets: list[torch.Tensor],
    hf_names: tuple[str, ...],
    layout: Layout,
    norm_offset: float = 0.0,
    gate_up: GateUp = GateUp.stacked,
) -> None:
    """Copy this rank's shard into real HF tensors (see ``shard_writes``)."""
    for _, target, data in shard_writes(kind, local, targets, hf_names, layout, norm_offset, gate_up):
        target.copy_(data)
