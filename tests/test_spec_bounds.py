"""Specs come from pull requests: the loader's bounds on size, aliases, tags and expression cost.

No test here asserts a time: a busy machine is slower, not wrong. The times the code takes,
and what the code before these bounds took, are noted per test; memory and the errors given
are what the tests check.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridgegen.spec.errors import SpecErrors
from bridgegen.spec.expr import MAX_SOURCE_CHARS, ExpressionError, parse_expression
from bridgegen.spec.generate import load_specs
from bridgegen.spec.loader import MAX_NESTING, MAX_SPEC_BYTES, LoadedSpec, load_spec_text
from bridgegen.spec.resolve import resolve_all

ROOT = Path(__file__).parents[1]
BASE = ROOT / "tests" / "bad_specs" / "duplicate_yaml_key" / "_base.yaml"
HEAD = "extends: _base\narchitectures: [BigForCausalLM]\nmodel_types: [big]\n"


def error_lines(folder: Path) -> list[str]:
    with pytest.raises(SpecErrors) as info:
        load_specs(folder, ".")
    return [str(error) for error in info.value.errors]


# ---------------------------------------------------------------- file size


def test_a_spec_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    # Invalid YAML throughout: had it been parsed, the error would be a syntax error.
    (tmp_path / "big.yaml").write_text("[" * (MAX_SPEC_BYTES + 1), encoding="utf-8")
    assert error_lines(tmp_path) == [
        f"big.yaml:1:1: spec file is larger than {MAX_SPEC_BYTES} bytes; refused unread"
    ]


def test_a_spec_at_the_size_limit_is_read(tmp_path: Path) -> None:
    text = "colour: red\n"
    text += "#" * (MAX_SPEC_BYTES - len(text) - 1) + "\n"
    (tmp_path / "big.yaml").write_bytes(text.encode())
    assert len(text.encode()) == MAX_SPEC_BYTES
    assert error_lines(tmp_path) == ["big.yaml:1:1: colour: unknown key 'colour'"]


def test_the_size_limit_leaves_room_for_real_specs() -> None:
    largest = max(path.stat().st_size for path in (ROOT / "specs").glob("*.yaml"))
    assert largest * 20 < MAX_SPEC_BYTES


def test_a_spec_that_cannot_be_read_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "folder.yaml").mkdir()
    assert error_lines(tmp_path) == ["folder.yaml:1:1: cannot read spec file: Is a directory"]


def test_a_spec_that_is_not_utf8_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"description: ok\nmodel_types: [caf\xe9]\n")
    assert error_lines(tmp_path) == ["bad.yaml:2:18: not UTF-8 text (byte 0xe9)"]


# ---------------------------------------------------------------- aliases, tags, nesting


def billion_laughs(levels: int = 9) -> str:
    """Nine aliases to the level below on each of ``levels`` lines: 9**levels strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_in_little_memory(tmp_path: Path) -> None:
    # Before aliases were refused, six levels took 6 s and 155 MiB, seven 52 s and 1.6 GiB;
    # each level multiplies both by about nine, so the nine levels here would need ~130 GiB.
    # Memory is the bound checked (a machine's load changes the time, not the bytes).
    (tmp_path / "bomb.yaml").write_text(billion_laughs(), encoding="utf-8")
    tracemalloc.start()
    try:
        lines = error_lines(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == ["bomb.yaml:1:5: YAML anchors (&a0) are not allowed in specs"]
    assert peak < 50 * 2**20


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param(
            "a: *nowhere\n",
            "f.yaml:1:4: YAML aliases (*nowhere) are not allowed in specs; write the value out",
            id="alias",
        ),
        pytest.param("a: &x 1\n", "f.yaml:1:4: YAML anchors (&x) are not allowed in specs", id="anchor"),
        pytest.param(
            "a: !!python/object/apply:os.system [ls]\n",
            "f.yaml:1:4: YAML tags (!!python/object/apply:os.system) are not allowed in specs",
            id="python-tag-on-sequence",
        ),
        pytest.param(
            "a: !!python/object:x.Y {b: 1}\n",
            "f.yaml:1:4: YAML tags (!!python/object:x.Y) are not allowed in specs",
            id="python-tag-on-mapping",
        ),
        pytest.param("a: !!map {b: 1}\n", "f.yaml:1:4: YAML tags (!!map) are not allowed in specs", id="map"),
        pytest.param("- !!seq [1]\n", "f.yaml:1:3: YAML tags (!!seq) are not allowed in specs", id="seq"),
        pytest.param("a: !!int 1\n", "f.yaml:1:4: YAML tags (!!int) are not allowed in specs", id="int"),
        pytest.param("a: !local x\n", "f.yaml:1:4: YAML tags (!local) are not allowed in specs", id="local"),
        pytest.param("a: ! 1\n", "f.yaml:1:4: YAML tags (!) are not allowed in specs", id="non-specific"),
        pytest.param(
            "%TAG !e! tag:example.com,2000:\n---\na: !e!x 1\n",
            "f.yaml:3:4: YAML tags (tag:example.com,2000:x) are not allowed in specs",
            id="tag-directive",
        ),
        pytest.param(
            "!!map\na: 1\n", "f.yaml:1:1: YAML tags (!!map) are not allowed in specs", id="top-level"
        ),
        pytest.param(
            "a: " + "[" * 40 + "]" * 40 + "\n",
            f"f.yaml:1:{4 + MAX_NESTING - 1}: nested more than {MAX_NESTING} levels deep",
            id="deep-nesting",
        ),
        pytest.param(
            "a: b\x07\n",
            "f.yaml:1:5: invalid YAML: special characters are not allowed (#x0007)",
            id="control",
        ),
        pytest.param(
            "w:\n  d: 2001-02-30\n",
            "f.yaml:2:6: w.d: invalid timestamp '2001-02-30': day is out of range for month",
            id="bad-date",
        ),
        pytest.param(
            "a: 0x_\n",
            "f.yaml:1:4: a: invalid int '0x_': invalid literal for int() with base 16: ''",
            id="bad-int",
        ),
    ],
)
def test_yaml_a_spec_may_not_use_is_one_located_error(text: str, line: str) -> None:
    spec, errors = load_spec_text(text, "f.yaml")
    assert spec is None
    assert [str(error) for error in errors] == [line]


