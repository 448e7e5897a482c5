"""The slice of each HF tensor an inference engine's TP rank keeps (bridgegen.plan.inference_tp),
checked against vLLM's split written out here by HF name, for a tiny Llama and Qwen3-MoE.

The sync itself (``WeightExport(...)(inference_tp=(k, K))``) is checked in
tests/test_weight_sync.py, with ``expected_slice`` below.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.weight_rules import GateUp, WeightKind
from bridgegen.plan.inference_tp import hf_slice, matched_slice, vocab_rows
from bridgegen.plan.transforms import Layout
from bridgegen.plan.weight_map import MatchedTensor, WeightMap

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def expected_slice(
    name: str, shape: tuple[int, ...], k: int, count: int, vocab: int, *, transposed_layout: bool = False
) -> tuple[int, int, int] | None:
    """vLLM's slice of HF tensor ``name`` on TP rank k of ``count``, by name (the tiny models of
    these tests: 4 heads, 2 key/value heads). ``transposed_layout``: tests/test_layouts.py's
    storage (o_proj and MLP tensors transposed, gate/up interleaved, experts stacked)."""

    def even(dim: int) -> tuple[int, int, int]:
        step = shape[dim] // count
        return dim, k * step, (k + 1) * step

    if count == 1:
        return None
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        per = -(-vocab // 64) * 64 // count  # padded to a multiple of 64, then split
        return 0, min(k * per, vocab), min((k + 1) * per, vocab)
    if name.endswith("q_proj.weight"):
        return even(0)
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        if count <= KV_HEADS:
            return even(0)
        head = k * KV_HEADS // count  # replicated key/value heads
        return 0, head * HEAD_DIM, (head + 1) * HEAD_DIM
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return even(0)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return even(0 if transposed_layout else 1)
    if name.endswith("gate_up_proj"):  # [(E,) hidden, 2 * ffn], gate and up rows interleaved
        dim = len(shape) - 1
        step = shape[dim] // 2 // count
        return dim, 2 * k * step, 2 * (k + 1) * step
    if name.endswith("down_proj"):  # [(E,) ffn, hidden]
        return even(len(shape) - 2)
    if name.endswith(("norm.weight", "mlp.gate.weight")):
        return None
    raise AssertionError(f"no expectation for {name}")


def _models() -> dict[str, Any]:
    from transformers import AutoConfig

    common = {
        "hidden_size": 64,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": 250,
        "max_position_embeddings": 128,
    }
    return {
        "llama": AutoConfig.for_model(
            "llama", intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False, **common
        ),
        "qwen3_moe": AutoConfig.for_model(
            "qwen3_moe",
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            mlp_only_layers=[0],
            head_dim=HEAD_DIM,
            **common,
        ),
    }


def _matched_by_hf_name(weight_map: WeightMap, layers: int, experts: int) -> dict[str, MatchedTensor]:
    """Every HF tensor of the rules, with its matched Megatron tensor."""
    out = {}
    for rule in weight_map.rules:
        templates = (rule.megatron_name, *rule.hf_names)
        layer_numbers = range(layers) if any("{layer}" in t for t in templates) else [None]
        expert_numbers = range(experts) if any("{expert}" in t for t in templates) else [None]
        for layer, expert in itertools.product(layer_numbers, expert_numbers):
            matched = MatchedTensor(rule.megatron_name, rule, layer, expert)
            for name in matched.hf_names():
                out[name] = matched
    return out


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bridgegen.plan.conversion import Conversion

    config = _models()[request.param]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)  # the HF names as stored
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    weight_map = Conversion.from_hf_config(config.to_dict()).weight_map()
    matched = _matched_by_hf_name(weight_map, config.num_hidden_layers, getattr(config, "num_experts", 0))
    assert set(tensors) <= set(matched)
    return {"tensors": tensors, "matched": matched, "heads": weight_map.layout(), "vocab": config.vocab_size}


@pytest.mark.parametrize("count", [1, 2, 4])
def test_slices_are_vllms_and_cover_each_tensor(model: dict[str, Any], count: int) -> None:
    """Every rank's slice is the one vLLM keeps; the distinct slices over the ranks, put
    together in rank order, are the whole tensor (k/v heads at K=4 > 2 heads: each slice held
    by K / 2 ranks)."""
    sent = [0] * count
    full = 0
    for name, tensor in model["tensors"].items():
        shape = tuple(tensor.shape)
        parts = []
        full += tensor.nbytes
        for k in range(count):
            found = matched_slice(model["matched"][name], name, shape, k, count, model["heads"])
            assert (None if found is None else tuple(found)) == expected_slice(
                name, shape, k, count, model["vocab"]
            )
            piece = (
                tensor if found is None else tensor.narrow(found.dim, found.start, found.stop - found.start)
            )
            sent[k] += piece.nbytes
            if found is None:
                assert torch.equal(piece, tensor)
            elif not parts or not torch.equal(parts[-1][1], piece):
                parts.append((found.dim, piece))
        if len(parts) > 1:
            assert torch.equal(torch.cat([p for _, p in parts], dim=parts[0][0]), tensor), name
        elif parts:
            assert count == 1 or torch.equal(parts[0][1], tensor), name
    print(f"inference TP {count}: bytes per rank {sent} of {full} ({[round(s / full, 3) for s in sent]})")
    assert all(s <= full / count * 1.25 for s in sent)


def test_kv_heads_replicate_as_vllm_does() -> None:
    heads = Layout(8, 2, 4, 100)
    owned = [hf_slice(WeightKind.qkv, "k", (8,), k, 8, heads, part=1) for k in range(8)]
    assert [s.start // 4 if s else None for s in owned] == [0, 0, 0, 0, 1, 1, 1, 1]
    q = [hf_slice(WeightKind.qkv, "q", (32, 3), k, 8, heads, part=0) for k in range(8)]
    assert [tuple(s) if s else None for s in q] == [(0, 4 * k, 4 * k + 4) for k in range(8)]
    with pytest.raises(WeightError, match="cannot be replicated evenly"):
        hf_slice(WeightKind.qkv, "k", (8,), 0, 3, heads, part=1)


def test_vocabulary_rows_follow_vllms_padding() -> None:
    assert [vocab_rows(250, k, 4) for k in range(4)] == [(0, 64), (64, 128), (128, 192), (192, 250)]
    assert [vocab_rows(100, k, 4) for k in range(4)] == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert [vocab_rows(65, k, 4) for k in range(4)] == [
        (0, 32),
        (32, 64),
        (64, 65),
        (65, 65),
    ]  # none for rank 3
    with pytest.raises(WeightError, match="does not split evenly"):
        vocab_rows(250, 0, 3)


def test_layouts_shift_the_dim() -> None:
    heads = Layout(4, 2, 16, 100)
    # Stacked experts, transposed, interleaved gate/up: [E, hidden, 2 * ffn].
    found = hf_slice(
        WeightKind.fused_gate_up, "g", (4, 64, 64), 1, 2, heads,
        transposed=True, stacked_experts=True, gate_up=GateUp.interleaved,
    )  # fmt: skip
    assert tuple(found or ()) == (2, 32, 64)
    assert tuple(
        hf_slice(WeightKind.row, "d", (4, 32, 64), 1, 2, heads, transposed=True, stacked_experts=True) or ()
    ) == (
        1,
        16,
        32,
    )
    with pytest.raises(WeightError, match="not one contiguous slice"):
        hf_slice(WeightKind.fused_qkv, "qkv", (128, 64), 0, 2, heads)
    with pytest.raises(WeightError, match="not one contiguous slice"):
        hf_slice(WeightKind.fused_gate_up, "gate_up", (128, 64), 0, 2, heads)
    with pytest.raises(WeightError, match="is not a rank"):
        hf_slice(WeightKind.column, "c", (8, 2), 2, 2, heads)
