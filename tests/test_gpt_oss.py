"""GPT-OSS (specs/gpt_oss.yaml), on the tiny model of the spec's ``example_config``: attention
sinks, alternating sliding-window and full layers (a 16-token input over an 8-token window),
clamped SwiGLU, biased experts stacked as [E, in, out] with gate and up interleaved, a biased
router, YaRN without truncation, and MXFP4-quantized experts.

Every bias, sink and router row is drawn at random (transformers initializes biases to zero),
so a bias or sink mapped wrongly changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dist_cases
import pytest
import torch
from bridgegen.generated.gpt_oss import GptOssBridge
from checkpoints import assert_bit_exact, tensors_of

from bridgegen.engines.launch import run_on_ranks

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

# fp32 logits, HF vs Megatron; measured 2.5e-7.
LOGIT_ATOL = 1e-5


def vocab() -> int:
    return int(GptOssBridge.example_config["vocab_size"])


def make_gpt_oss(folder: Path, **overrides: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_oss", **{**GptOssBridge.example_config, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("bias", "sinks")) or "router.weight" in name:
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    model.train(False)
    return model


def logits_of(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(dist_cases.tokens(vocab())).logits.float()


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("gpt_oss") / "fp32"
    model = make_gpt_oss(folder)
    return {"folder": folder, "reference": logits_of(model)}


def megatron_logits_of(folder: Path) -> torch.Tensor:
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import megatron_logits

    bridge = ModelBridge.from_hf_dir(folder)
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    return megatron_logits(model, dist_cases.tokens(vocab()), vocab())


def test_tiny_model_has_the_gpt_oss_storage(gpt_oss: dict[str, Any]) -> None:
    """transformers 5 stores the experts stacked [E, in, out], gate/up interleaved, with biases."""
    tensors = tensors_of(gpt_oss["folder"])
    config = GptOssBridge.example_config
    hidden, ffn, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (experts, hidden, 2 * ffn)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_bias"].shape == (experts, 2 * ffn)
    assert tensors["model.layers.0.mlp.experts.down_proj"].shape == (experts, ffn, hidden)
    assert tensors["model.layers.0.mlp.router.bias"].shape == (experts,)
    assert tensors["model.layers.0.self_attn.sinks"].shape == (config["num_attention_heads"],)
    saved = json.loads((gpt_oss["folder"] / "config.json").read_text())
    assert saved["rope_parameters"]["truncate"] is False
    assert saved["layer_types"] == ["sliding_attention", "full_attention"] * 2


def test_yarn_truncation_is_honoured(tmp_path: Path) -> None:
    """The same weights with ``truncate: true`` give other HF logits, and the bridge follows."""
    from bridgegen.engines.verify import compare

    rope = {**GptOssBridge.example_config["rope_parameters"], "truncate": True}
    reference = logits_of(make_gpt_oss(tmp_path / "truncated", rope_parameters=rope))
    parity = compare(reference, megatron_logits_of(tmp_path / "truncated"))
    assert parity.max_abs_diff <= LOGIT_ATOL


def test_cli_round_trip_is_bit_exact_and_loads_in_transformers(
    gpt_oss: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from bridgegen.cli.main import main

    checkpoint, out = tmp_path / "megatron", tmp_path / "hf"
    assert main(["import", "--hf", str(gpt_oss["folder"]), "--out", str(checkpoint)]) == 0
    assert main(["export", "--megatron", str(checkpoint), "--out", str(out)]) == 0
    assert_bit_exact(gpt_oss["folder"], out)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    exported.train(False)
    assert torch.equal(logits_of(exported), gpt_oss["reference"])


def test_config_round_trip(gpt_oss: dict[str, Any], tmp_path: Path) -> None:
    """HF config -> Megatron config -> HF config, compared as transformers reads it (the export
    writes RoPE as ``rope_scaling`` + ``rope_theta``, which transformers 5 reads as the same
    ``rope_parameters``)."""
    from transformers import AutoConfig

    from bridgegen.engines.model import ModelBridge

    exported = ModelBridge.from_hf_dir(gpt_oss["folder"]).export_config(torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(exported))

    def loaded(folder: Path) -> dict[str, Any]:
        config: dict[str, Any] = AutoConfig.from_pretrained(folder).to_dict()
        return {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}

    assert loaded(tmp_path) == loaded(gpt_oss["folder"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"swiglu_alpha": 1.0}, "swiglu_alpha is not 1.702"),
        ({"attention_bias": False}, "attention_bias is false"),
        ({"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types must name"),
    ],
)
def test_configs_megatron_cannot_run_are_refused(change: dict[str, Any], message: str) -> None:
    from bridgegen.bridge.errors import ConfigError

    config = {**GptOssBridge.example_config, "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"}
    with pytest.raises(ConfigError, match=message):
        GptOssBridge.to_megatron_config({**config, **change})


@pytest.mark.parametrize(
    "layout",
    # Biased experts: megatron-core allows expert-TP 1 only.
    [{"tp": 2, "etp": 1}, {"ep": 2}],
    ids=lambda layout: "-".join(f"{k}{v}" for k, v in layout.items()),
)
def test_parallel_layouts(layout: dict[str, int], gpt_oss: dict[str, Any], tmp_path: Path) -> None:
    """TP=2 splits the heads with their sinks; EP=2 gives each rank two stacked experts."""
    results = run_on_ranks(dist_cases.convert, 2, str(gpt_oss["folder"]), str(tmp_path / "out"), layout)
    found = [r["logits"] for r in results if r["logits"] is not None]
    assert found
    for logits in found:
        diff = (logits - gpt_oss["reference"]).abs().max().item()
        print(f"gpt_oss {layout}: max|diff| vs HF {diff:.3e}")
        assert diff <= LOGIT_ATOL
    assert_bit_exact(gpt_oss["folder"], tmp_path / "out")


# ------------------------------------------------------------------ MXFP4


def random_mxfp4(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 parts of a tensor whose stored rows x blocks are ``shape`` (scales near 2**0)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(122, 129, shape, dtype=torch.uint8, generator=generator)
    return blocks, scales


def test_mxfp4_dequantization_matches_transformers() -> None:
    """Against transformers' own dequantization (transformers/integrations/mxfp4.py,
    ``convert_moe_packed_tensors``, which GptOss loading uses for ``*_blocks`` / ``*_scales``)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from bridgegen.formats.mxfp4 import dequantize

    blocks, scales = random_mxfp4((3, 10, 2), seed=0)
    # Low nibble first: 0x10 -> +0.0, +0.5; 0xF8 -> -0.0, -6.0.
    blocks[0, 0, 0, :2] = torch.tensor([0x10, 0xF8], dtype=torch.uint8)
    scales[0, 0, 0] = 127  # 2 ** 0
    expected = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)
    found = dequantize(blocks, scales, "w", torch.float32)
    assert found.shape == expected.shape == (3, 64, 10)
    assert torch.equal(found, expected)
    assert found[0, :4, 0].tolist() == [0.0, 0.5, -0.0, -6.0]
    # bfloat16 holds these values exactly.
    assert torch.equal(dequantize(blocks, scales, "w").float(), expected)


