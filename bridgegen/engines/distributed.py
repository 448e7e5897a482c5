"""Conversion at any parallel layout, with torch.distributed as the engine.

Import: every rank builds only its own model chunks and reads from the safetensors files only
the slices its parameters own (no rank-0 read-then-scatter). Export: every Megatron tensor is
gathered over tensor parallelism onto its TP group's first rank, which streams the HF tensors
into its own shard files; rank 0 then writes one index and moves the finished folder into
place. Works under torchrun (gloo on CPU, NCCL on GPU) or ``launch.run_on_ranks``.
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridgegen.bridge.errors import WeightError
from bridgegen.engines.progress import progress_bar, share
from bridgegen.engines.weights import LoadStats, load_into, quantized_parts
from bridgegen.formats.folders import shared_temp_dir
from bridgegen.formats.fp8 import block_size
from bridgegen.formats.hf_folder import carried_tensors
from bridgegen.formats.hf_writer import FilePlan, PlannedFiles, PlannedTensor, file_plan, stream_tensors
from bridgegen.formats.safetensors import INDEX_NAME, Checkpoint
from bridgegen.megatron.build import build_model, ensure_model_parallel, transformer_config_for
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.transforms import gather_tp_shards, shard_writes, split_full, tp_partition_dim
from bridgegen.plan.values import parse_dtype
from bridgegen.plan.weight_map import ExportChecks, TensorPlan, model_tensors, plan_tensors


@dataclass(frozen=True)
class ParallelLayout:
    """A Megatron parallel layout. Data parallelism takes the ranks left over."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def __str__(self) -> str:
        parts = [f"tp={self.tp}", f"pp={self.pp}"]
        parts += [
            f"{k}={v}"
            for k, v in (("vpp", self.vpp), ("ep", self.ep if self.ep > 1 else None), ("etp", self.etp))
            if v
        ]
        return " ".join(parts)

    def transformer_overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tensor_parallel_size": self.tp,
            "pipeline_parallel_size": self.pp,
            "virtual_pipeline_parallel_size": self.vpp,
            "expert_parallel_size": self.ep,
            "expert_tensor_parallel_size": self.etp,
        }
        if self.first_stage_layers is not None:
            out["num_layers_in_first_pipeline_stage"] = self.first_stage_layers
        if self.last_stage_layers is not None:
            out["num_layers_in_last_pipeline_stage"] = self.last_stage_layers
        return out


@dataclass
class ModelChunk:
    """One virtual-pipeline chunk of this rank's model, with its global layer offset."""

    model: Any  # a megatron-core GPTModel
    vp_stage: int | None
    layer_offset: int


def initialize(layout: ParallelLayout) -> None:
    ensure_model_parallel(
        layout.tp,
        layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def build_chunks(
    bridge: Conversion,
    layout: ParallelLayout,
    dtype: str | torch.dtype | None = None,
    *,
    parallel_output: bool = True,
    device: str | torch.device | None = None,
) -> list[ModelChunk]:
    """This rank's model chunks (one per virtual pipeline stage), moved to ``device`` if
    given (parameters stay uninitialised until loaded)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    initialize(layout)
    config = transformer_config_for(bridge, dtype, **layout.transformer_overrides())
    chunks = []
    for index in range(layout.vpp or 1):
        vp_stage = index if layout.vpp else None
        model = build_model(
            bridge,
            transformer_config=config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            parallel_output=parallel_output,
        )
        if device is not None:
            model = model.to(device)
        chunks.append(ModelChunk(model, vp_stage, get_transformer_layer_offset(config, vp_stage=vp_stage)))
    return chunks


def load_hf(
    bridge: Conversion,
    chunks: list[ModelChunk],
    hf_dir: str | os.PathLike[str],
    *,
    progress: bool = False,
    allow_lossy_casts: bool = True,
) -> LoadStats:
    """Fill this rank's chunks from an HF folder, reading only this rank's slices. Every rank
    checks that the checkpoint holds no tensor that no rank needs. Without
    ``allow_lossy_casts`` a source tensor the model's dtype cannot hold exactly is an error."""
    from megatron.core import parallel_state

    checkpoint = Checkpoint.open(hf_dir)
    checkpoint.allow_lossy_casts = allow_lossy_casts
    weight_map = bridge.weight_map()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    expert_offset = _expert_offset(bridge)
    needed = sorted(
        {
            hf
            for chunk in chunks
            for entry in plan_tensors(
                weight_map, model_tensors(chunk.model), layer_offset=chunk.layer_offset, expert_offset=expert_offset
            )
            for hf in entry.hf_names
        }
    )
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, needed)
    wanted = {name for names in everyone for name in names or []}
    wanted |= quantized_parts(wanted)
    unexpected = [n for n in checkpoint.names() if n not in wanted and not weight_map.ignored(n)]
    if unexpected:
        raise WeightError(
            f"{checkpoint.folder}: unexpected tensor(s) {', '.join(repr(n) for n in unexpected[:8])}: "
            f"the {bridge.config.family} spec maps no Megatron tensor to them"
        )
    total = LoadStats()
    count = sum(1 for c in chunks for _ in model_tensors(c.model))
    what = share("import", dist.get_rank(), dist.get_world_size())
    with progress_bar(progress and dist.get_rank() == 0, count, what) as update:
        for chunk in chunks:
            stats = load_into(
                weight_map,
                chunk.model,
                checkpoint,
                layer_offset=chunk.layer_offset,
                tp=(tp_rank, tp_size),
                expert_offset=expert_offset,
                expert_tp=(
                    parallel_state.get_expert_tensor_parallel_rank(),
                    parallel_state.get_expert_tensor_parallel_world_size(),
                ),
                check_unused=False,
                fp8_block=block_size(bridge.config.hf_passthrough),
                progress=update,
            )
            total.tensors += stats.tensors
            total.bytes_requested += stats.bytes_requested
            total.hf_tensors_used += stats.hf_tensors_used
    return total


