"""Mixtral, Qwen2-MoE and StarCoder2, each built from its bridge's ``example_config``.

What tests/test_families.py does not: fp32 logits of variants of each example (VARIANTS, within
LOGIT_ATOL: max |diff| over all logits, argmax equal everywhere); HF -> Megatron checkpoint -> HF
through the CLI (``bridgegen import`` / ``bridgegen export``) keeps every MoE switch in the
Megatron-LM arguments, and the exported config.json equals the source's as transformers reads it.
The example configs make each feature count: Mixtral and StarCoder2 windows shorter than the
test sequence, Qwen2-MoE's dense layer among MoE layers and its shared-expert gate,
StarCoder2's biases (random, non-zero, as every other parameter here); VARIANTS check the
other side of each option. Also: bf16 routing against transformers', configs each bridge
must refuse, and a two-process TP=2 / EP=2 round trip.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from bridgegen.generated import BRIDGES, bridge_for_config
from checkpoints import assert_bit_exact
from routing import hf_expert_sets, megatron_expert_sets, tokens_routed_differently

from bridgegen.cli.main import main
from bridgegen.formats import dist_checkpoint, foreign_config

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

FAMILIES = ("mixtral", "qwen2_moe", "starcoder2")
SEQ = 16  # longer than the example configs' sliding windows
LOGIT_ATOL = 1e-5
# Written by transformers itself, not by the mapping.
VOLATILE = {"_name_or_path", "transformers_version"}


def bridge_of(family: str) -> Any:
    (bridge,) = [b for b in BRIDGES if b.family == family]
    return bridge


def bridge_config(folder: Path) -> Any:
    config = json.loads((folder / "config.json").read_text())
    return bridge_for_config(config).to_megatron_config(config)


def example_model(family: str, **overrides: Any) -> Any:
    """The family's tiny transformers model: norms around 1, every other parameter (biases and
    routers included) random with std 0.1, so no bias is zero and no top-k choice is a tie."""
    from transformers import AutoConfig, AutoModelForCausalLM

    bridge = bridge_of(family)
    config = AutoConfig.for_model(bridge.model_types[0], **{**bridge.example_config, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))


def loaded_config(folder: Path) -> dict[str, Any]:
    """The config as transformers reads it, without the fields transformers itself writes.
    An absent head_dim reads as hidden_size // num_attention_heads, as every attention class
    of these families reads it (e.g. modeling_mixtral.py MixtralAttention.__init__)."""
    from transformers import AutoConfig

    config: dict[str, Any] = AutoConfig.from_pretrained(folder).to_dict()
    for key in VOLATILE:
        config.pop(key, None)
    if config.get("head_dim") is None:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return config


def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    family: str = request.param
    folder = tmp_path_factory.mktemp(family) / "hf"
    model = example_model(family)
    model.save_pretrained(folder)
    ids = tokens(model.config.vocab_size)
    return {
        "family": family,
        "folder": folder,
        "model": model,
        "ids": ids,
        "reference": hf_logits(model, ids),
    }


def fp32_parity(folder: Path, reference: torch.Tensor, ids: torch.Tensor) -> Any:
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    bridge = ModelBridge.from_hf_dir(folder)
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    return compare(reference, megatron_logits(model, ids, bridge.config.vocab_size))


# The other side of each option the example configs set.
VARIANTS = [
    ("mixtral", {"sliding_window": None}),
    ("qwen2_moe", {"qkv_bias": False, "decoder_sparse_step": 2, "mlp_only_layers": [3]}),
    ("starcoder2", {"use_bias": False, "tie_word_embeddings": False}),
]


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=[family for family, _ in VARIANTS])
def test_fp32_logits_match_transformers_for_variants(
    family: str, overrides: dict[str, Any], tmp_path: Path
) -> None:
    model = example_model(family, **overrides)
    model.save_pretrained(tmp_path)
    ids = tokens(model.config.vocab_size)
    parity = fp32_parity(tmp_path, hf_logits(model, ids), ids)
    print(f"{family} {overrides} fp32: {parity}")
    assert parity.max_abs_diff <= LOGIT_ATOL
    assert parity.argmax_agreement == 1.0


def test_cli_round_trip_is_bit_exact_and_config_survives(saved: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    checkpoint, out = tmp_path / "megatron", tmp_path / "hf"
    assert main(["import", "--hf", str(saved["folder"]), "--out", str(checkpoint)]) == 0
    assert main(["export", "--megatron", str(checkpoint), "--out", str(out)]) == 0
    assert_bit_exact(saved["folder"], out)
    # The Megatron-LM arguments saved with the checkpoint build the same MoE layers: every MoE
    # on/off setting of the bridge's Megatron config has its value (Megatron-LM makes these
    # flags from TransformerConfig's fields, same names: megatron/training/arguments.py:2373).
    # They are read back as such from a checkpoint without bridgegen's own record.
    args = dist_checkpoint.read_common_state(checkpoint / "release")["args"]
    values = bridge_config(saved["folder"]).values
    switches = {k: v for k, v in values.items() if k.startswith("moe_") and isinstance(v, bool)}
    assert {k: vars(args).get(k) for k in switches} == switches
    read_back, _, _ = foreign_config.values_from_args(args)
    assert {k: read_back.get(k) for k in switches} == switches

    source, exported = loaded_config(saved["folder"]), loaded_config(out)
    assert exported == source
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(saved["model"])
    assert torch.equal(hf_logits(reloaded, saved["ids"]), saved["reference"])


@pytest.mark.parametrize("family", FAMILIES)
def test_example_config_exercises_the_family(family: str) -> None:
    """The features the tests above are meant to cover are really in the example configs."""
    from transformers import AutoConfig

    bridge = bridge_of(family)
    config = AutoConfig.for_model(bridge.model_types[0], **bridge.example_config).to_dict()
    values = bridge.to_megatron_config(config).values
    if family in ("mixtral", "starcoder2"):
        assert values["window_size"] is not None and values["window_size"][0] + 1 < SEQ
    if family == "qwen2_moe":
        assert values["moe_shared_expert_gate"] is True
        assert 0 in values["moe_layer_freq"] and 1 in values["moe_layer_freq"]
    if family == "starcoder2":
        assert values["add_bias_linear"] is True and values["normalization"] == "LayerNorm"


@pytest.mark.parametrize(
    ("family", "overrides"),
    # 16 experts, top 4: enough near-ties that float32 routing shows a difference.
    [
        ("mixtral", {"num_local_experts": 16, "num_experts_per_tok": 4}),
        ("qwen2_moe", {"num_experts": 16, "num_experts_per_tok": 4, "norm_topk_prob": True}),
    ],
    ids=["mixtral", "qwen2_moe-norm_topk_prob"],
)
def test_bf16_routing_picks_the_experts_transformers_picks(
    family: str, overrides: dict[str, Any], tmp_path: Path
) -> None:
    """In bf16 the Megatron router of layer 0 sends each of 16384 tokens to the experts
    transformers' router picks. transformers computes the router logits in the model dtype and
    the softmax and top-k in float32 (modeling_mixtral.py MixtralTopKRouter.forward,
    modeling_qwen2_moe.py Qwen2MoeTopKRouter.forward); megatron-core's top-k-then-softmax on
    model-dtype logits (moe_router_dtype unset) picks the same sets, float32 logits would not."""
    from bridgegen.engines.model import ModelBridge

    hf = example_model(family, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    hf = hf.to(torch.bfloat16)
    bridge = ModelBridge.from_hf_dir(tmp_path / "hf")
    assert bridge.config.values.get("moe_router_dtype") is None
    model = bridge.build_model(torch.bfloat16)
    bridge.load_hf_weights(model)
    experts = int(bridge.config.values["num_moe_experts"])
    hidden = torch.randn(16384, hf.config.hidden_size, generator=torch.Generator().manual_seed(1))
    hidden = hidden.to(torch.bfloat16)
    hf_chosen, _ = hf_expert_sets(hf.model.layers[0].mlp.gate, hidden, experts)
    router = model.decoder.layers[0].mlp.router
    chosen, _ = megatron_expert_sets(router, hidden)
    assert torch.equal(chosen, hf_chosen)
    differing = tokens_routed_differently(router, hidden, hf_chosen, "fp32")
    print(f"{family}: float32 routing differs from transformers on {differing} of {len(hidden)} tokens")
    assert differing >= 5


REFUSED = [
    # transformers jitters the whole MoE input in training (modeling_mixtral.py
    # MixtralSparseMoeBlock.forward); megatron-core's moe_input_jitter_eps jitters only the
    # router input, in eval too (router.py TopKRouter.apply_input_jitter): not the same model.
    ("mixtral", {"router_jitter_noise": 0.01}, "router_jitter_noise is not 0; "),
    # A sliding layer among full ones, which transformers reads from layer_types as given.
    (
        "qwen2_moe",
        {"layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]},
        "layer_types has sliding-attention layers, which are not supported ",
    ),
    # megatron-core leaves a single sigmoid weight as it is (moe_utils.py: renormalised only
    # when topk > 1); HF DeepSeek-V3 divides it by itself under norm_topk_prob.
    (
        "deepseek_v3",
        {"num_experts_per_tok": 1, "n_group": 1, "norm_topk_prob": True},
        "sigmoid routing: megatron-core renormalises the top-k weights exactly when num_experts_per_tok > 1",
    ),
    ("exaone4", {"sliding_window": None}, "sliding_window is null but layer_types has sliding_attention layers"),
    ("dots1", {"norm_topk_prob": False}, "sigmoid routing: megatron-core renormalises the top-k weights"),
    (
        "dots1",
        {"n_routed_experts": 8, "num_experts_per_tok": 3},
        "HF Dots1 ranks an expert group by the sum of its best two experts",
    ),
    ("glm4_moe", {"norm_topk_prob": False}, "norm_topk_prob is false with num_experts_per_tok > 1"),
    (
        "glm4_moe",
        {"n_routed_experts": 16, "num_experts_per_tok": 6, "n_group": 4, "topk_group": 2},
        "n_group > 1: HF GLM-4.5 ranks an expert group by the sum of its best two experts",
    ),
    ("smollm3", {"no_rope_layers": [1, 0, 1]}, "no_rope_layers must hold 1 (RoPE) or 0 (NoPE) for each of"),
    ("nemotron", {"attention_bias": True, "mlp_bias": False}, "attention_bias and mlp_bias differ"),
    ("apertus", {"attention_bias": True}, "'attention_bias' is true; the apertus bridge supports only false"),
    ("cohere", {"attention_bias": True}, "'attention_bias' is true; the cohere bridge supports only false"),
    ("cohere2", {"sliding_window": None}, "sliding_window is null or absent"),
    ("ernie4_5", {"attention_dropout": 0.1}, "attention_dropout is set; HF ERNIE 4.5 has no attention dropout"),
    ("helium", {"mlp_bias": True}, "'mlp_bias' is true; the helium bridge supports only false"),
    (
        "seed_oss",
        {"attention_bias": False, "attention_out_bias": True, "mlp_bias": True},
        "attention_out_bias and mlp_bias are true but attention_bias is false",
    ),
    (
        "olmo3",
        {"layer_types": ["sliding_attention", "full_attention"]},
        "layer_types must name sliding_attention or full_attention for each of the num_hidden_layers layers",
    ),
]


@pytest.mark.parametrize(("family", "fields", "message"), REFUSED, ids=[family for family, _, _ in REFUSED])
def test_configs_the_bridge_cannot_convert_are_refused(
    family: str, fields: dict[str, Any], message: str
) -> None:
    from transformers import AutoConfig

    from bridgegen.bridge.errors import ConfigError

    bridge = bridge_of(family)
    config = {**AutoConfig.for_model(family, **bridge.example_config).to_dict(), **fields}
    with pytest.raises(ConfigError, match="^config\\.json: " + re.escape(message)):
        bridge.to_megatron_config(config)


# One MoE family keeps the two-process runs short: Qwen2-MoE, whose layers hold the most kinds
# of tensor (dense MLP, experts, router, shared expert and its gate).
@pytest.mark.parametrize("family", ["qwen2_moe"])
def test_moe_at_tp2_ep2_round_trips_bit_exact(family: str, tmp_path: Path) -> None:
    """Two processes, TP=2 and EP=2 with whole experts (each rank one tensor slice and half the
    experts): import, verify logits against transformers, export; the export equals the
    source bit for bit."""
    folder = tmp_path / "hf"
    example_model(family).save_pretrained(folder)
    checkpoint, out = tmp_path / "megatron", tmp_path / "out"
    layout = ["--tp", "2", "--ep", "2", "--etp", "1"]
    assert main(["import", "--hf", str(folder), "--out", str(checkpoint), *layout]) == 0
    assert main(["verify", "--hf", str(folder), "--megatron", str(checkpoint), *layout]) == 0
    assert main(["export", "--megatron", str(checkpoint), "--out", str(out), *layout]) == 0
    assert_bit_exact(folder, out)