def test_no_spec_uses_anchors_aliases_or_tags() -> None:
    # What the loader refuses must stay unused by the real specs (or the refusal needs a rethink).
    for path in (ROOT / "specs").glob("*.yaml"):
        spec, errors = load_spec_text(path.read_text(encoding="utf-8"), path.name)
        assert spec is not None and errors == [], path


def test_huge_integers_in_yaml_are_one_error() -> None:
    spec, errors = load_spec_text("a: " + "9" * 5000 + "\n", "f.yaml")
    assert spec is None
    assert [str(error).split(":")[:4] for error in errors] == [["f.yaml", "1", "4", " a"]]
    assert "invalid int '" + "9" * 40 + "...'" in str(errors[0])


# ---------------------------------------------------------------- many errors


def _fill(head: str, entry: Callable[[int], str]) -> str:
    """``head`` and as many numbered entries as fit in MAX_SPEC_BYTES."""
    parts, size, index = [head], len(head), 0
    while size + len(entry(index)) <= MAX_SPEC_BYTES:
        parts.append(entry(index))
        size += len(entry(index))
        index += 1
    return "".join(parts)


_LONG_SUM = " + ".join(["hidden_size"] * 30)
FULL_OF_ERRORS = {
    "unknown-keys": lambda: _fill(
        HEAD + "weights:\n",
        lambda i: f"  w{i}.weight:\n    hf: h{i}.weight\n    kind: row\n    colour: {i}\n",
    ),
    "unknown-megatron-fields": lambda: _fill(
        HEAD + "config:\n  renames:\n", lambda i: f"    f{i}: num_layer{i}\n"
    ),
    "bad-weights": lambda: _fill(
        HEAD
        + "wrappers:\n  BigForCausalLM:\n    config: text_config\n    carried_weights:\n"
        + "".join(f"      - h.{i}.\n" for i in range(3000))
        + "weights:\n",
        lambda i: (
            f"  w.{{Layer}}.{i}:\n    hf: h.{i}.{{layer}}\n    kind: row\n    when: num_layers ** num_layers\n"
        ),
    ),
    "bad-expressions": lambda: _fill(
        HEAD + "config:\n  to_megatron:\n", lambda i: f'    f{i}: "{_LONG_SUM} * 10000000"\n'
    ),
    "duplicate-keys": lambda: _fill("weights:\n  w:\n", lambda i: "    hf: x\n"),
}


