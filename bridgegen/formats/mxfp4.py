"""MXFP4 checkpoints (as GPT-OSS ships its experts), dequantized on import.

A quantized tensor ``W`` is stored as two uint8 tensors: ``W_blocks`` [..., rows, G, 16], each
byte two FP4 (e2m1) values (low nibble first), 32 values per block, and ``W_scales``
[..., rows, G], one power-of-two exponent per block (e8m0, bias 127). The stored rows are
``W``'s output features: the unquantized HF tensor is the transpose, [..., G * 32, rows]
(transformers' ``integrations/mxfp4.py``, ``_convert_moe_packed_tensors``).
"""

from __future__ import annotations

import torch

from bridgegen.bridge.errors import WeightError

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
VALUES_PER_BLOCK = 32
SCALE_BIAS = 127
ROWS_PER_STEP = 4096
# The 16 e2m1 codes: sign bit, 2 exponent bits, 1 mantissa bit.
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def parts(name: str) -> tuple[str, str]:
    """The blocks and scales tensors an MXFP4 tensor ``name`` is stored as."""
    return name + BLOCKS_SUFFIX, name + SCALES_SUFFIX


def dequantized_shape(blocks: torch.Size, scales: torch.Size, name: str) -> tuple[int, ...]:
    """The unquantized HF tensor's shape, [..., G * 32, rows]; an error naming ``name`` when the
    blocks and scales do not fit together."""
    blocks_name, scales_name = parts(name)
    if len(blocks) < 3 or blocks[-1] != VALUES_PER_BLOCK // 2:
        raise WeightError(f"{blocks_name}: shape {list(blocks)} is not [..., rows, blocks, 16]")
    if tuple(scales) != tuple(blocks[:-1]):
        raise WeightError(f"{scales_name}: shape {list(scales)} does not match {blocks_name} {list(blocks)}")
    return (*blocks[:-3], blocks[-2] * VALUES_PER_BLOCK, blocks[-3])


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, name: str, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The HF tensor ``name`` held by MXFP4 ``blocks`` and ``scales``, in ``dtype`` (bfloat16
    holds every FP4 value times a power of two in its range exactly), as a transposed view."""
    shape = dequantized_shape(blocks.shape, scales.shape, name)
    for tensor, part in zip((blocks, scales), parts(name), strict=True):
        if tensor.dtype != torch.uint8:
            raise WeightError(f"{part}: dtype {tensor.dtype}; MXFP4 parts are uint8")
    codes = torch.tensor(FP4_E2M1, dtype=torch.float32)
    rows = blocks.reshape(-1, blocks.shape[-2], blocks.shape[-1])
    exponents = scales.reshape(-1, scales.shape[-1])
    out = torch.empty(rows.shape[0], rows.shape[1] * VALUES_PER_BLOCK, dtype=dtype)
    for start in range(0, rows.shape[0], ROWS_PER_STEP):  # bounds the temporaries
        step = slice(start, start + ROWS_PER_STEP)
        packed = rows[step].to(torch.int32)
        values = torch.stack([codes[packed & 0x0F], codes[packed >> 4]], dim=-1).flatten(-2)
        values = torch.ldexp(values, exponents[step].to(torch.int32).sub(SCALE_BIAS).unsqueeze(-1))
        out[step] = values.flatten(-2).to(dtype)
    stored = out.view(*blocks.shape[:-2], rows.shape[1] * VALUES_PER_BLOCK)
    result = stored.transpose(-1, -2)
    assert tuple(result.shape) == shape
    return result
