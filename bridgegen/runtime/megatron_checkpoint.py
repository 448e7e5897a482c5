"""Megatron-Core distributed checkpoints (``megatron.core.dist_checkpointing``) with the
bridge's config recorded beside them, so export needs no extra flags."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bridgegen.runtime.config import MegatronConfig
from bridgegen.runtime.errors import WeightError
from bridgegen.runtime.safetensors_io import HF_SIDE_FILES

BRIDGE_FILE = "bridgegen.json"
SIDE_FILES_DIR = "hf_side_files"


def save_megatron(
    model: torch.nn.Module,
    config: MegatronConfig,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    hf_source: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` as a dist checkpoint in ``out_dir`` (atomic: temp folder, then rename)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from bridgegen.runtime.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise WeightError(f"{target}: output folder exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp), sharded_strategy=strategy)  # type: ignore[operator]
        record: dict[str, Any] = {
            "megatron_config": json.loads(config.to_json()),
            "dtype": str(dtype).removeprefix("torch."),
        }
        (tmp / BRIDGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if hf_source is not None:
            (tmp / SIDE_FILES_DIR).mkdir()
            for name in HF_SIDE_FILES:
                if (Path(hf_source) / name).is_file():
                    shutil.copy2(Path(hf_source) / name, tmp / SIDE_FILES_DIR / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
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


def load_megatron(model: torch.nn.Module, checkpoint_dir: str | os.PathLike[str]) -> None:
    """Fill ``model`` from a dist checkpoint (any layout it was saved at)."""
    from megatron.core import dist_checkpointing

    from bridgegen.runtime.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    state = dist_checkpointing.load(model.sharded_state_dict(), str(checkpoint_dir))  # type: ignore[operator]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise WeightError(f"{checkpoint_dir}: checkpoint lacks {', '.join(missing[:5])}")
