"""Tensor layouts declared in a spec: HF tensors stored transposed (``hf_layout: transposed``,
``[in, out]`` for modules computing ``x @ W``) and fused gate/up tensors whose gate and up rows
alternate (``gate_up: interleaved``), as GPT-OSS stores its experts.

The checkpoint under test is a tiny Qwen3-MoE rewritten into that storage: each MoE layer's
experts stacked as ``gate_up_proj`` [E, hidden, 2 * ffn] (interleaved) and ``down_proj``
[E, ffn, hidden], the dense layer's MLP likewise unstacked, and every ``o_proj`` transposed.
``moe_intermediate_size == hidden_size`` and ``heads * head_dim == hidden_size`` make every
expert ``down_proj`` and every ``o_proj`` square: their shapes cannot tell the orientation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import dist_cases
import pytest
import torch
from checkpoints import assert_bit_exact, tensors_of

from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.weight_rules import GateUp, WeightKind
from bridgegen.engines.launch import run_on_ranks
from bridgegen.plan.transforms import Layout, interleave_gate_up, load_shard, shard_writes

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

VOCAB = 200
HIDDEN = 64
EXPERTS = 4
LOGIT_ATOL = 1e-5

LAYOUT_SPEC = """\
description: Qwen3-MoE stored with transposed and interleaved tensors
extends: qwen3_moe
architectures: [LayoutQwen3MoeForCausalLM]
model_types: [qwen3_moe_layouts]
weights:
  decoder.layers.{layer}.self_attention.linear_proj.weight:
    hf: model.layers.{layer}.self_attn.o_proj.weight              # [heads * head_dim, hidden]
    kind: row
    hf_layout: transposed
  decoder.layers.{layer}.mlp.linear_fc1.weight:
    hf: model.layers.{layer}.mlp.gate_up_proj                     # [hidden, 2 * ffn]
    kind: fused_gate_up
    hf_layout: transposed
    gate_up: interleaved
  decoder.layers.{layer}.mlp.linear_fc2.weight:
    hf: model.layers.{layer}.mlp.down_proj                        # [ffn, hidden]
    kind: row
    hf_layout: transposed
  decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight:
    hf: model.layers.{layer}.mlp.experts.gate_up_proj             # [E, hidden, 2 * moe_ffn]
    kind: fused_gate_up
    hf_stacked_experts: true
    hf_layout: transposed
    gate_up: interleaved
  decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc2.weight:
    hf: model.layers.{layer}.mlp.experts.down_proj                # [E, moe_ffn, hidden]
    kind: row
    hf_stacked_experts: true
    hf_layout: transposed
"""


def make_qwen3_moe(folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=HIDDEN,
        intermediate_size=96,
        moe_intermediate_size=HIDDEN,  # square expert down_proj
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        num_hidden_layers=3,
        mlp_only_layers=[0],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # 4 * 16 = hidden: square o_proj
        vocab_size=VOCAB,
        max_position_embeddings=128,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # distinct router rows so the top-k choice is not a tie
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder


def fused(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF storage of a gate/up pair: interleaved rows, transposed ([hidden, 2 * ffn])."""
    return interleave_gate_up(torch.cat([gate, up])).t()


def to_layout_storage(source: Path, target: Path, down_stored: str = "transposed") -> dict[str, torch.Tensor]:
    """Rewrite a per-expert Qwen3-MoE folder into the storage LAYOUT_SPEC declares. With
    ``down_stored="as_megatron"`` the expert ``down_proj`` is written untransposed (wrong)."""
    from safetensors.torch import save_file

    tensors = tensors_of(source)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if ".mlp." in name and ".mlp.gate.weight" not in name:
            continue
        out[name] = tensor.t().contiguous() if name.endswith("self_attn.o_proj.weight") else tensor
    out["model.layers.0.mlp.gate_up_proj"] = fused(
        tensors["model.layers.0.mlp.gate_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"]
    ).contiguous()
    out["model.layers.0.mlp.down_proj"] = tensors["model.layers.0.mlp.down_proj.weight"].t().contiguous()
    for layer in (1, 2):
        prefix = f"model.layers.{layer}.mlp.experts"
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [
                fused(tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"])
                for e in range(EXPERTS)
            ]
        )
        downs = [tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(EXPERTS)]
        out[f"{prefix}.down_proj"] = torch.stack(
            [d if down_stored == "as_megatron" else d.t() for d in downs]
        )
    target.mkdir(parents=True)
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["LayoutQwen3MoeForCausalLM"]
    config["model_type"] = "qwen3_moe_layouts"
    (target / "config.json").write_text(json.dumps(config))
    return out


