"""Unit tests of bridgegen.spec.expr: parsing, whitelisting, name collection and emission."""

from __future__ import annotations

import re

import pytest

from bridgegen.spec.expr import (
    ALLOWED_FUNCTIONS,
    ExpressionError,
    check_names,
    emit_python,
    parse_expression,
    variable_name,
)


def hf(name: str) -> str:
    return variable_name("hf", name)


@pytest.mark.parametrize(
    ("source", "names", "python"),
    [
        ("hidden_size", {"hidden_size"}, "hf_hidden_size"),
        (
            "  hidden_size // num_attention_heads  ",
            {"hidden_size", "num_attention_heads"},
            "hf_hidden_size // hf_num_attention_heads",
        ),
        (
            "num_attention_heads if num_key_value_heads is None else num_key_value_heads",
            {"num_attention_heads", "num_key_value_heads"},
            "hf_num_attention_heads if hf_num_key_value_heads is None else hf_num_key_value_heads",
        ),
        ("not norm_topk_prob", {"norm_topk_prob"}, "not hf_norm_topk_prob"),
        ("a and (b or c)", {"a", "b", "c"}, "hf_a and (hf_b or hf_c)"),
        ("-a + +b - a ** 2 % 3 * 4 / 5", {"a", "b"}, "-hf_a + +hf_b - hf_a ** 2 % 3 * 4 / 5"),
        ("0 < a <= 10 != b", {"a", "b"}, "0 < hf_a <= 10 != hf_b"),
        ("a is not None", {"a"}, "hf_a is not None"),
        ("a in ['x', 'y'] and b not in (1, 2)", {"a", "b"}, "hf_a in ['x', 'y'] and hf_b not in (1, 2)"),
        ("layer_types[0] == 'full'", {"layer_types"}, "hf_layer_types[0] == 'full'"),
        ("1.0e-6", set(), "1e-06"),
        ("True", set(), "True"),
        # Dotted names are paths into nested configs: one name, one variable.
        ("text_config.hidden_size * 2", {"text_config.hidden_size"}, "hf_text_config__hidden_size * 2"),
        ("a.b.c + d", {"a.b.c", "d"}, "hf_a__b__c + hf_d"),
        # Builtins stay builtins; runtime helpers become helpers.<name>.
        ("max(a, b) + len(c)", {"a", "b", "c"}, "max(hf_a, hf_b) + len(hf_c)"),
        (
            "moe_layer_pattern(num_hidden_layers, decoder_sparse_step, mlp_only_layers)",
            {"num_hidden_layers", "decoder_sparse_step", "mlp_only_layers"},
            "helpers.moe_layer_pattern(hf_num_hidden_layers, hf_decoder_sparse_step, hf_mlp_only_layers)",
        ),
        (
            "dense_layers(freq, sparse_step(freq))",
            {"freq"},
            "helpers.dense_layers(hf_freq, helpers.sparse_step(hf_freq))",
        ),
        ("int(round(x * 1.5))", {"x"}, "int(round(hf_x * 1.5))"),
    ],
)
def test_accepted_expression(source: str, names: set[str], python: str) -> None:
    checked = parse_expression(source)
    assert checked.source == source.strip()
    assert checked.names == frozenset(names)
    assert emit_python(checked, hf) == python


def test_emit_uses_the_given_variable_function() -> None:
    checked = parse_expression("not share_embeddings_and_output_weights")
    emitted = emit_python(checked, lambda n: f"config.value({n!r})")
    assert emitted == "not config.value('share_embeddings_and_output_weights')"


