"""The package's layers, checked over its import graph (``make check`` runs this file).

Folders, lowest first: ``bridge`` (what generated code imports), ``spec`` (the compiler),
``generated``, ``plan``, ``formats``, ``megatron``, ``engines``, ``cli``. A module may import its
own folder and the folders its folder's ``__init__`` allows, never one above it; no module
imports another that imports it back (through any chain); imports inside functions count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bridgegen"
GENERATED = ROOT / "generated"

# What each folder may import (besides itself). ``runtime`` holds the deprecated aliases.
ALLOWED: dict[str, frozenset[str]] = {
    "bridge": frozenset(),
    "spec": frozenset({"bridge"}),
    "generated": frozenset({"bridge"}),
    "plan": frozenset({"bridge", "generated"}),
    "formats": frozenset({"bridge", "generated", "plan"}),
    "megatron": frozenset({"bridge", "generated", "plan", "formats", "spec"}),
    "engines": frozenset({"bridge", "generated", "plan", "formats", "megatron"}),
    "cli": frozenset({"bridge", "spec", "generated", "plan", "formats", "megatron", "engines"}),
    "runtime": frozenset({"bridge", "generated", "plan", "formats", "megatron", "engines"}),
}
# Layers from the bottom: an import never goes to a higher number.
RANK = {
    "bridge": 0,
    "spec": 1,
    "generated": 1,
    "plan": 2,
    "formats": 3,
    "megatron": 4,
    "engines": 5,
    "cli": 6,
}
HEAVY = ("torch", "megatron", "transformers", "safetensors", "numpy", "huggingface_hub")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported bridgegen module
    where: str  # file:line
    top_level: bool


def _module_name(path: Path) -> str:
    if path.is_relative_to(GENERATED):
        parts = ("bridgegen", "generated", *path.relative_to(GENERATED).with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*PACKAGE.rglob("*.py"), *GENERATED.rglob("*.py")]
    return {_module_name(path): path for path in files}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The bridgegen module an imported dotted name refers to (a module, or a name in one)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _resolve(name) if name.startswith("bridgegen") else None
            if target is not None and target != module:
                found.append(
                    Import(module, target, f"{path.relative_to(ROOT)}:{node.lineno}", id(node) in top)
                )
    return found


IMPORTS = [edge for module, path in MODULES.items() for edge in _imports_of(module, path)]


def folder(module: str) -> str:
    """``bridgegen.engines.model`` -> ``engines``; ``bridgegen`` and ``bridgegen.__main__`` are
    the command's own."""
    parts = module.split(".")
    return "cli" if len(parts) == 1 or module == "bridgegen.__main__" else parts[1]


def _packages() -> set[str]:
    return {name for name, path in MODULES.items() if path.name == "__init__.py"}


def test_every_import_points_down_the_layers() -> None:
    wrong = [
        f"{edge.where}: {edge.source} ({folder(edge.source)}) imports {edge.target} ({folder(edge.target)})"
        for edge in IMPORTS
        if folder(edge.target) != folder(edge.source)
        and folder(edge.target) not in ALLOWED[folder(edge.source)]
    ]
    assert wrong == []


def test_nothing_imports_the_deprecated_aliases() -> None:
    users = [f"{edge.where}: {edge.target}" for edge in IMPORTS if folder(edge.target) == "runtime"]
    assert users == []


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for edge in IMPORTS:
        if not (edge.target in _packages() and edge.source.startswith(edge.target + ".")):
            graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself: an import from a lower module back up is a cycle it reports."""
    IMPORTS.append(Import("bridgegen.plan.values", "bridgegen.engines.stream_import", "made up", False))
    try:
        assert any("bridgegen.plan.values" in cycle for cycle in _cycles())
    finally:
        IMPORTS.pop()


def _reachable(start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        source = todo.pop()
        for edge in IMPORTS:
            if edge.source == source and edge.target not in seen:
                seen.add(edge.target)
                todo.append(edge.target)
    return seen


@pytest.mark.parametrize("engine", ["bridgegen.engines.stream_import", "bridgegen.engines.stream_export"])
def test_a_streaming_conversion_walks_down_the_layers_once(engine: str) -> None:
    """Everything the streaming engines reach, each import going to the same or a lower layer
    (entering each folder once, in order, never returning), without the model-holding API."""
    reached = _reachable(engine)
    climbing = [
        f"{edge.where}: {edge.source} -> {edge.target}"
        for edge in IMPORTS
        if edge.source in reached
        and folder(edge.source) in RANK
        and RANK[folder(edge.target)] > RANK[folder(edge.source)]
    ]
    assert climbing == []
    assert "bridgegen.engines.model" not in reached
    folders_reached = {folder(module) for module in reached}
    assert {"engines", "megatron", "formats", "plan", "bridge"} <= folders_reached
    assert "cli" not in folders_reached


def test_the_bridge_surface_imports_nothing_heavy() -> None:
    """At module level the surface imports only the standard library, pydantic-free plain
    Python and itself; a real import of every generated bridge loads no torch."""
    heavy = [
        f"{_module_name(path)} imports {alias}"
        for path in (PACKAGE / "bridge").glob("*.py")
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if alias.split(".")[0] in HEAVY
    ]
    assert heavy == []
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, bridgegen.generated as g; g.bridge_for_config({'architectures': ['LlamaForCausalLM']}); "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"


def test_the_plan_does_no_io_and_no_communication() -> None:
    forbidden = ("torch.distributed", "megatron", "safetensors", "mmap", "shutil", "tempfile", "subprocess")
    found = [
        f"{_module_name(path)}:{node.lineno} imports {name}"
        for path in (PACKAGE / "plan").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if name.startswith(forbidden)
    ]
    assert found == []


def test_every_module_says_what_it_is_for() -> None:
    """A docstring on every module; each folder's says what it may import."""
    missing = [
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__main__.py" and not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert missing == []
    silent = [
        str(path.relative_to(ROOT))
        for path in PACKAGE.glob("*/__init__.py")
        if path.parent.name not in ("runtime",)
        and "May import" not in (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "")
    ]
    assert silent == []


def test_the_old_paths_still_work_with_a_deprecation_warning() -> None:
    """``bridgegen.runtime.convert.ModelBridge`` (in the README before 0.2) is the new class."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from bridgegen.runtime.convert import ModelBridge\n"
        "    from bridgegen.runtime.stream import stream_import\n"
        "from bridgegen.engines.model import ModelBridge as New\n"
        "from bridgegen.engines.stream_import import stream_import as new_import\n"
        "assert ModelBridge is New and stream_import is new_import\n"
        "print(sorted({w.category.__name__ for w in caught}), len(caught))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['DeprecationWarning'] 2"
