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
