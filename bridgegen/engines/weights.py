"""Carrying out a conversion plan (``plan/weight_map.py``): checking and reading the HF sources of each
Megatron tensor, and turning whole Megatron tensors into HF tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.weight_rules import GateUp, HFLayout
from bridgegen.formats.fp8 import scale_name
from bridgegen.formats.mxfp4 import parts
from bridgegen.formats.safetensors import Checkpoint
from bridgegen.plan.transforms import load_shard, split_full, verbatim_rows
from bridgegen.plan.values import checked_cast, warn_if_not_finite
from bridgegen.plan.weight_map import (
    ExportChecks,
    TensorPlan,
    WeightMap,
    model_tensors,
    plan_tensor,
    plan_tensors,
)


@dataclass
class LoadStats:
    """What a load read: Megatron tensors made (or their slices, on a rank of a layout), bytes
    of the HF files read for them, and the distinct HF tensors they came from."""

    tensors: int = 0
    bytes_requested: int = 0
    hf_tensors_used: int = 0

    @classmethod
    def total(cls, parts: Iterable[LoadStats]) -> LoadStats:
        """The sum of several loads' stats (the ranks of one conversion: each rank's shares
        are its own, so the HF tensors used add up too)."""
        out = cls()
        for part in parts:
            out.tensors += part.tensors
            out.bytes_requested += part.bytes_requested
            out.hf_tensors_used += part.hf_tensors_used
        return out


def quantized_parts(names: set[str]) -> set[str]:
    """The tensors quantized ``names`` may be stored with: FP8 scales, MXFP4 blocks and scales."""
    return {scale_name(name) for name in names} | {part for name in names for part in parts(name)}


def check_sources(
    weight_map: WeightMap,
    plan: Sequence[TensorPlan],
    checkpoint: Checkpoint,
    *,
    check_unused: bool = True,
) -> None:
    """Before anything is read or written: every HF tensor each planned Megatron tensor needs
    is in ``checkpoint`` and floating point, no HF tensor is left unmapped (``check_unused``),
    and every shape fits, checked against meta stand-ins."""
    for entry in plan:
        for hf_name in entry.hf_names:
            if hf_name not in checkpoint:
                hint = (
                    "; the config declares multi-token prediction layers: --drop-mtp converts without them"
                    if entry.megatron_name.startswith("mtp.")
                    else ""
                )
                raise WeightError(
                    f"{checkpoint.folder}: missing tensor {hf_name!r} (needed for Megatron "
                    f"{entry.megatron_name!r}){hint}"
                )
            info = checkpoint.tensors.get(hf_name)  # None: MXFP4 (uint8 parts, dequantized)
            if info is not None and not info.dtype.is_floating_point:
                raise WeightError(
                    f"{info.file}: tensor {hf_name!r} has dtype {info.dtype}; expected floating point"
                )
    if check_unused:
        wanted = {hf for entry in plan for hf in entry.hf_names}
        wanted |= quantized_parts(wanted)
        unexpected = [n for n in checkpoint.names() if n not in wanted and not weight_map.ignored(n)]
        if unexpected:
            shown = ", ".join(repr(n) for n in unexpected[:8])
            more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
            raise WeightError(
                f"{checkpoint.folder}: unexpected tensor(s) {shown}{more}: the {weight_map.config.family} spec maps no "
                "Megatron tensor to them"
            )
    for output, embedding in weight_map.tied_output_sources():
        if output in checkpoint and embedding in checkpoint:
            held, used = checkpoint.view(output), checkpoint.view(embedding)
            same = held.shape == used.shape and held.dtype == used.dtype
            # Compared as bytes: a NaN equals itself there.
            if not same or not torch.equal(held.reshape(-1).view(torch.uint8), used.reshape(-1).view(torch.uint8)):
                raise WeightError(
                    f"{checkpoint.folder}: the config ties the output layer to the embedding (tie_word_embeddings) "
                    f"but the checkpoint's {output!r} differs from {embedding!r}: converting would drop an output "
                    "layer that transformers may use; fix the config or the checkpoint"
                )
            checkpoint.release(output)
            checkpoint.release(embedding)
    for entry in plan:
        try:
            load_shard(
                entry.kind,
                torch.empty(entry.shape, dtype=entry.dtype, device="meta"),
                [entry.matched.select(checkpoint.stand_in(n)) for n in entry.hf_names],
                entry.hf_names,
                entry.layout,
                lambda tensor: tensor,
                entry.matched.rule.norm_offset,
                entry.matched.rule.gate_up,
                value=entry.matched.rule.value,
            )
        except WeightError as exc:
            raise WeightError(f"{checkpoint.folder}: {exc} ({_loading(entry)})") from None


def _loading(entry: TensorPlan) -> str:
    """What was being loaded, with the HF storage the spec declares (shapes are checked after it)."""
    rule = entry.matched.rule
    declared = [f"hf_layout {rule.hf_layout.value}"] if rule.hf_layout is not HFLayout.same else []
    declared += [f"gate_up {rule.gate_up.value}"] if rule.gate_up is not GateUp.stacked else []
    return f"loading Megatron {entry.megatron_name!r}" + (
        f"; spec declares {', '.join(declared)}" if declared else ""
    )


def fill_parameter(
    entry: TensorPlan,
    target: torch.Tensor,
    checkpoint: Checkpoint,
    fp8_block: tuple[int, int] = (128, 128),
) -> None:
    """Copy the slice of its HF sources that planned tensor ``entry`` holds from ``checkpoint``
    into ``target``, then hand the sources' pages back."""
    hf_names = entry.hf_names
    sources = [entry.matched.select(checkpoint.source(n, fp8_block)) for n in hf_names]
    # Dequantized FP8 / MXFP4 weights are cast to the model's dtype by design; other sources must fit.
    dequantized = any(checkpoint.is_quantized(n) for n in hf_names)
    allow_lossy = checkpoint.allow_lossy_casts or dequantized
    what = f"HF {', '.join(repr(n) for n in hf_names)}"

    def read(part: torch.Tensor) -> torch.Tensor:
        if part.dtype != target.dtype:  # checked only; the transform casts as it copies
            checked_cast(part, target.dtype, allow_lossy, what)
        return checkpoint.count(part)

    try:
        with torch.no_grad():
            load_shard(
                entry.kind,
                target,
                sources,
                hf_names,
                entry.layout,
                read,
                entry.matched.rule.norm_offset,
                entry.matched.rule.gate_up,
                value=entry.matched.rule.value,
            )
    except WeightError as exc:
        raise WeightError(f"{checkpoint.folder}: {exc} ({_loading(entry)})") from None
    _warn_if_not_finite(entry, target, checkpoint)
    release_sources(entry, checkpoint)