@pytest.mark.parametrize("make", list(FULL_OF_ERRORS.values()), ids=list(FULL_OF_ERRORS))
def test_a_spec_at_the_size_limit_full_of_errors_is_checked(tmp_path: Path, make: Callable[[], str]) -> None:
    # 0.2-1.3 s each here. The code before took up to 7.4 s at this size (unknown Megatron
    # fields: a difflib suggestion for each) and grew quadratically beyond it. No time is
    # asserted (a busy machine is slower); a quadratic return shows as a slow suite.
    text = make()
    assert MAX_SPEC_BYTES - 1000 < len(text.encode()) <= MAX_SPEC_BYTES
    (tmp_path / "big.yaml").write_text(text, encoding="utf-8")
    (tmp_path / "_base.yaml").write_text(BASE.read_text(encoding="utf-8"), encoding="utf-8")
    errors = error_lines(tmp_path)
    assert len(errors) > 400
    assert all(line.startswith("big.yaml:") for line in errors)


def _many(count: int) -> dict[str, dict[str, Any]]:
    """In-memory specs with ``count`` problems each, beyond what the file size limit lets in:
    these check that collecting and filtering errors is n log n, whatever the input size."""
    head: dict[str, Any] = {"extends": "_base", "architectures": ["BigForCausalLM"], "model_types": ["big"]}
    weights = {f"w{i}.weight": {"hf": f"h{i}.weight", "kind": "row"} for i in range(count)}
    return {
        "unknown-keys": {
            **head,
            "weights": {name: {**weight, "colour": 1} for name, weight in weights.items()},
        },
        "unknown-megatron-fields": {
            **head,
            "config": {"renames": {f"f{i}": f"num_layer{i}" for i in range(count)}},
        },
        "carried-weights": {
            **head,
            "wrappers": {
                "BigForCausalLM": {
                    "config": "text_config",
                    "carried_weights": [f"h{i}." for i in range(count)],
                }
            },
            "weights": weights,
        },
    }


@pytest.mark.parametrize("kind", list(_many(0)))
def test_fifty_thousand_errors_are_collected(kind: str) -> None:
    # About 1 s each here; the code before took 114 s (pydantic error filtering), 34 s
    # (suggestions) and 116 s (carried weights against every tensor). No time is asserted.
    base = LoadedSpec("_base", "_base.yaml", yaml.safe_load(BASE.read_text(encoding="utf-8")))
    big = LoadedSpec("big", "big.yaml", _many(50_000)[kind])
    with pytest.raises(SpecErrors) as info:
        resolve_all([base, big])
    assert len(info.value.errors) == 50_000


def test_only_the_first_unknown_fields_get_suggestions() -> None:
    base = LoadedSpec("_base", "_base.yaml", yaml.safe_load(BASE.read_text(encoding="utf-8")))
    big = LoadedSpec("big", "big.yaml", _many(30)["unknown-megatron-fields"])
    with pytest.raises(SpecErrors) as info:
        resolve_all([base, big])
    suggested = [e for e in info.value.errors if "did you mean" in e.message]
    assert len(suggested) == 20


