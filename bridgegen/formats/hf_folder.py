"""An HF model folder as a conversion reads it: its config.json, the dtype of its weights, the
multi-token prediction layers it really holds, and the tensors it carries besides the language
model."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch

from bridgegen.bridge.errors import BridgeWarning, ConfigError, WeightError
from bridgegen.formats.folders import CONFIG_LIMIT, read_small_text
from bridgegen.formats.hf_writer import PlannedTensor
from bridgegen.formats.safetensors import Checkpoint
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.weight_map import hf_layer_numbers, mtp_layer_numbers

C = TypeVar("C", bound=Conversion)


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the HF folder")
    try:
        data = json.loads(read_small_text(path, CONFIG_LIMIT, "config file"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def conversion_of_hf_dir(hf_dir: str | os.PathLike[str], kind: type[C]) -> C:
    """The conversion (of class ``kind``) of the HF folder ``hf_dir``: its config's bridge,
    without the MTP layers its checkpoint lacks (``without_absent_mtp``)."""
    data = read_hf_config(hf_dir)
    found: C = kind.from_hf_config(data, source=str(Path(hf_dir) / "config.json"))
    found.hf_dir = Path(hf_dir)
    return without_absent_mtp(found)


def without_absent_mtp(conversion: C) -> C:
    """Without the multi-token prediction layers the config declares when the source
    checkpoint holds no tensor of any of them, with a warning (transformers writes
    DeepSeek-V3 configs with one MTP layer by default, and its model has none). Layers
    partly present are left to the weight check, which names the missing tensors."""
    numbers = mtp_layer_numbers(conversion.config)
    if not numbers or conversion.hf_dir is None:
        return conversion
    try:
        names = Checkpoint.open(conversion.hf_dir).names()
    except WeightError:
        return conversion  # no weights here (a config-only folder): nothing to compare with
    if hf_layer_numbers(names) & set(numbers):
        return conversion
    layers = ", ".join(str(n) for n in numbers)
    warnings.warn(
        BridgeWarning(
            f"{conversion.hf_dir / 'config.json'}: declares {len(numbers)} multi-token prediction "
            f"layer(s) (HF layer {layers}) but the checkpoint holds no tensor of them; converting "
            "without them (as --drop-mtp does; an export will declare 0)"
        ),
        stacklevel=3,
    )
    without: C = conversion.without_mtp()
    return without


def default_dtype(conversion: Conversion) -> torch.dtype:
    """The dtype of the source folder's floating-point weights (float32 without a folder)."""
    if conversion.hf_dir is not None:
        return Checkpoint.open(conversion.hf_dir).floating_dtype()
    return torch.float32


def carried_tensors(
    conversion: Conversion,
    hf_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Checkpoint | None, list[PlannedTensor]]:
    """The HF tensors outside the language model (e.g. a vision tower) that an export
    writes back unchanged, read from ``hf_dir`` (default: the source folder). Floating
    point ones are planned in ``dtype`` when given. Empty when the architecture has none."""
    wrapper = conversion.wrapper()
    if wrapper is None or not wrapper.carried_weights:
        return None, []
    folder = Path(hf_dir) if hf_dir is not None else conversion.hf_dir
    what = ", ".join(f"{prefix}*" for prefix in wrapper.carried_weights)
    architecture = conversion.config.hf_architecture
    if folder is None:
        raise WeightError(
            f"{architecture} holds {what} tensors besides the language model; "
            "writing it needs the source HF folder they come from"
        )
    try:
        checkpoint = Checkpoint.open(folder)
    except WeightError as exc:
        raise WeightError(f"{exc} (looking for the {what} tensors of {architecture})") from None
    planned = [
        PlannedTensor(
            name,
            dtype
            if dtype is not None and info.dtype.is_floating_point and info.dtype.itemsize > 1
            else info.dtype,
            info.shape,
        )
        for name, info in sorted(checkpoint.tensors.items())
        if name.startswith(wrapper.carried_weights)
    ]
    if not planned:
        raise WeightError(f"{folder}: holds no {what} tensors, which a {architecture} checkpoint needs")
    return checkpoint, planned
