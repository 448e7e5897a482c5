"""Config conversion runtime: reading HF config dicts and the Megatron-side config object.

Nothing here imports torch or megatron-core at module level, so config conversion is fast;
``MegatronConfig.transformer_config()`` imports megatron-core when a model is built.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bridgegen.bridge.errors import ConfigError
from bridgegen.bridge.rope import RopeScaling

# GPTModel keyword arguments (and bridge-level settings) that are not TransformerConfig fields.
MODEL_FIELDS = frozenset(
    {
        "vocab_size",
        "max_sequence_length",
        "position_embedding_type",
        "rotary_base",
        "rotary_percent",
        "share_embeddings_and_output_weights",
        "seq_len_interpolation_factor",
        "make_vocab_size_divisible_by",
        "padded_vocab_size",
    }
)
# HF fields that describe the file rather than the model; never carried through.
HF_VOLATILE_FIELDS = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})
_MISSING = object()


def normalize_hf_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """One shape for configs of every transformers version.

    transformers 5 writes ``rope_parameters`` (holding ``rope_theta``) where older configs have
    ``rope_theta`` and ``rope_scaling``; we read both and work with the older shape.
    """
    out = copy.deepcopy(dict(data))
    params = out.pop("rope_parameters", None)
    if isinstance(params, Mapping) and "full_attention" in params:
        # Per layer type (Gemma 3 in transformers 5): global layers carry the model's RoPE,
        # local (sliding) layers their own base.
        local = params.get("sliding_attention")
        if isinstance(local, Mapping) and "rope_theta" in local:
            out.setdefault("rope_local_base_freq", local["rope_theta"])
        params = params["full_attention"]
    if (
        isinstance(params, Mapping)
        and "rope_type" in params
        or isinstance(params, Mapping)
        and "rope_theta" in params
    ):
        params = dict(params)
        if "rope_theta" in params:
            out.setdefault("rope_theta", params.pop("rope_theta"))
        if "partial_rotary_factor" in params:
            out.setdefault("partial_rotary_factor", params.pop("partial_rotary_factor"))
        if params.get("rope_type", "default") != "default" and not out.get("rope_scaling"):
            out["rope_scaling"] = params
    elif params is not None:
        out["rope_parameters"] = params
    for key, value in list(out.items()):
        if isinstance(value, Mapping) and key.endswith("_config"):
            out[key] = normalize_hf_config(value)
    return out


def get_path(data: Mapping[str, Any], path: str, default: Any = _MISSING) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(path)
            return default
        node = node[part]
    return node


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def drop_path(data: dict[str, Any], path: str) -> None:
    parts = path.split(".")
    node: Any = data
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def _same_value(value: Any, neutral: Any) -> bool:
    """Equal as JSON values: ``1`` and ``1.0`` are, ``true`` and ``1`` are not."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return isinstance(value, bool) and isinstance(neutral, bool) and value == neutral
    return bool(value == neutral)


