"""Runtime modules: what each declares (no torch import here: the spec checker reads it).

A runtime module stands in for a quirk megatron-core's layer spec cannot express. It is one
class: a subclass of ``ModuleParameters`` whose ``name`` specs select it by
(``runtime_modules: {residual_multiplier: {multiplier: residual_multiplier}}``), whose pydantic
fields are its parameters (a spec binds each to a Megatron-side field), and whose ``apply``
changes the model: the decoder block's layer spec before the model is built
(``stage = "layer_spec"``) or the built model (``stage = "model"``). A module applies to a model
when every field it reads has a value (a module without parameters always applies); the values
are checked against the declared types when a bridge is built.

The modules below are the built-in set's core; their implementations live in
``bridgegen.megatron.modules`` and are named by ``implementation`` ("module:function", imported
only when a model is built). A specs folder (the built-in one too) brings its own modules in a
``runtime_modules.py`` beside its specs, found as bridges are found: ``bridgegen generate``
validates the specs against them and copies the file into the bridges folder, whose bridges
import their classes from it. Such a module overrides ``apply`` and imports torch inside it, so
the file stays importable without torch (README: Runtime modules).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, TypeAdapter, ValidationError

Stage = Literal["layer_spec", "model"]


class ModuleParameters(BaseModel):
    """The values a runtime module reads, one Megatron field each."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # How specs select the module under ``runtime_modules`` (unique among the modules a spec sees).
    name: ClassVar[str]
    # What ``apply`` changes: the decoder block's layer spec (before the model is built) or the model.
    stage: ClassVar[Stage]
    # "module:function" called as function(target, parameters) by the default ``apply``.
    implementation: ClassVar[str] = ""
    # What a model built from Megatron-LM's arguments lacks without this module (printed with
    # those arguments, {parameter} replaced by its value); None for a module whose effect
    # lm_arguments writes as flags.
    not_in_megatron_lm: ClassVar[str | None]

    def megatron_lm_gap(self) -> str | None:
        """``not_in_megatron_lm`` with this module's values."""
        if self.not_in_megatron_lm is None:
            return None
        return self.not_in_megatron_lm.format(**self.model_dump())

    def apply(self, target: Any) -> None:
        """Change ``target`` (a layer spec or a model, as ``stage`` says)."""
        module, _, function = self.implementation.partition(":")
        if not module or not function:
            raise NotImplementedError(f"runtime module {self.name!r} names no implementation; override apply")
        getattr(importlib.import_module(module), function)(target, self)


class EmbeddingScale(ModuleParameters):
    """Embeddings times a constant (Gemma: sqrt(hidden_size); Granite: embedding_multiplier)."""

    name: ClassVar[str] = "embedding_scale"
    stage: ClassVar[Stage] = "model"
    implementation: ClassVar[str] = "bridgegen.megatron.modules:scale_embeddings_module"
    not_in_megatron_lm: ClassVar[str | None] = "embedding output scaled by {scale}"
    scale: float


class SoftcappedAttention(ModuleParameters):
    """Attention scores -> cap * tanh(scores / cap) (Gemma 2)."""

    name: ClassVar[str] = "softcapped_attention"
    stage: ClassVar[Stage] = "layer_spec"
    implementation: ClassVar[str] = "bridgegen.megatron.modules:use_softcapped_attention_module"
    not_in_megatron_lm: ClassVar[str | None] = "attention logit softcapping at {cap}"
    cap: float


class FinalLogitSoftcapping(ModuleParameters):
    """Logits -> cap * tanh(logits / cap) (Gemma 2)."""

    name: ClassVar[str] = "final_logit_softcapping"
    stage: ClassVar[Stage] = "model"
    implementation: ClassVar[str] = "bridgegen.megatron.modules:softcap_final_logits_module"
    not_in_megatron_lm: ClassVar[str | None] = "final logit softcapping at {cap}"
    cap: float


class PostLayerNorms(ModuleParameters):
    """Norms on the attention and MLP outputs before each residual add (Gemma 2 / 3: 1 + w,
    OLMo 2: plain w; the model's layernorm_zero_centered_gamma says which)."""

    name: ClassVar[str] = "post_layer_norms"
    stage: ClassVar[Stage] = "model"
    implementation: ClassVar[str] = "bridgegen.megatron.modules:add_post_layer_norms_module"
    not_in_megatron_lm: ClassVar[str | None] = "post-attention / post-MLP norms"
    enabled: StrictBool


class LocalRopeBase(ModuleParameters):
    """Sliding-window layers rotate with their own RoPE base (Gemma 3)."""

    name: ClassVar[str] = "local_rope_base"
    stage: ClassVar[Stage] = "model"
    implementation: ClassVar[str] = "bridgegen.megatron.modules:use_local_rope_base_module"
    not_in_megatron_lm: ClassVar[str | None] = "RoPE base {base} on sliding-window layers"
    base: float


class ResidualMultiplier(ModuleParameters):
    """Attention and MLP outputs times a constant before each residual add (Granite)."""

    name: ClassVar[str] = "residual_multiplier"
    stage: ClassVar[Stage] = "model"
    implementation: ClassVar[str] = "bridgegen.megatron.modules:multiply_residual_branches_module"
    not_in_megatron_lm: ClassVar[str | None] = (
        "attention and MLP outputs times {multiplier} before the residual add"
    )
    multiplier: float


