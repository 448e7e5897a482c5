"""A new family is one YAML file: write a spec, render it, import the module, convert configs."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bridgegen.bridge.base import Bridge
from bridgegen.bridge.config import MegatronConfig
from bridgegen.bridge.errors import ConfigError
from bridgegen.bridge.weight_rules import WeightKind
from bridgegen.plan.bridges import find_bridge
from bridgegen.spec.generate import render_project

REPO = Path(__file__).resolve().parent.parent

TOY_SPEC = """\
description: Toy LM, a made-up family added by a single YAML file
extends: _base
architectures: [ToyForCausalLM]
model_types: [toy]
activation_default: silu
rope:
  supported: [default, linear]
config:
  renames:
    attention_bias: add_qkv_bias
  hf_optional:
    attention_bias: false
    partial_rotary_factor: 1.0
  to_megatron:
    rotary_percent: "partial_rotary_factor"
  to_hf:
    partial_rotary_factor: "rotary_percent"
  hf_checks:
    - expect: "hidden_size % num_attention_heads == 0"
      message: hidden_size must be a multiple of num_attention_heads
  hf_defaults:
    use_cache: true
weights:
  decoder.layers.{layer}.self_attention.linear_qkv.bias:
    hf:
      - model.layers.{layer}.self_attn.q_proj.bias
      - model.layers.{layer}.self_attn.k_proj.bias
      - model.layers.{layer}.self_attn.v_proj.bias
    kind: qkv
    when: add_qkv_bias
