"""Gemma: RMSNorm with 1 + w (zero-centred gamma), embeddings scaled by sqrt(hidden_size),
gelu_pytorch_tanh, tied embeddings, head_dim independent of hidden / heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import assert_bit_exact

VOCAB = 250
LOGIT_ATOL = 1e-5


def make_gemma(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, object]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,  # not hidden / heads
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF initialises the (1 + w) norms at w = 0; make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(folder)
    model.train(False)
    return folder, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemma_parity_and_round_trip(dtype: torch.dtype, tmp_path: Path) -> None:
    from bridgegen.runtime.convert import ModelBridge
    from bridgegen.runtime.verify import compare, megatron_logits

    folder, hf = make_gemma(tmp_path / "hf", dtype)
    bridge = ModelBridge.from_hf_dir(folder)
    assert bridge.config.activation == "gelu_tanh"
    assert bridge.config.value("share_embeddings_and_output_weights") is True
    model = bridge.build_model()
    bridge.load_hf_weights(model)
    bridge.export_hf(model, tmp_path / "out")
    assert_bit_exact(folder, tmp_path / "out")  # norms keep w as HF stores it: exact in bf16 too
    if dtype == torch.float32:
        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            parity = compare(hf(tokens).logits.float(), megatron_logits(model, tokens, VOCAB))  # type: ignore[operator]
        print(f"gemma: {parity}")
        assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0


VARIANTS = {
    # caps below this tiny model's score range, so capping changes results; a window shorter
    # than the sequence on every second layer
    "gemma2": dict(attn_logit_softcapping=0.01, final_logit_softcapping=0.1, query_pre_attn_scalar=24),
    # q/k norms, local layers with their own RoPE base, one global layer in two
    "gemma3_text": dict(
        sliding_window_pattern=2, rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=24
    ),
    # linear RoPE scaling on the global layers only (as Gemma 3 27B)
    "gemma3_text_linear": dict(
        sliding_window_pattern=2,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    ),
}


def make_variant(folder: Path, name: str) -> tuple[Path, object]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        name.removesuffix("_linear"),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        sliding_window=5,
        **VARIANTS[name],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    model.train(False)
    return folder, model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gemma2_and_gemma3_parity_with_windows_longer_than_sliding(name: str, tmp_path: Path) -> None:
    from bridgegen.runtime.convert import ModelBridge
    from bridgegen.runtime.verify import compare, megatron_logits

    folder, hf = make_variant(tmp_path / "hf", name)
    bridge = ModelBridge.from_hf_dir(folder)
    assert bridge.config.value("window_size") == [4, 0]
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))  # 24 > window 5
    with torch.no_grad():
        parity = compare(hf(tokens).logits.float(), megatron_logits(model, tokens, VOCAB))  # type: ignore[operator]
    print(f"{name}: {parity}")
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
    bridge.export_hf(model, tmp_path / "out")
    assert_bit_exact(folder, tmp_path / "out")


def test_softcapping_and_window_change_the_result(tmp_path: Path) -> None:
    """The quirks matter at this size: without them HF's logits move by more than 1e-2."""
    import json

    folder, hf = make_variant(tmp_path / "hf", "gemma2")
    plain = json.loads((folder / "config.json").read_text())
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    from transformers import AutoConfig, AutoModelForCausalLM

    for change in (
        {"attn_logit_softcapping": None},
        {"final_logit_softcapping": None},
        {"sliding_window": 64},
    ):
        config = AutoConfig.for_model(
            "gemma2", **{k: v for k, v in plain.items() if k != "model_type"} | change
        )
        other = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)
        other.train(False)
        with torch.no_grad():
            moved = (other(tokens).logits - hf(tokens).logits).abs().max().item()  # type: ignore[operator]
        assert moved > 1e-2, change


def test_multimodal_gemma3_weights_are_refused_with_a_reason() -> None:
    from bridgegen.runtime.convert import ModelBridge
    from bridgegen.runtime.errors import ConfigError

    text = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
    }
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
    }
    bridge = ModelBridge.from_hf_config(config)
    assert bridge.config.value("hidden_size") == 64  # the config converts
    with pytest.raises(ConfigError, match="Gemma3ForConditionalGeneration checkpoints"):
        bridge.build_model()