class LogitsScaling(ModuleParameters):
    """Logits divided by a constant (Granite's logits_scaling)."""

    name: ClassVar[str] = "logits_scaling"
    stage: ClassVar[Stage] = "model"
    implementation: ClassVar[str] = "bridgegen.megatron.modules:divide_logits_module"
    not_in_megatron_lm: ClassVar[str | None] = "logits divided by {divisor}"
    divisor: float


class NoPreNorms(ModuleParameters):
    """Decoder layers without input / pre-MLP norms (OLMo 2 norms sublayer outputs instead)."""

    name: ClassVar[str] = "no_pre_norms"
    stage: ClassVar[Stage] = "layer_spec"
    implementation: ClassVar[str] = "bridgegen.megatron.modules:remove_pre_norms_module"
    not_in_megatron_lm: ClassVar[str | None] = "decoder layers without pre-norms"


class QkNormOverHeads(ModuleParameters):
    """q/k RMSNorm over the whole projection (all heads at once, OLMo 2) instead of per head;
    under tensor parallelism its statistics are summed over the tensor-parallel group."""

    name: ClassVar[str] = "qk_norm_over_heads"
    stage: ClassVar[Stage] = "layer_spec"
    implementation: ClassVar[str] = "bridgegen.megatron.modules:use_qk_norms_over_heads_module"
    not_in_megatron_lm: ClassVar[str | None] = "q/k RMSNorm over all heads (--qk-layernorm is per head)"


BUILTIN_MODULES: tuple[type[ModuleParameters], ...] = (
    EmbeddingScale,
    SoftcappedAttention,
    FinalLogitSoftcapping,
    PostLayerNorms,
    LocalRopeBase,
    ResidualMultiplier,
    LogitsScaling,
    NoPreNorms,
    QkNormOverHeads,
)


def modules_by_name(modules: Iterable[type[ModuleParameters]]) -> dict[str, type[ModuleParameters]]:
    """``modules`` keyed by the name specs select them by; two of one name are an error."""
    named: dict[str, type[ModuleParameters]] = {}
    for module in modules:
        other = named.setdefault(module.name, module)
        if other is not module:
            raise ValueError(
                f"runtime modules {other.__module__}.{other.__qualname__} and "
                f"{module.__module__}.{module.__qualname__} are both named {module.name!r}"
            )
    return named


def declaration_errors(module: type[ModuleParameters]) -> list[str]:
    """What a module class declares wrongly (its name, stage, Megatron-LM note, implementation)."""
    where = f"{module.__module__}.{module.__qualname__}"
    errors = []
    name = getattr(module, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        errors.append(f"{where}: name must be an identifier (how specs select the module), not {name!r}")
    if getattr(module, "stage", None) not in ("layer_spec", "model"):
        errors.append(f"{where}: stage must be 'layer_spec' or 'model'")
    note = getattr(module, "not_in_megatron_lm", ...)
    if note is not None and not isinstance(note, str):
        errors.append(
            f"{where}: not_in_megatron_lm must say what Megatron-LM's arguments cannot express "
            "(a string, {parameter} for a value), or be None where they can"
        )
    if module.apply is ModuleParameters.apply and ":" not in module.implementation:
        errors.append(f"{where}: neither overrides apply nor names an implementation ('module:function')")
    if not (module.__doc__ or "").strip():
        errors.append(f"{where}: needs a docstring saying what the module does")
    return errors


def parameter_names(module: type[ModuleParameters]) -> frozenset[str]:
    """The parameters ``module`` declares, each of which a spec binds to a Megatron field."""
    return frozenset(module.model_fields)


def parameter_type_error(module: type[ModuleParameters], parameter: str, value: Any) -> str | None:
    """Why ``value`` cannot be ``module``'s ``parameter`` (None when it can)."""
    declared = module.model_fields[parameter]
    annotation = declared.annotation
    try:
        TypeAdapter(Annotated[annotation, declared]).validate_python(value)  # type: ignore[arg-type]
    except ValidationError as error:
        type_name = getattr(annotation, "__name__", str(annotation))
        return f"{value!r} is not a {type_name} ({error.errors()[0]['msg']})"
    return None


def selected_modules(
    bindings: Mapping[str, Mapping[str, str]],
    modules: Iterable[type[ModuleParameters]],
    values: Mapping[str, Any],
    family: str,
) -> list[ModuleParameters]:
    """The modules of ``bindings`` ({module name: {parameter: Megatron field}}) that apply to a
    config's Megatron ``values`` (every field read has a value, not False), with their parameters
    checked against the types the module declares."""
    from bridgegen.bridge.errors import ConfigError

    named = modules_by_name(modules)
    applied = []
    for name, fields in sorted(bindings.items()):
        module = named.get(name)
        if module is None:
            raise ConfigError(f"{family}: the bridge selects runtime module {name!r}, which it does not import")
        read = {parameter: values.get(field) for parameter, field in fields.items()}
        if any(value is None or value is False for value in read.values()):
            continue
        for parameter, value in sorted(read.items()):
            reason = parameter_type_error(module, parameter, value)
            if reason is not None:
                raise ConfigError(
                    f"{family}: Megatron field {fields[parameter]!r} feeds parameter "
                    f"{parameter!r} of runtime module {name!r}: {reason}"
                )
        applied.append(module(**read))
    return applied
