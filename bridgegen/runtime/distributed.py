"""Conversion at any parallel layout, with torch.distributed as the engine.

Import: every rank builds only its own model chunks and reads from the safetensors files only
the slices its parameters own (no rank-0 read-then-scatter). Export: every Megatron tensor is
gathered over tensor parallelism onto its TP group's first rank, which streams the HF tensors
into its own shard files; rank 0 then writes one index and moves the finished folder into
place. Works under torchrun (gloo on CPU, NCCL on GPU) or ``launch.run_on_ranks``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridgegen.runtime.convert import ModelBridge, ensure_model_parallel, parse_dtype
from bridgegen.runtime.errors import WeightError
from bridgegen.runtime.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    PlannedTensor,
    plan_shards,
    remove_partial_outputs,
    write_safetensors,
)
from bridgegen.runtime.transforms import gather_tp_shards, tp_partition_dim
from bridgegen.runtime.weight_rules import WeightKind
from bridgegen.runtime.weights import LoadStats, iter_hf_from_full, load_into, model_tensors


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
    bridge: ModelBridge,
    layout: ParallelLayout,
    dtype: str | torch.dtype | None = None,
    *,
    parallel_output: bool = True,
) -> list[ModelChunk]:
    """This rank's model chunks (one per virtual pipeline stage)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    initialize(layout)
    config = bridge.transformer_config(dtype, **layout.transformer_overrides())
    chunks = []
    for index in range(layout.vpp or 1):
        vp_stage = index if layout.vpp else None
        model = bridge.build_model(
            transformer_config=config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            parallel_output=parallel_output,
        )
        chunks.append(ModelChunk(model, vp_stage, get_transformer_layer_offset(config, vp_stage=vp_stage)))
    return chunks


def load_hf(
    bridge: ModelBridge, chunks: list[ModelChunk], hf_dir: str | os.PathLike[str], *, progress: bool = False
) -> LoadStats:
    """Fill this rank's chunks from an HF folder, reading only this rank's slices. Every rank
    checks that the checkpoint holds no tensor that no rank needs."""
    from megatron.core import parallel_state

    checkpoint = Checkpoint.open(hf_dir)
    weight_map = bridge.weight_map()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    needed = sorted(
        {
            hf
            for chunk in chunks
            for name, _ in model_tensors(chunk.model)
            for hf in weight_map.match(name, chunk.layer_offset).hf_names()
        }
    )
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, needed)
    wanted = {name for names in everyone for name in names or []}
    unexpected = [n for n in checkpoint.names() if n not in wanted and not weight_map.ignored(n)]
    if unexpected:
        raise WeightError(
            f"{checkpoint.folder}: unexpected tensor(s) {', '.join(repr(n) for n in unexpected[:8])}: "
            f"the {bridge.config.family} spec maps no Megatron tensor to them"
        )
    total = LoadStats()
    bar = None
    if progress and dist.get_rank() == 0:
        from tqdm import tqdm

        bar = tqdm(total=sum(1 for c in chunks for _ in model_tensors(c.model)), desc="import (rank 0)", unit="tensor")
    for chunk in chunks:
        stats = load_into(
            weight_map,
            chunk.model,
            checkpoint,
            layer_offset=chunk.layer_offset,
            tp_rank=tp_rank,
            tp_size=tp_size,
            check_unused=False,
            progress=bar.update if bar is not None else None,
        )
        total.tensors += stats.tensors
        total.bytes_requested += stats.bytes_requested
        total.hf_tensors_used += stats.hf_tensors_used
    if bar is not None:
        bar.close()
    return total


def _gathered_tensors(
    bridge: ModelBridge, chunks: list[ModelChunk], *, meta: bool
) -> Iterator[tuple[str, torch.Tensor, int, int]]:
    """(megatron name, whole tensor, layer offset, expert offset) for the tensors this rank
    owns. Ownership alternates over the ranks of each tensor's group (TP for dense tensors,
    expert-TP for experts), so gathering and writing are spread over ranks. With ``meta``, only
    shapes are produced and nothing is communicated."""
    from megatron.core import parallel_state as ps

    weight_map = bridge.weight_map()
    dense = (ps.get_tensor_model_parallel_group(), ps.get_data_parallel_rank() == 0)
    experts = (ps.get_expert_tensor_parallel_group(), ps.get_expert_data_parallel_rank() == 0)
    local_experts = int(bridge.config.values.get("num_moe_experts") or 0) // ps.get_expert_model_parallel_world_size()
    expert_offset = ps.get_expert_model_parallel_rank() * local_experts
    index = 0
    for chunk in chunks:
        for name, param in model_tensors(chunk.model):
            if weight_map.is_tied_output(name):
                continue  # a tied output layer is the embedding; HF has no tensor of its own
            matched = weight_map.match(name, chunk.layer_offset, expert_offset)
            group, takes_part = experts if matched.expert is not None else dense
            if not takes_part:
                continue  # another data-parallel replica holds the same tensor
            size, me = dist.get_world_size(group), dist.get_rank(group)
            owner = index % size
            index += 1
            kind = matched.rule.kind
            if meta:
                if me == owner:
                    shards = [torch.empty(param.shape, dtype=param.dtype, device="meta")] * size
                    yield name, gather_tp_shards(kind, shards), chunk.layer_offset, expert_offset
                continue
            local = param.detach()
            if size == 1 or tp_partition_dim(kind) is None:
                if me == owner:  # replicated tensors need no communication
                    yield name, local, chunk.layer_offset, expert_offset
                continue
            local = local.contiguous()
            destination = dist.get_global_rank(group, owner)
            if me != owner:
                dist.gather(local, None, dst=destination, group=group)
                continue
            if tp_partition_dim(kind) == 0 and kind not in (WeightKind.gate_up, WeightKind.fused_gate_up):
                # Receive straight into the whole tensor: its dim-0 chunks are contiguous.
                full = torch.empty((local.shape[0] * size, *local.shape[1:]), dtype=local.dtype, device=local.device)
                dist.gather(local, list(full.chunk(size)), dst=destination, group=group)
            else:
                shards = [torch.empty_like(local) for _ in range(size)]
                dist.gather(local, shards, dst=destination, group=group)
                full = gather_tp_shards(kind, shards)
            yield name, full, chunk.layer_offset, expert_offset


