"""No HF config field ignored silently.

The coverage check (``bridgegen.spec.coverage``) fails on a field of transformers' config
class that a spec neither reads, allows at one value only (``hf_neutral``) nor declares
behaviour-free (``hf_behaviour_free``); the values refused that way are refused on import with
one line naming the file, field, value and the supported value. Each field found passing
through unread before these keys existed has a case here: refused, or mapped with fp32 logits
parity against transformers (max |diff| <= 1e-5, same argmax).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from bridgegen.generated import (
    DeepseekV3Bridge,
    Gemma2Bridge,
    Gemma3Bridge,
    GemmaBridge,
    LlamaBridge,
    MistralBridge,
    Qwen2Bridge,
    Qwen3Bridge,
)

from bridgegen.bridge.errors import ConfigError
from bridgegen.bridge.rope import RUNTIME_ROPE_KEYS, TRANSFORMERS_ROPE_KEYS, unhandled_rope_keys
from bridgegen.spec.coverage import (
    ConfigClass,
    coverage_problems,
    field_coverage,
    rope_problems,
    unaccounted_fields,
)
from bridgegen.spec.errors import SpecErrors
from bridgegen.spec.generate import load_specs
from bridgegen.spec.resolve import ResolvedSpec

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128
LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def specs() -> dict[str, ResolvedSpec]:
    return {spec.family: spec for spec in load_specs(REPO)}


def llama_fields() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
    }


def with_fields(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(fields)
    return out


# ------------------------------------------------------------------ the check itself (pure)


def test_an_unaccounted_field_names_field_and_spec_line(specs: dict[str, ResolvedSpec]) -> None:
    llama = specs["llama"]
    known = ("hidden_size", "mlp_bias", "use_cache", "dtype")
    assert coverage_problems(llama, "llama", ConfigClass("LlamaConfig", known, {}, ())) == []
    problems = coverage_problems(llama, "llama", ConfigClass("LlamaConfig", (*known, "new_knob"), {}, ()))
    assert problems == [
        "specs/llama.yaml:4: llama: LlamaConfig field 'new_knob' (model type 'llama') is not accounted "
        "for: map it, or list it in config.hf_neutral or config.hf_behaviour_free"
    ]


def test_a_field_counts_as_accounted_for_under_an_attribute_map_name(specs: dict[str, ResolvedSpec]) -> None:
    """Qwen3-MoE reads num_experts; transformers 5 names the parameter num_local_experts."""
    qwen3_moe = specs["qwen3_moe"]
    assert unaccounted_fields(qwen3_moe, ["num_local_experts"], {"num_experts": "num_local_experts"}) == []
    assert unaccounted_fields(qwen3_moe, ["num_local_experts"], {}) == []  # read as an alias too
    assert unaccounted_fields(qwen3_moe, ["num_shards"], {"shards": "num_shards"}) == ["num_shards"]


def test_every_shipped_spec_accounts_for_the_installed_transformers() -> None:
    problems, notes = field_coverage(load_specs(REPO))
    assert problems == []
    # Kimi K2 ships remote code: transformers has no config class for kimi_k2.
    assert any("'kimi_k2' not checked" in note for note in notes)


def test_rope_keys_transformers_reads_are_read_or_refused(specs: dict[str, ResolvedSpec]) -> None:
    for spec in specs.values():
        assert rope_problems(spec) == [], spec.family
    # longrope is read by no megatron model: a spec supporting it is caught.
    longrope = dataclasses.replace(specs["llama"], rope_types=("default", "longrope"))
    assert [p.split("key ")[1].split(",")[0] for p in rope_problems(longrope)] == [
        repr(key) for key in TRANSFORMERS_ROPE_KEYS["longrope"]
    ]
    assert unhandled_rope_keys("mla", "linear") == ("factor",)
    assert unhandled_rope_keys("mla", "yarn") == ()  # truncate and attention_factor refused off neutral
    assert set(RUNTIME_ROPE_KEYS["gpt"]["yarn"]) | {"attention_factor"} == set(TRANSFORMERS_ROPE_KEYS["yarn"])


def write_toy_spec(root: Path, config: str) -> None:
    (root / "specs").mkdir(parents=True)
    (root / "specs" / "_base.yaml").write_text((REPO / "specs" / "_base.yaml").read_text())
    (root / "specs" / "toy.yaml").write_text(
        "extends: _base\narchitectures: [ToyForCausalLM]\nmodel_types: [toy]\nconfig:\n" + config
    )


def test_a_field_the_spec_reads_cannot_be_neutral_or_behaviour_free(tmp_path: Path) -> None:
    write_toy_spec(tmp_path / "a", "  hf_behaviour_free: [vocab_size]\n")
    with pytest.raises(
        SpecErrors, match="'vocab_size' is read by this bridge; it cannot be behaviour-free too"
    ):
        load_specs(tmp_path / "a")
    write_toy_spec(tmp_path / "b", "  hf_neutral:\n    vocab_size: {value: 8, why: toy}\n")
    with pytest.raises(SpecErrors, match="'vocab_size' is read by this bridge; it cannot be neutral too"):
        load_specs(tmp_path / "b")


def test_a_family_reading_a_field_its_base_refuses_drops_the_refusal(tmp_path: Path) -> None:
    """_base allows partial_rotary_factor at 1.0 only; a family that maps it reads any value."""
    write_toy_spec(tmp_path, "  renames:\n    partial_rotary_factor: rotary_percent\n")
    (toy,) = load_specs(tmp_path)
    assert "partial_rotary_factor" not in {name for name, _, _ in toy.hf_neutral}
    (llama,) = [spec for spec in load_specs(REPO) if spec.family == "llama"]
    assert (
        "partial_rotary_factor",
        (1.0,),
        "a rotary embedding on part of each head is not mapped",
    ) in llama.hf_neutral


# ------------------------------------------------------------------ refused on import


@pytest.mark.parametrize(
    ("bridge", "fields", "message"),
    [
        (
            LlamaBridge,
            {"mlp_bias": True},
            "attention_bias and mlp_bias differ",
        ),
        (
            LlamaBridge,
            {"attention_bias": True},  # biases o_proj too: add_qkv_bias alone would drop it
            "attention_bias and mlp_bias differ",
        ),
        (
            LlamaBridge,
            {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.5,
                }
            },
            r"'partial_rotary_factor' is 0.5; the llama bridge supports only 1.0",
        ),
        (
            LlamaBridge,
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "attention_factor": 1.5,
                }
            },
            r"rope_scaling 'attention_factor' is 1.5; the llama bridge supports it only absent",
        ),
    ],
)
def test_llama_fields_that_change_the_model_are_refused(
    bridge: Any, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        bridge.to_megatron_config(with_fields(llama_fields(), **fields))


def test_neutral_values_name_file_field_value_and_reason() -> None:
    gemma = with_fields(
        llama_fields(), architectures=["GemmaForCausalLM"], model_type="gemma", hidden_act="gelu"
    )
    with pytest.raises(ConfigError) as caught:
        GemmaBridge.to_megatron_config(with_fields(gemma, attention_bias=True), source="hf/config.json")
    assert str(caught.value) == (
        "hf/config.json: 'attention_bias' is true; the gemma bridge supports only false (HF Gemma biases "
        "q, k, v and o but not the MLP, which megatron-core cannot express)"
    )
    with pytest.raises(
        ConfigError, match="'use_bidirectional_attention' is true; the gemma bridge supports only false"
    ):
        GemmaBridge.to_megatron_config(with_fields(gemma, use_bidirectional_attention=True))
    with pytest.raises(
        ConfigError,
        match='\'hidden_act\' is "relu"; the gemma bridge supports only "gelu_pytorch_tanh" or "gelu"',
    ):
        GemmaBridge.to_megatron_config(with_fields(gemma, hidden_act="relu"))
    # The neutral value itself, its other spelling and an absent field all convert.
    for value in ("gelu", "gelu_pytorch_tanh"):
        GemmaBridge.to_megatron_config(with_fields(gemma, hidden_act=value, attention_bias=False))


def test_qwen3_attention_bias_is_refused() -> None:
    """HF Qwen3 biases o_proj too (transformers 5.24 models/qwen3/modeling_qwen3.py:227)."""
    qwen3 = with_fields(llama_fields(), architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16)
    with pytest.raises(ConfigError, match="'attention_bias' is true; the qwen3 bridge supports only false"):
        Qwen3Bridge.to_megatron_config(with_fields(qwen3, attention_bias=True))


@pytest.mark.parametrize("bridge", [Qwen2Bridge, Qwen3Bridge])
def test_qwen_sliding_layer_types_are_refused(bridge: Any) -> None:
    arch = "Qwen2ForCausalLM" if bridge is Qwen2Bridge else "Qwen3ForCausalLM"
    config = with_fields(llama_fields(), architectures=[arch], model_type=bridge.model_types[0])
    full = bridge.to_megatron_config(with_fields(config, layer_types=["full_attention"] * 2))
    assert bridge.to_hf_config(full)["layer_types"] == ["full_attention"] * 2
    with pytest.raises(ConfigError, match="layer_types has sliding-attention layers"):
        bridge.to_megatron_config(with_fields(config, layer_types=["full_attention", "sliding_attention"]))


def gemma2_fields(**fields: Any) -> dict[str, Any]:
    return with_fields(
        llama_fields(),
        architectures=["Gemma2ForCausalLM"],
        model_type="gemma2",
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=8,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=16,
        **fields,
    )


def test_gemma2_layer_types_decide_the_window_pattern() -> None:
    sliding, full = "sliding_attention", "full_attention"
    default = Gemma2Bridge.to_megatron_config(gemma2_fields())
    assert default.value("window_attn_skip_freq") == 2
    # Written on export, as transformers writes it.
    assert Gemma2Bridge.to_hf_config(default)["layer_types"] == [sliding, full, sliding, full]
    every_fourth = Gemma2Bridge.to_megatron_config(
        gemma2_fields(layer_types=[sliding, sliding, sliding, full])
    )
    assert every_fourth.value("window_attn_skip_freq") == 4
    with pytest.raises(ConfigError, match="layer_types is not one full-attention layer after every n - 1"):
        Gemma2Bridge.to_megatron_config(gemma2_fields(layer_types=[full, sliding, sliding, full]))


def test_gemma3_layer_types_win_over_sliding_window_pattern() -> None:
    """transformers' Gemma3TextConfig uses layer_types when given; sliding_window_pattern only
    builds the default ones."""
    sliding, full = "sliding_attention", "full_attention"
    fields = with_fields(
        gemma2_fields(),
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        sliding_window_pattern=6,
    )
    assert Gemma3Bridge.to_megatron_config(fields).value("window_attn_skip_freq") == 6
    two = Gemma3Bridge.to_megatron_config(with_fields(fields, layer_types=[sliding, full, sliding, full]))
    assert two.value("window_attn_skip_freq") == 2
    # Four layers, none global: the declared pattern 6 explains them and stays.
    none_global = with_fields(fields, layer_types=[sliding] * 4)
    assert Gemma3Bridge.to_megatron_config(none_global).value("window_attn_skip_freq") == 6


def test_deepseek_v3_rope_interleave_false_is_refused() -> None:
    """transformers' DeepseekV3Attention de-interleaves the rope dimensions only when
    rope_interleave (transformers 5.24 models/deepseek_v3/modeling_deepseek_v3.py:453);
    megatron-core's multi-latent attention always does (megatron-core 0.16.1
    models/common/embeddings/rope_utils.py:115-117)."""
    import test_config_reference

    config = test_config_reference.reference_config("DeepSeek-V3")
    DeepseekV3Bridge.to_megatron_config(with_fields(config, rope_interleave=True))
    with pytest.raises(
        ConfigError, match="'rope_interleave' is false; the deepseek_v3 bridge supports only true"
    ):
        DeepseekV3Bridge.to_megatron_config(with_fields(config, rope_interleave=False))


def test_yarn_truncate_false_is_mapped_on_gpt_and_refused_on_mla() -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    mistral = with_fields(llama_fields(), architectures=["MistralForCausalLM"], model_type="mistral")
    kept = MistralBridge.to_megatron_config(with_fields(mistral, rope_scaling={**yarn, "truncate": False}))
    assert kept.rope.megatron_gpt_settings()["yarn_correction_range_round_to_int"] is False
    assert MistralBridge.to_hf_config(kept)["rope_scaling"]["truncate"] is False
    import test_config_reference

    deepseek = test_config_reference.reference_config("DeepSeek-V3")
    source = {**deepseek["rope_scaling"], "truncate": False}
    with pytest.raises(
        ConfigError, match="rope_scaling 'truncate' is false; the deepseek_v3 bridge supports only true"
    ):
        DeepseekV3Bridge.to_megatron_config(with_fields(deepseek, rope_scaling=source))


def test_import_cli_refuses_a_non_neutral_value_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_hostile import import_refused
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = with_fields(llama_fields(), attention_bias=True)
    fields.pop("architectures")
    config = AutoConfig.for_model(**{"model_type": fields.pop("model_type"), **fields})
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    import_refused(
        tmp_path / "hf", tmp_path, capsys, re.escape("config.json: attention_bias and mlp_bias differ")
    )


# ------------------------------------------------------------------ mapped, with logits parity


def hf_llama(folder: Path, **fields: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = llama_fields()
    values.pop("architectures")
    values.pop("model_type")
    values.update(fields)
    config = AutoConfig.for_model("llama", **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):  # transformers starts biases at zero, which would prove nothing
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    model.train(False)
    return model


def megatron_parity(folder: Path, reference: torch.Tensor, tokens: torch.Tensor) -> Any:
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    bridge = ModelBridge.from_hf_dir(folder)
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    return bridge, compare(reference, megatron_logits(model, tokens, VOCAB))


def test_llama_with_every_bias_converts_with_logits_parity(tmp_path: Path) -> None:
    """attention_bias and mlp_bias together bias every linear layer (transformers 5.24
    models/llama/modeling_llama.py:158-160 and 220-229), as megatron-core's add_bias_linear."""
    hf = hf_llama(tmp_path / "hf", attention_bias=True, mlp_bias=True)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(tokens).logits.float()
        for name, parameter in hf.named_parameters():
            if name.endswith(".bias"):
                parameter.zero_()
        moved = (hf(tokens).logits.float() - reference).abs().max().item()
    assert moved > 100 * LOGIT_ATOL, "the biases must change the result, or parity proves nothing"
    bridge, parity = megatron_parity(tmp_path / "hf", reference, tokens)
    print(f"llama with biases: {parity} (biases move logits by {moved:.2e})")
    assert bridge.config.value("add_bias_linear") is True
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
    exported = bridge.hf_config()
    assert exported["attention_bias"] is True and exported["mlp_bias"] is True


