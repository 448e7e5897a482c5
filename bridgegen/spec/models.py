"""Stage 2: pydantic models that mirror a spec file faithfully (one model per YAML section).

Every model forbids unknown keys and is frozen, so a typo in a spec is an error with a
location, never a silently ignored key. Closed vocabularies are enums.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
)

from bridgegen.bridge.weight_rules import GateUp, HFLayout, WeightKind

Name = Annotated[
    str, StringConstraints(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
]
TensorTemplate = Annotated[str, StringConstraints(min_length=1, pattern=r"^[A-Za-z0-9_.{}]+$")]
Expression = Annotated[str, StringConstraints(min_length=1)]
YamlValue = StrictBool | StrictInt | StrictFloat | StrictStr | None | list[Any] | dict[str, Any]


class MegatronModel(str, Enum):
    """Which megatron-core model family a spec builds."""

    gpt = "gpt"  # GPTModel with TransformerConfig
    mla = "mla"  # GPTModel with MLATransformerConfig (multi-latent attention)


class MegatronActivation(str, Enum):
    """Activation functions the runtime can hand to megatron-core."""

    silu = "silu"
    gelu = "gelu"
    gelu_tanh = "gelu_tanh"
    relu = "relu"
    squared_relu = "squared_relu"
    quick_gelu = "quick_gelu"
    module = "module"  # a runtime module of the spec gives the MLP its activation (Apertus' xIELU)


class RopeType(str, Enum):
    """RoPE scaling variants, named as HF's ``rope_type``."""

    default = "default"
    linear = "linear"
    dynamic = "dynamic"
    llama3 = "llama3"
    yarn = "yarn"
    longrope = "longrope"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightSpec(Strict):
    """One Megatron tensor and the HF tensor(s) it is made of."""

    hf: TensorTemplate | list[TensorTemplate] = Field(
        default_factory=list,
        description="HF tensor name template(s); order matters for fused kinds. None for kind constant, and "
        "for a rule with shares_hf_with (it takes that rule's)",
    )
    kind: WeightKind
    te_megatron: TensorTemplate | None = Field(
        default=None, description="the same tensor's name in Transformer Engine layer specs"
    )
    when: Expression | None = Field(
        default=None,
        description="expression over Megatron config fields; the tensor exists only where it is true",
    )
    hf_stacked_experts: StrictBool = Field(
        default=False,
        description="the HF tensor(s) hold every expert stacked on dim 0 ([E, ...]); the Megatron tensor is "
        "expert {expert} of it",
    )
    hf_layout: HFLayout = Field(
        default=HFLayout.same,
        description="how the HF tensor is stored: same ([out, in], as Megatron), transposed ([in, out], "
        "modules computing x @ W; stacked experts [E, in, out]; declared, since a square tensor fits either way) "
        "or unsqueezed (a leading dim of 1 that Megatron lacks: [1, E] for [E])",
    )
    gate_up: GateUp = Field(
        default=GateUp.stacked,
        description="fused_gate_up only: the HF tensor holds [gate; up] (stacked) or alternating gate and up "
        "rows (interleaved: gate = [0::2], up = [1::2] along Megatron's dim 0, i.e. after hf_layout)",
    )
    norm_offset: StrictFloat | StrictInt = Field(
        default=0.0,
        description="Megatron value = HF value + norm_offset (for 1 + w norms); exact or refused: an import "
        "whose weight loses bits in w + norm_offset (any bf16 / fp16 parameter, most float32 ones) is refused. "
        "Prefer layernorm_zero_centered_gamma, which keeps w as HF stores it",
    )
    value: StrictFloat | StrictInt | None = Field(
        default=None,
        description="kind constant only: what the Megatron tensor holds (e.g. 0.0 for the bias of a bias-free "
        "HF norm); filled on import, and an export refuses a tensor holding anything else",
    )
    shares_hf_with: TensorTemplate | None = Field(
        default=None,
        description="the Megatron name template of another rule whose HF tensor this Megatron tensor repeats "
        "(one HF tensor feeding two Megatron tensors, e.g. one norm before two parallel branches); same kind "
        "and placeholders. Import fills both; export writes the HF tensor once and refuses copies that differ",
    )
    hf_copies: list[TensorTemplate] = Field(
        default_factory=list,
        description="HF tensors that repeat this one's HF tensor (e.g. a multi-token prediction layer's "
        "copy of the embedding; {mtp_layer} is each such layer's HF number): written on export, not read",
    )


WeightPrefix = Annotated[str, StringConstraints(pattern=r"^([A-Za-z0-9_]+\.)*$")]
CarriedPrefix = Annotated[str, StringConstraints(min_length=1, pattern=r"^[A-Za-z0-9_.]+$")]


class WrapperSpec(Strict):
    """An HF architecture holding this family's language model inside a larger model (e.g. the
    text part of a vision-language checkpoint)."""

    config: Name = Field(description="HF field holding the language model's config (e.g. text_config)")
    weight_prefix: WeightPrefix = Field(
        default="",
        description="prepended to every HF tensor name of the language model (e.g. 'language_model.')",
    )
    carried_weights: list[CarriedPrefix] = Field(
        default_factory=list,
        description="HF tensor name prefixes outside the language model (e.g. 'vision_tower.'): not "
        "converted, kept beside a Megatron checkpoint and written back on export",
    )


class RopeSection(Strict):
    supported: list[RopeType] = Field(description="RoPE scaling types this family accepts")


class HFCheck(Strict):
    """A condition an HF config must meet to be convertible (an expression over HF fields)."""

    expect: Expression
    message: StrictStr


