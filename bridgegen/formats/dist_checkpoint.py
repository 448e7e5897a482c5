"""Reading megatron-core distributed checkpoints written by any megatron-core from 0.16 on:
the DCP index (``.metadata``), the model's keys, and the common state.

The tensors are torch.distributed.checkpoint (DCP) items keyed by the model's
``sharded_state_dict()`` names. The "common state" (``args``, ``iteration``, ...) is, up to
megatron-core 0.18, a ``common.pt`` beside them; from 0.19 it is a pickled DCP object
``common_state/shard_0_1`` (``torch.save([state])``) and there is no ``common.pt``
(megatron-core 0.19.2 ``dist_checkpointing/serialization.py``, ``load_common_state_dict``).
megatron-core 0.16.1 reads only ``common.pt``, so we read the common state ourselves. Every
pickle here (the index, the common state) goes through ``pickles``: a checkpoint is data, and
no class outside its allowlist is ever resolved.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.formats import pickles

COMMON_FILE = "common.pt"
COMMON_OBJECT = "common_state"
METADATA_FILE = ".metadata"
# Checkpoint items that are not model weights: optimizer and RNG state, the common state.
NOT_MODEL_PREFIXES = ("optimizer.", "rng_state", COMMON_OBJECT, "rerun_state_machine")


def read_metadata(folder: str | Path) -> Any:
    """The checkpoint's DCP index (a torch ``Metadata``), read through the restricted
    unpickler (torch's ``FileSystemReader.read_metadata`` uses a plain ``pickle.load``)."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(folder) / METADATA_FILE
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise WeightError(f"{path}: cannot read the checkpoint's index: {exc.strerror or exc}") from None
    with handle:
        metadata = pickles.load(handle, path)
    if not isinstance(metadata, Metadata):
        raise WeightError(f"{path}: holds a {type(metadata).__name__}, not a checkpoint index")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def file_reader(folder: str | Path) -> Any:
    """torch's DCP ``FileSystemReader`` for ``folder``, its index read by ``read_metadata``."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(folder)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(folder))


def tensor_metadata(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor item of the checkpoint, with its global shape and dtype."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {
        key: (tuple(item.size), item.properties.dtype)
        for key, item in read_metadata(folder).state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }


def object_keys(folder: Path) -> list[str]:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_metadata(folder)
    return [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]


def model_keys(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The model's tensors only (no optimizer or RNG state)."""
    return {k: v for k, v in tensor_metadata(folder).items() if not k.startswith(NOT_MODEL_PREFIXES)}


def read_common_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's common state, from ``common.pt`` or the DCP object."""
    legacy = folder / COMMON_FILE
    if legacy.is_file():
        with legacy.open("rb") as handle:
            common = pickles.torch_load(handle, legacy)
        if not isinstance(common, dict):
            raise WeightError(f"{legacy}: the common state is not a mapping")
        return common
    keys = [k for k in object_keys(folder) if k.split("/")[0] == COMMON_OBJECT]
    if not keys:
        raise WeightError(f"{folder}: no common state (neither {COMMON_FILE} nor a {COMMON_OBJECT} object)")
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    class RawBytesPlanner(DefaultLoadPlanner):
        """Hands the object's bytes back as they are, so we unpickle them ourselves."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            target = self.state_dict[read_item.dest_index.fqn]
            target.seek(0)
            target.truncate()
            target.write(value.read())
            target.seek(0)

    state: dict[str, Any] = {keys[0]: io.BytesIO()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": we read on one process
        dcp_load(state, storage_reader=file_reader(folder), planner=RawBytesPlanner(), no_dist=True)
    loaded = pickles.torch_load(state[keys[0]].getvalue(), folder / keys[0])
    common = loaded[0] if isinstance(loaded, list) and loaded else loaded
    if not isinstance(common, dict):
        raise WeightError(f"{folder / keys[0]}: the common state is not a mapping")
    return common


def common_load_strategy() -> Any:
    """A megatron-core 0.16 common-state strategy that also reads 0.19's format."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class CommonStateLoadStrategy(TorchCommonLoadStrategy):  # type: ignore[misc]
        def load_common(self, checkpoint_dir: Any) -> Any:
            return read_common_state(Path(checkpoint_dir))

    return CommonStateLoadStrategy()
