"""``extends`` composes: a spec replaces or deletes inherited entries, in any config section.

Each test writes a small set of specs to a temporary folder and checks what they resolve to;
the errors (a null deleting nothing, two entries of one spec for a field) are cases under
tests/bad_specs/.
"""

from __future__ import annotations

from pathlib import Path

from bridgegen.spec.generate import load_specs
from bridgegen.spec.resolve import ResolvedSpec

BASE = """\
abstract: true
megatron_model: gpt
activation_field: hidden_act
activations:
  silu: silu
rope:
  supported: [default]
config:
  renames:
    hidden_size: hidden_size
    num_hidden_layers: num_layers
    num_attention_heads: num_attention_heads
    rms_norm_eps: layernorm_epsilon
  hf_optional:
    rms_norm_eps: 1.0e-6
  megatron_defaults:
    add_qkv_bias: false
    gated_linear_unit: true
    normalization: RMSNorm
  hf_defaults:
    use_cache: true
weights:
  embedding.word_embeddings.weight:
    hf: model.embed_tokens.weight
    kind: vocab
"""

HEAD = "extends: _base\narchitectures: [TinyForCausalLM]\nmodel_types: [tiny]\n"


def resolve(folder: Path, specs: dict[str, str]) -> dict[str, ResolvedSpec]:
    for name, text in {"_base": BASE, **specs}.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return {spec.family: spec for spec in load_specs(folder, ".")}


def imported(spec: ResolvedSpec) -> dict[str, str]:
    """Megatron field -> the Python that computes it on import."""
    return {value.target: value.python for value in spec.megatron_values}


def exported(spec: ResolvedSpec) -> dict[str, str]:
    """HF field -> the Python that computes it on export."""
    return {value.target: value.python for value in spec.hf_values}


def read_hf(spec: ResolvedSpec) -> set[str]:
    return {field.hf_name for field in spec.hf_inputs}


def test_the_base_alone(tmp_path: Path) -> None:
    tiny = resolve(tmp_path, {"tiny": HEAD})["tiny"]
    assert imported(tiny) == {
        "add_qkv_bias": "False",
        "gated_linear_unit": "True",
        "hidden_size": "hf_hidden_size",
        "layernorm_epsilon": "hf_rms_norm_eps",
        "normalization": "'RMSNorm'",
        "num_attention_heads": "hf_num_attention_heads",
        "num_layers": "hf_num_hidden_layers",
    }
    assert exported(tiny)["rms_norm_eps"] == "m_layernorm_epsilon"
    assert exported(tiny)["use_cache"] == "True"


def test_null_deletes_an_inherited_default(tmp_path: Path) -> None:
    child = (
        HEAD
        + "config:\n  megatron_defaults:\n    gated_linear_unit: null\n  hf_defaults:\n    use_cache: null\n"
    )
    tiny = resolve(tmp_path, {"tiny": child})["tiny"]
    assert "gated_linear_unit" not in imported(tiny)
    assert imported(tiny)["normalization"] == "'RMSNorm'"
    assert "use_cache" not in exported(tiny)


def test_none_is_set_by_an_expression(tmp_path: Path) -> None:
    child = HEAD + 'config:\n  to_megatron:\n    normalization: "None"\n  to_hf:\n    use_cache: "None"\n'
    tiny = resolve(tmp_path, {"tiny": child})["tiny"]
    assert imported(tiny)["normalization"] == "None"
    assert exported(tiny)["use_cache"] == "None"


def test_null_in_hf_optional_is_the_value_none(tmp_path: Path) -> None:
    child = HEAD + "config:\n  hf_optional:\n    rms_norm_eps: null\n"
    (epsilon,) = [
        f for f in resolve(tmp_path, {"tiny": child})["tiny"].hf_inputs if f.hf_name == "rms_norm_eps"
    ]
    assert not epsilon.required
    assert epsilon.default is None


def test_a_rename_replaces_an_inherited_default(tmp_path: Path) -> None:
    child = (
        HEAD
        + "config:\n  renames:\n    attention_bias: add_qkv_bias\n  hf_optional:\n    attention_bias: false\n"
    )
    tiny = resolve(tmp_path, {"tiny": child})["tiny"]
    assert imported(tiny)["add_qkv_bias"] == "hf_attention_bias"
    assert exported(tiny)["attention_bias"] == "m_add_qkv_bias"
    assert "attention_bias" in read_hf(tiny)


