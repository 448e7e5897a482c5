"""Stages 4-5: resolved specs -> ``{relative path: source}`` (jinja2, then the pinned ruff).

``render_all`` is the one function behind both ``generate`` and ``check``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from typing import Any

import jinja2

from bridgegen.bridge.weight_rules import GateUp, HFLayout
from bridgegen.spec.folder_modules import MODULES_FILE, FolderModules
from bridgegen.spec.resolve import ResolvedSpec, ResolvedWeight, mapped_hf_fields

# The formatter is part of the output's definition: another ruff could format differently.
RUFF_VERSION = "0.17.6"
LINE_LENGTH = 110
GENERATED_PACKAGE_DIR = "generated"
SCHEMA_PATH = "specs/spec.schema.json"


def _pyrepr(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_pyrepr(k)}: {_pyrepr(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_pyrepr(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(_pyrepr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def when_function(weight: ResolvedWeight) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", weight.megatron_name.replace("{layer}", "layer_").lower()).strip("_")
    return f"_when_{slug}"


def weight_rule_imports(spec: ResolvedSpec) -> str:
    """The names the bridge imports from weight_rules (the layout enums only where used)."""
    names = {"WeightKind", "WeightRule"}
    names |= {"HFLayout" for weight in spec.weights if weight.hf_layout is not HFLayout.same}
    names |= {"GateUp" for weight in spec.weights if weight.gate_up is not GateUp.stacked}
    return ", ".join(sorted(names))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bridgegen.spec", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pyrepr"] = _pyrepr
    env.globals["when_function"] = when_function
    env.globals["weight_rule_imports"] = weight_rule_imports
    return env


def hf_fields_of(spec: ResolvedSpec) -> tuple[str, ...]:
    """Every HF field the spec maps (read on import or written on export)."""
    return tuple(
        sorted(mapped_hf_fields(spec.hf_inputs, spec.hf_values, spec.activation_field, spec.hf_aliases))
    )


class FormatterError(RuntimeError):
    pass


def format_python(source: str, display_path: str) -> str:
    """Format with the pinned ruff, isolated from any project configuration."""
    try:
        installed = metadata.version("ruff")
    except metadata.PackageNotFoundError:
        raise FormatterError(
            f"ruff {RUFF_VERSION} is needed to format generated code; it is not installed "
            "(pip install 'bridgegen[generate]')"
        ) from None
    if installed != RUFF_VERSION:
        raise FormatterError(
            f"generated code is formatted with ruff {RUFF_VERSION}, but ruff {installed} is installed"
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "format",
            "--isolated",
            f"--line-length={LINE_LENGTH}",
            "--stdin-filename",
            display_path,
            "-",
        ],
        input=source,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise FormatterError(f"ruff could not format {display_path}:\n{result.stderr}")
    return result.stdout


def module_imports(spec: ResolvedSpec, module_prefix: str) -> list[tuple[str, str]]:
    """(module, class) imports of the runtime module classes a bridge selects; the bridges
    folder's own file is ``runtime_modules`` beside the bridge."""
    own = f"{module_prefix}{MODULES_FILE.removesuffix('.py')}"
    return sorted((source or own, name) for source, name in spec.runtime_module_classes)


def import_lines(spec: ResolvedSpec, module_prefix: str) -> str:
    """The bridge module's imports of bridgegen and of runtime module classes, sorted as isort
    sorts them (relative imports in a block of their own)."""
    names: dict[str, list[str]] = {
        "bridgegen.bridge.base": ["Bridge", *(["Wrapper"] if spec.wrappers else [])],
        "bridgegen.bridge.config": ["HFConfigReader", "MegatronConfig"],
        "bridgegen.bridge.weight_rules": [weight_rule_imports(spec)],
    }
    for module, name in module_imports(spec, module_prefix):
        names.setdefault(module, []).append(name)
    # isort's sections as ruff finds them: bridgegen.generated (mapped from generated/, so not
    # found beside the package) reads as third party, the rest of bridgegen as first party.
    generated = sorted(m for m in names if m.startswith("bridgegen.generated."))
    first_party = sorted(m for m in names if m.startswith("bridgegen.") and m not in generated)
    relative = sorted(m for m in names if m.startswith("."))
    blocks = [
        [f"from {m} import {', '.join(names[m])}" for m in generated],
        [
            "from bridgegen.bridge import helpers  # noqa: F401",
            *(f"from {m} import {', '.join(names[m])}" for m in first_party),
        ],
        [f"from {m} import {', '.join(names[m])}" for m in relative],
    ]
    return "\n\n".join("\n".join(block) for block in blocks if block)


def copied_modules(modules: FolderModules, regenerate: str) -> str:
    """The specs folder's runtime_modules.py as the bridges folder holds it."""
    return (
        f"# @generated by bridgegen from {modules.display}. Do not edit: change it there and run {regenerate}.\n"
        + modules.text
    )


def render_package(
    specs: list[ResolvedSpec], module_prefix: str, regenerate: str, modules: FolderModules | None = None
) -> dict[str, str]:
    """The bridge module of each spec and the package's ``__init__.py`` listing them, keyed by
    file name, not yet formatted, with the specs folder's runtime modules copied. ``module_prefix``
    is how ``__init__.py`` imports the modules (``bridgegen.generated.`` or ``.``); ``regenerate``
    is the command the headers name."""
    env = _environment()
    files: dict[str, str] = {}
    ordered = sorted(specs, key=lambda s: s.family)
    for spec in ordered:
        files[f"{spec.family}.py"] = env.get_template("bridge.py.j2").render(
            spec=spec,
            hf_fields=hf_fields_of(spec),
            regenerate=regenerate,
            module_imports=module_imports(spec, module_prefix),
            import_lines=import_lines(spec, module_prefix),
        )
    if modules is not None:
        files[MODULES_FILE] = copied_modules(modules, regenerate)
    files["__init__.py"] = env.get_template("registry.py.j2").render(
        specs=ordered,
        sources=[spec.source for spec in ordered],
        module_prefix=module_prefix,
        regenerate=regenerate,
    )
    return files


def render_all(
    specs: list[ResolvedSpec], schema: dict[str, Any], modules: FolderModules | None = None
) -> dict[str, str]:
    """Every generated file of the project, formatted (the copied runtime modules as they are),
    keyed by path relative to the root."""
    package = render_package(specs, "bridgegen.generated.", "`make generate`", modules)
    files = {
        f"{GENERATED_PACKAGE_DIR}/{name}": text
        if name == MODULES_FILE
        else format_python(text, f"{GENERATED_PACKAGE_DIR}/{name}")
        for name, text in package.items()
    }
    files[SCHEMA_PATH] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def render_external(
    specs: list[ResolvedSpec], out_name: str, modules: FolderModules | None = None
) -> dict[str, str]:
    """The bridge package of specs kept outside this project, formatted, keyed by file name;
    its modules import each other relatively, so the package works wherever it lies."""
    package = render_package(
        specs, ".", "`bridgegen generate --specs <its folder> --out <this folder>`", modules
    )
    return {
        name: text if name == MODULES_FILE else format_python(text, f"{out_name}/{name}")
        for name, text in package.items()
    }
