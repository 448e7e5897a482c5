"""Saving models as Megatron-LM style checkpoints and loading them back into models (the
layout is ``formats.megatron_checkpoint``'s)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridgegen.engines.checkpoint_read import checkpoint_values
from bridgegen.engines.progress import progress_bar, share
from bridgegen.formats import dist_checkpoint, megatron_lm
from bridgegen.formats.folders import HF_SIDE_FILES, publish_folder, shared_temp_dir
from bridgegen.formats.hf_folder import carried_tensors
from bridgegen.formats.hf_writer import copy_side_files, copy_tensors
from bridgegen.formats.megatron_checkpoint import (
    ARGS_FILE,
    BRIDGE_FILE,
    PER_LAYER_KEY,
    SIDE_FILES_DIR,
    check_keys,
    in_process_save_strategy,
    sharded_state_dict,
)
from bridgegen.formats.megatron_lm import arguments_for
from bridgegen.formats.safetensors import SINGLE_NAME
from bridgegen.megatron.build import ensure_model_parallel
from bridgegen.megatron.cpu_support import enable_cpu_execution
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.weight_map import model_tensors


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _tokenizer_files(folder: Path | None) -> bool:
    return folder is not None and any((folder / name).is_file() for name in HF_SIDE_FILES[1:])


def save_megatron(
    models: torch.nn.Module | list[Any],
    bridge: Conversion,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    hf_source: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    sharded_strategy: Any = None,
    assign: Any = None,
) -> Path:
    """Save the model (all ranks call this) as a Megatron-LM style checkpoint in ``out_dir``;
    atomic: the folder appears only when every rank has written its part. The tokenizer files
    of ``hf_source``, and the tensors it holds besides the language model (e.g. a vision tower,
    see ``formats.hf_folder.carried_tensors``), are kept in ``hf_side_files/`` for the export.
    ``sharded_strategy`` replaces megatron-core's writer (``stream_import.lazy_save_strategy``);
    ``assign`` may mark which rank writes which tensor (``stream_import.share_the_writing``)."""
    from megatron.core import dist_checkpointing

    source, carried = carried_tensors(bridge, hf_source) if hf_source is not None else (None, [])
    enable_cpu_execution()
    ensure_model_parallel()
    chunks = models if isinstance(models, list) else [models]
    target = Path(out_dir)
    lm_args = arguments_for(
        bridge,
        dtype,
        tokenizer_model=str(target.resolve() / SIDE_FILES_DIR)
        if _tokenizer_files(Path(hf_source) if hf_source is not None else None)
        else None,
    )
    tmp = shared_temp_dir(target, overwrite)
    try:
        folder = tmp / megatron_lm.RELEASE
        state = sharded_state_dict(chunks)
        if assign is not None:
            assign(state)
        state.update(
            args=lm_args.namespace(),
            checkpoint_version=megatron_lm.CHECKPOINT_VERSION,
            iteration=0,
        )
        strategy = sharded_strategy or in_process_save_strategy()("torch_dist", 1, thread_count=1)
        if _rank() == 0:
            folder.mkdir()
        if dist.is_initialized():
            dist.barrier()
        dist_checkpointing.save(
            state,
            str(folder),
            sharded_strategy=strategy,
            content_metadata=dict(megatron_lm.CONTENT_METADATA),
        )
        if _rank() == 0:
            megatron_lm.write_tracker(tmp)
            record = {
                "megatron_config": json.loads(bridge.config.to_json()),
                "dtype": str(dtype).removeprefix("torch."),
                "key_names": bridge.key_names.value,
            }
            (tmp / BRIDGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            (tmp / ARGS_FILE).write_text(lm_args.command_text())
            if hf_source is not None:
                (tmp / SIDE_FILES_DIR).mkdir()
                copy_side_files(hf_source, tmp / SIDE_FILES_DIR)
                if source is not None:
                    copy_tensors(source, carried, tmp / SIDE_FILES_DIR / SINGLE_NAME)
            publish_folder(tmp, target)
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        if _rank() == 0:  # the temp folder is shared; see distributed.export_hf
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_megatron(
    models: torch.nn.Module | list[Any],
    checkpoint_dir: str | os.PathLike[str],
    *,
    iteration: str | None = None,
    progress: bool = False,
) -> None:
    """Fill the model (all ranks call this) from a dist checkpoint saved at any layout. Every
    key the model asks for must be there, and every model tensor of the checkpoint must be
    asked for (optimizer and RNG state are never read). Each rank reads the regions of its own
    tensors straight into them, through the streaming export's reader (every item checked
    against its CRC32s). With ``progress``, a bar counts this rank's tensors."""
    enable_cpu_execution()
    found = megatron_lm.find_checkpoint(checkpoint_dir, iteration)
    chunks = models if isinstance(models, list) else [models]
    present = set(dist_checkpoint.model_keys(found.path))
    per_layer_keys = any(PER_LAYER_KEY.match(key) for key in present)
    check_keys(sharded_state_dict(chunks, per_layer_keys), found.path, present)
    total = sum(1 for model in chunks for _ in model_tensors(model))
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with progress_bar(progress, total, share("load Megatron checkpoint", rank, world_size)) as update:
        for model in chunks:
            values = checkpoint_values(
                model, found.path, per_layer_keys=per_layer_keys, check_keys=False, progress=update
            )
            for _ in values:
                pass  # each tensor is read into the model