def _warn_if_not_finite(entry: TensorPlan, value: torch.Tensor | list[torch.Tensor], checkpoint: Checkpoint) -> None:
    """The NaN / Inf warning of a loaded Megatron tensor, naming it and its HF sources."""
    what = f"HF {', '.join(repr(n) for n in entry.hf_names)}"
    warn_if_not_finite(value, f"{checkpoint.folder}: Megatron {entry.megatron_name!r} (from {what})")


def source_rows(entry: TensorPlan, checkpoint: Checkpoint) -> list[torch.Tensor] | None:
    """Planned tensor ``entry``'s value as blocks of whole rows of its HF tensors' memory-mapped
    bytes (``transforms.verbatim_rows``), for a writer that takes them as they are: no copy is
    made. None when the value must be made by ``fill_parameter``: a transform that computes, a
    dtype to change, a quantized or transposed source."""
    if not entry.shape or any(checkpoint.is_quantized(n) for n in entry.hf_names):
        return None
    sources = [entry.matched.select(checkpoint.view(n)) for n in entry.hf_names]
    rule = entry.matched.rule
    rows = verbatim_rows(entry.kind, entry.shape, sources, entry.layout, rule.norm_offset, rule.gate_up)
    if rows is None or any(
        block.dtype != entry.dtype or not block.is_contiguous() or tuple(block.shape[1:]) != entry.shape[1:]
        for block in rows
    ):
        return None
    return rows if sum(block.shape[0] for block in rows) == entry.shape[0] else None


