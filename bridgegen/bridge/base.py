"""The base class every generated bridge fills in with data from its spec."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from bridgegen.bridge.config import (
    HF_VOLATILE_FIELDS,
    HFConfigReader,
    MegatronConfig,
    drop_path,
    get_path,
    normalize_hf_config,
    set_path,
)
from bridgegen.bridge.config_checks import check_with_transformers
from bridgegen.bridge.errors import ConfigError, UnsupportedModelError
from bridgegen.bridge.module_parameters import ModuleParameters
from bridgegen.bridge.rope import fold_rope_parameters, rope_from_hf, uses_flat_rope_keys
from bridgegen.bridge.weight_rules import WeightRule


@dataclass(frozen=True)
class Wrapper:
    """Where a family's language model sits inside a larger HF architecture."""

    config: str  # HF field holding the language model's config
    weight_prefix: str = ""  # prepended to every HF tensor name of the language model
    carried_weights: tuple[str, ...] = ()  # HF tensor name prefixes kept through unchanged


class Bridge:
    """Config and weight conversion for one architecture family (subclasses are generated)."""

    family: ClassVar[str]
    source_spec: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]]
    wrappers: ClassVar[Mapping[str, Wrapper]]
    megatron_model: ClassVar[str]
    activation_field: ClassVar[str]
    activation_default: ClassVar[str | None]
    activations: ClassVar[Mapping[str, str]]
    rope_types: ClassVar[tuple[str, ...]]
    hf_fields: ClassVar[tuple[str, ...]]
    extra_fields: ClassVar[tuple[str, ...]]
    # runtime module name: {its parameter: the Megatron field bound to it}
    runtime_modules: ClassVar[Mapping[str, Mapping[str, str]]]
    # the classes of those modules (bridgegen.bridge.module_parameters.ModuleParameters)
    runtime_module_types: ClassVar[tuple[type[ModuleParameters], ...]] = ()
    hf_aliases: ClassVar[Mapping[str, tuple[str, ...]]]
    weight_rules: ClassVar[tuple[WeightRule, ...]]
    hf_ignore: ClassVar[tuple[str, ...]]
    example_config: ClassVar[Mapping[str, Any]]  # HF config fields of a tiny model of the family

    @staticmethod
    def megatron_values(hf: HFConfigReader) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def hf_values(config: MegatronConfig) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def config_root(cls, architecture: str | None) -> str | None:
        """The HF field holding the language model's config for ``architecture`` (None: the top)."""
        wrapper = cls.wrappers.get(architecture or "")
        return wrapper.config if wrapper else None

    @classmethod
    def example_hf_config(cls) -> dict[str, Any]:
        """The spec's ``example_config`` as a config.json dict, with the family's first
        architecture and model type."""
        return {
            **cls.example_config,
            "architectures": [cls.architectures[0]],
            "model_type": cls.model_types[0],
        }

    # ------------------------------------------------------------------ config conversion

    @classmethod
    def to_megatron_config(cls, hf_config: Mapping[str, Any], source: str = "config.json") -> MegatronConfig:
        """HF config dict -> MegatronConfig. Raises ConfigError naming the field at fault."""
        data = normalize_hf_config(hf_config)
        architectures = data.get("architectures") or [cls.architectures[0]]
        architecture = next((a for a in architectures if a in cls.architectures), None)
        if architecture is None:
            raise ConfigError(
                f"{source}: architectures {architectures} are not served by the {cls.family} bridge "
                f"(it serves {', '.join(cls.architectures)})"
            )
        model_type = data.get("model_type", cls.model_types[0])
        if model_type not in cls.model_types:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not served by the {cls.family} bridge "
                f"(it serves {', '.join(cls.model_types)})"
            )
        root = cls.config_root(architecture)
        fields = data if root is None else get_path(data, root, None)
        if not isinstance(fields, dict):
            raise ConfigError(
                f"{source}: {architecture} keeps its language model config in {root!r}, which is missing"
            )
        reader = HFConfigReader(fields, cls.family, source, cls.hf_aliases)
        values = cls.megatron_values(reader)
        hf_activation = (
            reader.require(cls.activation_field)
            if cls.activation_default is None
            else reader.optional(cls.activation_field, cls.activation_default)
        )
        if hf_activation not in cls.activations:
            raise ConfigError(
                f"{source}: {cls.activation_field} {hf_activation!r} is not a known activation for the "
                f"{cls.family} bridge; known: {', '.join(sorted(cls.activations))}"
            )
        rope = rope_from_hf(fields, cls.rope_types, cls.family, source, cls.megatron_model)
        raw = hf_config if root is None else hf_config.get(root)
        if isinstance(raw, Mapping) and uses_flat_rope_keys(raw):
            rope = dataclasses.replace(rope, flat_keys=True)
        passthrough = copy.deepcopy(data)
        for name in HF_VOLATILE_FIELDS:
            drop_path(passthrough, name)
        for name in cls.hf_fields:
            drop_path(
                passthrough,
                name if root is None or name in ("architectures", "model_type") else f"{root}.{name}",
            )
        # Our own checks first (their messages are the more specific), then transformers'.
        check_with_transformers(hf_config, source)
        return MegatronConfig(
            family=cls.family,
            megatron_model=cls.megatron_model,
            values=values,
            activation=cls.activations[hf_activation],
            rope=rope,
            hf_architecture=architecture,
            hf_model_type=model_type,
            hf_activation=hf_activation,
            hf_passthrough=passthrough,
        )

    @classmethod
    def to_hf_config(cls, config: MegatronConfig) -> dict[str, Any]:
        """MegatronConfig -> HF config dict that ``transformers.AutoConfig.for_model`` accepts."""
        if config.family != cls.family:
            raise ConfigError(f"a {config.family} config cannot be exported by the {cls.family} bridge")
        out: dict[str, Any] = copy.deepcopy(dict(config.hf_passthrough))
        out["architectures"] = [config.hf_architecture or cls.architectures[0]]
        out["model_type"] = config.hf_model_type or cls.model_types[0]
        root = cls.config_root(out["architectures"][0])
        fields: dict[str, Any] = out if root is None else out.setdefault(root, {})
        for name, value in cls.hf_values(config).items():
            set_path(fields, name, value)
        hf_activation = config.hf_activation or next(
            (hf for hf, megatron in sorted(cls.activations.items()) if megatron == config.activation), None
        )
        if hf_activation is None or cls.activations.get(hf_activation) != config.activation:
            raise ConfigError(
                f"{cls.family}: no HF activation name for Megatron activation {config.activation!r}"
            )
        set_path(fields, cls.activation_field, hf_activation)
        fields.update(config.rope.to_hf())
        if not config.rope.flat_keys:
            fold_rope_parameters(fields)
        check_with_transformers(out, f"the {cls.family} config written on export")
        return dict(sorted(out.items()))


def find_bridge(bridges: tuple[type[Bridge], ...], hf_config: Mapping[str, Any]) -> type[Bridge]:
    """The bridge whose spec claims the config's architecture (or, failing that, model_type)."""
    architectures = list(hf_config.get("architectures") or [])
    for architecture in architectures:
        for bridge in bridges:
            if architecture in bridge.architectures:
                return bridge
    model_type = hf_config.get("model_type")
    for bridge in bridges:
        if model_type in bridge.model_types:
            return bridge
    supported = sorted(a for bridge in bridges for a in bridge.architectures)
    raise UnsupportedModelError(
        f"no bridge for architectures {architectures} / model_type {model_type!r}; "
        f"supported architectures: {', '.join(supported)}"
    )
