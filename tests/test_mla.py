"""DeepSeek V2 / V3 family weights (multi-latent attention, routed + shared experts, dense
first layers): Moonlight's and Kimi K2's field sets too. Single process, fp32 parity and
bit-exact round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dist_cases
import pytest
import torch
from checkpoints import tensors_of
from routing import hf_expert_sets, megatron_expert_sets, tokens_routed_differently
from safetensors.torch import load_file

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

VOCAB = 250
LOGIT_ATOL = 1e-5

COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    num_nextn_predict_layers=0,
)
VARIANTS: dict[str, dict[str, Any]] = {
    # sigmoid scoring with expert bias, group-limited routing, one shared expert, q LoRA
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        q_lora_rank=32,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    # YaRN RoPE with mscale on a sequence 3x its original context
    "deepseek_v3_yarn": dict(
        model_type="deepseek_v3",
        q_lora_rank=32,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    ),
    # V2-Lite: softmax over all experts, no renormalisation, no q LoRA, two shared experts
    "deepseek_v2": dict(
        model_type="deepseek_v2",
        q_lora_rank=None,
        n_shared_experts=2,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
    ),
    # Moonlight's field set: deepseek_v3 without q LoRA or groups
    "moonlight": dict(
        model_type="deepseek_v3",
        q_lora_rank=None,
        n_shared_experts=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
    ),
}


def build(folder: Path, name: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> tuple[Path, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(COMMON) | dict(VARIANTS[name]) | overrides
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # make routing non-trivial: spread router rows, random expert bias
        for layer in model.model.layers[COMMON["first_k_dense_replace"] :]:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
            bias = getattr(layer.mlp.gate, "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0.0, 0.1)
    model.to(dtype).save_pretrained(folder)
    model.train(False)
    return folder, model


def convert(folder: Path, dtype: torch.dtype | None, out: Path) -> Any:
    from bridgegen.engines.model import ModelBridge

    bridge = ModelBridge.from_hf_dir(folder)
    model = bridge.build_model(dtype)
    bridge.load_hf_weights(model)
    bridge.export_hf(model, out)
    return bridge, model


# deepseek_v2 and deepseek_v3 as they are here are the specs' example configs, run by
# tests/test_families.py.
@pytest.mark.parametrize("name", ["deepseek_v3_yarn", "moonlight"])
def test_logits_match_hf_and_round_trip_is_exact(name: str, tmp_path: Path) -> None:
    from bridgegen.engines.verify import compare, megatron_logits

    folder, hf = build(tmp_path / "hf", name)
    bridge, model = convert(folder, torch.float32, tmp_path / "out")
    assert bridge.config.rope.rope_type == ("yarn" if "yarn" in name else "default")
    tokens = dist_cases.tokens(VOCAB) if "yarn" not in name else torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        reference = hf(tokens).logits.float()
    parity = compare(reference, megatron_logits(model, tokens, VOCAB))
    print(f"{name}: {parity}")
    assert parity.max_abs_diff <= LOGIT_ATOL
    assert parity.argmax_agreement == 1.0
    a, b = tensors_of(folder), tensors_of(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    for key in (
        "q_lora_rank",
        "kv_lora_rank",
        "n_shared_experts",
        "first_k_dense_replace",
        "n_group",
        "topk_group",
    ):
        assert exported[key] == source[key], key


def test_bf16_round_trip_is_exact(tmp_path: Path) -> None:
    """Exact in every value. The router's expert bias comes back in float32 even from this
    all-bf16 source (made with ``.to(bf16)``): megatron-core keeps it in float32, and
    transformers itself saves DeepSeek-V3's e_score_correction_bias in float32
    (``_keep_in_fp32_modules_strict``)."""
    folder, _ = build(tmp_path / "hf", "deepseek_v3", torch.bfloat16)
    convert(folder, None, tmp_path / "out")
    a, b = tensors_of(folder), tensors_of(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for name in a:
        kept = torch.float32 if name.endswith("e_score_correction_bias") else a[name].dtype
        assert b[name].dtype == kept, name
        assert torch.equal(a[name].to(kept), b[name]), name


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2"])
def test_bf16_routing_matches_transformers(name: str, tmp_path: Path) -> None:
    """A bf16 model routes each token to the experts transformers picks. transformers computes
    DeepSeek routers in float32 (modeling_deepseek_v3.py DeepseekV3TopkRouter.forward:
    ``F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))``; V2 the
    same); the spec sets megatron-core's ``moe_router_dtype: fp32`` for it. The same router in
    bf16 (megatron-core's default) picks another expert set for some tokens of this layer, so
    the test would fail without the setting."""
    from bridgegen.engines.model import ModelBridge

    experts = dict(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1)
    folder, _ = build(tmp_path / "hf", name, torch.bfloat16, **experts)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    bridge = ModelBridge.from_hf_dir(folder)
    assert bridge.config.value("moe_router_dtype") == "fp32"
    model = bridge.build_model(torch.bfloat16)
    bridge.load_hf_weights(model)
    layer = COMMON["first_k_dense_replace"]
    hf_gate = hf.model.layers[layer].mlp.gate
    router = model.decoder.layers[layer].mlp.router
    hidden = torch.randn(16384, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    hidden = hidden.to(torch.bfloat16)
    hf_chosen, hf_weights = hf_expert_sets(hf_gate, hidden, experts["n_routed_experts"])
    chosen, weights = megatron_expert_sets(router, hidden)
    assert torch.equal(chosen, hf_chosen)
    assert torch.allclose(weights, hf_weights, atol=1e-6, rtol=0)
    differing = tokens_routed_differently(router, hidden, hf_chosen, None)  # megatron-core's default
    print(f"{name}: bf16 routing differs from transformers on {differing} of {len(hidden)} tokens")
    assert differing >= 5


def test_kimi_k2_model_type_is_served_by_the_deepseek_v3_bridge(tmp_path: Path) -> None:
    from bridgegen.engines.verify import compare, megatron_logits

    folder, hf = build(tmp_path / "hf", "moonlight")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "kimi_k2"  # what Kimi K2 checkpoints say; transformers has no class for it
    (folder / "config.json").write_text(json.dumps(config))
    bridge, model = convert(folder, torch.float32, tmp_path / "out")
    assert bridge.bridge.family == "deepseek_v3"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "kimi_k2"
    tokens = dist_cases.tokens(VOCAB)
    with torch.no_grad():
        parity = compare(hf(tokens).logits.float(), megatron_logits(model, tokens, VOCAB))
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0


def with_mtp_layer(folder: Path) -> dict[str, torch.Tensor]:
    """Give a tiny DeepSeek-V3 checkpoint one multi-token prediction layer (layer 3, after the
    3 decoder layers), laid out as DeepSeek-V3 checkpoints do; returns the source tensors."""
    from safetensors.torch import save_file

    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name in [n for n in tensors if n.startswith("model.layers.2.")]:
        tensors[name.replace("model.layers.2.", "model.layers.3.")] = torch.randn(
            tensors[name].shape, generator=generator
        )
    tensors["model.layers.3.enorm.weight"] = torch.randn(64, generator=generator)
    tensors["model.layers.3.hnorm.weight"] = torch.randn(64, generator=generator)
    tensors["model.layers.3.eh_proj.weight"] = torch.randn(64, 128, generator=generator)
    tensors["model.layers.3.shared_head.norm.weight"] = torch.randn(64, generator=generator)
    tensors["model.layers.3.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.3.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def test_multi_token_prediction_layer_round_trips(tmp_path: Path) -> None:
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    folder, hf = build(tmp_path / "hf", "deepseek_v3")
    source = with_mtp_layer(folder)
    bridge = ModelBridge.from_hf_dir(folder)
    assert bridge.config.value("mtp_num_layers") == 1
    model = bridge.build_model(torch.float32)
    names = [name for name, _ in model.named_parameters()]
    assert "mtp.layers.0.eh_proj.weight" in names
    # megatron-core 0.19 names the inner layer mtp_model_layer (checkpoint keys keep transformer_layer)
    assert any(
        f"mtp.layers.0.{inner}.self_attention.linear_q_down_proj.weight" in names
        for inner in ("transformer_layer", "mtp_model_layer")
    )
    bridge.load_hf_weights(model)
    tokens = dist_cases.tokens(VOCAB)
    with torch.no_grad():  # the MTP layer does not change the main head's logits
        parity = compare(hf(tokens).logits.float(), megatron_logits(model, tokens, VOCAB))
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
    bridge.export_hf(model, tmp_path / "out")
    exported = tensors_of(tmp_path / "out")
    # megatron-core shares the main embedding and head with MTP layers; the HF copies in the
    # MTP layer are written back from them (NextN / MTP loaders of inference engines read them).
    assert sorted(exported) == sorted(source)
    assert all(torch.equal(exported[k], source[k]) for k in exported)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_mtp_copies_are_written_at_tp2_pp2(tmp_path: Path) -> None:
    """The distributed export writes the MTP layer's copies of the embedding (first stage) and
    head (last stage) from the ranks that hold them, each TP rank its vocab slice."""
    from checkpoints import assert_bit_exact

    from bridgegen.engines.launch import run_on_ranks

    folder, _ = build(tmp_path / "hf", "deepseek_v3")
    with_mtp_layer(folder)
    run_on_ranks(dist_cases.convert, 2, str(folder), str(tmp_path / "out-tp2"), {"tp": 2})
    assert_bit_exact(folder, tmp_path / "out-tp2")
    run_on_ranks(
        dist_cases.convert,
        2,
        str(folder),
        str(tmp_path / "out-pp2"),
        {"pp": 2, "first_stage_layers": 2, "last_stage_layers": 1},
    )
    assert_bit_exact(folder, tmp_path / "out-pp2")


def test_mtp_layers_can_be_left_out(tmp_path: Path) -> None:
    """A checkpoint with an MTP layer after its decoder layers (model.layers.3.*) converts
    without it; the decoder is unaffected."""
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    folder, hf = build(tmp_path / "hf", "deepseek_v3")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.layers.2.")]:
        tensors[name.replace("model.layers.2.", "model.layers.3.")] = tensors[name].clone()
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))

    from bridgegen.bridge.errors import WeightError

    partial = ModelBridge.from_hf_dir(folder)  # layer 3 is there in part: not left out silently
    with pytest.raises(WeightError, match=r"missing tensor 'model\.layers\.3\.enorm\.weight'.*--drop-mtp"):
        partial.load_hf_weights(partial.build_model(torch.float32))
    bridge = ModelBridge.from_hf_dir(folder).without_mtp()
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    tokens = dist_cases.tokens(VOCAB)
    with torch.no_grad():
        parity = compare(hf(tokens).logits.float(), megatron_logits(model, tokens, VOCAB))
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
    bridge.export_hf(model, tmp_path / "out")
    assert not any(n.startswith("model.layers.3.") for n in tensors_of(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_declared_mtp_layer_without_tensors_is_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers 5 writes ``num_nextn_predict_layers: 1`` into every DeepSeek-V3 config it
    saves (its config's default) while its model has no MTP layer: the import says so in one
    warning and converts the decoder; the export declares 0 MTP layers and holds every source
    tensor bit-exact."""
    from checkpoints import assert_bit_exact

    from bridgegen.cli.main import main

    folder, _ = build(tmp_path / "hf", "deepseek_v3", num_nextn_predict_layers=1)
    assert json.loads((folder / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert not any(".layers.3." in name for name in tensors_of(folder))
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "ckpt")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 1
    assert "declares 1 multi-token prediction layer(s) (HF layer 3)" in warnings[0]
    assert main(["export", "--megatron", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["num_nextn_predict_layers"] == 0
    assert_bit_exact(folder, tmp_path / "out")


def test_deepseek_v3_at_expert_parallel_2(tmp_path: Path) -> None:
    """Routed experts split over two EP ranks, shared experts and the expert bias replicated."""
    from checkpoints import assert_bit_exact

    from bridgegen.engines.launch import run_on_ranks

    folder, hf = build(tmp_path / "hf", "deepseek_v3")
    with torch.no_grad():
        reference = hf(dist_cases.tokens(VOCAB)).logits.float()
    results = run_on_ranks(dist_cases.convert, 2, str(folder), str(tmp_path / "out"), {"ep": 2})
    for found in (r["logits"] for r in results if r["logits"] is not None):
        assert (found - reference).abs().max().item() <= LOGIT_ATOL
        assert torch.equal(found.argmax(-1), reference.argmax(-1))
    assert_bit_exact(folder, tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "layout"),
    [("deepseek_v3", {"tp": 2}), ("deepseek_v2", {"tp": 2}), ("deepseek_v3", {"tp": 2, "ep": 2, "etp": 1})],
    ids=["deepseek_v3-tp2", "deepseek_v2-tp2", "deepseek_v3-tp2-ep2-etp1"],
)
def test_latent_attention_at_tensor_parallel_2(name: str, layout: dict[str, int], tmp_path: Path) -> None:
    """MLA's projections split over TP ranks as megatron-core's plain layer spec splits them
    (latent norms replicated), with or without q LoRA, and with experts over EP inside the TP
    group: parity with HF and a bit-exact export."""
    from checkpoints import assert_bit_exact

    from bridgegen.engines.launch import run_on_ranks

    folder, hf = build(tmp_path / "hf", name)
    with torch.no_grad():
        reference = hf(dist_cases.tokens(VOCAB)).logits.float()
    results = run_on_ranks(dist_cases.convert, 2, str(folder), str(tmp_path / "out"), layout)
    logits = [r["logits"] for r in results if r["logits"] is not None]
    assert logits
    for found in logits:
        assert (found - reference).abs().max().item() <= LOGIT_ATOL
        assert torch.equal(found.argmax(-1), reference.argmax(-1))
    assert_bit_exact(folder, tmp_path / "out")
