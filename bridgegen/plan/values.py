"""The values a conversion carries: dtype names, casts that lose or overflow, and NaN / Inf."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from bridgegen.bridge.errors import BridgeWarning, ConfigError, WeightError

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Dtypes whose NaN / Inf are looked for (float8 sources are dequantized before they are checked).
CHECKED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
COUNT_CHUNK = 1 << 24


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` -> torch.bfloat16; an error listing the accepted names otherwise."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and value not in DTYPE_NAMES.values():
            raise ConfigError(
                f"dtype {value} is not supported; choose one of {', '.join(sorted(DTYPE_NAMES))}"
            )
        return value
    try:
        return DTYPE_NAMES[value]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {value!r}; choose one of {', '.join(sorted(DTYPE_NAMES))}"
        ) from None


def checked_cast(value: torch.Tensor, dtype: torch.dtype, allow_lossy: bool, what: str) -> torch.Tensor:
    """``value`` cast to ``dtype``, which may not overflow (a finite value becoming inf) and
    unless ``allow_lossy`` must give back every value exactly."""
    cast = value.to(dtype)
    if value.is_meta or value.dtype == dtype or not value.dtype.is_floating_point or not dtype.is_floating_point:
        return cast
    overflowed = int(torch.isinf(cast).sum()) - int(torch.isinf(value).sum())
    if overflowed > 0:
        raise WeightError(
            f"{what}: {overflowed} value(s) of this {value.dtype} tensor overflow to inf in {dtype} "
            f"(largest magnitude {value.abs().max().item():g})"
        )
    if allow_lossy:
        return cast
    back = cast.to(value.dtype)
    exact = (back == value) | (torch.isnan(back) & torch.isnan(value))
    if not bool(exact.all()):
        changed = int((~exact).sum())
        raise WeightError(
            f"{what}: stored as {value.dtype}, {changed} value(s) change when cast to the model's {dtype}; "
            "pass --dtype to choose the model's dtype (a lossy cast is then what you asked for)"
        )
    return cast


def warn_if_not_finite(value: torch.Tensor | Sequence[torch.Tensor], what: str) -> None:
    """Warn (``BridgeWarning``), naming ``what``, if ``value`` (a tensor, or the parts of one)
    holds NaN or infinite values: they are converted as they are, but a user should know. One
    vectorised min/max pass per part (NaN and +-inf show in it); the values are counted only
    when there is something to count."""
    parts = [value] if isinstance(value, torch.Tensor) else list(value)
    checked = [p for p in parts if not p.is_meta and p.dtype in CHECKED_DTYPES and p.numel()]
    if all(_finite(part) for part in checked):
        return
    nan = infinite = 0
    for part in checked:
        for chunk in torch.split(part.detach().reshape(-1), COUNT_CHUNK):
            nan += int(torch.isnan(chunk).sum())
            infinite += int(torch.isinf(chunk).sum())
    size = sum(part.numel() for part in parts)
    warnings.warn(
        f"{what} holds {nan} NaN and {infinite} infinite value(s) of {size}; converted as they are",
        BridgeWarning,
        stacklevel=2,
    )


def _finite(tensor: torch.Tensor) -> bool:
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
