"""Derived-field expressions: parsed with ``ast``, whitelisted, name-checked, emitted as Python.

Spec text is never evaluated. An expression is parsed once, every node is checked against a
small whitelist, every field name it reads is checked against the fields the spec declares,
and the checked tree is printed back as plain Python (with field names turned into local
variable names) into the generated module.

Specs arrive in pull requests, so an accepted expression must also be cheap to run: before
these limits, ``hidden_size ** 9 ** 9 ** 9`` passed the check and hung the conversion. The
largest expression in ``specs/`` has 115 characters, 22 syntax nodes and depth 6.

* Size: at most ``MAX_SOURCE_CHARS`` characters, ``MAX_NODES`` syntax nodes and ``MAX_DEPTH``
  levels of nesting. This bounds every string, list and tuple literal too, and keeps the
  recursive passes below far from Python's recursion limit.
* Powers: the exponent of ``**`` is a number literal (a sign allowed) from ``-MAX_EXPONENT`` to
  ``MAX_EXPONENT``; the specs use 0.5, -0.5 and -2. ``a ** b`` and ``a ** 9 ** 9`` are refused.
* Growth: every sub-expression's value (or length) must be bounded by
  ``2 ** MAX_GROWTH_BITS * V ** MAX_DEGREE``, where V (at least 1) bounds the magnitudes,
  lengths and reciprocal magnitudes of the config values it reads. Bounds compose: ``a * b``
  multiplies its operands', ``a + b`` adds them, a number literal is its magnitude (so at most
  2 ** 20), a list literal its length or largest item, a call its largest argument. Without
  types every product might repeat a list, so this is what refuses ``[0] * 1000000 * 1000000``
  and ``a * a * a * a * a``. A divisor, and the base of a negative power, must be a field, a
  non-zero number literal, an integer-valued call or a product of those: ``n / (1.0 -
  0.9999999999)`` would amplify beyond anything its literals show.
* Spelled sizes: ``%`` with a string literal on its left and ``int`` or ``float`` of a string
  literal are refused; a format's padding or a numeral spells a size the growth bound cannot see.

What stays is proportional to the config: ``[0] * first_k_dense_replace`` is as long as the
config says; bounding config values is the config reader's job.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass

# Helpers an expression may call. Builtins are emitted as-is; the rest live in
# bridgegen.bridge.helpers and are emitted as ``helpers.<name>``.
BUILTIN_FUNCTIONS = frozenset(
    {"len", "min", "max", "int", "float", "bool", "abs", "round", "sum", "all", "any"}
)
RUNTIME_HELPERS = frozenset(
    {
        "first_index",
        "count",
        "all_equal",
        "moe_layer_pattern",
        "sparse_step",
        "dense_layers",
        "range_list",
        "sliding_layer_types",
        "full_attention_every",
        "flags_where",
        "choose_each",
    }
)
ALLOWED_FUNCTIONS = BUILTIN_FUNCTIONS | RUNTIME_HELPERS
# Calls whose value, when not zero, is an integer (so at least 1 in magnitude).
_INTEGER_FUNCTIONS = frozenset(
    {"len", "int", "bool", "all", "any", "first_index", "count", "all_equal", "sparse_step"}
)

MAX_SOURCE_CHARS = 500
MAX_NODES = 100
MAX_DEPTH = 20
MAX_EXPONENT = 4
MAX_GROWTH_BITS = 20
MAX_DEGREE = 4

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
class _Growth:
    """A value's magnitude (or length) is at most ``2 ** bits * V ** degree``; see the module
    docstring. Bits rather than factors, so that no bound ever overflows a float."""

    bits: float
    degree: float

    def plus(self, other: _Growth) -> _Growth:
        high, low = max(self.bits, other.bits), min(self.bits, other.bits)
        return _Growth(high + math.log2(1 + 2 ** (low - high)), max(self.degree, other.degree))

    def times(self, other: _Growth) -> _Growth:
        return _Growth(self.bits + other.bits, self.degree + other.degree)

    def power(self, exponent: float) -> _Growth:
        return _Growth(self.bits * exponent, self.degree * exponent)

    def either(self, other: _Growth) -> _Growth:
        return _Growth(max(self.bits, other.bits), max(self.degree, other.degree))


_CONSTANT = _Growth(0.0, 0.0)
_FIELD = _Growth(0.0, 1.0)


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


def _number(node: ast.AST) -> float | None:
    """The value of a number literal, sign included; None for anything else."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _number(node.operand)
        return None if inner is None else -inner if isinstance(node.op, ast.USub) else inner
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        # An int literal beyond float range (400 digits, say) counts as infinitely large.
        return float(node.value) if abs(node.value) < 2**1000 else math.inf
    return None


