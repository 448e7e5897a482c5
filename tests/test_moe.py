"""Mixture-of-experts weights: Qwen3-MoE with a dense first layer, single process and at
EP=2 / expert-TP=2 on two gloo processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dist_cases
import pytest
import torch
from checkpoints import assert_bit_exact, tensors_of
from routing import hf_expert_sets, megatron_expert_sets, tokens_routed_differently

from bridgegen.engines.launch import run_on_ranks

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

VOCAB = 250
LOGIT_ATOL = 1e-5


def make_qwen3_moe(
    folder: Path, dtype: torch.dtype = torch.float32, experts: int = 4, top_k: int = 2
) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=experts,
        num_experts_per_tok=top_k,
        num_hidden_layers=3,
        mlp_only_layers=[0],  # one dense layer, then MoE layers
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        norm_topk_prob=True,
        rope_theta=1000000.0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # distinct router rows so the top-k choice is not a tie
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe")
    folder = make_qwen3_moe(root / "fp32")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf.train(False)
    with torch.no_grad():
        reference = hf(dist_cases.tokens(VOCAB)).logits.float()
    return {"root": root, "fp32": folder, "reference": reference}


def test_expert_tensors_on_disk_are_per_expert(moe: dict[str, Any]) -> None:
    names = set(tensors_of(moe["fp32"]))
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # the dense layer
    assert "model.layers.1.mlp.gate.weight" in names  # the router


def test_single_process_bf16_round_trip_is_bit_exact(tmp_path: Path) -> None:
    """(fp32 parity and round trip of this config: tests/test_families.py, qwen3_moe.)"""
    from bridgegen.engines.model import ModelBridge

    folder = make_qwen3_moe(tmp_path / "bf16", torch.bfloat16)
    bridge = ModelBridge.from_hf_dir(folder)
    model = bridge.build_model()
    bridge.load_hf_weights(model)
    bridge.export_hf(model, tmp_path / "out")
    assert_bit_exact(folder, tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "layout"),
    # Two ranks: dense tensors are data-parallel replicas; experts split over EP or expert-TP.
    [("ep2", {"ep": 2}), ("etp2", {"etp": 2})],
)
def test_expert_parallel_layouts(
    name: str, layout: dict[str, int], moe: dict[str, Any], tmp_path: Path
) -> None:
    results = run_on_ranks(dist_cases.convert, 2, str(moe["fp32"]), str(tmp_path / "out"), layout)
    logits = [r["logits"] for r in results if r["logits"] is not None]
    assert logits
    for found in logits:
        diff = (found - moe["reference"]).abs().max().item()
        print(f"qwen3_moe {name}: max|diff| vs HF {diff:.3e}")
        assert diff <= LOGIT_ATOL
        assert torch.equal(found.argmax(-1), moe["reference"].argmax(-1))
    assert_bit_exact(moe["fp32"], tmp_path / "out")


STACKED_SPEC = """\
description: Qwen3-MoE checkpoints that keep each layer's experts stacked in one tensor
extends: qwen3_moe
architectures: [StackedQwen3MoeForCausalLM]
model_types: [qwen3_moe_stacked]
weights:
  decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight:
    hf: model.layers.{layer}.mlp.experts.gate_up_proj     # [E, 2 * moe_ffn, hidden], rows [gate; up]
    kind: fused_gate_up
    hf_stacked_experts: true
  decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc2.weight:
    hf: model.layers.{layer}.mlp.experts.down_proj        # [E, hidden, moe_ffn]
    kind: row
    hf_stacked_experts: true
"""


def stacked_bridge(root: Path) -> Any:
    """The bridge generated from STACKED_SPEC (a spec file alone, beside the repo's specs)."""
    import shutil

    from bridgegen.spec.generate import render_project

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "specs", root / "specs")
    (root / "specs" / "qwen3_moe_stacked.yaml").write_text(STACKED_SPEC)
    files = render_project(root)
    path = root / "qwen3_moe_stacked.py"
    path.write_text(files["generated/qwen3_moe_stacked.py"])
    root.joinpath("bridge_file").write_text(str(path))
    return dist_cases.bridge_class(path)


