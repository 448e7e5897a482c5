"""Derived-field expressions: parsed with ``ast``, whitelisted, name-checked, emitted as Python.

Spec text is never evaluated. An expression is parsed once, every node is checked against a
small whitelist, every field name it reads is checked against the fields the spec declares,
and the checked tree is printed back as plain Python (with field names turned into local
variable names) into the generated module.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass

# Helpers an expression may call. Builtins are emitted as-is; the rest live in
# bridgegen.runtime.helpers and are emitted as ``helpers.<name>``.
BUILTIN_FUNCTIONS = frozenset(
    {"len", "min", "max", "int", "float", "bool", "abs", "round", "sum", "all", "any"}
)
RUNTIME_HELPERS = frozenset(
    {"first_index", "count", "all_equal", "moe_layer_pattern", "sparse_step", "dense_layers", "range_list"}
)
ALLOWED_FUNCTIONS = BUILTIN_FUNCTIONS | RUNTIME_HELPERS

_ALLOWED_NODES: tuple[type[ast.AST], ...] = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.BinOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.UnaryOp,
    ast.Not,
    ast.USub,
    ast.UAdd,
    ast.Compare,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.Is,
    ast.IsNot,
    ast.In,
    ast.NotIn,
    ast.IfExp,
    ast.Call,
    ast.Constant,
    ast.List,
    ast.Tuple,
    ast.Name,
    ast.Attribute,
    ast.Subscript,
    ast.Load,
)


class ExpressionError(ValueError):
    """An expression that cannot be accepted; the message says why."""


@dataclass(frozen=True)
class CheckedExpression:
    """An accepted expression: its source, the field names it reads, and its parsed tree."""

    source: str
    names: frozenset[str]
    tree: ast.Expression


def _dotted_name(node: ast.AST) -> str | None:
    """``a.b.c`` as a string if ``node`` is a chain of attributes on a plain name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def _collect_names(node: ast.AST, names: set[str]) -> None:
    """Every field an expression reads: whole ``a.b.c`` chains, never the helpers it calls."""
    dotted = _dotted_name(node) if isinstance(node, ast.Name | ast.Attribute) else None
    if dotted is not None:
        names.add(dotted)
        return
    for child in ast.iter_child_nodes(node):
        if isinstance(node, ast.Call) and child is node.func:
            continue
        _collect_names(child, names)


def parse_expression(source: str) -> CheckedExpression:
    """Parse and whitelist-check ``source``; raise ExpressionError with the reason."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"expression {source!r} is not valid syntax: {exc.msg}") from None
    names: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ExpressionError(f"expression {source!r} uses a forbidden construct: {type(node).__name__}")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in ALLOWED_FUNCTIONS:
                allowed = ", ".join(sorted(ALLOWED_FUNCTIONS))
                raise ExpressionError(
                    f"expression {source!r} calls {ast.unparse(node.func)!r}; callable helpers are: {allowed}"
                )
            if node.keywords:
                raise ExpressionError(
                    f"expression {source!r} passes keyword arguments, which are not allowed"
                )
        if isinstance(node, ast.Attribute):
            if _dotted_name(node) is None:
                raise ExpressionError(
                    f"expression {source!r} reads an attribute of something that is not a field"
                )
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes | complex):
            raise ExpressionError(f"expression {source!r} uses a {type(node.value).__name__} literal")
    _collect_names(tree.body, names)
    return CheckedExpression(source=source.strip(), names=frozenset(names), tree=tree)


def check_names(expression: CheckedExpression, known: frozenset[str], side: str) -> None:
    """Raise ExpressionError naming the first unknown field ``expression`` reads."""
    for name in sorted(expression.names):
        if name not in known:
            raise ExpressionError(
                f"expression {expression.source!r} reads unknown {side} field {name!r}; "
                f"declare it (renames, hf_optional, hf_required or megatron fields) first"
            )


class _Renamer(ast.NodeTransformer):
    def __init__(self, variable: Callable[[str], str]) -> None:
        self.variable = variable

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        dotted = _dotted_name(node)
        if dotted is not None:
            return ast.copy_location(ast.Name(id=self.variable(dotted), ctx=ast.Load()), node)
        return self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Name(id=self.variable(node.id), ctx=ast.Load()), node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        assert isinstance(node.func, ast.Name)  # guaranteed by parse_expression
        func_name = node.func.id
        func: ast.expr = (
            ast.Attribute(value=ast.Name(id="helpers", ctx=ast.Load()), attr=func_name, ctx=ast.Load())
            if func_name in RUNTIME_HELPERS
            else ast.Name(id=func_name, ctx=ast.Load())
        )
        args = [self.visit(arg) for arg in node.args]
        return ast.copy_location(ast.Call(func=func, args=args, keywords=[]), node)


def emit_python(expression: CheckedExpression, variable: Callable[[str], str]) -> str:
    """The expression as Python source, each field name replaced by ``variable(name)``."""
    tree = _Renamer(variable).visit(ast.parse(expression.source, mode="eval"))
    return ast.unparse(ast.fix_missing_locations(tree))


def variable_name(prefix: str, field_name: str) -> str:
    """A Python identifier for a (possibly dotted) field: ``hf``, ``text_config.x`` -> ``hf_text_config__x``."""
    return f"{prefix}_{field_name.replace('.', '__')}"