"""

HF_CONFIG: dict[str, Any] = {
    "architectures": ["ToyForCausalLM"],
    "model_type": "toy",
    "hidden_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 688,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    "attention_bias": True,
    "partial_rotary_factor": 0.5,
    "hidden_act": "gelu_pytorch_tanh",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
}


@pytest.fixture(scope="module")
def toy_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    root = tmp_path_factory.mktemp("toy_project")
    (root / "specs").mkdir()
    shutil.copy(REPO / "specs" / "_base.yaml", root / "specs" / "_base.yaml")
    (root / "specs" / "toy.yaml").write_text(TOY_SPEC, encoding="utf-8")

    files = render_project(root)
    assert sorted(files) == ["generated/__init__.py", "generated/toy.py", "specs/spec.schema.json"]
    assert "from bridgegen.generated.toy import ToyBridge" in files["generated/__init__.py"]

    package = root / "toy_package"
    package.mkdir()
    module_path = package / "toy.py"
    module_path.write_text(files["generated/toy.py"], encoding="utf-8")
    name = "bridgegen_test_generated_toy"
    spec = importlib.util.spec_from_file_location(name, module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def toy(toy_module: ModuleType) -> type[Bridge]:
    bridge: type[Bridge] = toy_module.ToyBridge
    assert issubclass(bridge, Bridge)
    return bridge


def test_class_attributes(toy: type[Bridge]) -> None:
    assert toy.family == "toy"
    assert toy.source_spec == "specs/toy.yaml"
    assert toy.architectures == ("ToyForCausalLM",)
    assert toy.model_types == ("toy",)
    assert toy.megatron_model == "gpt"
    assert toy.activation_field == "hidden_act"
    assert toy.activation_default == "silu"
    assert toy.activations["gelu_pytorch_tanh"] == "gelu_tanh"
    assert toy.rope_types == ("default", "linear")
    assert find_bridge((toy,), {"architectures": ["ToyForCausalLM"]}) is toy
    assert find_bridge((toy,), {"model_type": "toy"}) is toy


def test_weight_rules(toy: type[Bridge]) -> None:
    rules = {rule.megatron_name: rule for rule in toy.weight_rules}
    qkv_bias = rules["decoder.layers.{layer}.self_attention.linear_qkv.bias"]
    assert qkv_bias.kind is WeightKind.qkv
    assert qkv_bias.hf_names == (
        "model.layers.{layer}.self_attn.q_proj.bias",
        "model.layers.{layer}.self_attn.k_proj.bias",
        "model.layers.{layer}.self_attn.v_proj.bias",
    )
    assert rules["decoder.layers.{layer}.mlp.linear_fc1.weight"].kind is WeightKind.gate_up
    config = toy.to_megatron_config(HF_CONFIG)
    assert qkv_bias.applies(config)
    # Tied embeddings: no separate output layer.
    assert not rules["output_layer.weight"].applies(config)
    untied = toy.to_megatron_config({**HF_CONFIG, "tie_word_embeddings": False, "attention_bias": False})
    assert rules["output_layer.weight"].applies(untied)
    assert not qkv_bias.applies(untied)


def test_hf_to_megatron(toy: type[Bridge]) -> None:
    config = toy.to_megatron_config(HF_CONFIG)
    assert config.family == "toy"
    assert config.megatron_model == "gpt"
    assert config.activation == "gelu_tanh"
    assert config.hf_activation == "gelu_pytorch_tanh"
    assert config.hf_architecture == "ToyForCausalLM"
    assert config.rope.rope_type == "linear"
    assert config.rope.param("factor") == 2.0
    assert dict(config.values) == {
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "attention_dropout": 0.0,
        "ffn_hidden_size": 688,
        "gated_linear_unit": True,
        "hidden_size": 256,
        "init_method_std": 0.02,
        "kv_channels": 32,
        "layernorm_epsilon": 1e-5,
        "max_sequence_length": 2048,
        "normalization": "RMSNorm",
        "num_attention_heads": 8,
        "num_layers": 3,
        "num_query_groups": 2,
        "position_embedding_type": "rope",
        "rotary_base": 500000.0,
        "rotary_percent": 0.5,
        "share_embeddings_and_output_weights": True,
        "vocab_size": 1000,
    }
    # Unmapped fields travel through; fields describing the file do not.
    assert dict(config.hf_passthrough) == {"bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    assert config.model_values()["seq_len_interpolation_factor"] == 2.0


def test_optional_fields_take_their_defaults(toy: type[Bridge]) -> None:
    minimal = {
        key: HF_CONFIG[key]
        for key in (
            "architectures",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        )
    }
    config = toy.to_megatron_config(minimal)
    assert config.value("num_query_groups") == 8
    assert config.value("kv_channels") == 32
    assert config.value("rotary_percent") == 1.0
    assert config.value("add_qkv_bias") is False
    assert config.value("share_embeddings_and_output_weights") is False
    assert config.value("rotary_base") == 10000.0
    assert config.activation == "silu"  # activation_default
    assert config.rope.rope_type == "default"


def test_megatron_to_hf_round_trip(toy: type[Bridge]) -> None:
    config = toy.to_megatron_config(HF_CONFIG)
    exported = toy.to_hf_config(MegatronConfig.from_json(config.to_json()))
    expected = {key: value for key, value in HF_CONFIG.items() if key != "transformers_version"}
    expected["head_dim"] = 32  # written on export (to_hf) although the source left it implicit
    expected["initializer_range"] = 0.02  # an absent optional field is written with its default
    expected["use_cache"] = True  # hf_defaults
    expected["attention_dropout"] = 0.0  # an absent optional field is written with its default
    assert exported == expected
    assert list(exported) == sorted(exported)


def test_export_of_a_megatron_side_config(toy: type[Bridge]) -> None:
    values = dict(toy.to_megatron_config(HF_CONFIG).values)
    values.update(num_layers=5, num_query_groups=8, rotary_percent=1.0)
    config = MegatronConfig(family="toy", megatron_model="gpt", values=values, activation="silu")
    exported = toy.to_hf_config(config)
    assert exported["architectures"] == ["ToyForCausalLM"]
    assert exported["model_type"] == "toy"
    assert exported["num_hidden_layers"] == 5
    assert exported["num_key_value_heads"] == 8
    # No source config: RoPE in transformers 5's form.
    assert exported["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert exported["hidden_act"] == "silu"
    assert not {"rope_scaling", "rope_theta", "partial_rotary_factor"} & set(exported)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 7}, "hidden_size must be a multiple of num_attention_heads"),
        ({"hidden_act": "swish"}, "hidden_act 'swish' is not a known activation for the toy bridge"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "not supported by the toy bridge"),
        ({"architectures": ["LlamaForCausalLM"]}, "are not served by the toy bridge"),
        ({"vocab_size": None}, "field 'vocab_size' is required by the toy bridge but missing"),
    ],
)
def test_bad_hf_configs_are_refused(toy: type[Bridge], change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        toy.to_megatron_config({**HF_CONFIG, **change})


def test_weights_with_similar_names_keep_their_own_when(tmp_path: Path) -> None:
    # Bug (bridgegen/spec/render.py, when_function): the predicate name is the Megatron name with
    # "{layer}" removed, lowercased and punctuation folded to "_", so `decoder.layers.{layer}.extra.weight`
    # and `decoder.layers.extra.weight` both get `_when_decoder_layers_extra_weight`; the second
    # definition silently replaces the first and both rules use it.
    (tmp_path / "specs").mkdir()
    shutil.copy(REPO / "specs" / "_base.yaml", tmp_path / "specs" / "_base.yaml")
    (tmp_path / "specs" / "twin.yaml").write_text(
        "extends: _base\n"
        "architectures: [TwinForCausalLM]\n"
        "model_types: [twin]\n"
        "weights:\n"
        "  decoder.layers.{layer}.extra.weight:\n"
        "    hf: model.layers.{layer}.extra.weight\n"
        "    kind: replicated\n"
        "    when: share_embeddings_and_output_weights\n"
        "  decoder.layers.extra.weight:\n"
        "    hf: model.extra.weight\n"
        "    kind: replicated\n"
        "    when: not share_embeddings_and_output_weights\n",
        encoding="utf-8",
    )
    module_path = tmp_path / "twin.py"
    module_path.write_text(render_project(tmp_path)["generated/twin.py"], encoding="utf-8")
    spec = importlib.util.spec_from_file_location("bridgegen_test_generated_twin", module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rules = {rule.megatron_name: rule for rule in module.TwinBridge.weight_rules}
    tied = MegatronConfig(
        family="twin",
        megatron_model="gpt",
        values={"share_embeddings_and_output_weights": True},
        activation="silu",
    )
    assert rules["decoder.layers.{layer}.extra.weight"].applies(tied)
    assert not rules["decoder.layers.extra.weight"].applies(tied)
