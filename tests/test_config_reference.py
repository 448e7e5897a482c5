"""Config conversion on real published Hugging Face configs.

The configs are copies of published ones, in ``tests/data/hf_configs``. For every one of them:
HF -> Megatron -> HF keeps every field, transformers accepts the export, megatron-core accepts the Megatron side, and the Megatron
values are the right ones for the architecture. Moonlight, Kimi K2, the Gemma 3 multimodal
wrapper and transformers-5 shaped configs are built from those files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transformers
import yaml
from bridgegen.generated import (
    BRIDGES,
    DeepseekV2Bridge,
    DeepseekV3Bridge,
    Gemma3Bridge,
    LlamaBridge,
    bridge_for_config,
)

from bridgegen.bridge.base import Bridge
from bridgegen.bridge.config import HF_VOLATILE_FIELDS, MODEL_FIELDS, MegatronConfig
from bridgegen.bridge.errors import ConfigError
from bridgegen.bridge.rope import MEGATRON_LLAMA3_CONSTANTS

# Published configs, copied into the repository (tests/data/hf_configs/SOURCES.tsv says where from).
REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT / "tests" / "data" / "hf_configs"

# Every published config in tests/data/hf_configs and the bridge family that serves it.
EXPECTED_FAMILY = {
    "DeepSeek-V2-Lite": "deepseek_v2",
    "DeepSeek-V3": "deepseek_v3",
    "Llama-2-7b-hf": "llama",
    "Llama-3.1-8B": "llama",
    "Llama-3.2-1B-Instruct": "llama",
    "Mistral-7B-v0.1": "mistral",
    "Qwen2-7B": "qwen2",
    "Qwen3-0.6B": "qwen3",
    "Qwen3-1.7B": "qwen3",
    "Qwen3-30B-A3B": "qwen3_moe",
    "Qwen3-8B": "qwen3",
    "gemma-2-2b": "gemma2",
    "gemma-3-1b-it": "gemma3",
    "gemma-7b": "gemma",
}
# Reference configs that say `"rope_scaling": null` explicitly (their own round-trip test below).
NULL_ROPE_REFERENCES = (
    "Llama-2-7b-hf",
    "Qwen3-0.6B",
    "Qwen3-1.7B",
    "Qwen3-8B",
    "Qwen3-30B-A3B",
    "gemma-3-1b-it",
    "gemma-7b",
)


def _reference_names() -> list[str]:
    return sorted(path.stem for path in REFERENCE_DIR.glob("*.json"))


REFERENCE_NAMES = _reference_names()


def reference_config(name: str) -> dict[str, Any]:
    """A fresh copy of one published config."""
    path = REFERENCE_DIR / f"{name}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def convert(hf_config: dict[str, Any], source: str = "config.json") -> tuple[type[Bridge], MegatronConfig]:
    bridge = bridge_for_config(hf_config)
    return bridge, bridge.to_megatron_config(copy.deepcopy(hf_config), source=source)


def round_trip(hf_config: dict[str, Any]) -> tuple[type[Bridge], MegatronConfig, dict[str, Any]]:
    bridge, megatron = convert(hf_config)
    return bridge, megatron, bridge.to_hf_config(megatron)


def null_rope_keys(hf_config: dict[str, Any]) -> tuple[str, ...]:
    """``rope_scaling`` when the source says null explicitly (checked by its own tests instead)."""
    return ("rope_scaling",) if "rope_scaling" in hf_config and hf_config["rope_scaling"] is None else ()


def assert_keeps_fields(
    bridge: type[Bridge],
    source: dict[str, Any],
    exported: dict[str, Any],
    *,
    root: str | None = None,
    ignore: tuple[str, ...] = (),
) -> None:
    """Every source key (bar volatile ones) and every present hf_field comes back equal."""
    missing = object()
    changed = {
        key: (value, exported.get(key, "<missing>"))
        for key, value in source.items()
        if key not in HF_VOLATILE_FIELDS and key not in ignore and exported.get(key, missing) != value
    }
    assert changed == {}, f"fields changed or lost by HF -> Megatron -> HF (source, export): {changed}"
    for name in bridge.hf_fields:
        top = root is None or name in ("architectures", "model_type")
        fields_in = source if top else source[root]
        fields_out = exported if top else exported[root]
        if name in fields_in and name not in ignore:
            assert fields_out.get(name, missing) == fields_in[name], name


def auto_config(exported: dict[str, Any]) -> Any:
    rest = dict(exported)
    model_type = rest.pop("model_type")
    if model_type == "kimi_k2":
        # transformers has no kimi_k2 config class (Kimi K2 ships remote code whose config is
        # DeepseekV3Config); the same fields are checked with deepseek_v3 instead.
        model_type = "deepseek_v3"
    return transformers.AutoConfig.for_model(model_type, **rest)


def flat_rope_parameters(config: Any) -> dict[str, Any]:
    params = dict(config.rope_parameters)
    return dict(params["full_attention"]) if "full_attention" in params else params


def mla_rope(megatron: MegatronConfig) -> dict[str, Any]:
    return megatron.rope.megatron_mla_settings()


def spec_extra_fields() -> set[str]:
    """Megatron names the specs declare as bridge-level extras (not megatron-core fields),
    directly or as the fields their runtime modules read."""
    names: set[str] = set()
    for path in (REPO_ROOT / "specs").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text()) or {}
        names.update((spec.get("config") or {}).get("extra_fields") or [])
        for bindings in (spec.get("runtime_modules") or {}).values():
            names.update((bindings or {}).values())
    return names


# --------------------------------------------------------------------------- every reference config


def test_reference_set_is_complete() -> None:
    assert set(EXPECTED_FAMILY) == {path.stem for path in REFERENCE_DIR.glob("*.json")}


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_reference_round_trip_keeps_every_field(name: str) -> None:
    source = reference_config(name)
    bridge, megatron, exported = round_trip(source)
    assert bridge.family == EXPECTED_FAMILY[name]
    assert megatron.hf_architecture == source["architectures"][0]
    assert exported["architectures"] == source["architectures"]
    assert exported["model_type"] == source["model_type"]
    assert_keeps_fields(bridge, source, exported, ignore=null_rope_keys(source))
    # Through JSON too: MegatronConfig is saved next to Megatron checkpoints.
    again = MegatronConfig.from_json(megatron.to_json())
    assert bridge.to_hf_config(again) == exported


def test_null_rope_references_are_those_with_explicit_null() -> None:
    explicit_null = {
        path.stem for path in REFERENCE_DIR.glob("*.json") if null_rope_keys(json.loads(path.read_text()))
    }
    assert explicit_null == set(NULL_ROPE_REFERENCES)


@pytest.mark.parametrize("name", NULL_ROPE_REFERENCES)
def test_reference_round_trip_keeps_explicit_null_rope_scaling(name: str) -> None:
    source = reference_config(name)
    assert source["rope_scaling"] is None
    _, _, exported = round_trip(source)
    assert "rope_scaling" in exported
    assert exported["rope_scaling"] is None


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_reference_export_is_accepted_by_transformers(name: str) -> None:
    _, _, exported = round_trip(reference_config(name))
    config = auto_config(exported)
    assert type(config).model_type == exported["model_type"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        assert getattr(config, key) == exported[key], key
    rope = flat_rope_parameters(config)
    assert rope["rope_theta"] == exported["rope_theta"]
    expected_type = (exported.get("rope_scaling") or {}).get("rope_type") or (
        exported.get("rope_scaling") or {}
    ).get("type", "default")
    assert rope["rope_type"] == expected_type


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_reference_megatron_core_config_constructs(
    name: str, megatron_transformer_config: Callable[..., Any]
) -> None:
    _, megatron = convert(reference_config(name))
    built = megatron_transformer_config(megatron)
    expected_class = "MLATransformerConfig" if megatron.megatron_model == "mla" else "TransformerConfig"
    assert type(built).__name__ == expected_class
    field_names = {f.name for f in dataclasses.fields(built)}
    for key, value in megatron.values.items():
        if key in field_names:
            got = getattr(built, key)
            if key == "moe_layer_freq" and value == [1] * len(value):
                value = 1  # all MoE: stacked checkpoint keys need the int form
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    # A value that is neither a megatron-core field, a GPTModel argument nor a declared extra
    # would be dropped silently by MegatronConfig.transformer_values (a misspelt name, say).
    unknown = set(megatron.values) - field_names - MODEL_FIELDS - spec_extra_fields()
    assert unknown == set()


# --------------------------------------------------------------------------- values per architecture


def test_qwen3_30b_a3b_values(megatron_transformer_config: Callable[..., Any]) -> None:
    _, m = convert(reference_config("Qwen3-30B-A3B"))
    assert m.megatron_model == "gpt"
    assert m.value("num_moe_experts") == 128
    assert m.value("moe_router_topk") == 8
    assert m.value("moe_ffn_hidden_size") == 768
    assert m.value("ffn_hidden_size") == 6144
    assert m.value("kv_channels") == 128  # head_dim, not 2048 // 32 = 64
    assert m.value("num_attention_heads") == 32
    assert m.value("num_query_groups") == 4
    assert m.value("num_layers") == 48
    assert m.value("hidden_size") == 2048
    assert m.value("qk_layernorm") is True
    assert m.value("moe_layer_freq") == [1] * 48
    # norm_topk_prob true: softmax over the top 8 logits == softmax-all, top 8, renormalise.
    assert m.value("moe_router_pre_softmax") is False
    assert m.value("moe_router_score_function") == "softmax"
    assert m.value("moe_router_load_balancing_type") == "aux_loss"
    assert m.value("moe_aux_loss_coeff") == 0.001
    assert "moe_shared_expert_intermediate_size" not in m.values
    assert m.value("add_bias_linear") is False and "add_qkv_bias" not in m.values
    assert m.value("rotary_base") == 1_000_000.0
    assert m.value("share_embeddings_and_output_weights") is False
    assert m.activation == "silu"
    assert m.rope.rope_type == "default"
    built = megatron_transformer_config(m)
    assert built.num_moe_experts == 128
    # Every layer MoE: an int frequency, so megatron-core stacks the layers' checkpoint keys as
    # Megatron-LM (--moe-layer-freq 1) and Megatron-Bridge do.
    assert built.moe_layer_freq == 1


def test_deepseek_v3_values(megatron_transformer_config: Callable[..., Any]) -> None:
    bridge, m = convert(reference_config("DeepSeek-V3"))
    assert bridge is DeepseekV3Bridge
    assert m.megatron_model == "mla"
    assert m.value("multi_latent_attention") is True
    assert m.value("q_lora_rank") == 1536
    assert m.value("kv_lora_rank") == 512
    assert m.value("qk_head_dim") == 128
    assert m.value("qk_pos_emb_head_dim") == 64
    assert m.value("v_head_dim") == 128
    assert m.value("num_attention_heads") == 128
    assert m.value("num_layers") == 61
    assert m.value("hidden_size") == 7168
    assert m.value("ffn_hidden_size") == 18432
    assert m.value("num_moe_experts") == 256
    assert m.value("moe_router_topk") == 8
    assert m.value("moe_ffn_hidden_size") == 2048
    assert m.value("moe_layer_freq")[:3] == [0, 0, 0]
    assert m.value("moe_layer_freq")[3:] == [1] * 58
    assert m.value("moe_shared_expert_intermediate_size") == 2048
    assert m.value("moe_router_score_function") == "sigmoid"
    assert m.value("moe_router_enable_expert_bias") is True
    assert m.value("moe_router_num_groups") == 8
    assert m.value("moe_router_group_topk") == 4
    assert m.value("moe_router_topk_scaling_factor") == 2.5
    assert m.value("moe_router_pre_softmax") is False
    assert m.value("mtp_num_layers") == 1
    assert m.value("vocab_size") == 129280
    assert m.activation == "silu"
    assert m.rope.rope_type == "yarn"
    assert mla_rope(m) == {
        "rope_type": "yarn",
        "rotary_scaling_factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    built = megatron_transformer_config(m)
    assert type(built).__name__ == "MLATransformerConfig"
    assert built.rope_type == "yarn"
    assert built.rotary_scaling_factor == 40.0
    assert built.mscale == 1.0
    assert built.mscale_all_dim == 1.0
    assert built.original_max_position_embeddings == 4096
    assert built.beta_fast == 32
    assert built.beta_slow == 1
    assert built.rotary_base == 10000
    assert built.q_lora_rank == 1536
    assert built.mtp_num_layers == 1


def test_deepseek_v2_lite_values(megatron_transformer_config: Callable[..., Any]) -> None:
    bridge, m = convert(reference_config("DeepSeek-V2-Lite"))
    assert bridge is DeepseekV2Bridge
    assert m.value("q_lora_rank") is None
    assert m.value("kv_lora_rank") == 512
    assert m.value("qk_head_dim") == 128
    assert m.value("qk_pos_emb_head_dim") == 64
    assert m.value("num_moe_experts") == 64
    assert m.value("moe_router_topk") == 6
    assert m.value("moe_ffn_hidden_size") == 1408
    assert m.value("moe_shared_expert_intermediate_size") == 2 * 1408
    assert m.value("moe_layer_freq") == [0] + [1] * 26
    assert m.value("moe_router_score_function") == "softmax"
    assert m.value("moe_router_enable_expert_bias") is False
    assert m.value("moe_router_num_groups") is None
    assert m.value("moe_router_group_topk") is None
    # norm_topk_prob false: softmax over all experts, then the top 6 without renormalising.
    assert m.value("moe_router_pre_softmax") is True
    assert m.value("moe_router_topk_scaling_factor") == 1.0
    assert m.value("moe_router_load_balancing_type") == "seq_aux_loss"
    assert "mtp_num_layers" not in m.values
    assert mla_rope(m)["rotary_scaling_factor"] == 40.0
    built = megatron_transformer_config(m)
    assert built.q_lora_rank is None  # not MLATransformerConfig's default 512
    assert built.rope_type == "yarn"
    assert built.mscale == 0.707
    assert built.mscale_all_dim == 0.707


def test_llama_3_1_8b_values() -> None:
    source = reference_config("Llama-3.1-8B")
    _, m = convert(source)
    assert m.rope.rope_type == "llama3"
    assert m.value("rotary_base") == 500000.0
    assert m.value("num_query_groups") == 8
    assert m.value("kv_channels") == 128
    assert m.value("ffn_hidden_size") == 14336
    assert m.value("layernorm_epsilon") == 1e-05
    assert m.value("add_bias_linear") is False and "add_qkv_bias" not in m.values
    assert m.model_values() == {
        "vocab_size": 128256,
        "max_sequence_length": 131072,
        "position_embedding_type": "rope",
        "rotary_base": 500000.0,
        "share_embeddings_and_output_weights": False,
        "rope_scaling": True,
        "rope_scaling_factor": 8.0,
    }
    exported = LlamaBridge.to_hf_config(m)
    assert exported["rope_scaling"] == source["rope_scaling"]
    assert exported["rope_scaling"]["low_freq_factor"] == 1.0
    assert exported["rope_scaling"]["high_freq_factor"] == 4.0
    assert exported["rope_scaling"]["original_max_position_embeddings"] == 8192
    # megatron-core's llama3 scaling hard-codes these; only then is rope_scaling=True exact.
    assert {k: m.rope.param(k) for k in MEGATRON_LLAMA3_CONSTANTS} == MEGATRON_LLAMA3_CONSTANTS


def test_llama_3_2_1b_values() -> None:
    _, m = convert(reference_config("Llama-3.2-1B-Instruct"))
    assert m.model_values()["rope_scaling"] is True
    assert m.model_values()["rope_scaling_factor"] == 32.0
    assert m.value("share_embeddings_and_output_weights") is True
    assert m.value("kv_channels") == 64
    assert m.value("num_query_groups") == 8
    assert m.value("num_layers") == 16
    assert m.value("rotary_base") == 500000.0


def test_llama_2_values() -> None:
    _, m = convert(reference_config("Llama-2-7b-hf"))
    assert m.rope.rope_type == "default"
    assert "rope_scaling" not in m.model_values()
    assert m.value("rotary_base") == 10000.0  # absent from the file: HF's default
    assert m.value("num_query_groups") == 32
    assert m.value("kv_channels") == 128
    assert m.value("layernorm_epsilon") == 1e-05


def test_mistral_values(megatron_transformer_config: Callable[..., Any]) -> None:
    _, m = convert(reference_config("Mistral-7B-v0.1"))
    # HF attends to the last 4096 tokens including the current one: 4095 to the left.
    assert m.value("window_size") == [4095, 0]
    assert "window_attn_skip_freq" not in m.values  # every layer uses the window
    assert m.value("num_query_groups") == 8
    assert m.value("kv_channels") == 128
    assert m.value("max_sequence_length") == 32768
    built = megatron_transformer_config(m)
    assert tuple(built.window_size) == (4095, 0)
    assert built.window_attn_skip_freq is None


def test_qwen2_values(megatron_transformer_config: Callable[..., Any]) -> None:
    _, m = convert(reference_config("Qwen2-7B"))
    assert m.value("add_qkv_bias") is True
    assert m.value("num_query_groups") == 4
    assert m.value("kv_channels") == 3584 // 28
    assert m.value("rotary_base") == 1_000_000.0
    assert "window_size" not in m.values  # use_sliding_window false
    assert megatron_transformer_config(m).add_qkv_bias is True


@pytest.mark.parametrize(
    ("name", "hidden", "kv_channels", "tied"),
    [("Qwen3-0.6B", 1024, 128, True), ("Qwen3-1.7B", 2048, 128, True), ("Qwen3-8B", 4096, 128, False)],
)
def test_qwen3_dense_values(name: str, hidden: int, kv_channels: int, tied: bool) -> None:
    _, m = convert(reference_config(name))
    assert m.value("hidden_size") == hidden
    assert m.value("kv_channels") == kv_channels
    assert m.value("num_query_groups") == 8
    assert m.value("qk_layernorm") is True
    assert m.value("add_bias_linear") is False and "add_qkv_bias" not in m.values
    assert m.value("share_embeddings_and_output_weights") is tied
    assert m.value("rotary_base") == 1_000_000


def test_gemma_7b_values() -> None:
    source = reference_config("gemma-7b")
    assert "hidden_activation" not in source and source["hidden_act"] == "gelu"
    bridge, m = convert(source)
    assert m.value("kv_channels") == 256  # head_dim, not 3072 // 16 = 192
    assert m.value("num_query_groups") == 16
    # HF Gemma ignores the legacy hidden_act "gelu": hidden_activation defaults to the tanh GELU.
    assert m.activation == "gelu_tanh"
    assert m.hf_activation == "gelu_pytorch_tanh"
    assert m.value("share_embeddings_and_output_weights") is True
    assert m.value("layernorm_zero_centered_gamma") is True
    assert m.value("embedding_scale") == pytest.approx(math.sqrt(3072))
    assert m.value("add_bias_linear") is False and "add_qkv_bias" not in m.values
    exported = bridge.to_hf_config(m)
    assert exported["hidden_activation"] == "gelu_pytorch_tanh"
    assert exported["hidden_act"] == "gelu"


def test_gemma_2_2b_values(megatron_transformer_config: Callable[..., Any]) -> None:
    _, m = convert(reference_config("gemma-2-2b"))
    assert m.value("softmax_scale") == pytest.approx(256**-0.5)
    assert m.value("attn_logit_softcapping") == 50.0
    assert m.value("final_logit_softcapping") == 30.0
    assert m.value("window_size") == [4095, 0]
    # HF Gemma 2: layer i slides when i is even; Megatron: layer i+1 is global when (i+1) % 2 == 0.
    assert m.value("window_attn_skip_freq") == 2
    assert m.value("kv_channels") == 256
    assert m.value("num_query_groups") == 4
    assert m.value("embedding_scale") == pytest.approx(48.0)
    assert m.value("share_embeddings_and_output_weights") is True
    assert m.activation == "gelu_tanh"
    built = megatron_transformer_config(m)
    assert built.softmax_scale == pytest.approx(0.0625)
    assert built.window_attn_skip_freq == 2
    assert built.layernorm_zero_centered_gamma is True


def test_gemma_3_1b_values(megatron_transformer_config: Callable[..., Any]) -> None:
    _, m = convert(reference_config("gemma-3-1b-it"))
    # HF Gemma 3: layer i is global when (i + 1) % 6 == 0, as Megatron's skip frequency 6.
    assert m.value("window_attn_skip_freq") == 6
    assert m.value("window_size") == [511, 0]
    assert m.value("qk_layernorm") is True
    assert m.value("rotary_base") == 1_000_000
    assert m.value("rotary_base_local") == 10000
    assert m.value("softmax_scale") == pytest.approx(256**-0.5)
    assert m.value("kv_channels") == 256
    assert m.value("num_query_groups") == 1
    assert m.value("attn_logit_softcapping") is None
    assert m.value("final_logit_softcapping") is None
    assert m.value("share_embeddings_and_output_weights") is True
    built = megatron_transformer_config(m)
    assert built.window_attn_skip_freq == 6
    assert built.qk_layernorm is True


# --------------------------------------------------------------------------- Moonlight and Kimi K2


def moonlight_config() -> dict[str, Any]:
    """DeepSeek-V3's config with Moonlight-16B-A3B's values."""
    config = reference_config("DeepSeek-V3")
    config.pop("quantization_config")
    config.update(
        hidden_size=2048,
        num_hidden_layers=27,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        moe_intermediate_size=1408,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=512,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        vocab_size=163840,
        rope_scaling=None,
        # The published Moonlight config's other differences from V3.
        intermediate_size=11264,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=8192,
        rope_theta=50000.0,
        num_nextn_predict_layers=0,
    )
    return config


def kimi_k2_config() -> dict[str, Any]:
    """DeepSeek-V3's config with Kimi K2's values."""
    config = reference_config("DeepSeek-V3")
    config.update(
        model_type="kimi_k2",
        num_hidden_layers=61,
        n_routed_experts=384,
        num_attention_heads=64,
        num_key_value_heads=64,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.827,
        rope_scaling={
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=131072,
        vocab_size=163840,
        num_nextn_predict_layers=0,
    )
    return config


def test_moonlight_round_trip() -> None:
    source = moonlight_config()
    bridge, m, exported = round_trip(source)
    assert bridge is DeepseekV3Bridge
    assert exported["model_type"] == "deepseek_v3"
    assert exported["architectures"] == ["DeepseekV3ForCausalLM"]
    assert_keeps_fields(bridge, source, exported, ignore=null_rope_keys(source))
    config = auto_config(exported)
    assert config.n_routed_experts == 64
    assert config.q_lora_rank is None


def test_moonlight_values(megatron_transformer_config: Callable[..., Any]) -> None:
    _, m = convert(moonlight_config())
    assert m.value("hidden_size") == 2048
    assert m.value("num_layers") == 27
    assert m.value("q_lora_rank") is None
    assert m.value("kv_lora_rank") == 512
    assert m.value("num_moe_experts") == 64
    assert m.value("moe_router_topk") == 6
    assert m.value("moe_shared_expert_intermediate_size") == 2 * 1408
    assert m.value("moe_layer_freq") == [0] + [1] * 26
    assert m.value("moe_router_num_groups") is None
    assert m.value("moe_router_group_topk") is None
    assert m.value("moe_router_topk_scaling_factor") == 2.446
    assert m.value("moe_router_score_function") == "sigmoid"
    assert m.value("moe_router_enable_expert_bias") is True
    assert m.value("moe_router_pre_softmax") is False
    assert "mtp_num_layers" in m.values and m.value("mtp_num_layers") is None
    assert m.value("vocab_size") == 163840
    assert m.value("rotary_base") == 50000.0
    assert m.rope.rope_type == "default"
    built = megatron_transformer_config(m)
    assert built.rope_type == "rope"  # not MLATransformerConfig's default yarn
    assert built.q_lora_rank is None
    assert built.moe_router_num_groups is None


def test_kimi_k2_round_trip() -> None:
    source = kimi_k2_config()
    assert bridge_for_config({"model_type": "kimi_k2"}) is DeepseekV3Bridge
    bridge, m, exported = round_trip(source)
    assert bridge is DeepseekV3Bridge
    assert m.hf_model_type == "kimi_k2"
    assert exported["model_type"] == "kimi_k2"
    assert exported["architectures"] == ["DeepseekV3ForCausalLM"]
    assert_keeps_fields(bridge, source, exported)
    config = auto_config(exported)  # as deepseek_v3: transformers has no kimi_k2 class
    assert config.n_routed_experts == 384
    assert flat_rope_parameters(config)["factor"] == 32.0


def test_kimi_k2_values(megatron_transformer_config: Callable[..., Any]) -> None:
    _, m = convert(kimi_k2_config())
    assert m.value("num_layers") == 61
    assert m.value("num_moe_experts") == 384
    assert m.value("moe_router_topk") == 8
    assert m.value("num_attention_heads") == 64
    assert m.value("moe_layer_freq") == [0] + [1] * 60
    assert m.value("moe_router_num_groups") is None
    assert m.value("moe_router_group_topk") is None
    assert m.value("moe_router_topk_scaling_factor") == 2.827
    assert m.value("moe_router_score_function") == "sigmoid"
    assert m.value("moe_router_enable_expert_bias") is True
    assert m.value("moe_shared_expert_intermediate_size") == 2048
    assert m.value("mtp_num_layers") is None
    assert m.value("vocab_size") == 163840
    assert mla_rope(m) == {
        "rope_type": "yarn",
        "rotary_scaling_factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    built = megatron_transformer_config(m)
    assert built.rotary_scaling_factor == 32.0
    assert built.beta_fast == 1.0
    assert built.beta_slow == 1.0
    assert built.original_max_position_embeddings == 4096


# --------------------------------------------------------------------------- Gemma 3 multimodal wrapper

VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
    "vision_use_head": False,
}


def gemma3_wrapper_config() -> dict[str, Any]:
    text = reference_config("gemma-3-1b-it")
    for key in ("architectures", "transformers_version"):
        text.pop(key)
    assert text["model_type"] == "gemma3_text"
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": copy.deepcopy(VISION_CONFIG),
        "mm_tokens_per_image": 256,
    }


def test_gemma3_wrapper_reads_text_config() -> None:
    source = gemma3_wrapper_config()
    bridge, m = convert(source)
    assert bridge is Gemma3Bridge
    assert m.hf_architecture == "Gemma3ForConditionalGeneration"
    assert m.hf_model_type == "gemma3"
    _, text_only = convert(reference_config("gemma-3-1b-it"))
    assert m.values == text_only.values
    assert m.activation == text_only.activation == "gelu_tanh"
    assert m.value("hidden_size") == 1152
    assert m.value("window_attn_skip_freq") == 6
    assert m.value("rotary_base") == 1_000_000


def test_gemma3_wrapper_round_trip() -> None:
    source = gemma3_wrapper_config()
    bridge, _, exported = round_trip(source)
    assert exported["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert exported["model_type"] == "gemma3"
    assert exported["vision_config"] == VISION_CONFIG
    assert exported["mm_tokens_per_image"] == 256
    # Text fields go back under text_config, not to the top level.
    assert "hidden_size" not in exported and "rope_theta" not in exported
    assert exported["text_config"]["hidden_size"] == 1152
    assert exported["text_config"]["model_type"] == "gemma3_text"
    text = source["text_config"]
    ignore = null_rope_keys(text)
    assert_keeps_fields(bridge, source, exported, root="text_config", ignore=("text_config", *ignore))
    assert_keeps_fields(bridge, text, exported["text_config"], ignore=ignore)
    config = auto_config(exported)
    assert config.text_config.num_attention_heads == 4
    assert config.text_config.sliding_window == 512
    assert config.vision_config.hidden_size == 64
    assert config.mm_tokens_per_image == 256


@pytest.mark.parametrize("which", ["moonlight", "gemma3_wrapper"])
def test_constructed_round_trip_keeps_explicit_null_rope_scaling(which: str) -> None:
    if which == "moonlight":
        source = moonlight_config()
        _, _, exported = round_trip(source)
    else:
        source = gemma3_wrapper_config()["text_config"]
        _, _, wrapper = round_trip(gemma3_wrapper_config())
        exported = wrapper["text_config"]
    assert source["rope_scaling"] is None
    assert "rope_scaling" in exported


def test_gemma3_published_sparse_text_config_uses_transformers_defaults() -> None:
    # google/gemma-3-4b-it's config.json (text_config exactly as published).
    source = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "eos_token_id": [1, 106],
        "image_token_index": 262144,
        "initializer_range": 0.02,
        "mm_tokens_per_image": 256,
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0",
        "vision_config": copy.deepcopy(VISION_CONFIG),
    }
    _, m = convert(source)
    assert m.value("num_attention_heads") == 8
    assert m.value("num_query_groups") == 4
    assert m.value("kv_channels") == 256
    assert m.value("vocab_size") == 262208
    assert m.value("max_sequence_length") == 131072
    assert m.value("rotary_base") == 1_000_000.0
    assert m.value("softmax_scale") == pytest.approx(256**-0.5)
    assert m.value("window_size") == [1023, 0]
    assert m.rope.rope_type == "linear"


# --------------------------------------------------------------------------- transformers 5 shapes

LLAMA_3_1_ROPE_PARAMETERS = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_transformers5_llama_config_converts_like_classic(tmp_path: Path) -> None:
    classic = reference_config("Llama-3.1-8B")
    kwargs = {
        k: v
        for k, v in classic.items()
        if k not in ("rope_scaling", "rope_theta", "model_type", "transformers_version")
    }
    transformers.LlamaConfig(**kwargs, rope_parameters=dict(LLAMA_3_1_ROPE_PARAMETERS)).save_pretrained(
        tmp_path
    )
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"] == LLAMA_3_1_ROPE_PARAMETERS
    assert "rope_theta" not in saved and "rope_scaling" not in saved

    _, new = convert(saved)
    _, old = convert(classic)
    assert new.values == old.values
    assert new.rope == dataclasses.replace(old.rope, flat_keys=False)
    assert new.activation == old.activation == "silu"
    assert new.model_values() == old.model_values()
    assert new.model_values()["rotary_base"] == 500000.0
    assert new.model_values()["rope_scaling_factor"] == 8.0

    # Each export writes RoPE in its source's form: transformers 5's rope_parameters, or the
    # flat keys of a classic config; transformers reads both alike.
    exported = LlamaBridge.to_hf_config(new)
    assert exported["rope_parameters"] == LLAMA_3_1_ROPE_PARAMETERS
    assert not {"rope_theta", "rope_scaling"} & set(exported)
    classic_export = LlamaBridge.to_hf_config(old)
    assert classic_export["rope_theta"] == 500000.0 and "rope_parameters" not in classic_export
    assert classic_export["rope_scaling"] == classic["rope_scaling"]
    assert auto_config(exported).rope_parameters == LLAMA_3_1_ROPE_PARAMETERS
    assert auto_config(classic_export).rope_parameters == LLAMA_3_1_ROPE_PARAMETERS


@pytest.mark.parametrize(
    "name",
    REFERENCE_NAMES,
)
def test_transformers5_shape_converts_like_classic(name: str) -> None:
    """The same model written by transformers 5 (AutoConfig(...).to_dict()) converts the same."""
    classic = reference_config(name)
    rest = dict(classic)
    model_type = rest.pop("model_type")
    shaped = transformers.AutoConfig.for_model(model_type, **rest).to_dict()
    assert "rope_parameters" in shaped and "rope_theta" not in shaped and "rope_scaling" not in shaped

    bridge, old = convert(classic)
    new = bridge.to_megatron_config(shaped)
    assert new.values == old.values
    assert new.activation == old.activation
    assert new.rope.rope_type == old.rope.rope_type
    if old.megatron_model == "mla":
        assert mla_rope(new) == mla_rope(old)
    else:
        assert new.model_values() == old.model_values()


# --------------------------------------------------------------------------- semantics megatron-core cannot express


def test_llama3_rope_with_other_parameters_is_not_silently_converted(
    megatron_transformer_config: Callable[..., Any],
) -> None:
    """megatron-core fixes llama3's other parameters; other values go to the runtime's rotary
    frequencies instead of megatron-core's rope_scaling (parity in tests/test_rope.py)."""
    source = reference_config("Llama-3.1-8B")
    source["rope_scaling"] = dict(source["rope_scaling"], low_freq_factor=2.0)
    _, m = convert(source)
    assert m.rope.needs_runtime_rope()
    assert "rope_scaling" not in m.model_values()
    megatron_transformer_config(m)
    _, classic = convert(reference_config("Llama-3.1-8B"))
    assert not classic.rope.needs_runtime_rope()
    assert classic.model_values()["rope_scaling"] is True


def test_deepseek_v2_group_limited_greedy_is_not_silently_converted(
    megatron_transformer_config: Callable[..., Any],
) -> None:
    source = reference_config("DeepSeek-V2-Lite")  # with DeepSeek-V2 (236B)'s routing
    source.update(n_routed_experts=160, num_experts_per_tok=6, n_group=8, topk_group=3)
    source["topk_method"] = "group_limited_greedy"
    with pytest.raises(ConfigError):
        _, m = convert(source)
        megatron_transformer_config(m)


def test_sigmoid_routing_without_norm_topk_prob_is_not_silently_converted(
    megatron_transformer_config: Callable[..., Any],
) -> None:
    source = reference_config("DeepSeek-V3")
    source["norm_topk_prob"] = False
    with pytest.raises(ConfigError):
        _, m = convert(source)
        megatron_transformer_config(m)


def test_bridges_cover_the_reference_families() -> None:
    assert set(EXPECTED_FAMILY.values()) <= {bridge.family for bridge in BRIDGES}
