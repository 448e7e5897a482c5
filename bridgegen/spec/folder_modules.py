"""The runtime modules a specs folder brings: its ``runtime_modules.py``, beside its specs.

The file is the folder's own Python (its team's code, not an input to convert): it is imported
to read its module classes (subclasses of ``ModuleParameters``, see
``bridgegen.bridge.module_parameters``), whose declarations are checked here, and its text is
copied into the bridges folder ``generate`` writes, where the bridges import their classes from.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

from bridgegen.bridge.module_parameters import ModuleParameters, declaration_errors
from bridgegen.spec.errors import Location, SpecError

MODULES_FILE = "runtime_modules.py"
BUILTIN_FOLDER_PACKAGE = "bridgegen.generated.runtime_modules"


@dataclass(frozen=True)
class FolderModules:
    """A specs folder's ``runtime_modules.py``: what it declares, and its text to copy."""

    display: str  # the file as errors and generated headers name it
    import_name: str  # the private module name it was imported under
    classes: tuple[type[ModuleParameters], ...]
    text: str
    # Where generated bridges of other folders import these classes from (the built-in folder's,
    # as generated); None for the folder being generated, whose bridges import its own copy.
    imported_from: str | None = None


def _line_of(cls: type, fallback: int = 1) -> int:
    try:
        return inspect.getsourcelines(cls)[1]
    except (OSError, TypeError):
        return fallback


def load_folder_modules(
    folder: Path, display: str, imported_from: str | None = None
) -> tuple[FolderModules | None, list[SpecError]]:
    """Import ``folder/runtime_modules.py`` if there is one; its module classes and what is
    wrong with them (``display`` names the file in errors)."""
    path = folder / MODULES_FILE
    if not path.is_file():
        return None, []
    text = path.read_text(encoding="utf-8")
    import_name = "_bridgegen_folder_modules_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(import_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a loader
        return None, [SpecError(Location(display, 1, 1), "", "cannot be imported")]
    module = importlib.util.module_from_spec(spec)
    sys.modules[import_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the team's code: say which file failed and how
        sys.modules.pop(import_name, None)
        line = getattr(exc, "lineno", None) or _traceback_line(exc, str(path))
        return None, [SpecError(Location(display, line, 1), "", f"importing it failed: {type(exc).__name__}: {exc}")]
    classes = tuple(
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, ModuleParameters)
        and value.__module__ == import_name
        and "name" in vars(value)
    )
    errors = [
        SpecError(Location(display, _line_of(cls), 1), "", message.split(": ", 1)[1])
        for cls in classes
        for message in declaration_errors(cls)
    ]
    if not classes:
        errors.append(
            SpecError(
                Location(display, 1, 1),
                "",
                "declares no runtime module (a subclass of "
                "bridgegen.bridge.module_parameters.ModuleParameters with a name)",
            )
        )
    return FolderModules(display, import_name, classes, text, imported_from), errors


def _traceback_line(exc: BaseException, filename: str) -> int:
    tb = exc.__traceback__
    line = 1
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
