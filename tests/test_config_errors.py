"""Config conversion errors: the exact text a user sees for each config we cannot convert.

Each message names the file (the ``source`` argument), the field at fault and the bridge. The
configs are built in place (Llama-3.1-8B / Qwen2-7B / DeepSeek-V3 field sets), so these tests
do not need the shared reference files.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
from bridgegen.generated import (
    BRIDGES,
    DeepseekV3Bridge,
    Gemma3Bridge,
    LlamaBridge,
    Qwen2Bridge,
    bridge_for_config,
)

from bridgegen.bridge.errors import BridgeError, ConfigError, UnsupportedModelError

# Every architecture of every built-in bridge, sorted.
SUPPORTED_ARCHITECTURES = ", ".join(sorted(a for bridge in BRIDGES for a in bridge.architectures))


def llama_3_1_8b() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "vocab_size": 128256,
    }


def qwen2_7b() -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "vocab_size": 152064,
    }


def deepseek_v3() -> dict[str, Any]:
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "first_k_dense_replace": 3,
        "hidden_act": "silu",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "v_head_dim": 128,
        "vocab_size": 129280,
    }


def raises_exactly(error: type[Exception], message: str) -> Any:
    """pytest.raises that requires the whole message, not a substring."""
    return pytest.raises(error, match=f"^{re.escape(message)}$")


def test_the_base_configs_convert() -> None:
    """The configs below fail only because of the one field each test changes."""
    assert LlamaBridge.to_megatron_config(llama_3_1_8b()).value("hidden_size") == 4096
    assert Qwen2Bridge.to_megatron_config(qwen2_7b()).value("add_qkv_bias") is True
    assert DeepseekV3Bridge.to_megatron_config(deepseek_v3()).value("num_moe_experts") == 256


def test_error_classes() -> None:
    assert issubclass(ConfigError, BridgeError) and issubclass(ConfigError, ValueError)
    assert issubclass(UnsupportedModelError, BridgeError) and issubclass(UnsupportedModelError, LookupError)


# --------------------------------------------------------------------------- activation


def test_unknown_activation() -> None:
    config = llama_3_1_8b() | {"hidden_act": "swishy"}
    with raises_exactly(
        ConfigError,
        "Llama-3.1-8B/config.json: hidden_act 'swishy' is not a known activation for the llama bridge; "
        "known: gelu, gelu_pytorch_tanh, quick_gelu, relu, relu2, silu",
    ):
        LlamaBridge.to_megatron_config(config, source="Llama-3.1-8B/config.json")


def test_missing_activation_is_a_missing_field() -> None:
    config = llama_3_1_8b()
    del config["hidden_act"]
    with raises_exactly(
        ConfigError, "config.json: field 'hidden_act' is required by the llama bridge but missing"
    ):
        LlamaBridge.to_megatron_config(config)


def test_export_without_an_hf_activation_name() -> None:
    megatron = LlamaBridge.to_megatron_config(llama_3_1_8b())
    with raises_exactly(ConfigError, "llama: no HF activation name for Megatron activation 'tanh'"):
        LlamaBridge.to_hf_config(dataclasses.replace(megatron, activation="tanh", hf_activation=""))


def test_unknown_megatron_activation(megatron_transformer_config: Callable[..., Any]) -> None:
    megatron = LlamaBridge.to_megatron_config(llama_3_1_8b())
    with raises_exactly(
        ConfigError,
        "unknown Megatron activation 'tanh'; known: gelu, gelu_tanh, module, quick_gelu, relu, silu, squared_relu",
    ):
        megatron_transformer_config(dataclasses.replace(megatron, activation="tanh"))


# --------------------------------------------------------------------------- RoPE


def test_rope_type_not_supported_by_the_family() -> None:
    config = qwen2_7b() | {"rope_scaling": llama_3_1_8b()["rope_scaling"]}
    with raises_exactly(
        ConfigError,
        "config.json: rope_scaling type 'llama3' is not supported by the qwen2 bridge; "
        "supported: default, linear, dynamic, yarn",
    ):
        Qwen2Bridge.to_megatron_config(config)


def test_made_up_rope_type() -> None:
    config = llama_3_1_8b() | {"rope_scaling": {"rope_type": "spiral", "factor": 2.0}}
    with raises_exactly(
        ConfigError,
        "config.json: rope_scaling type 'spiral' is unknown; "
        "known types: default, dynamic, linear, llama3, longrope, yarn",
    ):
        LlamaBridge.to_megatron_config(config)


def test_rope_scaling_without_a_type() -> None:
    config = llama_3_1_8b() | {"rope_scaling": {"factor": 2.0}}
    with raises_exactly(ConfigError, "config.json: 'rope_scaling' has neither 'rope_type' nor 'type'"):
        LlamaBridge.to_megatron_config(config)


def test_rope_scaling_that_is_not_a_mapping() -> None:
    config = llama_3_1_8b() | {"rope_scaling": "llama3"}
    with raises_exactly(ConfigError, "config.json: 'rope_scaling' must be a mapping, got 'llama3'"):
        LlamaBridge.to_megatron_config(config)


def test_rope_scaling_missing_parameters() -> None:
    config = llama_3_1_8b() | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with raises_exactly(
        ConfigError,
        "config.json: rope_scaling type 'llama3' lacks low_freq_factor, high_freq_factor, "
        "original_max_position_embeddings",
    ):
        LlamaBridge.to_megatron_config(config)


def test_rope_type_without_megatron_equivalent(megatron_transformer_config: Callable[..., Any]) -> None:
    import dataclasses

    from bridgegen.bridge.rope import RopeScaling

    megatron = LlamaBridge.to_megatron_config(llama_3_1_8b())
    longrope = RopeScaling("longrope", {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]})
    with raises_exactly(ConfigError, "llama: RoPE type 'longrope' has no megatron-core equivalent yet"):
        megatron_transformer_config(dataclasses.replace(megatron, rope=longrope))


def test_rope_errors_name_the_source_file() -> None:
    config = qwen2_7b() | {"rope_scaling": llama_3_1_8b()["rope_scaling"]}
    with pytest.raises(ConfigError) as info:
        Qwen2Bridge.to_megatron_config(config, source="Qwen2-7B/config.json")
    assert str(info.value).startswith("Qwen2-7B/config.json: ")


# --------------------------------------------------------------------------- fields and checks


def test_missing_required_field() -> None:
    config = llama_3_1_8b()
    del config["hidden_size"]
    with raises_exactly(
        ConfigError,
        "Llama-3.1-8B/config.json: field 'hidden_size' is required by the llama bridge but missing",
    ):
        LlamaBridge.to_megatron_config(config, source="Llama-3.1-8B/config.json")


def test_null_required_field_is_missing() -> None:
    config = llama_3_1_8b() | {"hidden_size": None}
    with raises_exactly(
        ConfigError, "config.json: field 'hidden_size' is required by the llama bridge but missing"
    ):
        LlamaBridge.to_megatron_config(config)


def test_qwen2_sliding_window_is_rejected() -> None:
    config = qwen2_7b() | {"use_sliding_window": True}
    with raises_exactly(
        ConfigError,
        "Qwen2-7B/config.json: use_sliding_window is true; sliding windows on Qwen2's upper layers "
        "(max_window_layers) are not supported (the qwen2 bridge cannot convert this config)",
    ):
        Qwen2Bridge.to_megatron_config(config, source="Qwen2-7B/config.json")


def test_deepseek_moe_layer_freq_other_than_one() -> None:
    config = deepseek_v3() | {"moe_layer_freq": 2}
    with raises_exactly(
        ConfigError,
        "DeepSeek-V3/config.json: moe_layer_freq other than 1 is not supported "
        "(the deepseek_v3 bridge cannot convert this config)",
    ):
        DeepseekV3Bridge.to_megatron_config(config, source="DeepSeek-V3/config.json")


def test_deepseek_attention_bias() -> None:
    config = deepseek_v3() | {"attention_bias": True}
    with raises_exactly(
        ConfigError,
        "config.json: attention_bias is true; MLA projections with bias are not supported "
        "(the deepseek_v3 bridge cannot convert this config)",
    ):
        DeepseekV3Bridge.to_megatron_config(config)


def test_llama_mlp_bias_without_attention_bias() -> None:
    """HF Llama biases the MLP alone; megatron-core biases every linear layer or q, k, v only."""
    with raises_exactly(
        ConfigError,
        "Llama/config.json: attention_bias and mlp_bias differ; megatron-core biases every linear layer "
        "(add_bias_linear) or q, k and v only (add_qkv_bias), not HF Llama's q, k, v and o projections "
        "alone (attention_bias) nor its MLP alone (mlp_bias) (the llama bridge cannot convert this config)",
    ):
        LlamaBridge.to_megatron_config(llama_3_1_8b() | {"mlp_bias": True}, source="Llama/config.json")


def test_deepseek_v3_rope_interleave_false() -> None:
    with raises_exactly(
        ConfigError,
        "config.json: 'rope_interleave' is false; the deepseek_v3 bridge supports only true "
        "(megatron-core's multi-latent attention reads the rope dimensions as interleaved pairs)",
    ):
        DeepseekV3Bridge.to_megatron_config(deepseek_v3() | {"rope_interleave": False})


def test_nested_config_missing() -> None:
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}
    with raises_exactly(
        ConfigError,
        "gemma-3-4b-it/config.json: Gemma3ForConditionalGeneration keeps its language model config "
        "in 'text_config', which is missing",
    ):
        Gemma3Bridge.to_megatron_config(config, source="gemma-3-4b-it/config.json")


def test_megatron_core_rejection_is_a_config_error(megatron_transformer_config: Callable[..., Any]) -> None:
    megatron = LlamaBridge.to_megatron_config(llama_3_1_8b())
    with pytest.raises(ConfigError, match=r"^llama: megatron-core rejects the converted config: .*\S"):
        megatron_transformer_config(megatron, tensor_parallel_size=3)  # 32 heads over 3 ranks


def test_unset_megatron_field() -> None:
    megatron = LlamaBridge.to_megatron_config(llama_3_1_8b())
    with raises_exactly(ConfigError, "llama: Megatron field 'moe_router_topk' is not set"):
        megatron.value("moe_router_topk")


# --------------------------------------------------------------------------- which bridge


def test_architectures_not_served_by_the_bridge() -> None:
    with raises_exactly(
        ConfigError,
        "Qwen2-7B/config.json: architectures ['Qwen2ForCausalLM'] are not served by the llama bridge "
        "(it serves LlamaForCausalLM)",
    ):
        LlamaBridge.to_megatron_config(qwen2_7b(), source="Qwen2-7B/config.json")


def test_model_type_not_served_by_the_bridge() -> None:
    config = llama_3_1_8b() | {"model_type": "qwen2"}
    with raises_exactly(
        ConfigError, "config.json: model_type 'qwen2' is not served by the llama bridge (it serves llama)"
    ):
        LlamaBridge.to_megatron_config(config)


def test_bridge_for_unsupported_architecture_lists_supported_ones() -> None:
    with raises_exactly(
        UnsupportedModelError,
        f"no bridge for architectures ['PhiForCausalLM'] / model_type 'phi'; "
        f"supported architectures: {SUPPORTED_ARCHITECTURES}",
    ):
        bridge_for_config({"architectures": ["PhiForCausalLM"], "model_type": "phi"})


def test_bridge_for_config_without_architecture_or_model_type() -> None:
    with raises_exactly(
        UnsupportedModelError,
        f"no bridge for architectures [] / model_type None; supported architectures: {SUPPORTED_ARCHITECTURES}",
    ):
        bridge_for_config({"hidden_size": 64})


def test_export_with_another_familys_bridge() -> None:
    megatron = LlamaBridge.to_megatron_config(llama_3_1_8b())
    with raises_exactly(ConfigError, "a llama config cannot be exported by the qwen2 bridge"):
        Qwen2Bridge.to_hf_config(megatron)
