"""The runtime modules a spec can select, and the parameters each declares (no torch import
here: the spec checker reads it).

A runtime module stands in for a quirk megatron-core's layer spec cannot express. It declares
its parameters here, as a small pydantic class; a spec binds each parameter to a Megatron-side
field (``runtime_modules: {residual_multiplier: {multiplier: residual_multiplier}}``), and the
module applies to a model when every field it reads has a value (a module without parameters
always applies). The field values are checked against the declared types when a bridge is
built. The modules themselves live in ``bridgegen.megatron.modules``.

To add one: a member of ``RuntimeModule``, a parameter class below (its docstring says what the
module does; ``not_in_megatron_lm`` says what Megatron-LM's arguments cannot express, or is
None where ``formats.megatron_lm.lm_arguments`` writes its flags), its entry in
``PARAMETERS``, and its implementation with its entry in ``modules.py`` (README: Runtime
modules).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, StrictBool, TypeAdapter, ValidationError


class RuntimeModule(str, Enum):
    """A quirk module, named as specs name it under ``runtime_modules``."""

    embedding_scale = "embedding_scale"
    softcapped_attention = "softcapped_attention"
    final_logit_softcapping = "final_logit_softcapping"
    post_layer_norms = "post_layer_norms"
    local_rope_base = "local_rope_base"
    residual_multiplier = "residual_multiplier"
    logits_scaling = "logits_scaling"
    no_pre_norms = "no_pre_norms"
    qk_norm_over_heads = "qk_norm_over_heads"


class ModuleParameters(BaseModel):
    """The values a runtime module reads, one Megatron field each."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # What a model built from Megatron-LM's arguments lacks without this module (printed with
    # those arguments, {parameter} replaced by its value); None for a module whose effect
    # lm_arguments writes as flags.
    not_in_megatron_lm: ClassVar[str | None]

    def megatron_lm_gap(self) -> str | None:
        """``not_in_megatron_lm`` with this module's values."""
        if self.not_in_megatron_lm is None:
            return None
        return self.not_in_megatron_lm.format(**self.model_dump())


class EmbeddingScale(ModuleParameters):
    """Embeddings times a constant (Gemma: sqrt(hidden_size); Granite: embedding_multiplier)."""

    not_in_megatron_lm: ClassVar[str | None] = "embedding output scaled by {scale}"
    scale: float


class SoftcappedAttention(ModuleParameters):
    """Attention scores -> cap * tanh(scores / cap) (Gemma 2)."""

    not_in_megatron_lm: ClassVar[str | None] = "attention logit softcapping at {cap}"
    cap: float


class FinalLogitSoftcapping(ModuleParameters):
    """Logits -> cap * tanh(logits / cap) (Gemma 2)."""

    not_in_megatron_lm: ClassVar[str | None] = "final logit softcapping at {cap}"
    cap: float


class PostLayerNorms(ModuleParameters):
    """Norms on the attention and MLP outputs before each residual add (Gemma 2 / 3: 1 + w,
    OLMo 2: plain w; the model's layernorm_zero_centered_gamma says which)."""

    not_in_megatron_lm: ClassVar[str | None] = "post-attention / post-MLP norms"
    enabled: StrictBool


class LocalRopeBase(ModuleParameters):
    """Sliding-window layers rotate with their own RoPE base (Gemma 3)."""

    not_in_megatron_lm: ClassVar[str | None] = "RoPE base {base} on sliding-window layers"
    base: float


class ResidualMultiplier(ModuleParameters):
    """Attention and MLP outputs times a constant before each residual add (Granite)."""

    not_in_megatron_lm: ClassVar[str | None] = (
        "attention and MLP outputs times {multiplier} before the residual add"
    )
    multiplier: float


class LogitsScaling(ModuleParameters):
    """Logits divided by a constant (Granite's logits_scaling)."""

    not_in_megatron_lm: ClassVar[str | None] = "logits divided by {divisor}"
    divisor: float


class NoPreNorms(ModuleParameters):
    """Decoder layers without input / pre-MLP norms (OLMo 2 norms sublayer outputs instead)."""

    not_in_megatron_lm: ClassVar[str | None] = "decoder layers without pre-norms"


class QkNormOverHeads(ModuleParameters):
    """q/k RMSNorm over the whole projection (all heads at once, OLMo 2) instead of per head;
    under tensor parallelism its statistics are summed over the tensor-parallel group."""

    not_in_megatron_lm: ClassVar[str | None] = "q/k RMSNorm over all heads (--qk-layernorm is per head)"


PARAMETERS: dict[RuntimeModule, type[ModuleParameters]] = {
    RuntimeModule.embedding_scale: EmbeddingScale,
    RuntimeModule.softcapped_attention: SoftcappedAttention,
    RuntimeModule.final_logit_softcapping: FinalLogitSoftcapping,
    RuntimeModule.post_layer_norms: PostLayerNorms,
    RuntimeModule.local_rope_base: LocalRopeBase,
    RuntimeModule.residual_multiplier: ResidualMultiplier,
    RuntimeModule.logits_scaling: LogitsScaling,
    RuntimeModule.no_pre_norms: NoPreNorms,
    RuntimeModule.qk_norm_over_heads: QkNormOverHeads,
}


def parameter_names(module: RuntimeModule) -> frozenset[str]:
    """The parameters ``module`` declares, each of which a spec binds to a Megatron field."""
    return frozenset(PARAMETERS[module].model_fields)


def parameter_type_error(module: RuntimeModule, parameter: str, value: Any) -> str | None:
    """Why ``value`` cannot be ``module``'s ``parameter`` (None when it can)."""
    declared = PARAMETERS[module].model_fields[parameter]
    annotation = declared.annotation
    try:
        TypeAdapter(Annotated[annotation, declared]).validate_python(value)  # type: ignore[arg-type]
    except ValidationError as error:
        name = getattr(annotation, "__name__", str(annotation))
        return f"{value!r} is not a {name} ({error.errors()[0]['msg']})"
    return None