@dataclass(frozen=True)
class _LocalTensor:
    """One of this rank's Megatron tensors and its plan (the plan's layout is its place in its
    group: TP for dense tensors, expert-TP for experts)."""

    tensor: torch.Tensor
    plan: TensorPlan

    def writes(self) -> bool:
        """Replicated tensors are written by the group's first rank; split ones by every rank."""
        return tp_partition_dim(self.plan.kind) is not None or self.plan.layout.tp_rank == 0


def _expert_offset(bridge: Conversion) -> int:
    """Global number of this rank's first local expert (experts split evenly over EP ranks)."""
    from megatron.core import parallel_state as ps

    experts = int(bridge.config.values.get("num_moe_experts") or 0)
    return int(ps.get_expert_model_parallel_rank()) * (
        experts // int(ps.get_expert_model_parallel_world_size())
    )


def _local_tensors(bridge: Conversion, chunks: list[ModelChunk]) -> list[_LocalTensor]:
    """This rank's tensors that the export writes (one data-parallel replica writes each)."""
    from megatron.core import parallel_state as ps

    weight_map = bridge.weight_map()
    expert_offset = _expert_offset(bridge)
    out = []
    # Constant tensors and copies of another's HF tensor are checked here, not written: a copy
    # and the tensor it repeats are split alike and held by the same ranks, so each rank compares
    # its own shards.
    checks = ExportChecks(weight_map)
    for chunk in chunks:
        tensors = dict(model_tensors(chunk.model))
        # A tied output layer is the embedding; HF has no tensor of its own.
        kept = [(name, tensor) for name, tensor in tensors.items() if not weight_map.is_tied_output(name)]
        plan = plan_tensors(
            weight_map,
            kept,
            layer_offset=chunk.layer_offset,
            expert_offset=expert_offset,
            tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            expert_tp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        )
        for entry in plan:
            if not checks.offer(entry.megatron_name, tensors[entry.megatron_name], entry.matched):
                continue
            replica = ps.get_expert_data_parallel_rank() if entry.is_expert else ps.get_data_parallel_rank()
            if replica == 0:
                out.append(_LocalTensor(tensors[entry.megatron_name], entry))
    checks.finish()
    return out


def _planned(
    bridge: Conversion, tensors: list[_LocalTensor], dtype: torch.dtype | None
) -> list[PlannedTensor]:
    """The HF tensors (name, dtype, whole shape) this rank's tensors are part of, in ``dtype``
    or (None) their own."""
    weight_map = bridge.weight_map()
    layout = weight_map.layout()
    out = []
    for item in tensors:
        entry = item.plan
        shard = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        whole = gather_tp_shards(entry.kind, [shard] * entry.layout.tp_size)
        experts = int(bridge.config.values.get("num_moe_experts") or 0)
        pieces = split_full(entry.kind, whole, layout, gate_up=entry.matched.rule.gate_up)
        for hf_name, piece in zip(entry.hf_names, map(entry.matched.as_stored, pieces), strict=True):
            shape = (experts, *piece.shape) if entry.matched.rule.hf_stacked_experts else tuple(piece.shape)
            out.append(PlannedTensor(hf_name, dtype or entry.dtype, shape))
        out += [PlannedTensor(copy, dtype or entry.dtype, out[-1].shape) for copy in entry.matched.hf_copies()]
    return out


