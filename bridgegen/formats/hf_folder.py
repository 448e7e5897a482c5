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

from bridgegen.bridge.errors import BridgeWarning, WeightError
from bridgegen.formats.folders import CONFIG_LIMIT, INDEX_LIMIT, inside_input, read_hf_config, read_small_text
from bridgegen.formats.hf_writer import PlannedTensor
from bridgegen.formats.safetensors import Checkpoint
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.weight_map import hf_layer_numbers, mtp_layer_numbers

C = TypeVar("C", bound=Conversion)


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


def _tokenizer_json(path: Path, folder: Path, limit: int) -> Any:
    """A tokenizer file's JSON (None when absent or not JSON: its ids are then left out); a
    link out of ``folder`` is refused as for every side file."""
    if not path.is_file():
        return None
    inside_input(path, folder)
    try:
        return json.loads(read_small_text(path, limit, "tokenizer file"))
    except json.JSONDecodeError:
        return None


def special_token_ids(folder: Path) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the tokenizer files in
    ``folder``: each token named in ``tokenizer_config.json`` (or ``special_tokens_map.json``),
    looked up in ``tokenizer.json``'s added tokens and vocabulary. Tokens not found are left out."""
    named: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _tokenizer_json(folder / file, folder, CONFIG_LIMIT)
        if isinstance(data, dict):
            for role in ("bos", "eos", "pad"):
                token = data.get(f"{role}_token") if isinstance(data, dict) else None
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str):
                    named[role] = token
    data = _tokenizer_json(folder / "tokenizer.json", folder, INDEX_LIMIT) if named else None
    if not isinstance(data, dict):
        return {}
    ids: dict[str, int] = {}
    vocab = data.get("model", {}).get("vocab") if isinstance(data, dict) else None
    if isinstance(vocab, dict):
        ids.update({k: v for k, v in vocab.items() if isinstance(v, int)})
    for added in data.get("added_tokens", []) if isinstance(data, dict) else []:
        if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
            ids[added["content"]] = added["id"]
    return {f"{role}_token_id": ids[token] for role, token in named.items() if token in ids}
