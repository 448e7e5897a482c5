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


def test_gemma2_and_gemma3_models_are_refused_until_their_quirks_exist(tmp_path: Path) -> None:
    import json

    from bridgegen.runtime.convert import ModelBridge
    from bridgegen.runtime.errors import ConfigError

    reference = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "hf_configs"
    if not reference.is_dir():
        pytest.skip("reference configs not found beside the repository")
    bridge = ModelBridge.from_hf_config(json.loads((reference / "gemma-2-2b.json").read_text()))
    with pytest.raises(ConfigError, match="cannot build a model with attn_logit_softcapping"):
        bridge.build_model()
