"""Writing an HF folder from a model's Megatron tensors: the files planned from the model's
names and shapes, then each HF tensor streamed into its shard as it is made."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from bridgegen.bridge.config_checks import raise_if_a_config_check_failed, start_config_checks
from bridgegen.engines.progress import progress_bar
from bridgegen.engines.weights import iter_hf_from_full
from bridgegen.formats.hf_folder import carried_tensors
from bridgegen.formats.hf_writer import HFDirWriter, PlannedTensor, stream_tensors
from bridgegen.megatron.build import model_dtype
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.values import parse_dtype
from bridgegen.plan.weight_map import model_tensors


def planned_hf_tensors(
    conversion: Conversion, model: torch.nn.Module, dtype: torch.dtype | None
) -> list[PlannedTensor]:
    """Every HF tensor (name, dtype, shape) an export of ``model`` writes, in order,
    worked out on meta copies: nothing is read. Each keeps its Megatron tensor's dtype
    (a router's fp32 expert bias in a bf16 model stays fp32) unless ``dtype`` is given."""
    meta = [(name, torch.empty(t.shape, dtype=t.dtype, device="meta")) for name, t in model_tensors(model)]
    return [
        PlannedTensor(n, t.dtype, tuple(t.shape))
        for n, t in iter_hf_from_full(conversion.weight_map(), meta, dtype=dtype)
    ]


def write_hf_folder(
    conversion: Conversion,
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = False,
    values: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``model`` as an HF folder: config, side files from the source, sharded
    safetensors with an index. Atomic: the folder appears only when complete. With
    ``values``, ``model`` may be a meta-device model that only plans the files, and
    ``values`` yields each of its tensors' real value in ``model_tensors`` order. Every
    tensor keeps its own dtype unless ``dtype`` is given."""
    target = parse_dtype(dtype)
    hf_config = conversion.export_config(target or model_dtype(model))
    tensors = list(model_tensors(model))
    weight_map = conversion.weight_map()
    planned = planned_hf_tensors(conversion, model, target)
    source, carried = carried_tensors(conversion, dtype=target)

    def produce(update: Callable[[int], object] | None) -> Iterator[tuple[str, torch.Tensor]]:
        converted = iter_hf_from_full(weight_map, values if values is not None else tensors, dtype=target)
        passed = stream_tensors(source, carried) if source is not None else iter(())
        for item in itertools.chain(converted, passed):
            start_config_checks()  # the first tensor is read: every import the export needs is done
            raise_if_a_config_check_failed()
            yield item
            if update is not None:
                update(1)

    with (
        progress_bar(progress, len(planned) + len(carried), "export") as update,
        HFDirWriter(out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes) as writer,
    ):
        writer.write_tensors(planned + carried, produce(update))
        writer.write_json("config.json", hf_config)
        writer.copy_side_files(conversion.hf_dir)
        writer.write_generation_config(hf_config)
    return Path(out_dir)