def _bits(magnitude: float) -> float:
    """log2 of a magnitude, at least 0: a literal below 1 amplifies nothing."""
    return math.log2(magnitude) if magnitude > 1 else 0.0


def _has_string_literal(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) for n in ast.walk(node))


class _Cost:
    """Bounds the growth of every sub-expression of one expression (see the module docstring)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def refuse(self, reason: str) -> ExpressionError:
        return ExpressionError(f"expression {self.source!r} {reason}")

    def bounded(self, node: ast.AST, growth: _Growth) -> _Growth:
        if growth.bits > MAX_GROWTH_BITS or growth.degree > MAX_DEGREE:
            raise self.refuse(
                f"could compute values too large: {ast.unparse(node)!r} may reach "
                f"2**{growth.bits:.3g} * V**{growth.degree:.3g}, where V bounds the config values it "
                f"reads; the limit is 2**{MAX_GROWTH_BITS} * V**{MAX_DEGREE}"
            )
        return growth

    def one_of(self, nodes: list[ast.expr]) -> _Growth:
        """The growth bound of a value that is one of ``nodes`` (each of them checked)."""
        result = _CONSTANT
        for node in nodes:
            result = result.either(self.growth(node))
        return result

    def growth(self, node: ast.AST) -> _Growth:
        """How large the value of ``node`` may be; raises if that is beyond the limit."""
        return self.bounded(node, self._growth(node))

    def _growth(self, node: ast.AST) -> _Growth:
        if isinstance(node, ast.Name | ast.Attribute):
            return _FIELD
        if isinstance(node, ast.Constant):
            number = _number(node)
            if number is not None and abs(number) > 2**MAX_GROWTH_BITS:
                raise self.refuse(
                    f"uses the number {ast.unparse(node)}; a number literal may be at most "
                    f"2**{MAX_GROWTH_BITS} = {2**MAX_GROWTH_BITS} in magnitude"
                )
            if number is not None:
                return _Growth(_bits(abs(number)), 0.0)
            return _Growth(_bits(len(node.value)), 0.0) if isinstance(node.value, str) else _CONSTANT
        if isinstance(node, ast.Subscript):
            self.growth(node.slice)
            return self.growth(node.value)  # an item of a sequence is bounded as the sequence is
        if isinstance(node, ast.List | ast.Tuple):
            return self.one_of(node.elts).either(_Growth(_bits(len(node.elts)), 0.0))
        if isinstance(node, ast.UnaryOp):
            operand = self.growth(node.operand)
            return _CONSTANT if isinstance(node.op, ast.Not) else operand
        if isinstance(node, ast.Compare):
            self.one_of([node.left, *node.comparators])
            return _CONSTANT
        if isinstance(node, ast.BoolOp):
            return self.one_of(node.values)  # the value of one of them
        if isinstance(node, ast.IfExp):
            self.growth(node.test)
            return self.one_of([node.body, node.orelse])
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.BinOp):
            return self._binary(node)
        raise AssertionError(f"{type(node).__name__} is whitelisted but has no growth rule")

    def _call(self, node: ast.Call) -> _Growth:
        assert isinstance(node.func, ast.Name)  # guaranteed by the whitelist
        name = node.func.id
        if name in {"int", "float"} and any(_has_string_literal(arg) for arg in node.args):
            raise self.refuse(f"calls {name} on a string literal; write the number itself")
        # Every helper's value is bounded by its largest argument (len(xs) by xs, range_list(n)
        # by n), except sum: n items each up to m add up to n * m, and a list's bound covers both.
        largest = self.one_of(node.args)
        return largest.power(2) if name == "sum" else largest

    def _binary(self, node: ast.BinOp) -> _Growth:
        if isinstance(node.op, ast.Pow):
            exponent = _number(node.right)
            if exponent is None or abs(exponent) > MAX_EXPONENT:
                raise self.refuse(
                    f"raises to the power {ast.unparse(node.right)!r}; an exponent must be a number "
                    f"literal from -{MAX_EXPONENT} to {MAX_EXPONENT}"
                )
            base = self.growth(node.left)  # checked even when only its reciprocal matters
            return self.reciprocal(node.left).power(-exponent) if exponent < 0 else base.power(exponent)
        if isinstance(node.op, ast.Mod) and _has_string_literal(node.left):
            raise self.refuse("formats a string with %; its format could ask for any amount of padding")
        left, right = self.growth(node.left), self.growth(node.right)
        if isinstance(node.op, ast.Add | ast.Sub):
            return left.plus(right)
        if isinstance(node.op, ast.Mult):
            return left.times(right)
        if isinstance(node.op, ast.Mod):
            return right  # |a % b| < |b|
        return left.times(self.reciprocal(node.right))  # / and //

    def reciprocal(self, node: ast.AST) -> _Growth:
        """How large ``1 / value`` may be: what dividing by ``node`` may multiply by."""
        return self.bounded(node, self._reciprocal(node))

    def _reciprocal(self, node: ast.AST) -> _Growth:
        number = _number(node)
        if number is not None and number != 0:
            return _Growth(max(0.0, -math.log2(abs(number))), 0.0)
        if isinstance(node, ast.Name | ast.Attribute):
            return _FIELD
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name | ast.Attribute):
            return _FIELD
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.List | ast.Tuple):
            return self.reciprocal_of_one_of(node.value.elts)
        if isinstance(node, ast.BoolOp):
            return self.reciprocal_of_one_of(node.values)
        if isinstance(node, ast.IfExp):
            return self.reciprocal_of_one_of([node.body, node.orelse])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            return self.reciprocal(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return self.reciprocal(node.left).times(self.reciprocal(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in _INTEGER_FUNCTIONS or (node.func.id == "round" and len(node.args) == 1):
                return _CONSTANT  # a non-zero integer is at least 1 in magnitude
            if node.func.id in {"min", "max", "abs", "float"}:
                return self.reciprocal_of_one_of(node.args)  # the value of one of the arguments
        raise self.refuse(
            f"divides by {ast.unparse(node)!r}, which could be arbitrarily close to zero; divide by a "
            "field, a non-zero number literal, an integer-valued call or a product of those"
        )

    def reciprocal_of_one_of(self, nodes: list[ast.expr]) -> _Growth:
        """The reciprocal bound of a value that is one of ``nodes``."""
        result = _CONSTANT
        for node in nodes:
            result = result.either(self.reciprocal(node))
        return result


def _size_problem(tree: ast.AST) -> str | None:
    """Why ``tree`` is too large or too deep to accept, or None. Iterative: deep trees are
    exactly what it must survive, before anything recursive walks them."""
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            return f"is too large (more than {MAX_NODES} syntax nodes)"
        if depth > MAX_DEPTH:
            return f"nests too deeply (more than {MAX_DEPTH} levels)"
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return None


def parse_expression(source: str) -> CheckedExpression:
    """Parse and whitelist-check ``source``; raise ExpressionError with the reason."""
    if len(source.strip()) > MAX_SOURCE_CHARS:
        raise ExpressionError(
            f"expression {source.strip()[:40]!r}... is too long "
            f"({len(source.strip())} characters; at most {MAX_SOURCE_CHARS})"
        )
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"expression {source!r} is not valid syntax: {exc.msg}") from None
    except (ValueError, MemoryError, RecursionError) as exc:
        # Null bytes (ValueError before Python 3.12) or a parser stack overflow.
        raise ExpressionError(f"expression {source!r} cannot be parsed: {type(exc).__name__}") from None
    size_problem = _size_problem(tree)
    if size_problem is not None:
        raise ExpressionError(f"expression {source!r} {size_problem}")
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
    _Cost(source).growth(tree.body)
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