def test_a_carried_prefix_clash_is_found_through_the_weight_prefix() -> None:
    base = LoadedSpec("_base", "_base.yaml", yaml.safe_load(BASE.read_text(encoding="utf-8")))
    wrapped = {
        "extends": "_base",
        "architectures": ["Tiny", "TinyVL"],
        "model_types": ["tiny"],
        "wrappers": {
            "TinyVL": {
                "config": "text_config",
                "weight_prefix": "language_model.",
                "carried_weights": [
                    "vision.",
                    "language_model.model.embed",
                    "lang",
                    "language_model.lm_head",
                ],
            }
        },
    }
    with pytest.raises(SpecErrors) as info:
        resolve_all([base, LoadedSpec("wrapped", "wrapped.yaml", wrapped)])
    assert [e.message for e in info.value.errors] == [
        "'language_model.model.embed' would carry language-model tensor "
        "'language_model.model.embed_tokens.weight' past the conversion",
        "'lang' would carry language-model tensor 'language_model.model.embed_tokens.weight' past the conversion",
    ]


# ---------------------------------------------------------------- expression cost


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (
            "hidden_size ** 9 ** 9 ** 9",
            "raises to the power '9 ** 9 ** 9'; an exponent must be a number literal",
        ),
        ("hidden_size ** num_layers", "raises to the power 'num_layers'; "),
        ("hidden_size ** 5", "raises to the power '5'; an exponent must be a number literal from -4 to 4"),
        ("(hidden_size ** 4) ** 4", "may reach 2**0 * V**16, "),
        ("a * a * a * a * a", "may reach 2**0 * V**5, "),
        ("[0] * 1000000 * 1000000", "may reach 2**39.9 * V**0, "),
        ("'x' * 1024 * 1024 * 1024", "may reach 2**30 * V**0, "),
        ("sum([a] * 1024) * 1024", "may reach 2**30 * V**2, "),
        (
            "123456789012345678901234567890",
            "uses the number 123456789012345678901234567890; a number literal may",
        ),
        ("1e999", "uses the number 1e309; a number literal may be at most 2**20 = 1048576 in magnitude"),
        ("n / 1e-9", "'1e-09' may reach 2**29.9 * V**0"),
        (
            "n / (1.0 - 0.9999999999)",
            "divides by '1.0 - 0.9999999999', which could be arbitrarily close to zero",
        ),
        ("n // (a - b)", "divides by 'a - b', which could be arbitrarily close to zero"),
        ("(a - b) ** -2", "divides by 'a - b', which could be arbitrarily close to zero"),
        ("n / [1e-9][0]", "'1e-09' may reach 2**29.9 * V**0"),
        ("'%01000000000d' % 1", "formats a string with %"),
        ("('%01000000000d' if a else 'b') % 1", "formats a string with %"),
        ("[0] * int('99999999999')", "calls int on a string literal; write the number itself"),
        ("-" * 30 + "a", "nests too deeply (more than 20 levels)"),
        ("max(" + ", ".join(["a"] * 60) + ")", "is too large (more than 100 syntax nodes)"),
    ],
)
def test_a_costly_expression_is_refused(source: str, reason: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse_expression(source)
    assert str(info.value).startswith(f"expression {source!r} ")
    assert reason in str(info.value)


def test_an_overlong_expression_is_refused_before_it_is_parsed() -> None:
    source = "(" * 10_000 + "a"  # the parser itself would fail on this, and slowly
    with pytest.raises(ExpressionError) as info:
        parse_expression(source)
    assert str(info.value) == (
        f"expression {source[:40]!r}... is too long (10001 characters; at most {MAX_SOURCE_CHARS})"
    )


@pytest.mark.parametrize(
    "source",
    [
        "hidden_size ** 0.5",
        "None if query_pre_attn_scalar is None else query_pre_attn_scalar ** -0.5",
        "round(softmax_scale ** -2)",
        "[0] * first_k_dense_replace + [1] * (num_hidden_layers - first_k_dense_replace)",
        "moe_shared_expert_intermediate_size // moe_ffn_hidden_size",
        "hidden_size // num_attention_heads if head_dim is None else head_dim",
        "a * b * c * d",
        "a / (b * 2)",
        "a // max(b, 1)",
        "a / len(xs)",
        "a / -xs[0]",
        "(2 ** 4) ** 4",
        "1048576 * a",
        "sum([a, b, c])",
        "'%s' if a else b % 7",
    ],
)
def test_a_cheap_expression_is_accepted(source: str) -> None:
    parse_expression(source)