class HFConfigReader:
    """Reads fields (dotted paths allowed) from an HF config dict with errors that name them."""

    def __init__(
        self,
        data: Mapping[str, Any],
        family: str,
        source: str = "config.json",
        aliases: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.data = data
        self.family = family
        self.source = source
        self.aliases = aliases or {}

    def _get(self, path: str) -> Any:
        value = get_path(self.data, path, None)
        for alias in self.aliases.get(path, ()):
            if value is not None:
                break
            value = get_path(self.data, alias, None)
        return value

    def require(self, path: str) -> Any:
        value = self._get(path)
        if value is None:
            raise ConfigError(
                f"{self.source}: field {path!r} is required by the {self.family} bridge but missing"
            )
        return value

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(
                f"{self.source}: {message} (the {self.family} bridge cannot convert this config)"
            )

    def require_neutral(self, path: str, neutral: tuple[Any, ...], why: str) -> None:
        """Refuse a field this bridge supports at one value only (``neutral`` holds it and other
        spellings of it; absent counts as it)."""
        value = self._get(path)
        if value is not None and not any(_same_value(value, supported) for supported in neutral):
            raise ConfigError(
                f"{self.source}: {path!r} is {json.dumps(value)}; the {self.family} bridge supports only "
                f"{' or '.join(json.dumps(supported) for supported in neutral)} ({why})"
            )

    def optional(self, path: str, default: Any) -> Any:
        value = self._get(path)
        return default if value is None else value


@dataclass(frozen=True)
class MegatronConfig:
    """The Megatron side of a model: config values, activation, RoPE, and what export needs.

    ``values`` holds TransformerConfig / MLATransformerConfig fields and model settings
    (``MODEL_FIELDS``) by Megatron name. ``hf_passthrough`` holds the source HF fields the spec
    does not map (token ids, dtype, ...), written back unchanged on export.
    """

    family: str
    megatron_model: str
    values: Mapping[str, Any]
    activation: str
    rope: RopeScaling = field(default_factory=RopeScaling)
    hf_architecture: str = ""
    hf_model_type: str = ""
    hf_activation: str = ""
    hf_passthrough: Mapping[str, Any] = field(default_factory=dict)

    def value(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise ConfigError(f"{self.family}: Megatron field {name!r} is not set") from None

    @property
    def vocab_size(self) -> int:
        return int(self.value("vocab_size"))

    @property
    def vocab_multiple(self) -> int:
        """The multiple the Megatron embedding's rows are padded to; 1 (the HF vocab exactly,
        as Megatron-Bridge builds it) unless an import chose otherwise."""
        return int(self.values.get("make_vocab_size_divisible_by") or 1)

    def padded_vocab_size(self) -> int:
        """Rows of the Megatron embedding and output layer: a checkpoint's own count when read
        from one, else the vocab rounded up to ``vocab_multiple``. A consumer must build the
        same count (Megatron-LM: ``--padded-vocab-size``)."""
        if self.values.get("padded_vocab_size"):
            return int(self.values["padded_vocab_size"])
        multiple = self.vocab_multiple
        return -(-self.vocab_size // multiple) * multiple

    def transformer_values(self, config_field_names: frozenset[str]) -> dict[str, Any]:
        """The values that are fields of the megatron-core config class."""
        out = {k: v for k, v in self.values.items() if k in config_field_names}
        if self.megatron_model == "mla":
            out.update(self.rope.megatron_mla_settings())
        return out

    def model_values(self) -> dict[str, Any]:
        """GPTModel keyword arguments (RoPE settings included)."""
        out = {
            k: v
            for k, v in self.values.items()
            if k in MODEL_FIELDS and k not in ("make_vocab_size_divisible_by", "padded_vocab_size")
        }
        if self.megatron_model == "gpt":
            out.update(
                {k: v for k, v in self.rope.megatron_gpt_settings().items() if not k.startswith("yarn_")}
            )
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "family": self.family,
                "megatron_model": self.megatron_model,
                "values": dict(self.values),
                "activation": self.activation,
                "rope": self.rope.to_json(),
                "hf_architecture": self.hf_architecture,
                "hf_model_type": self.hf_model_type,
                "hf_activation": self.hf_activation,
                "hf_passthrough": dict(self.hf_passthrough),
            },
            indent=2,
            sort_keys=True,
        )

    @staticmethod
    def from_json(text: str) -> MegatronConfig:
        data = json.loads(text)
        return MegatronConfig(
            family=data["family"],
            megatron_model=data["megatron_model"],
            values=data["values"],
            activation=data["activation"],
            rope=RopeScaling.from_json(data["rope"]),
            hf_architecture=data["hf_architecture"],
            hf_model_type=data["hf_model_type"],
            hf_activation=data["hf_activation"],
            hf_passthrough=data["hf_passthrough"],
        )