def test_an_expression_replaces_an_inherited_default(tmp_path: Path) -> None:
    child = HEAD + 'config:\n  to_megatron:\n    gated_linear_unit: "hidden_size > 64"\n'
    tiny = resolve(tmp_path, {"tiny": child})["tiny"]
    assert imported(tiny)["gated_linear_unit"] == "hf_hidden_size > 64"


def test_a_default_replaces_an_inherited_rename_whole(tmp_path: Path) -> None:
    # The rename goes on both sides: rms_norm_eps is neither read nor written any more.
    child = HEAD + "config:\n  megatron_defaults:\n    layernorm_epsilon: 1.0e-5\n"
    tiny = resolve(tmp_path, {"tiny": child})["tiny"]
    assert imported(tiny)["layernorm_epsilon"] == "1e-05"
    assert "rms_norm_eps" not in exported(tiny)
    assert "rms_norm_eps" not in read_hf(tiny)


def test_a_rename_replaces_an_inherited_rename_of_the_same_megatron_field(tmp_path: Path) -> None:
    # A family whose HF config names the norm epsilon differently.
    child = HEAD + "config:\n  renames:\n    norm_epsilon: layernorm_epsilon\n"
    tiny = resolve(tmp_path, {"tiny": child})["tiny"]
    assert imported(tiny)["layernorm_epsilon"] == "hf_norm_epsilon"
    assert exported(tiny)["norm_epsilon"] == "m_layernorm_epsilon"
    assert "rms_norm_eps" not in exported(tiny)
    assert "rms_norm_eps" not in read_hf(tiny)


def test_an_hf_default_replaces_an_inherited_rename_whole(tmp_path: Path) -> None:
    child = HEAD + "config:\n  hf_defaults:\n    rms_norm_eps: 1.0e-5\n"
    tiny = resolve(tmp_path, {"tiny": child})["tiny"]
    assert exported(tiny)["rms_norm_eps"] == "1e-05"
    assert "layernorm_epsilon" not in imported(tiny)


def test_a_deleted_rename_leaves_the_inherited_default_of_another_field(tmp_path: Path) -> None:
    child = HEAD + "config:\n  renames:\n    rms_norm_eps: null\n"
    tiny = resolve(tmp_path, {"tiny": child})["tiny"]
    assert "layernorm_epsilon" not in imported(tiny)
    assert imported(tiny)["add_qkv_bias"] == "False"


def test_a_grandchild_replaces_and_deletes_through_two_levels(tmp_path: Path) -> None:
    middle = (
        "abstract: true\nextends: _base\nconfig:\n  renames:\n    attention_bias: add_qkv_bias\n"
        "  hf_optional:\n    attention_bias: false\n  megatron_defaults:\n    qk_layernorm: true\n"
    )
    grandchild = (
        "extends: middle\narchitectures: [TinyForCausalLM]\nmodel_types: [tiny]\n"
        "config:\n  megatron_defaults:\n    add_qkv_bias: true\n    normalization: null\n    qk_layernorm: null\n"
    )
    sibling = "extends: middle\narchitectures: [SmallForCausalLM]\nmodel_types: [small]\n"
    resolved = resolve(tmp_path, {"middle": middle, "tiny": grandchild, "small": sibling})
    tiny, small = resolved["tiny"], resolved["small"]
    # The grandchild fixes what the middle spec maps, which replaced the base's default.
    assert imported(tiny)["add_qkv_bias"] == "True"
    assert "attention_bias" not in exported(tiny)
    # It deletes a default of the base and one of the middle spec.
    assert "normalization" not in imported(tiny)
    assert "qk_layernorm" not in imported(tiny)
    # Its sibling keeps what the middle spec made of the base.
    assert imported(small)["add_qkv_bias"] == "hf_attention_bias"
    assert imported(small)["normalization"] == "'RMSNorm'"
    assert imported(small)["qk_layernorm"] == "True"