def test_mxfp4_experts_are_dequantized_on_import(
    gpt_oss: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose expert matrices are MXFP4 imports like the same values unquantized
    (bit-exact Megatron weights), dequantizing each stacked tensor once although every expert
    reads it; its export is the unquantized checkpoint."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from bridgegen.engines.model import ModelBridge
    from bridgegen.formats import mxfp4

    dequantized: list[str] = []
    real_dequantize = mxfp4.dequantize

    def counted(blocks: torch.Tensor, scales: torch.Tensor, name: str, *args: Any) -> torch.Tensor:
        dequantized.append(name)
        return real_dequantize(blocks, scales, name, *args)

    monkeypatch.setattr(mxfp4, "dequantize", counted)

    config = GptOssBridge.example_config
    hidden, ffn, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    plain = tensors_of(gpt_oss["folder"])
    quantized = dict(plain)
    for layer in range(config["num_hidden_layers"]):
        for seed, (name, rows, cols) in enumerate(
            [("gate_up_proj", 2 * ffn, hidden), ("down_proj", hidden, ffn)], start=2 * layer
        ):
            full = f"model.layers.{layer}.mlp.experts.{name}"
            blocks, scales = random_mxfp4((experts, rows, cols // 32), seed)
            plain[full] = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)
            del quantized[full]
            quantized[full + "_blocks"], quantized[full + "_scales"] = blocks, scales
    source = json.loads((gpt_oss["folder"] / "config.json").read_text())
    for folder, tensors, extra in (
        (tmp_path / "plain", plain, {}),
        (tmp_path / "mxfp4", quantized, {"quantization_config": {"quant_method": "mxfp4"}}),
    ):
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**source, **extra}))

    def imported(folder: Path) -> tuple[ModelBridge, Any]:
        bridge = ModelBridge.from_hf_dir(folder)
        model = bridge.build_model(torch.float32)
        bridge.load_hf_weights(model)
        return bridge, model

    _, from_plain = imported(tmp_path / "plain")
    bridge, from_mxfp4 = imported(tmp_path / "mxfp4")
    assert sorted(dequantized) == sorted(
        name.removesuffix("_blocks") for name in quantized if name.endswith("_blocks")
    )
    want = dict(from_plain.named_parameters())
    for name, parameter in from_mxfp4.named_parameters():
        assert torch.equal(parameter, want[name]), name
    bridge.export_hf(from_mxfp4, tmp_path / "out")
    assert_bit_exact(tmp_path / "plain", tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_biased_experts_need_expert_tensor_parallel_1() -> None:
    """megatron-core asserts ETP == 1 for experts with biases (transformer_config.py, "Bias in Moe
    is only supported when ETP==1"); ETP defaults to the TP size, so TP=2 alone is refused with
    the option that fixes it."""
    from bridgegen.bridge.errors import ConfigError
    from bridgegen.engines.model import ModelBridge

    bridge = ModelBridge.from_hf_config(GptOssBridge.example_hf_config())
    with pytest.raises(
        ConfigError, match=r"^gpt_oss: .* expert tensor parallel size 1, not 2 .*: pass --etp 1$"
    ):
        bridge.transformer_config(torch.float32, tensor_parallel_size=2)
    assert bridge.transformer_config(torch.float32, tensor_parallel_size=2, expert_tensor_parallel_size=1)
