"""The conversion plan: pure (made from a config and a meta-device model, no file), complete
(every HF tensor of the architecture is the source of exactly the Megatron tensors that name
it), and the one every path carries out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bridgegen.engines.model import ModelBridge
from bridgegen.engines.weights import model_tensors
from bridgegen.formats.safetensors import Checkpoint
from bridgegen.megatron.build import meta_model
from bridgegen.plan.weight_map import plan_tensor, plan_tensors
from tests.test_weight_map import QWEN3_MOE


@pytest.mark.parametrize("tied", [False, True])
def test_the_plan_of_a_meta_model_covers_every_hf_tensor(tied: bool, tmp_path: Path) -> None:
    """Planned from the config alone (no weights, no file), the plan names every tensor of the
    checkpoint transformers writes for that config, each for exactly one Megatron tensor."""
    import test_moe

    folder = test_moe.make_qwen3_moe(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text()) | {"tie_word_embeddings": tied}
    bridge = ModelBridge.from_hf_config(config)
    weight_map = bridge.weight_map()
    model = meta_model(bridge, torch.bfloat16)
    plan = plan_tensors(weight_map, model_tensors(model))

    params = dict(model_tensors(model))
    assert [entry.megatron_name for entry in plan] == list(params)
    for entry in plan:
        assert entry.shape == tuple(params[entry.megatron_name].shape)
        assert entry.dtype == params[entry.megatron_name].dtype
        assert (entry.layout.tp_rank, entry.layout.tp_size) == (0, 1)
    planned = [hf for entry in plan for hf in entry.hf_names]
    assert len(planned) == len(set(planned)), "an HF tensor is the source of two Megatron tensors"
    written = {name for name in Checkpoint.open(folder).names() if not weight_map.ignored(name)}
    if tied:
        written.discard("lm_head.weight")
    assert set(planned) == written


def test_the_plan_gives_each_tensor_its_tensor_parallel_slice() -> None:
    bridge = ModelBridge.from_hf_config(QWEN3_MOE)
    weight_map = bridge.weight_map()
    meta = torch.empty(8, 64, device="meta")
    dense = plan_tensor(
        weight_map, "decoder.layers.0.self_attention.linear_proj.weight", meta, tp=(1, 2), expert_tp=(0, 1)
    )
    expert = plan_tensor(
        weight_map,
        "decoder.layers.1.mlp.experts.linear_fc2.weight1",
        meta,
        layer_offset=2,
        expert_offset=2,
        tp=(1, 2),
        expert_tp=(0, 1),
    )
    assert (dense.layout.tp_rank, dense.layout.tp_size) == (1, 2)
    assert not dense.is_expert
    assert (expert.layout.tp_rank, expert.layout.tp_size) == (0, 1)
    assert expert.is_expert
    assert expert.hf_names == ("model.layers.3.mlp.experts.3.down_proj.weight",)
    assert expert.nbytes == 8 * 64 * 4