class NeutralValue(Strict):
    """The one value of an HF field this family supports, and why no other is."""

    value: YamlValue = Field(description="the supported value (an absent field counts as it)")
    also: list[YamlValue] = Field(
        default_factory=list, description="other values transformers takes as the same one"
    )
    why: StrictStr = Field(min_length=1, description="what another value would change that is not mapped")


class RemovedEntries(Strict):
    """Entries of list sections that a spec drops from what it extends (maps drop with null)."""

    hf_checks: list[Expression] = Field(
        default_factory=list, description="inherited hf_checks entries to drop, each named by its expect text"
    )
    hf_behaviour_free: list[Name] = Field(
        default_factory=list, description="inherited hf_behaviour_free fields to drop"
    )
    extra_fields: list[Name] = Field(default_factory=list, description="inherited extra_fields to drop")


class ConfigSection(Strict):
    """HF <-> Megatron config fields. HF names may be dotted paths into nested configs."""

    remove: RemovedEntries = Field(
        default_factory=RemovedEntries,
        description="entries of the list sections below that this spec drops from the specs it extends",
    )

    renames: dict[Name, Name | None] = Field(
        default_factory=dict, description="hf_name: megatron_name (null removes an inherited rename)"
    )
    hf_optional: dict[Name, YamlValue] = Field(
        default_factory=dict,
        description="HF fields that may be absent, with the value assumed then (null is None here, not a removal)",
    )
    hf_aliases: dict[Name, list[Name]] = Field(
        default_factory=dict,
        description="hf_name: other names some transformers versions write for it (read when it is absent)",
    )
    hf_required: list[Name] = Field(
        default_factory=list, description="HF fields used only in expressions that must be present"
    )
    to_megatron: dict[Name, Expression | None] = Field(
        default_factory=dict,
        description="megatron_name: expression over HF fields (null removes an inherited one)",
    )
    to_hf: dict[Name, Expression | None] = Field(
        default_factory=dict,
        description="hf_name: expression over Megatron fields (null removes an inherited one)",
    )
    extra_fields: list[Name] = Field(
        default_factory=list,
        description="other Megatron-side fields, neither TransformerConfig fields, model settings nor "
        "read by a runtime module (a model with a value in one is refused until a module reads it)",
    )
    hf_checks: list[HFCheck] = Field(
        default_factory=list,
        description="conditions an HF config must meet; conversion fails with the message",
    )
    megatron_defaults: dict[Name, YamlValue] = Field(
        default_factory=dict,
        description="fixed Megatron values for this family (null removes an inherited one; set None with "
        'the to_megatron expression "None")',
    )
    hf_defaults: dict[Name, YamlValue] = Field(
        default_factory=dict,
        description="fixed HF values written on export (null removes an inherited one; write None with "
        'the to_hf expression "None")',
    )
    hf_neutral: dict[Name, NeutralValue | None] = Field(
        default_factory=dict,
        description="HF fields allowed only at one value (absent counts as it); a config with another "
        "value is refused on import, naming the field, the value and why (null removes an inherited one)",
    )
    hf_behaviour_free: list[Name] = Field(
        default_factory=list,
        description="HF fields that do not change the computed model (token ids, use_cache, ...): "
        "carried through unread",
    )


class SpecFile(Strict):
    """A whole spec file. The family name is the file's stem."""

    description: StrictStr = ""
    extends: str | None = Field(default=None, description="family whose spec this one builds on")
    abstract: StrictBool = Field(default=False, description="a base spec: inherited from, never generated")
    architectures: list[str] = Field(
        default_factory=list, description="HF `architectures` this bridge serves"
    )
    model_types: list[str] = Field(
        default_factory=list, description="HF `model_type` values this bridge serves"
    )
    wrappers: dict[str, WrapperSpec] = Field(
        default_factory=dict,
        description="architecture: where the language model sits in a larger HF model (its config "
        "field, tensor name prefix, and the tensors carried through unchanged)",
    )
    megatron_model: MegatronModel | None = None
    activation_field: Name | None = Field(default=None, description="HF field holding the activation name")
    activation_default: StrictStr | None = Field(
        default=None, description="HF activation assumed when the activation field is absent"
    )
    activations: dict[str, MegatronActivation | None] = Field(
        default_factory=dict,
        description="HF activation name: Megatron activation (null removes an inherited one)",
    )
    rope: RopeSection | None = None
    runtime_modules: dict[Name, dict[Name, Name] | None] = Field(
        default_factory=dict,
        description="runtime modules for quirks megatron-core's layer spec cannot express: module name: "
        "{parameter: Megatron field} (every parameter the module declares, each field set in config; {} for "
        "a module without parameters; null removes an inherited one). The built-in modules are declared in "
        "bridgegen.bridge.module_parameters, a specs folder's own in its runtime_modules.py. A module "
        "applies when every field it reads has a value",
    )
    config: ConfigSection = Field(default_factory=ConfigSection)
    weights: dict[TensorTemplate, WeightSpec | None] = Field(
        default_factory=dict,
        description="megatron_name template: how it is built (null removes an inherited one)",
    )
    hf_ignore: list[TensorTemplate] = Field(
        default_factory=list, description="HF tensor templates that exist in checkpoints but carry no weights"
    )
    example_config: dict[Name, YamlValue] = Field(
        default_factory=dict,
        description="the HF config fields of a tiny model of this family (architectures and model_type "
        "come from the spec): built on the meta device by `bridgegen check` and run by the family tests; "
        "not inherited",
    )