def layout_bridge_file(root: Path) -> str:
    """The bridge generated from LAYOUT_SPEC (a spec file beside the repository's specs)."""
    from bridgegen.spec.generate import render_project

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "specs", root / "specs")
    (root / "specs" / "qwen3_moe_layouts.yaml").write_text(LAYOUT_SPEC)
    path = root / "qwen3_moe_layouts.py"
    path.write_text(render_project(root)["generated/qwen3_moe_layouts.py"])
    return str(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("layouts")
    source = make_qwen3_moe(root / "per_expert")
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    hf.train(False)
    with torch.no_grad():
        reference = hf(dist_cases.tokens(VOCAB)).logits.float()
    stored = to_layout_storage(source, root / "stored")
    return {
        "root": root,
        "source": source,
        "stored": root / "stored",
        "tensors": stored,
        "reference": reference,
        "bridge_file": layout_bridge_file(root / "project"),
    }


def logits_of(case: dict[str, Any], folder: Path) -> torch.Tensor:
    from bridgegen.engines.verify import megatron_logits

    bridge = dist_cases.model_bridge(str(folder), case["bridge_file"])
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    return megatron_logits(model, dist_cases.tokens(VOCAB), VOCAB)


def assert_same_tensors(expected: dict[str, torch.Tensor], folder: Path) -> None:
    found = tensors_of(folder)
    assert sorted(found) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), name


# ----------------------------------------------------------------- transforms


