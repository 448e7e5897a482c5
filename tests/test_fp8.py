"""Block-quantized FP8 checkpoints (DeepSeek-V3 / Kimi K2 style) are dequantized on import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridgegen.bridge.errors import WeightError
from bridgegen.formats.fp8 import dequantize

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block quantization: one scale per tile, scale = amax / 448."""
    rows, cols = weight.shape
    tiles = (-(-rows // block), -(-cols // block))
    scale = torch.empty(tiles, dtype=torch.float32)
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            tile = weight[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            quantized[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scale[i, j]).to(
                torch.float8_e4m3fn
            )
    return quantized, scale


def reference_dequantize(quantized: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(quantized.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = quantized[i * block : (i + 1) * block, j * block : (j + 1) * block]
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] = tile.float() * scale[i, j]
    return out


@pytest.mark.parametrize("shape", [(300, 260), (128, 128), (7, 513)])
def test_dequantize_matches_tile_by_tile_reference(shape: tuple[int, int]) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    quantized, scale = quantize(weight)
    found = dequantize(quantized, scale, (128, 128), "w")
    assert torch.equal(found, reference_dequantize(quantized, scale))
    relative = ((found - weight).abs() / weight.abs().clamp(min=1e-3)).median().item()
    assert relative < 0.07  # e4m3 keeps 3 mantissa bits


def test_scale_shape_mismatch_names_the_tensor() -> None:
    quantized, scale = quantize(torch.randn(300, 260))
    with pytest.raises(
        WeightError, match=r"^w\.weight_scale_inv: shape \[3, 2\] does not match \[3, 3\] tiles"
    ):
        dequantize(quantized, scale[:, :2], (128, 128), "w.weight")


def test_fp8_deepseek_checkpoint_imports_dequantized(tmp_path: Path) -> None:
    """Quantize a tiny DeepSeek-V3's projection and expert weights with 32 x 32 tiles, then
    check the Megatron weights equal the dequantized values, logits match HF run on the
    dequantized weights, and the export is a plain (unquantized) checkpoint."""
    from test_mla import build

    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    folder, _ = build(tmp_path / "hf", "deepseek_v3")
    tensors = load_file(folder / "model.safetensors")
    quantized_names = [n for n in tensors if n.endswith("proj.weight") and "layers." in n]
    assert len(quantized_names) > 10
    dequantized: dict[str, torch.Tensor] = {}
    for name in quantized_names:
        q, s = quantize(tensors[name], block=32)
        tensors[name] = q
        tensors[name + "_scale_inv"] = s
        dequantized[name] = reference_dequantize(q, s, block=32)
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    save_file(tensors, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]}
    (fp8_dir / "config.json").write_text(json.dumps(config))

    bridge = ModelBridge.from_hf_dir(fp8_dir)
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    # The HF reference runs on the same dequantized weights, loaded from a plain checkpoint.
    from transformers import AutoModelForCausalLM

    plain = load_file(folder / "model.safetensors") | dequantized
    save_file(plain, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf.train(False)
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity = compare(hf(tokens).logits.float(), megatron_logits(model, tokens, 250))
    assert parity.max_abs_diff <= 1e-5 and parity.argmax_agreement == 1.0

    bridge.export_hf(model, tmp_path / "out")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(name.endswith("_scale_inv") for name in exported)
    for name, value in dequantized.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], value), name
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
