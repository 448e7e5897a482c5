"""The field names megatron-core's config dataclasses accept, read from its source with ``ast``.

Reading the source (rather than importing megatron-core, which takes seconds) keeps spec
validation fast while still checking every Megatron-side name against the installed version.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path


def _megatron_core_dir() -> Path:
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("megatron-core is not installed; install the package with its dependencies")
    return Path(next(iter(spec.submodule_search_locations)))


def _class_fields(path: Path) -> dict[str, tuple[list[str], set[str]]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: dict[str, tuple[list[str], set[str]]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
            fields = {
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
            found[node.name] = (bases, fields)
    return found


@functools.cache
def config_fields() -> dict[str, frozenset[str]]:
    """``{"gpt": TransformerConfig fields, "mla": MLATransformerConfig fields}``."""
    root = _megatron_core_dir()
    classes = _class_fields(root / "model_parallel_config.py")
    classes.update(_class_fields(root / "transformer" / "transformer_config.py"))

    def collect(name: str) -> set[str]:
        bases, fields = classes[name]
        out = set(fields)
        for base in bases:
            if base in classes:
                out |= collect(base)
        return out

    return {
        "gpt": frozenset(collect("TransformerConfig")),
        "mla": frozenset(collect("MLATransformerConfig")),
    }