@pytest.mark.parametrize("tp_size", [1, 2])
def test_interleaved_shards_hold_whole_gate_and_up_rows(tp_size: int) -> None:
    """Rank r's Megatron shard is [gate rows of r; up rows of r], read from one contiguous run of
    the interleaved tensor; ``shard_writes`` puts every element back exactly once."""
    gate, up = torch.arange(8.0).view(4, 2), 100 + torch.arange(8.0).view(4, 2)
    stored = interleave_gate_up(torch.cat([gate, up]))
    assert torch.equal(stored[0::2], gate) and torch.equal(stored[1::2], up)
    back = torch.full_like(stored, -1.0)
    for rank in range(tp_size):
        layout = Layout(1, 1, 1, 1, rank, tp_size)
        rows = slice(rank * 4 // tp_size, (rank + 1) * 4 // tp_size)
        dest = torch.empty(2 * (4 // tp_size), 2)
        load_shard(
            WeightKind.fused_gate_up, dest, [stored], ("t",), layout, lambda t: t, gate_up=GateUp.interleaved
        )
        assert torch.equal(dest, torch.cat([gate[rows], up[rows]]))
        for _, view, data in shard_writes(
            WeightKind.fused_gate_up, dest, [back], ("t",), layout, gate_up=GateUp.interleaved
        ):
            assert torch.all(view == -1.0)  # nothing written twice
            view.copy_(data)
    assert torch.equal(back, stored)


# ------------------------------------------------------------ one process


def test_logits_match_hf_and_round_trip_is_bit_exact(case: dict[str, Any], tmp_path: Path) -> None:
    from bridgegen.engines.verify import compare, megatron_logits

    bridge = dist_cases.model_bridge(str(case["stored"]), case["bridge_file"])
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)

    parity = compare(case["reference"], megatron_logits(model, dist_cases.tokens(VOCAB), VOCAB))
    print(f"layouts single process: {parity}")
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
    bridge.export_hf(model, tmp_path / "out")
    assert_same_tensors(case["tensors"], tmp_path / "out")
    assert_bit_exact(case["stored"], tmp_path / "out")


def test_streaming_import_and_export_are_bit_exact(
    case: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF -> Megatron checkpoint -> HF without a model in memory (the CLI's path)."""
    from bridgegen.engines import stream_export as stream_export_module
    from bridgegen.engines.stream_export import stream_export
    from bridgegen.engines.stream_import import stream_import

    bridge = dist_cases.model_bridge(str(case["stored"]), case["bridge_file"])
    stream_import(bridge, case["stored"], tmp_path / "megatron", dtype=torch.float32)
    # The test's family is not among the generated bridges the checkpoint's family is looked up in.
    monkeypatch.setattr(
        stream_export_module, "conversion_for_checkpoint", lambda *_, **__: (bridge, torch.float32)
    )
    stream_export(tmp_path / "megatron", tmp_path / "out")
    assert_same_tensors(case["tensors"], tmp_path / "out")


# ------------------------------------------------------------- two ranks


@pytest.mark.parametrize(
    "layout",
    [{"tp": 2}, {"ep": 2}, {"etp": 2}],
    ids=lambda layout: "-".join(f"{k}{v}" for k, v in layout.items()),
)
def test_parallel_layouts_match_hf_and_round_trip(
    layout: dict[str, int], case: dict[str, Any], tmp_path: Path
) -> None:
    """Each rank reads its TP / expert slice of the transposed, interleaved tensors and writes
    it back in place (TP=2: o_proj columns and gate/up rows split; EP=2: whole experts;
    expert-TP=2: each expert's rows split)."""
    results = run_on_ranks(
        dist_cases.convert, 2, str(case["stored"]), str(tmp_path / "out"), layout, None, case["bridge_file"]
    )
    found = [r["logits"] for r in results if r["logits"] is not None]
    assert found
    for logits in found:
        diff = (logits - case["reference"]).abs().max().item()
        print(f"layouts {layout}: max|diff| vs HF {diff:.3e}")
        assert diff <= LOGIT_ATOL
        assert torch.equal(logits.argmax(-1), case["reference"].argmax(-1))
    assert_same_tensors(case["tensors"], tmp_path / "out")


# ------------------------------------------------------ wrong orientation


def test_square_tensor_stored_the_wrong_way_gives_wrong_logits(case: dict[str, Any], tmp_path: Path) -> None:
    """What no shape check can catch: the experts' square ``down_proj`` written [E, hidden, ffn]
    (Megatron's orientation) where the spec declares [E, ffn, hidden]. It loads without error,
    as it would under any rule that guessed the orientation from shapes; only the declaration
    makes the right checkpoint convert right (the test above), and this one gives wrong logits."""
    wrong = tmp_path / "wrong"
    to_layout_storage(case["source"], wrong, down_stored="as_megatron")
    diff = (logits_of(case, wrong) - case["reference"]).abs().max().item()
    print(f"square down_proj stored untransposed: max|diff| vs HF {diff:.3e}")
    assert diff > 1e-3


def test_non_square_tensor_stored_the_wrong_way_is_refused(case: dict[str, Any], tmp_path: Path) -> None:
    """A non-square tensor in the other orientation fails the shape check made after the
    declared layout is applied, and the error names the tensor and the declaration."""
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong"
    shutil.copytree(case["stored"], wrong)
    tensors = dict(case["tensors"])
    name = "model.layers.1.mlp.experts.gate_up_proj"
    tensors[name] = tensors[name].transpose(1, 2).contiguous()  # [E, 2 * ffn, hidden]
    save_file(tensors, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightError) as error:
        logits_of(case, wrong)
    message = str(error.value)
    assert name in message and "hf_layout transposed" in message and "gate_up interleaved" in message
