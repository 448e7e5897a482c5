"""Megatron-Core distributed checkpoints (``megatron.core.dist_checkpointing``) with the
bridge's config recorded beside them, so export needs no extra flags.

The checkpoint is saved from whatever layout the model has (every rank takes part) and can be
loaded at any other layout: dist_checkpointing stores tensors by global key and offsets.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from bridgegen.runtime.config import MegatronConfig
from bridgegen.runtime.errors import WeightError
from bridgegen.runtime.safetensors_io import (
    SINGLE_NAME,
    copy_side_files,
    copy_tensors,
    shared_temp_dir,
)

if TYPE_CHECKING:
    from bridgegen.runtime.convert import ModelBridge

BRIDGE_FILE = "bridgegen.json"
SIDE_FILES_DIR = "hf_side_files"


def _sharded_state_dict(models: list[Any]) -> dict[str, Any]:
    """One dict for all of this rank's model chunks. The keys inside each ShardedTensor are
    global; the chunk prefix only keeps this rank's dict keys apart."""
    if len(models) == 1:
        return dict(models[0].sharded_state_dict())
    return {f"chunk{i}": model.sharded_state_dict() for i, model in enumerate(models)}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_megatron(
    models: torch.nn.Module | list[Any],
    bridge: ModelBridge,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    hf_source: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the model (all ranks call this) as a dist checkpoint in ``out_dir``; atomic: the
    folder appears only when every rank has written its part. The tokenizer files of
    ``hf_source``, and the tensors it holds besides the language model (e.g. a vision tower,
    see ``ModelBridge.carried_tensors``), are kept in ``hf_side_files/`` for the export."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from bridgegen.runtime.convert import ensure_model_parallel
    from bridgegen.runtime.cpu_support import enable_cpu_execution

    source, carried = bridge.carried_tensors(hf_source) if hf_source is not None else (None, [])
    enable_cpu_execution()
    ensure_model_parallel()
    chunks = models if isinstance(models, list) else [models]
    target = Path(out_dir)
    tmp = shared_temp_dir(target, overwrite)
    try:
        strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
        dist_checkpointing.save(_sharded_state_dict(chunks), str(tmp), sharded_strategy=strategy)
        if _rank() == 0:
            record = {
                "megatron_config": json.loads(bridge.config.to_json()),
                "dtype": str(dtype).removeprefix("torch."),
            }
            (tmp / BRIDGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            if hf_source is not None:
                (tmp / SIDE_FILES_DIR).mkdir()
                copy_side_files(hf_source, tmp / SIDE_FILES_DIR)
                if source is not None:
                    copy_tensors(source, carried, tmp / SIDE_FILES_DIR / SINGLE_NAME)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        dist.barrier()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_record(checkpoint_dir: str | os.PathLike[str]) -> tuple[MegatronConfig, torch.dtype]:
    path = Path(checkpoint_dir) / BRIDGE_FILE
    if not path.is_file():
        raise WeightError(f"{path}: missing; this folder was not written by bridgegen import")
    record = json.loads(path.read_text())
    return MegatronConfig.from_json(json.dumps(record["megatron_config"])), getattr(torch, record["dtype"])


def bridge_for_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> tuple[ModelBridge, torch.dtype]:
    """The bridge a checkpoint written by ``save_megatron`` was saved with, and its dtype; its
    ``hf_dir`` is the kept side-file folder, so an export writes those files back."""
    from bridgegen.generated import BRIDGES
    from bridgegen.runtime.convert import ModelBridge

    config, dtype = read_record(checkpoint_dir)
    bridge = next((b for b in BRIDGES if b.family == config.family), None)
    if bridge is None:
        raise WeightError(f"{checkpoint_dir}: family {config.family!r} has no bridge in this version")
    side = Path(checkpoint_dir) / SIDE_FILES_DIR
    return ModelBridge(bridge, config, side if side.is_dir() else None), dtype


def load_megatron(models: torch.nn.Module | list[Any], checkpoint_dir: str | os.PathLike[str]) -> None:
    """Fill the model (all ranks call this) from a dist checkpoint saved at any layout."""
    from megatron.core import dist_checkpointing

    from bridgegen.runtime.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    chunks = models if isinstance(models, list) else [models]
    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(checkpoint_dir))
    for index, model in enumerate(chunks):
        part = state if len(chunks) == 1 else state[f"chunk{index}"]
        result = model.load_state_dict(part, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise WeightError(f"{checkpoint_dir}: checkpoint lacks {', '.join(missing[:5])}")
