"""RoPE variants on Llama (and partial rotary on Phi-3): fp32 parity with transformers on
sequences long enough that the scaling changes the result, and the source's scaling
exported back unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

VOCAB = 250
LOGIT_ATOL = 1e-5
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# name: (rope_scaling, max_position_embeddings, sequence length)
CASES: dict[str, tuple[dict[str, Any], int, int]] = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, 256, 64),
    "llama3-megatron-constants": ({"rope_type": "llama3", "factor": 8.0, **LLAMA3_FIXED}, 256, 64),
    "llama3-other-parameters": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        256,
        64,
    ),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 64, 48),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 16, 48),  # grows past 16 positions
    # transformers' dynamic NTK scales from max_position_embeddings and ignores this key
    # (modeling_rope_utils.py _compute_dynamic_ntk_parameters reads config.max_position_embeddings)
    "dynamic-original-ignored": (
        {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8},
        16,
        48,
    ),
}


def llama(folder: Path, rope_scaling: dict[str, Any] | None, max_positions: int) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        rope_scaling=None if rope_scaling is None else dict(rope_scaling),  # transformers edits it in place
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    model.train(False)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope_scaling_parity(name: str, tmp_path: Path) -> None:
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    rope_scaling, max_positions, seq_len = CASES[name]
    hf = llama(tmp_path / "hf", rope_scaling, max_positions)
    unscaled = llama(tmp_path / "plain", None, max_positions)
    tokens = torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(tokens).logits.float()
        moved = (unscaled(tokens).logits.float() - reference).abs().max().item()
    # The scaling must change the result by more than the parity tolerance, or parity proves nothing.
    assert moved > 5 * LOGIT_ATOL, "the scaling must change the result at this length"
    bridge = ModelBridge.from_hf_dir(tmp_path / "hf")
    assert bridge.config.rope.rope_type == rope_scaling["rope_type"]
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    parity = compare(reference, megatron_logits(model, tokens, VOCAB))
    print(f"{name}: {parity} (scaling moves logits by {moved:.2e})")
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
    # Written as the source was (transformers 5: rope_parameters, holding the scaling's keys).
    exported = bridge.hf_config()
    assert "rope_scaling" not in exported
    for key, value in rope_scaling.items():
        assert exported["rope_parameters"][key] == value


def test_partial_rotary_phi3(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    config = AutoConfig.for_model(
        "phi3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        partial_rotary_factor=0.5,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config)
    hf.save_pretrained(tmp_path / "hf")
    hf.train(False)
    bridge = ModelBridge.from_hf_dir(tmp_path / "hf")
    assert bridge.config.value("rotary_percent") == 0.5
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity = compare(hf(tokens).logits.float(), megatron_logits(model, tokens, VOCAB))
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())  # written by transformers
