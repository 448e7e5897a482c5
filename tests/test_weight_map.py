"""Matching Megatron parameter names to spec rules: plain and Transformer Engine names,
grouped-GEMM expert names, layer and expert offsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bridgegen.generated import Qwen3MoeBridge

from bridgegen.bridge.errors import WeightError
from bridgegen.plan.weight_map import WeightMap

REFERENCE = Path(__file__).resolve().parent / "data" / "hf_configs"
QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 250,
    "max_position_embeddings": 256,
    "hidden_act": "silu",
}


@pytest.fixture
def weight_map() -> WeightMap:
    config = Qwen3MoeBridge.to_megatron_config(QWEN3_MOE)
    return WeightMap(Qwen3MoeBridge.weight_rules, config, Qwen3MoeBridge.hf_ignore)


@pytest.mark.parametrize(
    ("megatron_name", "hf_names"),
    [
        ("decoder.layers.1.input_layernorm.weight", ("model.layers.3.input_layernorm.weight",)),
        # Transformer Engine fuses the pre-attention / pre-MLP norms into the next linear layer.
        (
            "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
            ("model.layers.3.input_layernorm.weight",),
        ),
        (
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
            ("model.layers.2.post_attention_layernorm.weight",),
        ),
        (
            "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight",
            ("model.layers.2.mlp.experts.3.gate_proj.weight", "model.layers.2.mlp.experts.3.up_proj.weight"),
        ),
        # Grouped GEMM keeps one tensor per expert with the expert number as a suffix.
        (
            "decoder.layers.0.mlp.experts.linear_fc2.weight1",
            ("model.layers.2.mlp.experts.3.down_proj.weight",),
        ),
    ],
)
def test_names_match_with_layer_and_expert_offsets(
    weight_map: WeightMap, megatron_name: str, hf_names: tuple[str, ...]
) -> None:
    # A second pipeline stage starting at layer 2, and the second of two EP ranks (experts 2-3).
    matched = weight_map.match(megatron_name, layer_offset=2, expert_offset=2)
    assert matched.hf_names() == hf_names


def test_unknown_megatron_name_is_an_error(weight_map: WeightMap) -> None:
    with pytest.raises(
        WeightError, match=r"Megatron tensor 'decoder\.layers\.0\.mlp\.foo\.weight' has no rule"
    ):
        weight_map.match("decoder.layers.0.mlp.foo.weight")


def test_rotary_buffers_of_old_checkpoints_are_ignored(weight_map: WeightMap) -> None:
    assert weight_map.ignored("model.layers.7.self_attn.rotary_emb.inv_freq")
    assert not weight_map.ignored("model.layers.7.self_attn.q_proj.weight")


def test_deepseek_v3_mtp_layers_are_ignored_only_when_left_out() -> None:
    from bridgegen.engines.model import ModelBridge

    config = json.loads((REFERENCE / "DeepSeek-V3.json").read_text())
    bridge = ModelBridge.from_hf_config(config)
    assert not bridge.weight_map().ignored("model.layers.61.eh_proj.weight")
    assert bridge.without_mtp().weight_map().ignored("model.layers.61.eh_proj.weight")
    assert not bridge.without_mtp().weight_map().ignored("model.layers.60.self_attn.q_a_proj.weight")
