"""No HF config field ignored silently: every parameter of transformers' config class for a
spec's model types is read by the bridge, allowed at one value only (``hf_neutral``), or
declared not to change the computed model (``hf_behaviour_free``); and every RoPE key
transformers reads for a type the spec supports is read or refused by our RoPE handling.

``coverage_problems`` is pure (a resolved spec and the class's parameter names in, problems
out); ``transformers_config_class`` asks the installed transformers. A model type the installed
transformers does not know is skipped with a note, not failed: there is nothing to compare with.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bridgegen.bridge.rope import unhandled_rope_keys
from bridgegen.spec.render import hf_fields_of
from bridgegen.spec.resolve import ResolvedSpec

# Parameters every transformers config class takes from PretrainedConfig. Reviewed once: none
# changes what a decoder-only language model computes.
GENERIC_HF_FIELDS: Mapping[str, str] = {
    "architectures": "the model class; matched against the spec's architectures",
    "model_type": "the config class; matched against the spec's model_types",
    "transformers_version": "the writer's version",
    "dtype": "the dtype the weights are stored in; conversion keeps each tensor's dtype",
    "torch_dtype": "dtype's older name",
    "id2label": "labels of classification heads, which these bridges do not convert",
    "label2id": "labels of classification heads, which these bridges do not convert",
    "problem_type": "the loss of classification heads",
    "output_hidden_states": "what forward returns, not what it computes",
    "output_attentions": "what forward returns, not what it computes",
    "return_dict": "what forward returns, not what it computes",
    "chunk_size_feed_forward": "splits the feed-forward computation into chunks with the same result",
    "is_encoder_decoder": "false for every decoder-only model these bridges serve",
}


@dataclass(frozen=True)
class ConfigClass:
    """What the installed transformers says about one model type's config class."""

    name: str
    parameters: tuple[str, ...]
    aliases: Mapping[str, str]  # attribute_map: another name -> the parameter it stands for
    sub_configs: tuple[str, ...]  # parameters holding a nested config (text_config, ...)


def accounted_fields(spec: ResolvedSpec) -> frozenset[str]:
    """HF fields the spec reads, refuses off a neutral value, or declares behaviour-free."""
    neutral = {name for name, _, _ in spec.hf_neutral}
    return frozenset(hf_fields_of(spec)) | neutral | set(spec.hf_behaviour_free) | set(GENERIC_HF_FIELDS)


def unaccounted_fields(
    spec: ResolvedSpec, parameters: Iterable[str], aliases: Mapping[str, str] | None = None
) -> list[str]:
    """``parameters`` the spec does not account for; a parameter counts as accounted for when
    one of its names (``aliases`` maps other names to parameters) is."""
    accounted = accounted_fields(spec)
    names: dict[str, set[str]] = {name: {name} for name in parameters}
    for other, target in (aliases or {}).items():
        if target in names:
            names[target].add(other)
        if other in names:
            names[other].add(target)
    return sorted(name for name, known_as in names.items() if not known_as & accounted)


def _first_line(spec: ResolvedSpec, model_type: str) -> str:
    return dict(spec.model_type_lines).get(model_type, spec.source)


def wrapped_config(spec: ResolvedSpec, config_class: ConfigClass) -> str | None:
    """The nested config of ``config_class`` that holds the spec's language model, if any (a
    wrapper's ``config`` field, e.g. text_config)."""
    nested = sorted({wrapper.config for wrapper in spec.wrappers} & set(config_class.sub_configs))
    return nested[0] if nested else None


def coverage_problems(spec: ResolvedSpec, model_type: str, config_class: ConfigClass) -> list[str]:
    """Problems of one model type of ``spec`` against transformers' config class for it."""
    where = _first_line(spec, model_type)
    return [
        f"{where}: {spec.family}: {config_class.name} field {name!r} (model type {model_type!r}) is not "
        "accounted for: map it, or list it in config.hf_neutral or config.hf_behaviour_free"
        for name in unaccounted_fields(spec, config_class.parameters, config_class.aliases)
    ]


def rope_problems(spec: ResolvedSpec) -> list[str]:
    """RoPE keys transformers reads for a type the spec supports that our RoPE handling neither
    reads nor refuses (bridgegen.bridge.rope keeps both lists)."""
    where = _first_line(spec, spec.model_types[0]) if spec.model_types else spec.source
    return [
        f"{where}: {spec.family}: rope type {rope_type!r}: transformers reads rope_scaling key {key!r}, "
        f"which the {spec.megatron_model} RoPE handling neither reads nor refuses (bridgegen/runtime/rope.py)"
        for rope_type in spec.rope_types
        for key in unhandled_rope_keys(spec.megatron_model, rope_type)
    ]


def transformers_config_class(model_type: str) -> ConfigClass | None:
    """The installed transformers' config class for ``model_type``; None when it has none."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return None
    config_class = CONFIG_MAPPING[model_type]
    signature = inspect.signature(config_class.__init__)
    parameters = tuple(
        name
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    )
    return ConfigClass(
        name=config_class.__name__,
        parameters=parameters,
        aliases=dict(getattr(config_class, "attribute_map", {}) or {}),
        sub_configs=tuple(getattr(config_class, "sub_configs", {}) or {}),
    )


def field_coverage(specs: Iterable[ResolvedSpec]) -> tuple[list[str], list[str]]:
    """(problems, notes) of every spec against the installed transformers."""
    import transformers

    problems: list[str] = []
    notes: list[str] = []
    for spec in specs:
        problems += rope_problems(spec)
        for model_type in spec.model_types:
            config_class = transformers_config_class(model_type)
            if config_class is None:
                notes.append(
                    f"{_first_line(spec, model_type)}: {spec.family}: model type {model_type!r} not checked: "
                    f"transformers {transformers.__version__} has no config class for it"
                )
                continue
            nested = wrapped_config(spec, config_class)
            if nested is not None:
                # The language model's fields are checked through the nested config's own model
                # type; the others belong to the rest of the wrapped model, carried through.
                notes.append(
                    f"{_first_line(spec, model_type)}: {spec.family}: {config_class.name} fields outside "
                    f"{nested} are carried through unread with the rest of the wrapped model"
                )
                continue
            problems += coverage_problems(spec, model_type, config_class)
    return problems, notes
