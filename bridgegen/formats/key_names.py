"""Checkpoint key names: which name each norm weight is saved under.

A Megatron distributed checkpoint is keyed by the model's ``sharded_state_dict()`` names, and
those depend on the layer spec that built the model. Megatron-LM and Megatron-Bridge train with
the Transformer Engine spec, whose fused modules hold some norms (megatron-core 0.16-0.19,
``gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec``):

- GPT attention: the input norm lives in ``self_attention.linear_qkv`` (``layer_norm_weight``);
- dense MLP: the pre-MLP norm lives in ``mlp.linear_fc1``;
- MoE layer: a separate ``pre_mlp_layernorm`` (experts have no fused norm);
- latent attention (MLA): ``input_layernorm`` stays separate, the q / kv norms live in
  ``linear_q_up_proj`` / ``linear_kv_up_proj``.

The plain ("local") spec saves its separate norms under the fused names for GPT attention and
every MLP, MoE included, and keeps MLA's norms separate
(``get_gpt_layer_local_spec``). We build models from the plain spec (it runs without Transformer
Engine) and give each layer the key map of the style the checkpoint should have (``megatron.build.use_key_names``), so saving and
loading both speak that style.

Gemma 2 / 3 post norms are not in megatron-core; Megatron-Bridge saves them inside the linear
layer they follow (``self_attention.linear_proj.post_layernorm``, ``mlp.linear_fc2.post_layernorm``),
and so do we, in either style.
"""

from __future__ import annotations

from bridgegen.plan.conversion import KeyNames

POST_NORM_KEYS = {
    "post_self_attn_layernorm.": "self_attention.linear_proj.post_layernorm.",
    "post_mlp_layernorm.": "mlp.linear_fc2.post_layernorm.",
}


def layer_key_map(style: KeyNames, *, latent_attention: bool, moe: bool) -> dict[str, str]:
    """Module-prefix renames for one transformer layer's checkpoint keys."""
    mapping: dict[str, str] = {}
    if latent_attention:
        if style is KeyNames.te:
            mapping["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
            mapping["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
            if not moe:
                mapping["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    else:
        mapping["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
        if style is KeyNames.local or not moe:
            mapping["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    mapping.update(POST_NORM_KEYS)
    return mapping


def detect_key_names(keys: set[str]) -> KeyNames:
    """The style a checkpoint was saved in, from its keys: only the Transformer Engine spec
    saves a layer with both an attention input norm fused into ``linear_qkv`` and a separate
    ``pre_mlp_layernorm`` (MoE), or MLA q / kv norms inside the up projections."""
    te_only = (".linear_q_up_proj.layer_norm_weight", ".linear_kv_up_proj.layer_norm_weight")
    if any(key.endswith(te_only) for key in keys):
        return KeyNames.te
    fused_input = any(key.endswith(".self_attention.linear_qkv.layer_norm_weight") for key in keys)
    separate_pre_mlp = any(key.endswith(".pre_mlp_layernorm.weight") for key in keys)
    return KeyNames.te if fused_input and separate_pre_mlp else KeyNames.local
