"""Streaming export: Megatron checkpoint (any layout, any writer) -> HF folder, without a
model in memory, in one process or split over the ranks of a process group."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import torch

from bridgegen.engines.checkpoint_read import checkpoint_values
from bridgegen.engines.distributed import commit_export
from bridgegen.engines.hf_export import planned_hf_tensors, write_hf_folder
from bridgegen.engines.pieces import return_freed_buffers_to_the_system
from bridgegen.engines.progress import progress_bar, share
from bridgegen.engines.weights import iter_hf_from_full
from bridgegen.formats import megatron_lm
from bridgegen.formats.folders import shared_temp_dir
from bridgegen.formats.hf_folder import carried_tensors
from bridgegen.formats.hf_writer import PlannedFiles, file_plan, stream_tensors
from bridgegen.formats.megatron_checkpoint import conversion_for_checkpoint
from bridgegen.megatron.build import meta_model
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.values import parse_dtype
from bridgegen.plan.weight_map import model_tensors, plan_tensors


def stream_export(
    checkpoint_dir: Any,
    out_dir: Any,
    *,
    iteration: str | None = None,
    family: str | None = None,
    hf_config: Any = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    batch_bytes: int = 256 * 2**20,
    progress: bool = False,
) -> Any:
    """Megatron checkpoint (any layout, any writer) -> HF folder, without a model in memory:
    the files are planned from a meta-device model, then each batch of parameters (at most
    ``batch_bytes``, or one parameter) is read, converted and streamed into the safetensors
    shards."""
    import torch.distributed as dist

    return_freed_buffers_to_the_system()
    found = megatron_lm.find_checkpoint(checkpoint_dir, iteration)
    bridge, saved_dtype = conversion_for_checkpoint(found.path, family=family, hf_config=hf_config)
    model = meta_model(bridge, saved_dtype)
    if dist.is_initialized() and dist.get_world_size() > 1:
        return _export_on_ranks(
            bridge,
            model,
            found.path,
            out_dir,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
    with progress_bar(progress, sum(1 for _ in model_tensors(model)), "export") as update:
        values = checkpoint_values(
            model,
            found.path,
            per_layer_keys=bridge.per_layer_keys,
            batch_bytes=batch_bytes,
            progress=update,
        )
        return write_hf_folder(
            bridge, model, out_dir, overwrite=overwrite, dtype=dtype, max_shard_bytes=max_shard_bytes, values=values
        )

def owned_parameters(bridge: Conversion, model: torch.nn.Module, rank: int, world_size: int) -> set[str]:
    """This rank's share of an export: a contiguous run of parameters holding about 1/N of the
    bytes, never splitting the experts that are stacked into one HF tensor."""
    units: list[tuple[list[str], int]] = []
    last_group: tuple[str, ...] | None = None
    for entry in plan_tensors(bridge.weight_map(), model_tensors(model)):
        group = entry.hf_names if entry.matched.rule.hf_stacked_experts else None
        name, size = entry.megatron_name, entry.nbytes
        if group is not None and group == last_group:
            units[-1][0].append(name)
            units[-1] = (units[-1][0], units[-1][1] + size)
        else:
            units.append(([name], size))
        last_group = group
    total = sum(size for _, size in units) or 1
    owned: set[str] = set()
    done = 0
    for names, size in units:
        if min(world_size - 1, done * world_size // total) == rank:
            owned.update(names)
        done += size
    # A copy of another tensor's HF tensor goes with that tensor: the export compares them.
    weight_map = bridge.weight_map()
    for names, _ in units:
        for name in names:
            source = weight_map.shared_source(name)
            if source is not None:
                (owned.add if source in owned else owned.discard)(name)
    return owned

def _export_on_ranks(
    bridge: Conversion,
    model: torch.nn.Module,
    folder: Any,
    out_dir: Any,
    *,
    dtype: str | torch.dtype | None,
    overwrite: bool,
    max_shard_bytes: int,
    progress: bool = False,
) -> Any:
    """The streaming export on N ranks: rank 0 plans the HF files and writes their headers;
    every rank reads its share of the parameters and writes their HF tensors into those files;
    rank 0 writes the index and moves the folder into place. With ``progress``, a bar counts
    this rank's share."""
    import torch.distributed as dist

    saved: torch.dtype = getattr(model, "config").params_dtype  # noqa: B009 - GPTModel has a config
    target = parse_dtype(dtype)  # None: every tensor keeps its own dtype
    weight_map = bridge.weight_map()
    rank = dist.get_rank()
    out = Path(out_dir)
    tmp = shared_temp_dir(out, overwrite)
    try:
        planned = planned_hf_tensors(bridge, model, target)
        source, carried = carried_tensors(bridge, dtype=target)
        holder: list[Any] = [None]
        if rank == 0:
            holder[0] = file_plan(planned + carried, max_shard_bytes)
            holder[0].create(tmp)
        dist.broadcast_object_list(holder, src=0)
        output = PlannedFiles(tmp, holder[0])
        world_size = dist.get_world_size()
        owned = owned_parameters(bridge, model, rank, world_size)
        with progress_bar(progress, len(owned), share("export", rank, world_size)) as update:
            values = checkpoint_values(
                model, folder, per_layer_keys=bridge.per_layer_keys, only=owned, progress=update
            )
            converted = iter_hf_from_full(weight_map, values, dtype=target)
            passed = stream_tensors(source, carried) if rank == 0 and source is not None else iter(())
            for name, tensor in itertools.chain(converted, passed):
                output.write(name, output.target(name), tensor)
        output.close()
        dist.barrier()
        if rank == 0:
            commit_export(bridge, tmp, out, holder[0], target or saved, overwrite)
        dist.barrier()
    except BaseException:
        if rank == 0:  # the temp folder is shared; see distributed.export_hf
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