def test_yarn_without_truncation_has_logits_parity(tmp_path: Path) -> None:
    """YaRN with truncate false (transformers 5.24 modeling_rope_utils.py:475, find_correction_range
    without rounding) maps to GPTModel's yarn_correction_range_round_to_int=False (megatron-core
    0.16.1 models/gpt/gpt_model.py:187)."""
    # Head dim 16 and 1024 original positions: the correction range (1.41, 4.42) is rounded to
    # (1, 5) with truncation (a shorter original length rounds to the same ramp).
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    hf = hf_llama(tmp_path / "hf", max_position_embeddings=4096, rope_scaling={**yarn, "truncate": False})
    truncated = hf_llama(tmp_path / "truncated", max_position_embeddings=4096, rope_scaling=dict(yarn))
    with torch.no_grad():
        reference = hf(tokens).logits.float()
        moved = (truncated(tokens).logits.float() - reference).abs().max().item()
    _, parity = megatron_parity(tmp_path / "hf", reference, tokens)
    _, truncated_parity = megatron_parity(
        tmp_path / "truncated", truncated(tokens).logits.float().detach(), tokens
    )
    print(
        f"yarn truncate false: {parity}; truncate true: {truncated_parity} (truncation moves logits by {moved:.2e})"
    )
    assert moved > 5 * LOGIT_ATOL, "truncation must change the result, or parity proves nothing"
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
