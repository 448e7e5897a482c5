"""The model config of a checkpoint bridgegen did not write: Megatron-LM's saved ``args`` or
Megatron-Bridge's ``run_config.yaml``, read into Megatron-side values, turned into the HF config
of a chosen family (the spec's own reverse mapping), and converted back into a bridge so every
check of a normal import applies.

Megatron-Bridge writes ``<iter folder>/run_config.yaml``; its ``model:`` section holds the model
provider's TransformerConfig fields by name (Megatron-Bridge 0.6 ``training/checkpointing.py``,
``ConfigContainer.to_yaml``). Megatron-LM saves its argparse ``Namespace`` as ``args``, whose
names follow its flags (``num_experts``, ``swiglu``, ``untie_embeddings_and_output_weights``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridgegen.bridge.config import MegatronConfig
from bridgegen.bridge.errors import ConfigError
from bridgegen.bridge.rope import MEGATRON_LLAMA3_CONSTANTS, RopeScaling
from bridgegen.formats.folders import CONFIG_LIMIT, read_small_text
from bridgegen.formats.megatron_lm import MOE_VALUE_FIELDS

RUN_CONFIG = "run_config.yaml"

# Fields both tools name as megatron-core's TransformerConfig does.
SHARED_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "kv_channels",
    "normalization",
    "layernorm_epsilon",
    "layernorm_zero_centered_gamma",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "position_embedding_type",
    "rotary_percent",
    "window_size",
    "window_attn_skip_freq",
    *MOE_VALUE_FIELDS,
    "moe_router_pre_softmax",
    "moe_router_enable_expert_bias",
    "moe_shared_expert_gate",
    "moe_layer_freq",
    "multi_latent_attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "mtp_num_layers",
    "init_method_std",
    "attention_dropout",
    "hidden_dropout",
)


# Fields whose None megatron-core reads as "none" (no MTP layers, no q LoRA, no shared expert,
# no group-limited routing), not as "use the default".
NULL_MEANS_NONE = (
    "mtp_num_layers",
    "q_lora_rank",
    "moe_shared_expert_intermediate_size",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_topk_scaling_factor",
    "window_size",
)


def read_run_config(folder: Path) -> dict[str, Any] | None:
    """Megatron-Bridge's ``model:`` section, or None when the folder has no run config."""
    import yaml

    path = folder / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(read_small_text(path, CONFIG_LIMIT, "run config"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: no 'model' section")
    return model


# Megatron-Bridge writes a callable as ``{_target_: module.name, _call_: false}`` (a
# ``functools.partial`` adds ``_partial_: true`` and its keywords); Megatron-Bridge 0.6 sets
# GPT-OSS's to megatron.core.fusions.fused_bias_geglu.quick_gelu (gpt_oss_bridge.py:82), the
# others from ACTIVATION_FUNC_MAP (torch.nn.functional.silu, torch._C._nn.gelu, ...).
ACTIVATIONS = {
    "silu": "silu",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "fast_gelu": "gelu_tanh",  # megatron.core.activations: the tanh approximation
    "openai_gelu": "gelu_tanh",
    "squared_relu": "squared_relu",
    "relu": "relu",
}


def _activation_of(target: Any) -> str:
    name = str(target.get("_target_", "")) if isinstance(target, Mapping) else str(target)
    short = name.rsplit(".", 1)[-1]
    if short not in ACTIVATIONS:
        raise ConfigError(
            f"activation {name!r} in the run config is not one the bridges know "
            f"(known: {', '.join(sorted(ACTIVATIONS))})"
        )
    if short == "gelu" and isinstance(target, Mapping) and target.get("approximate") == "tanh":
        return "gelu_tanh"
    return ACTIVATIONS[short]


def values_from_run_config(model: Mapping[str, Any]) -> tuple[dict[str, Any], str, RopeScaling]:
    """Megatron-side values, activation and RoPE scaling from a Megatron-Bridge run config."""
    values = {name: model[name] for name in SHARED_FIELDS if model.get(name) is not None}
    # null is megatron-core's value for "none of these" (Megatron-Bridge writes
    # ``mtp_num_layers: null`` for a model without MTP layers): kept as a value, not as unset.
    values.update({name: None for name in NULL_MEANS_NONE if name in model and model[name] is None})
    values["num_query_groups"] = model.get("num_query_groups") or model["num_attention_heads"]
    values["vocab_size"] = int(model["vocab_size"])
    values["max_sequence_length"] = int(model.get("max_position_embeddings") or model["seq_length"])
    values["share_embeddings_and_output_weights"] = bool(model.get("share_embeddings_and_output_weights"))
    values["rotary_base"] = model.get("rotary_base", 10000)
    values["gated_linear_unit"] = bool(model.get("gated_linear_unit"))
    if model.get("num_moe_experts"):
        values["num_moe_experts"] = int(model["num_moe_experts"])
    rope = RopeScaling()
    if model.get("rope_scaling"):
        rope = _llama3(float(model.get("rope_scaling_factor", 8.0)))
    elif model.get("multi_latent_attention") and model.get("rope_type", "yarn") == "yarn":
        rope = _mla_yarn(model)
    elif model.get("position_embedding_type") == "yarn":
        rope = _gpt_yarn(model, factor="yarn_rotary_scaling_factor", mscale="yarn_mscale")
    return values, _activation_of(model.get("activation_func", "gelu")), rope


def values_from_args(args: Any) -> tuple[dict[str, Any], str, RopeScaling]:
    """Megatron-side values, activation and RoPE scaling from Megatron-LM's saved ``args``."""
    source = vars(args)
    values = {name: source[name] for name in SHARED_FIELDS if source.get(name) is not None}
    values.update({name: None for name in NULL_MEANS_NONE if name in source and source[name] is None})
    heads = int(source["num_attention_heads"])
    values["num_query_groups"] = (
        int(source["num_query_groups"]) if source.get("group_query_attention") else heads
    )
    vocab = source.get("vocab_size") or source.get("padded_vocab_size")
    if not vocab:
        raise ConfigError("the checkpoint's args name neither vocab_size nor padded_vocab_size")
    values["vocab_size"] = int(vocab)
    values["max_sequence_length"] = int(source.get("max_position_embeddings") or source["seq_length"])
    values["share_embeddings_and_output_weights"] = not source.get("untie_embeddings_and_output_weights")
    values["rotary_base"] = source.get("rotary_base", 10000)
    values["gated_linear_unit"] = bool(source.get("swiglu"))
    if source.get("apply_layernorm_1p"):
        values["layernorm_zero_centered_gamma"] = True
    if source.get("num_experts"):
        values["num_moe_experts"] = int(source["num_experts"])
    activation = "silu" if source.get("swiglu") else "squared_relu" if source.get("squared_relu") else "gelu"
    rope = RopeScaling()
    if source.get("use_rope_scaling"):
        rope = _llama3(float(source.get("rope_scaling_factor", 8.0)))
    elif source.get("rotary_seq_len_interpolation_factor"):
        factor = float(source["rotary_seq_len_interpolation_factor"])
        rope = RopeScaling("linear", {"rope_type": "linear", "factor": factor})
    elif source.get("multi_latent_attention") and source.get("rope_type", "yarn") == "yarn":
        rope = _mla_yarn(source)
    elif source.get("position_embedding_type") == "yarn":
        rope = _gpt_yarn(source, factor="rotary_scaling_factor", mscale="mscale")
    return values, activation, rope


def _llama3(factor: float) -> RopeScaling:
    return RopeScaling("llama3", {"rope_type": "llama3", "factor": factor, **MEGATRON_LLAMA3_CONSTANTS})


def _gpt_yarn(source: Mapping[str, Any], *, factor: str, mscale: str) -> RopeScaling:
    """GPTModel's YaRN (``position_embedding_type: yarn``): Megatron-Bridge names its settings
    ``yarn_*`` (TransformerConfig), Megatron-LM's args ``rotary_scaling_factor`` / ``mscale``."""
    params: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": float(source.get(factor) or 1.0),
        "original_max_position_embeddings": int(source.get("yarn_original_max_position_embeddings") or 4096),
        "beta_fast": float(source.get("yarn_beta_fast") or 32.0),
        "beta_slow": float(source.get("yarn_beta_slow") or 1.0),
        "truncate": bool(source.get("yarn_correction_range_round_to_int", True)),
    }
    for name, key in (("mscale", mscale), ("mscale_all_dim", f"{mscale}_all_dim")):
        if source.get(key) is not None:
            params[name] = float(source[key])
    return RopeScaling("yarn", params)


def _mla_yarn(source: Mapping[str, Any]) -> RopeScaling:
    if float(source.get("rotary_scaling_factor") or 1.0) == 1.0 and float(source.get("mscale") or 1.0) == float(
        source.get("mscale_all_dim") or 1.0
    ):
        return RopeScaling()  # YaRN of factor 1 with equal mscales: the plain rotation
    return RopeScaling(
        "yarn",
        {
            "type": "yarn",
            "factor": float(source.get("rotary_scaling_factor") or 1.0),
            "mscale": float(source.get("mscale") or 1.0),
            "mscale_all_dim": float(source.get("mscale_all_dim") or 0.0),
            "original_max_position_embeddings": int(source.get("original_max_position_embeddings") or 4096),
            "beta_fast": source.get("beta_fast", 32),
            "beta_slow": source.get("beta_slow", 1),
        },
    )


def hf_config_for(
    family: str,
    values: dict[str, Any],
    activation: str,
    rope: RopeScaling,
    where: str,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The HF config dict ``family``'s bridge writes for these Megatron values, completed with
    the family's own fields from ``source`` (the run config's model section, or ``vars(args)``)."""
    from bridgegen.plan.bridges import all_bridges, bridge_for_family

    bridge = bridge_for_family(family)
    if bridge is None:
        known = ", ".join(sorted(b.family for b in all_bridges()))
        raise ConfigError(f"unknown family {family!r}; known: {known}")
    if isinstance(values.get("moe_layer_freq"), int) and values.get("num_moe_experts"):
        freq = int(values["moe_layer_freq"])
        values["moe_layer_freq"] = [1 if i % freq == 0 else 0 for i in range(int(values["num_layers"]))]
    if source is not None:
        # The family's own Megatron fields (GPT-OSS's clamp, offset, softmax type, window
        # pattern, ...), under the names megatron-core's TransformerConfig gives them, which
        # Megatron-Bridge's run config and Megatron-LM's args share.
        read = set(bridge.to_megatron_config(bridge.example_hf_config()).values) | set(bridge.extra_fields)
        for name in sorted(read - set(values)):
            if name in source and (source[name] is not None or name in NULL_MEANS_NONE):
                values[name] = source[name]
    skip = values.get("window_attn_skip_freq")
    if isinstance(skip, int) and not isinstance(skip, bool):
        # megatron-core: layer n (from 1) has the window unless n % freq == 0
        # (transformer/utils.py is_layer_window_attention); as the per-layer list the bridges use.
        values["window_attn_skip_freq"] = [int((i + 1) % skip != 0) for i in range(int(values["num_layers"]))]
    config = MegatronConfig(
        family=family,
        megatron_model="mla" if values.get("multi_latent_attention") else "gpt",
        values=values,
        activation=activation,
        rope=rope,
    )
    try:
        return dict(bridge.to_hf_config(config))
    except (KeyError, ConfigError) as exc:
        raise ConfigError(
            f"{where}: the {family} bridge cannot describe this model from the checkpoint's config "
            f"({exc}); pass --hf-config with the HF config folder instead"
        ) from None