def read_source_rows(entry: TensorPlan, rows: list[torch.Tensor], checkpoint: Checkpoint) -> None:
    """Read ``source_rows``' blocks from the files (their pages are then in memory for the
    writer) with ``fill_parameter``'s accounting and NaN / Inf check."""
    for block in rows:
        checkpoint.count(block)
    _warn_if_not_finite(entry, rows, checkpoint)


def release_sources(entry: TensorPlan, checkpoint: Checkpoint) -> None:
    for hf_name in entry.hf_names:
        checkpoint.release(hf_name)


def load_into(
    weight_map: WeightMap,
    model: torch.nn.Module,
    checkpoint: Checkpoint,
    *,
    layer_offset: int = 0,
    tp: tuple[int, int] = (0, 1),
    expert_offset: int = 0,
    expert_tp: tuple[int, int] = (0, 1),
    check_unused: bool = True,
    progress: Callable[[int], object] | None = None,
    fp8_block: tuple[int, int] = (128, 128),
) -> LoadStats:
    """Copy every parameter of ``model`` from ``checkpoint``; each rank reads only its slices
    (``tp`` / ``expert_tp`` = (rank, size) of its tensor-parallel groups)."""
    used: set[str] = set()
    stats = LoadStats()
    params = dict(model_tensors(model))
    plan = plan_tensors(
        weight_map, params.items(), layer_offset=layer_offset, expert_offset=expert_offset, tp=tp, expert_tp=expert_tp
    )
    check_sources(weight_map, plan, checkpoint, check_unused=check_unused)
    before = checkpoint.bytes_requested
    with torch.no_grad():
        for entry in plan:
            fill_parameter(entry, params[entry.megatron_name].data, checkpoint, fp8_block)
            used.update(entry.hf_names)
            stats.tensors += 1
            if progress is not None:
                progress(1)
    stats.hf_tensors_used = len(used)
    stats.bytes_requested = checkpoint.bytes_requested - before
    return stats


def iter_hf_from_full(
    weight_map: WeightMap,
    named_full_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    layer_offset: int = 0,
    expert_offset: int = 0,
    dtype: torch.dtype | None = None,
    checks: ExportChecks | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for whole Megatron tensors (already gathered over TP). A stacked HF
    expert tensor is yielded once all its experts have come by. Constant tensors and copies of
    another tensor's HF tensor are checked, not yielded, by ``checks``: one of its own unless an
    export spread over several calls passes one (and finishes it)."""
    experts = int(weight_map.config.values.get("num_moe_experts") or 0)
    stacks: dict[str, list[torch.Tensor | None]] = {}
    own_checks = checks is None
    checks = ExportChecks(weight_map) if checks is None else checks
    for name, full in named_full_tensors:
        entry = plan_tensor(weight_map, name, full, layer_offset=layer_offset, expert_offset=expert_offset)
        matched = entry.matched
        if not checks.offer(name, full, matched):
            continue
        pieces = split_full(
            entry.kind, full.detach(), entry.layout, matched.rule.norm_offset, matched.rule.gate_up
        )
        for hf_name, piece in zip(entry.hf_names, map(matched.as_stored, pieces), strict=True):
            if dtype is not None:
                piece = checked_cast(piece, dtype, True, f"HF {hf_name!r}")
            if not matched.rule.hf_stacked_experts:
                yield hf_name, piece
                for copy in matched.hf_copies():
                    yield copy, piece
                continue
            stack = stacks.setdefault(hf_name, [None] * experts)
            assert matched.expert is not None
            stack[matched.expert] = piece
            if all(part is not None for part in stack):
                yield hf_name, torch.stack([part for part in stacks.pop(hf_name) if part is not None])
    if stacks:
        missing = ", ".join(sorted(stacks))
        raise WeightError(f"stacked expert tensor(s) {missing}: not every expert is held by this process")
    if own_checks:
        checks.finish()