def stack_experts(source: Path, target: Path, experts: int = 4) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    tensors = tensors_of(source)
    stacked: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if ".mlp.experts." not in name:
            stacked[name] = tensor
    for layer in (1, 2):
        prefix = f"model.layers.{layer}.mlp.experts"
        stacked[f"{prefix}.gate_up_proj"] = torch.stack(
            [
                torch.cat(
                    [tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"]]
                )
                for e in range(experts)
            ]
        )
        stacked[f"{prefix}.down_proj"] = torch.stack(
            [tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(experts)]
        )
    target.mkdir()
    save_file(stacked, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["StackedQwen3MoeForCausalLM"]
    config["model_type"] = "qwen3_moe_stacked"
    (target / "config.json").write_text(json.dumps(config))
    return stacked


def test_stacked_expert_tensors_map_by_spec_alone(moe: dict[str, Any], tmp_path: Path) -> None:
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    bridge_class = stacked_bridge(tmp_path / "project")
    stacked = stack_experts(moe["fp32"], tmp_path / "stacked")
    config = json.loads((tmp_path / "stacked" / "config.json").read_text())
    bridge = ModelBridge(bridge_class, bridge_class.to_megatron_config(config), tmp_path / "stacked")
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    parity = compare(moe["reference"], megatron_logits(model, dist_cases.tokens(VOCAB), VOCAB))
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
    # Export (single process, streaming) rebuilds each stacked tensor once all its experts came by.
    bridge.export_hf(model, tmp_path / "out")
    exported = tensors_of(tmp_path / "out")
    assert sorted(exported) == sorted(stacked)
    assert all(torch.equal(exported[k], stacked[k]) for k in stacked)
    streamed = dict(bridge.iter_hf_weights(model))
    assert streamed["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 64, 64)


def test_bf16_routing_matches_transformers(tmp_path: Path) -> None:
    """transformers computes Qwen3-MoE router logits in the model's dtype and only the softmax
    in float32 (modeling_qwen3_moe.py Qwen3MoeTopKRouter.forward: ``F.linear(hidden_states,
    self.weight)``, then ``softmax(..., dtype=torch.float)``), which is megatron-core's default
    (no ``moe_router_dtype``): in bf16 each token goes to the experts transformers picks. With
    float32 routing some tokens would go elsewhere, so the test would see a wrong setting."""
    from transformers import AutoModelForCausalLM

    from bridgegen.engines.model import ModelBridge

    folder = make_qwen3_moe(tmp_path / "hf", torch.bfloat16, experts=16, top_k=4)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    bridge = ModelBridge.from_hf_dir(folder)
    assert bridge.config.values.get("moe_router_dtype") is None
    model = bridge.build_model(torch.bfloat16)
    bridge.load_hf_weights(model)
    hidden = torch.randn(16384, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    hf_chosen, hf_weights = hf_expert_sets(hf.model.layers[1].mlp.gate, hidden, 16)
    router = model.decoder.layers[1].mlp.router
    chosen, weights = megatron_expert_sets(router, hidden)
    assert torch.equal(chosen, hf_chosen)
    assert torch.allclose(weights, hf_weights, atol=0, rtol=0)  # both bf16, same arithmetic
    differing = tokens_routed_differently(router, hidden, hf_chosen, "fp32")
    print(f"qwen3_moe: float32 routing differs from transformers on {differing} of {len(hidden)} tokens")
    assert differing >= 5


@pytest.mark.parametrize(
    "layout",
    [{"tp": 2}, {"etp": 2}, {"ep": 2}],
    ids=lambda layout: "-".join(f"{k}{v}" for k, v in layout.items()),
)
def test_stacked_expert_tensors_at_parallel_layouts(
    layout: dict[str, int], moe: dict[str, Any], tmp_path: Path
) -> None:
    """Each rank reads only its experts' slices of the stacked tensors and writes its slices
    of the stacked tensors back, at tensor, expert-tensor and expert parallelism."""
    stacked_bridge(tmp_path / "project")
    bridge_file = (tmp_path / "project" / "bridge_file").read_text()
    stacked = stack_experts(moe["fp32"], tmp_path / "stacked")
    results = run_on_ranks(
        dist_cases.convert, 2, str(tmp_path / "stacked"), str(tmp_path / "out"), layout, None, bridge_file
    )
    for found in (r["logits"] for r in results if r["logits"] is not None):
        assert (found - moe["reference"]).abs().max().item() <= LOGIT_ATOL
        assert torch.equal(found.argmax(-1), moe["reference"].argmax(-1))
    exported = tensors_of(tmp_path / "out")
    assert sorted(exported) == sorted(stacked)
    assert all(torch.equal(exported[k], stacked[k]) for k in stacked)