@pytest.mark.parametrize(
    ("source", "names"),
    [
        pytest.param(
            "text_config.window if text_config else 0",
            {"text_config.window", "text_config"},
            id="field-and-its-subfield",
        ),
        pytest.param("a.b.c + a.b", {"a.b.c", "a.b"}, id="two-chains-sharing-a-prefix"),
        pytest.param("first_index(xs, 1) if count else 0", {"xs", "count"}, id="field-named-like-a-helper"),
    ],
)
def test_every_emitted_variable_is_a_collected_name(source: str, names: set[str]) -> None:
    # Bug (bridgegen/spec/expr.py, parse_expression): names are collected from every Name and
    # Attribute node and then filtered by string prefix ("keep only outermost dotted chains") and
    # by the names of called helpers. A field that is also the prefix of another dotted name in the
    # same expression, or that is spelled like a called helper, is dropped: it is never
    # name-checked nor read by the generated code, which then uses an undefined variable
    # (NameError when a config is converted).
    checked = parse_expression(source)
    assert checked.names == frozenset(names)
    emitted = emit_python(checked, hf)
    referenced = set(re.findall(r"\bhf_\w+", emitted))
    assert referenced == {hf(name) for name in names}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("(lambda h: h)(hidden_size)", "calls 'lambda h: h'; callable helpers are: "),
        ("layer_types.index(1)", "calls 'layer_types.index'; callable helpers are: "),
        ("__import__('os')", "calls '__import__'; callable helpers are: "),
        ("open('x')", "calls 'open'; callable helpers are: "),
        ("max(a, default=1)", "passes keyword arguments, which are not allowed"),
        ("max(*a)", "uses a forbidden construct: Starred"),
        ("[h for h in a]", "uses a forbidden construct: ListComp"),
        ("{h for h in a}", "uses a forbidden construct: SetComp"),
        ("sum(h for h in a)", "uses a forbidden construct: GeneratorExp"),
        ("{'a': 1}", "uses a forbidden construct: Dict"),
        ("{1, 2}", "uses a forbidden construct: Set"),
        ("a[1:2]", "uses a forbidden construct: Slice"),
        ("f'{a}'", "uses a forbidden construct: JoinedStr"),
        ("(a := 1)", "uses a forbidden construct: NamedExpr"),
        ("a << 1", "uses a forbidden construct: LShift"),
        ("~a", "uses a forbidden construct: Invert"),
        ("a if b", "is not valid syntax: "),
        ("hidden_size //", "is not valid syntax: "),
        ("a = 1", "is not valid syntax: "),
        ("b'x'", "uses a bytes literal"),
        ("1j", "uses a complex literal"),
        ("(a + b).real", "reads an attribute of something that is not a field"),
        ("a[0].b", "reads an attribute of something that is not a field"),
    ],
)
def test_rejected_expression(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse_expression(source)
    text = str(info.value)
    assert text.startswith(f"expression {source!r} ")
    assert message in text


def test_call_rejection_lists_every_allowed_helper() -> None:
    with pytest.raises(ExpressionError) as info:
        parse_expression("sorted(a)")
    assert str(info.value).endswith("callable helpers are: " + ", ".join(sorted(ALLOWED_FUNCTIONS)))


def test_check_names_accepts_known_names() -> None:
    check_names(parse_expression("a + text_config.b"), frozenset({"a", "text_config.b"}), "HF")


def test_check_names_reports_the_first_unknown_name() -> None:
    checked = parse_expression("zeta + alpha + known")
    with pytest.raises(ExpressionError) as info:
        check_names(checked, frozenset({"known"}), "Megatron")
    assert str(info.value) == (
        "expression 'zeta + alpha + known' reads unknown Megatron field 'alpha'; "
        "declare it (renames, hf_optional, hf_required or megatron fields) first"
    )


def test_dotted_name_is_checked_as_a_whole() -> None:
    with pytest.raises(ExpressionError, match="unknown HF field 'text_config.hidden_size'"):
        check_names(parse_expression("text_config.hidden_size"), frozenset({"hidden_size"}), "HF")


def test_variable_name() -> None:
    assert variable_name("hf", "hidden_size") == "hf_hidden_size"
    assert variable_name("m", "num_layers") == "m_num_layers"
    assert variable_name("hf", "text_config.rope.theta") == "hf_text_config__rope__theta"
