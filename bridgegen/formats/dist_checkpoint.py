"""Reading megatron-core distributed checkpoints written by any megatron-core from 0.16 on.

The tensors are torch.distributed.checkpoint (DCP) items keyed by the model's
``sharded_state_dict()`` names. The "common state" (``args``, ``iteration``, ...) is, up to
megatron-core 0.18, a ``common.pt`` beside them; from 0.19 it is a pickled DCP object
``common_state/shard_0_1`` (``torch.save([state])``) and there is no ``common.pt``
(megatron-core 0.19.2 ``dist_checkpointing/serialization.py``, ``load_common_state_dict``).
megatron-core 0.16.1 reads only ``common.pt``, so we read the common state ourselves, with an
unpickler that stands in for classes this megatron-core lacks (a newer Megatron-LM's ``args``
names enums 0.16 does not have).
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from bridgegen.bridge.errors import WeightError

COMMON_FILE = "common.pt"
COMMON_OBJECT = "common_state"
# Checkpoint items that are not model weights: optimizer and RNG state, the common state.
NOT_MODEL_PREFIXES = ("optimizer.", "rng_state", COMMON_OBJECT, "rerun_state_machine")


class _Unknown:
    """Stands in for a class the installed packages do not define."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (AttributeError, ImportError):
            return type(name, (_Unknown,), {"qualified_name": f"{module}.{name}"})


class _TolerantPickle:
    Unpickler = _TolerantUnpickler
    load = staticmethod(pickle.load)


def tensor_metadata(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor item of the checkpoint, with its global shape and dtype."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise WeightError(f"{folder}: cannot read the checkpoint's .metadata: {exc}") from None
    return {
        key: (tuple(item.size), item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }


def object_keys(folder: Path) -> list[str]:
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    return [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]


def model_keys(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The model's tensors only (no optimizer or RNG state)."""
    return {k: v for k, v in tensor_metadata(folder).items() if not k.startswith(NOT_MODEL_PREFIXES)}


def read_common_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's common state, from ``common.pt`` or the DCP object."""
    legacy = folder / COMMON_FILE
    if legacy.is_file():
        with legacy.open("rb") as handle:
            common = _unpickle(handle, legacy)
        if not isinstance(common, dict):
            raise WeightError(f"{legacy}: the common state is not a mapping")
        return common
    keys = [k for k in object_keys(folder) if k.split("/")[0] == COMMON_OBJECT]
    if not keys:
        raise WeightError(f"{folder}: no common state (neither {COMMON_FILE} nor a {COMMON_OBJECT} object)")
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    class RawBytesPlanner(DefaultLoadPlanner):
        """Hands the object's bytes back unpickled, so we unpickle them tolerantly."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            target = self.state_dict[read_item.dest_index.fqn]
            target.seek(0)
            target.truncate()
            target.write(value.read())
            target.seek(0)

    state: dict[str, Any] = {keys[0]: io.BytesIO()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": we read on one process
        dcp_load(state, storage_reader=FileSystemReader(str(folder)), planner=RawBytesPlanner(), no_dist=True)
    buffer = state[keys[0]]
    buffer.seek(0)
    loaded = _unpickle(buffer, folder / keys[0])
    common = loaded[0] if isinstance(loaded, list) else loaded
    if not isinstance(common, dict):
        raise WeightError(f"{folder / keys[0]}: the common state is not a mapping")
    return common


def _unpickle(handle: Any, where: Path) -> Any:
    try:
        return torch.load(handle, map_location="cpu", weights_only=False, pickle_module=_TolerantPickle)
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise WeightError(f"{where}: cannot read the common state: {exc}") from None


def common_load_strategy() -> Any:
    """A megatron-core 0.16 common-state strategy that also reads 0.19's format."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class CommonStateLoadStrategy(TorchCommonLoadStrategy):  # type: ignore[misc]
        def load_common(self, checkpoint_dir: Any) -> Any:
            return read_common_state(Path(checkpoint_dir))

    return CommonStateLoadStrategy()
