"""The weight rules that go past one HF tensor per Megatron tensor: a constant tensor HF lacks
(``kind: constant``), one HF tensor feeding two Megatron tensors (``shares_hf_with``), an HF
tensor with a leading dim of 1 (``hf_layout: unsqueezed``), and list entries a spec drops
(``config.remove``). The families using them (Cohere, ERNIE 4.5 MoE) run end to end in
tests/test_families.py; here each rule is taken on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from bridgegen.generated.llama import LlamaBridge

from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.weight_rules import HFLayout, WeightKind, WeightRule
from bridgegen.engines.weights import iter_hf_from_full
from bridgegen.plan.transforms import load_shard
from bridgegen.plan.weight_map import ExportChecks, MatchedTensor, WeightMap
from bridgegen.spec.generate import load_specs
from bridgegen.spec.resolve import ResolvedSpec

REPO = Path(__file__).resolve().parent.parent

INPUT = "decoder.layers.{layer}.input_layernorm.weight"
PRE_MLP = "decoder.layers.{layer}.pre_mlp_layernorm.weight"
BIAS = "decoder.layers.{layer}.input_layernorm.bias"
HF_INPUT = "model.layers.{layer}.input_layernorm.weight"


def _weight_map() -> WeightMap:
    """Llama's rules with the pre-MLP norm repeating the input norm's HF tensor (a parallel
    block's one norm) and a zero bias on the input norm."""
    rules = [rule for rule in LlamaBridge.weight_rules if rule.megatron_name != PRE_MLP]
    rules += [
        WeightRule(
            PRE_MLP,
            (HF_INPUT,),
            WeightKind.replicated,
            te_megatron_name="decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
            shares_hf_with=INPUT,
        ),
        WeightRule(BIAS, (), WeightKind.constant, value=0.0),
    ]
    config = LlamaBridge.to_megatron_config(LlamaBridge.example_hf_config())
    return WeightMap(rules, config, LlamaBridge.hf_ignore)


def _layer(
    norm: torch.Tensor, copy: torch.Tensor, bias: torch.Tensor, layer: int = 0
) -> list[tuple[str, torch.Tensor]]:
    return [
        (f"decoder.layers.{layer}.pre_mlp_layernorm.weight", copy),
        (f"decoder.layers.{layer}.input_layernorm.bias", bias),
        (f"decoder.layers.{layer}.input_layernorm.weight", norm),
    ]


def test_a_shared_hf_tensor_is_written_once_and_a_constant_not_at_all() -> None:
    norm = torch.randn(64)
    out = dict(iter_hf_from_full(_weight_map(), _layer(norm, norm.clone(), torch.zeros(64))))
    assert list(out) == ["model.layers.0.input_layernorm.weight"]
    assert torch.equal(out["model.layers.0.input_layernorm.weight"], norm)


def test_copies_that_came_apart_are_refused_naming_both() -> None:
    norm = torch.randn(64)
    copy = norm.clone()
    copy[:3] += 1
    with pytest.raises(
        WeightError,
        match=r"'decoder\.layers\.0\.pre_mlp_layernorm\.weight' and 'decoder\.layers\.0\.input_layernorm\.weight' "
        r"come from one HF tensor, but 3 of 64 entries now differ",
    ):
        list(iter_hf_from_full(_weight_map(), _layer(norm, copy, torch.zeros(64))))


def test_a_constant_tensor_that_moved_is_refused() -> None:
    bias = torch.zeros(64)
    bias[5] = 1e-3
    with pytest.raises(WeightError, match=r"input_layernorm\.bias': 1 of 64 entries differ from 0\.0"):
        list(iter_hf_from_full(_weight_map(), _layer(torch.ones(64), torch.ones(64), bias)))


def test_a_copy_whose_source_the_export_lacks_is_refused() -> None:
    checks = ExportChecks(_weight_map())
    name = "decoder.layers.1.pre_mlp_layernorm.weight"
    assert not checks.offer(name, torch.ones(8), checks.weight_map.match(name))
    with pytest.raises(
        WeightError, match=r"repeats the HF tensor of 'decoder\.layers\.\{layer\}\.input_layernorm"
    ):
        checks.finish()


def test_a_copy_names_its_source_in_the_same_naming_style() -> None:
    weight_map = _weight_map()
    assert weight_map.shared_source("decoder.layers.3.pre_mlp_layernorm.weight") == (
        "decoder.layers.3.input_layernorm.weight"
    )
    assert weight_map.shared_source("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == (
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    )
    assert weight_map.shared_source("decoder.layers.3.input_layernorm.weight") is None


def test_both_tensors_import_from_the_one_hf_tensor_and_the_constant_is_filled() -> None:
    weight_map = _weight_map()
    copy = weight_map.match("decoder.layers.2.pre_mlp_layernorm.weight")
    assert copy.hf_names() == ("model.layers.2.input_layernorm.weight",) and not copy.exported
    bias = weight_map.match("decoder.layers.2.input_layernorm.bias")
    assert bias.hf_names() == () and not bias.exported
    dest = torch.full((64,), 7.0)
    layout = weight_map.layout()
    load_shard(WeightKind.constant, dest, [], (), layout, lambda t: t, value=0.0)
    assert torch.equal(dest, torch.zeros(64))


def test_unsqueezed_hf_tensors_drop_and_regain_their_leading_one() -> None:
    rule = WeightRule(
        "decoder.layers.{layer}.mlp.router.expert_bias",
        ("model.layers.{layer}.mlp.bias",),
        WeightKind.replicated,
        hf_layout=HFLayout.unsqueezed,
    )
    matched = MatchedTensor("decoder.layers.0.mlp.router.expert_bias", rule, 0)
    hf = torch.randn(1, 8)
    megatron = matched.select(hf)
    assert megatron.shape == (8,) and megatron.data_ptr() == hf.data_ptr()
    assert torch.equal(matched.as_stored(megatron), hf)
    with pytest.raises(
        WeightError,
        match=r"'model\.layers\.0\.mlp\.bias': hf_layout unsqueezed needs a leading dim of 1, got shape \[2, 4\]",
    ):
        matched.select(torch.randn(2, 4))


def test_config_remove_drops_inherited_list_entries(tmp_path: Path) -> None:
    """Seed-OSS-like: a Llama variant with biased q/k/v drops Llama's refusal of attention_bias
    and its listed behaviour-free field."""
    from bridgegen.spec.generate import load_external_specs

    llama = _resolved("llama")
    assert any("attention_bias" in message for _, message in llama.hf_checks)
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "acme.yaml").write_text(
        "description: a Llama without one of its checks\n"
        "extends: llama\n"
        "architectures: [AcmeForCausalLM]\n"
        "model_types: [acme]\n"
        "config:\n"
        "  remove:\n"
        f"    hf_checks: [{_llama_check_on('attention_bias')!r}]\n"
        "example_config: {hidden_act: silu, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,\n"
        "  num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 128, max_position_embeddings: 64}\n",
        encoding="utf-8",
    )
    (acme,) = load_external_specs(specs, tmp_path / "bridges_acme")
    assert len(acme.hf_checks) == len(llama.hf_checks) - 1
    assert not any("attention_bias" in message for _, message in acme.hf_checks)


def _resolved(family: str) -> ResolvedSpec:
    return next(spec for spec in load_specs(REPO) if spec.family == family)


def _llama_check_on(field: str) -> str:
    data = yaml.safe_load((REPO / "specs" / "llama.yaml").read_text(encoding="utf-8"))
    checks = data.get("config", {}).get("hf_checks", [])
    return next(check["expect"] for check in checks if field in check["expect"])
