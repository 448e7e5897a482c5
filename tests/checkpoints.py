"""Reading and comparing HF checkpoint folders in tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (all shards)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_bit_exact(source: Path, exported: Path) -> None:
    """Same tensor names, dtypes and bits."""
    a, b = tensors_of(source), tensors_of(exported)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def dist_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint folder at its global shape, whatever its chunks."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    metadata = FileSystemReader(str(folder)).read_metadata()
    state = {
        key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }
    load(state, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    return state
