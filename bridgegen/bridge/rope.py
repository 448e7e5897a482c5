"""RoPE scaling: read HF's ``rope_scaling`` / ``rope_parameters``, map to megatron-core, write back.

The source dictionary is kept verbatim so export writes exactly what the source had.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bridgegen.bridge.errors import ConfigError

# Parameters each HF rope type must carry.
REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
}

# The keys of a rope_scaling / rope_parameters block transformers reads for each type (5.24,
# modeling_rope_utils.py: the _compute_*_parameters functions and the keys _validate_*_parameters
# allow). rope_type / type name the type; rope_theta and partial_rotary_factor are config fields
# (normalize_hf_config moves them out of the block).
TRANSFORMERS_ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "longrope": (
        "short_factor",
        "long_factor",
        "factor",
        "attention_factor",
        "original_max_position_embeddings",
    ),
}

# The keys our RoPE handling reads, per megatron model and type (RopeScaling below, and the
# runtime's rotary module for llama3 and dynamic).
_YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)
RUNTIME_ROPE_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt": {
        "default": (),
        "linear": ("factor",),
        "dynamic": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "yarn": (*_YARN_KEYS, "truncate"),  # GPTModel's yarn_correction_range_round_to_int
    },
    "mla": {"default": (), "yarn": _YARN_KEYS},
}

# Keys transformers reads that we support at one value only: (value, why); None means absent.
ROPE_NEUTRAL: dict[str, dict[str, dict[str, tuple[Any, str]]]] = {
    "gpt": {
        "yarn": {"attention_factor": (None, "an explicit YaRN attention factor is not mapped")},
    },
    "mla": {
        "yarn": {
            "attention_factor": (None, "an explicit YaRN attention factor is not mapped"),
            "truncate": (True, "multi-latent attention's YaRN always rounds its correction range"),
        },
    },
}


def unhandled_rope_keys(megatron_model: str, rope_type: str) -> tuple[str, ...]:
    """Keys transformers reads for ``rope_type`` that we neither read nor refuse off their neutral value."""
    handled = RUNTIME_ROPE_KEYS.get(megatron_model, {}).get(rope_type)
    if handled is None:
        return TRANSFORMERS_ROPE_KEYS.get(rope_type, ())
    neutral = ROPE_NEUTRAL.get(megatron_model, {}).get(rope_type, {})
    return tuple(
        k for k in TRANSFORMERS_ROPE_KEYS.get(rope_type, ()) if k not in handled and k not in neutral
    )


# megatron-core's RotaryEmbedding applies llama3 scaling with these constants (only the factor
# is a parameter); other values need the runtime's own rotary embedding.
MEGATRON_LLAMA3_CONSTANTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling choice: its type and the source's dictionary (empty for default)."""

    rope_type: str = "default"
    source: Mapping[str, Any] = field(default_factory=dict)
    explicit_null: bool = False  # the source config said `rope_scaling: null`; export says it too
    # The source config wrote RoPE as flat keys (rope_theta, rope_scaling, ...), as transformers
    # 4 did; an export writes them so too. Otherwise transformers 5's rope_parameters.
    flat_keys: bool = False

    def param(self, name: str, default: Any = None) -> Any:
        return self.source.get(name, default)

    def megatron_gpt_settings(self) -> dict[str, Any]:
        """GPTModel keyword arguments and config attributes for this scaling (GPT models)."""
        if self.rope_type == "default":
            return {}
        if self.rope_type == "linear":
            return {"seq_len_interpolation_factor": float(self.param("factor"))}
        if self.rope_type == "llama3":
            if self.needs_runtime_rope():
                return {}  # the model builder sets the scaled frequencies itself
            return {"rope_scaling": True, "rope_scaling_factor": float(self.param("factor"))}
        if self.rope_type == "dynamic":
            return {}  # dynamic NTK scaling is applied by the runtime's rotary hook
        if self.rope_type == "yarn":
            return {
                "position_embedding_type": "yarn",
                "yarn_rotary_scaling_factor": float(self.param("factor")),
                "yarn_original_max_position_embeddings": self.param("original_max_position_embeddings"),
                "yarn_beta_fast": float(self.param("beta_fast", 32.0)),
                "yarn_beta_slow": float(self.param("beta_slow", 1.0)),
                "yarn_mscale": float(self.param("mscale", 1.0)),
                "yarn_mscale_all_dim": float(self.param("mscale_all_dim", 0.0)),
                # HF `truncate` (default true) floors and ceils the correction range.
                "yarn_correction_range_round_to_int": bool(self.param("truncate", True)),
            }
        return {"unsupported_rope_type": self.rope_type}

    def needs_runtime_rope(self) -> bool:
        """Scalings megatron-core's rotary embedding cannot express: dynamic NTK, and llama3
        with parameters other than megatron-core's fixed ones."""
        if self.rope_type == "dynamic":
            return True
        return self.rope_type == "llama3" and any(
            float(self.param(k)) != v for k, v in MEGATRON_LLAMA3_CONSTANTS.items()
        )

    def megatron_mla_settings(self) -> dict[str, Any]:
        """MLATransformerConfig fields for this scaling (multi-latent attention models)."""
        if self.rope_type == "default":
            return {"rope_type": "rope"}
        if self.rope_type == "yarn":
            settings: dict[str, Any] = {
                "rope_type": "yarn",
                "rotary_scaling_factor": float(self.param("factor")),
            }
            for hf_name, megatron_name in (
                ("original_max_position_embeddings", "original_max_position_embeddings"),
                ("beta_fast", "beta_fast"),
                ("beta_slow", "beta_slow"),
                ("mscale", "mscale"),
                ("mscale_all_dim", "mscale_all_dim"),
            ):
                if hf_name in self.source:
                    settings[megatron_name] = self.source[hf_name]
            return settings
        return {"unsupported_rope_type": self.rope_type}

    def to_hf(self) -> dict[str, Any]:
        if self.explicit_null:
            return {"rope_scaling": None}
        return {} if self.rope_type == "default" and not self.source else {"rope_scaling": dict(self.source)}

    def to_json(self) -> dict[str, Any]:
        return {
            "rope_type": self.rope_type,
            "source": dict(self.source),
            "explicit_null": self.explicit_null,
            "flat_keys": self.flat_keys,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> RopeScaling:
        return RopeScaling(
            str(data["rope_type"]),
            dict(data["source"]),
            bool(data.get("explicit_null", False)),
            bool(data.get("flat_keys", False)),
        )


# The flat RoPE keys of transformers 4 configs, which transformers 5 keeps in rope_parameters.
FLAT_ROPE_KEYS = ("rope_theta", "rope_scaling", "partial_rotary_factor", "rope_local_base_freq")


def uses_flat_rope_keys(hf_fields: Mapping[str, Any]) -> bool:
    """Whether a config (its language model's fields, as read) writes RoPE as flat keys."""
    return "rope_parameters" not in hf_fields and any(key in hf_fields for key in FLAT_ROPE_KEYS)


def fold_rope_parameters(fields: dict[str, Any]) -> None:
    """Move flat RoPE keys of an HF config's fields into transformers 5's ``rope_parameters``
    (in place): the scaling's type and parameters, ``rope_theta`` and ``partial_rotary_factor``;
    a local base for sliding-window layers (Gemma 3) makes it per layer type."""
    if not any(key in fields for key in FLAT_ROPE_KEYS):
        return
    scaling = fields.pop("rope_scaling", None) or {}
    params: dict[str, Any] = {k: v for k, v in scaling.items() if k != "type"}
    params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in fields:
            params[key] = fields.pop(key)
    local = fields.pop("rope_local_base_freq", None)
    if local is None:
        fields["rope_parameters"] = dict(sorted(params.items()))
    else:
        fields["rope_parameters"] = {
            "full_attention": dict(sorted(params.items())),
            "sliding_attention": {"rope_theta": local, "rope_type": "default"},
        }


def rope_from_hf(
    hf_config: Mapping[str, Any],
    supported: tuple[str, ...],
    family: str,
    source_name: str = "config.json",
    megatron_model: str = "gpt",
) -> RopeScaling:
    """The scaling an HF config asks for; an error if the family does not support it, or if a
    key transformers reads has a value we do not map (``ROPE_NEUTRAL``)."""
    source = hf_config.get("rope_scaling")
    if not source:
        return RopeScaling(explicit_null="rope_scaling" in hf_config and source is None)
    if not isinstance(source, Mapping):
        raise ConfigError(f"{source_name}: 'rope_scaling' must be a mapping, got {source!r}")
    rope_type = source.get("rope_type", source.get("type"))
    if rope_type is None:
        raise ConfigError(f"{source_name}: 'rope_scaling' has neither 'rope_type' nor 'type'")
    if rope_type not in REQUIRED_PARAMS:
        raise ConfigError(
            f"{source_name}: rope_scaling type {rope_type!r} is unknown; known types: {', '.join(sorted(REQUIRED_PARAMS))}"
        )
    if rope_type not in supported:
        raise ConfigError(
            f"{source_name}: rope_scaling type {rope_type!r} is not supported by the {family} bridge; "
            f"supported: {', '.join(supported)}"
        )
    missing = [name for name in REQUIRED_PARAMS[rope_type] if name not in source]
    if missing:
        raise ConfigError(f"{source_name}: rope_scaling type {rope_type!r} lacks {', '.join(missing)}")
    for key, (neutral, why) in ROPE_NEUTRAL.get(megatron_model, {}).get(str(rope_type), {}).items():
        value = source.get(key)
        if value is not None and value != neutral:
            allowed = "it only absent" if neutral is None else f"only {json.dumps(neutral)}"
            raise ConfigError(
                f"{source_name}: rope_scaling {key!r} is {json.dumps(value)}; the {family} bridge supports "
                f"{allowed} ({why})"
            )
    return RopeScaling(str(rope_type), dict(source))