def _hf_stream(
    bridge: ModelBridge, chunks: list[ModelChunk], dtype: torch.dtype, *, meta: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    weight_map = bridge.weight_map()
    for name, full, layer_offset, expert_offset in _gathered_tensors(bridge, chunks, meta=meta):
        yield from iter_hf_from_full(
            weight_map, [(name, full)], layer_offset=layer_offset, expert_offset=expert_offset, dtype=dtype
        )


def export_hf(
    bridge: ModelBridge,
    chunks: list[ModelChunk],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write the model spread over all ranks as one HF folder. Each TP group's first rank
    writes the shards of its pipeline stage; rank 0 writes the index and commits atomically."""
    from megatron.core import parallel_state

    target_dtype = parse_dtype(dtype) or chunks[0].model.config.params_dtype
    out = Path(out_dir)
    rank = dist.get_rank()
    if rank == 0 and out.exists() and not overwrite:
        error: str | None = f"{out}: output folder exists; pass overwrite=True (--overwrite) to replace it"
    else:
        error = None
    holder: list[Any] = [error, None]
    if rank == 0 and error is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_partial_outputs(out)  # left by an earlier run whose ranks were killed
        holder[1] = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    dist.broadcast_object_list(holder, src=0)
    if holder[0] is not None:
        raise WeightError(holder[0])
    tmp = Path(holder[1])
    try:
        # Only the first rank of each TP group of the first data-parallel replica writes.
        writes = (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )
        shards: list[tuple[str, list[str], int]] = []
        if writes:
            planned = [
                PlannedTensor(n, t.dtype, tuple(t.shape))
                for n, t in _hf_stream(bridge, chunks, target_dtype, meta=True)
            ]
            produce = _hf_stream(bridge, chunks, target_dtype, meta=False)
            for index, shard in enumerate(plan_shards(planned, max_shard_bytes)):
                file = f"part-{rank:05d}-{index:05d}.tmp"
                size = write_safetensors(tmp / file, shard, produce)
                shards.append((file, [entry.name for entry in shard], size))
            for _ in produce:  # pragma: no cover - the plan covers every tensor
                raise WeightError("export produced more tensors than planned")
        elif parallel_state.get_data_parallel_rank() == 0:
            for _ in _gathered_tensors(bridge, chunks, meta=False):
                pass  # take part in the TP gathers
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, shards)
        if rank == 0:
            _commit(bridge, tmp, out, [s for per_rank in everyone for s in per_rank], target_dtype, overwrite)
        dist.barrier()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _commit(
    bridge: ModelBridge,
    tmp: Path,
    out: Path,
    shards: list[tuple[str, list[str], int]],
    dtype: torch.dtype,
    overwrite: bool,
) -> None:
    import json

    from bridgegen.runtime.safetensors_io import HF_SIDE_FILES

    count = len(shards)
    weight_map: dict[str, str] = {}
    for index, (file, names, _) in enumerate(shards):
        final = SINGLE_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        os.replace(tmp / file, tmp / final)
        for name in names:
            if name in weight_map:
                raise WeightError(f"export wrote HF tensor {name!r} twice")
            weight_map[name] = final
    if count > 1:
        total = sum(size for _, _, size in shards)
        (tmp / INDEX_NAME).write_text(
            json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
            )
        )
    hf_config = bridge.hf_config()
    dtype_name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in hf_config or key == "torch_dtype":
            hf_config[key] = dtype_name
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if bridge.hf_dir is not None:
        for name in HF_SIDE_FILES:
            if (bridge.hf_dir / name).is_file():
                shutil.copy2(bridge.hf_dir / name, tmp / name)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    os.replace(tmp, out)


def forward_logits(chunks: list[ModelChunk], input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Forward through all pipeline stages with plain send/recv (no CUDA schedule needed).

    Returns full-vocab logits on the ranks of the last stage (models built with
    ``parallel_output=False``), None elsewhere.
    """
    from megatron.core import parallel_state

    from bridgegen.runtime.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    config = chunks[0].model.config
    hidden_shape = (input_ids.shape[1], input_ids.shape[0], config.hidden_size)
    output = None
    with torch.no_grad():
        for index, chunk in enumerate(chunks):
            chunk.model.eval()
            first = pp_rank == 0 and index == 0
            last = pp_rank == pp_size - 1 and index == len(chunks) - 1
            if not first:
                received = torch.empty(hidden_shape, dtype=config.params_dtype)
                dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                chunk.model.set_input_tensor(received)
            output = chunk.model(input_ids, positions, attention_mask=None)
            if not last:
                dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    if pp_rank != pp_size - 1 or output is None:
        return None
    trimmed: torch.Tensor = output[..., :vocab_size].float()
    return trimmed