def export_hf(
    bridge: Conversion,
    chunks: list[ModelChunk],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = False,
) -> Path:
    """Write the model spread over all ranks as one HF folder, with no gathering (with
    ``progress``, a bar counts the tensors this rank writes).

    Rank 0 plans the files (every rank reports the HF tensors it holds parts of) and creates
    them with their headers; then every rank writes exactly the bytes of its own shards into
    memory maps of those files, the inverse of the lazy import. Rank 0 then writes the index
    and config and moves the finished folder into place.
    """
    target_dtype = parse_dtype(dtype)  # None: every tensor keeps its own dtype
    out = Path(out_dir)
    rank = dist.get_rank()
    tmp = shared_temp_dir(out, overwrite)
    try:
        # Every rank reads the same headers, so a missing source fails everywhere alike.
        source, carried = carried_tensors(bridge, dtype=target_dtype)
        tensors = _local_tensors(bridge, chunks)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, _planned(bridge, tensors, target_dtype))
        plan_holder: list[Any] = [None]
        if rank == 0:
            unique: dict[str, PlannedTensor] = {}
            for entry in itertools.chain((entry for per_rank in everyone for entry in per_rank), carried):
                if unique.setdefault(entry.name, entry) != entry:
                    raise WeightError(
                        f"ranks disagree on HF tensor {entry.name!r}: {unique[entry.name]} vs {entry}"
                    )
            plan_holder[0] = file_plan(list(unique.values()), max_shard_bytes)
            plan_holder[0].create(tmp)
        dist.broadcast_object_list(plan_holder, src=0)
        plan: FilePlan = plan_holder[0]
        output = PlannedFiles(tmp, plan)
        written = [item for item in tensors if item.writes()]
        what = share("export", rank, dist.get_world_size())
        with torch.no_grad(), progress_bar(progress, len(written), what) as update:
            for item in written:
                entry = item.plan
                # The HF tensor(s), then any copies of the (single) HF tensor.
                for hf_names in (entry.hf_names, *((c,) for c in entry.matched.hf_copies())):
                    writes = shard_writes(
                        entry.kind,
                        item.tensor.detach(),
                        [entry.matched.select(output.target(name)) for name in hf_names],
                        hf_names,
                        entry.layout,
                        entry.matched.rule.norm_offset,
                        entry.matched.rule.gate_up,
                    )
                    for index, view, data in writes:
                        # In the stored orientation, so a transposed tensor is written in runs.
                        as_stored = entry.matched.as_stored
                        output.write(hf_names[index], as_stored(view), as_stored(data))
                if update is not None:
                    update(1)
            if rank == 0 and source is not None:
                for name, tensor in stream_tensors(source, carried):
                    output.write(name, output.target(name), tensor)
        output.close()
        dist.barrier()
        if rank == 0:
            commit_export(bridge, tmp, out, plan, target_dtype or chunks[0].model.config.params_dtype, overwrite)
        dist.barrier()
    except BaseException:
        # Rank 0 owns the shared temp folder: a failing rank removing it under the others would
        # turn its own error into theirs. The launcher removes what a killed rank 0 leaves.
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def commit_export(
    bridge: Conversion, tmp: Path, out: Path, plan: FilePlan, dtype: torch.dtype, overwrite: bool
) -> None:
    import json

    from bridgegen.formats.folders import publish_folder
    from bridgegen.formats.hf_writer import copy_side_files, write_generation_config

    if len(plan.files) > 1:
        weight_map = {entry.name: file for file, entries in plan.files.items() for entry in entries}
        total = sum(entry.nbytes for entries in plan.files.values() for entry in entries)
        (tmp / INDEX_NAME).write_text(
            json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
            )
        )
    hf_config = bridge.export_config(dtype)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    copy_side_files(bridge.hf_dir, tmp)
    write_generation_config(tmp, hf_config)
    publish_folder(tmp, out)


def forward_logits(chunks: list[ModelChunk], input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Forward through all pipeline stages with plain send/recv (no CUDA schedule needed).

    Returns full-vocab logits on the ranks of the last stage (models built with
    ``parallel_output=False``), None elsewhere.
    """
    from megatron.core import parallel_state

    from bridgegen.engines.verify import main_head_only
    from bridgegen.megatron.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    config = chunks[0].model.config
    hidden_shape = (input_ids.shape[1], input_ids.shape[0], config.hidden_size)
    output = None
    with torch.no_grad():
        for index, chunk in enumerate(chunks):
            chunk.model.eval()
            first = pp_rank == 0 and index == 0
            last = pp_rank == pp_size - 1 and index == len(chunks) - 1
            if not first:
                received = torch.empty(hidden_shape, dtype=config.params_dtype, device=input_ids.device)
                dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                chunk.model.set_input_tensor(received)
            with main_head_only(chunk.model):
                output = chunk.model(input_ids, positions, attention_mask=None)
            if not last:
                dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    if pp_rank != pp_size - 1 or output is None:
        return None
    trimmed: torch.Tensor = output[..., :vocab_size].float()
    return trimmed
