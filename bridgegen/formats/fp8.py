"""Block-quantized FP8 checkpoints (as DeepSeek-V3 and Kimi K2 ship them).

A quantized weight ``W`` is stored as ``W.weight`` in float8 (e4m3) plus
``W.weight_scale_inv``, one float32 scale per ``block x block`` tile (128 x 128 by default, from
``quantization_config.weight_block_size``); the real weight is ``fp8 * scale`` tile by tile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bridgegen.bridge.errors import WeightError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def block_size(hf_config: Mapping[str, Any]) -> tuple[int, int]:
    """The quantization tile from ``quantization_config`` (128 x 128 if unspecified)."""
    quantization = hf_config.get("quantization_config") or {}
    size = quantization.get("weight_block_size") or [128, 128]
    if len(size) != 2:
        raise WeightError(f"config.json: quantization_config.weight_block_size {size} must have two entries")
    return int(size[0]), int(size[1])


def dequantize(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str
) -> torch.Tensor:
    """The float32 weight of a block-quantized FP8 tensor."""
    if weight.dim() != 2:
        raise WeightError(f"{name}: block-quantized tensors must be 2-D, got shape {list(weight.shape)}")
    rows, cols = weight.shape
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != tiles:
        raise WeightError(
            f"{scale_name(name)}: shape {list(scale_inv.shape)} does not match {list(tiles)} tiles of "
            f"{block[0]}x{block[1]} over {name} {list(weight.shape)}"
        )
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale
