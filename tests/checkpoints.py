"""Reading and comparing HF checkpoint folders in tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (all shards)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_bit_exact(source: Path, exported: Path) -> None:
    """Same tensor names, dtypes and bits (NaN payloads and the sign of zero included)."""
    a, b = tensors_of(source), tensors_of(exported)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, (name, a[name].dtype, b[name].dtype)
        assert a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


def tensor_digests(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], str]]:
    """Every tensor of an HF folder as (dtype, shape, SHA-256 of its bytes), read one at a time:
    compared in place of the folder where keeping it would cost too much disk."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...], str]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                digest = hashlib.sha256(bits(tensor).numpy()).hexdigest()
                out[name] = (tensor.dtype, tuple(tensor.shape), digest)
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, compared as integers: NaN equals itself, -0.0 differs from 0.0."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


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


class FailingOnCall:
    """Stands in for function ``real``: calls it, except that call number ``failing`` (from 1)
    raises ``error``. ``calls`` counts the calls made."""

    def __init__(self, real: Callable[..., Any], failing: int, error: BaseException) -> None:
        self.real, self.failing, self.error, self.calls = real, failing, error, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.failing:
            raise self.error
        return self.real(*args, **kwargs)
