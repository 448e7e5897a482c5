"""Stage 6: the only stage that touches disk — write generated files, or check them."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridgegen.spec.errors import SpecError, SpecErrors
from bridgegen.spec.loader import LoadedSpec, load_spec_file
from bridgegen.spec.models import SpecFile
from bridgegen.spec.render import GENERATED_PACKAGE_DIR, SCHEMA_PATH, render_all
from bridgegen.spec.resolve import ResolvedSpec, resolve_all


def spec_schema() -> dict[str, Any]:
    schema = SpecFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "bridgegen architecture spec"
    return schema


def load_specs(root: Path, specs_dir: str = "specs") -> list[ResolvedSpec]:
    """Load, validate and resolve every ``*.yaml`` under ``root/specs_dir``; raise SpecErrors."""
    errors: list[SpecError] = []
    loaded: list[LoadedSpec] = []
    paths = sorted((root / specs_dir).glob("*.yaml"))
    for path in paths:
        spec, file_errors = load_spec_file(path, path.relative_to(root).as_posix())
        errors.extend(file_errors)
        if spec is not None and not file_errors:
            loaded.append(spec)
    try:
        resolved = resolve_all(loaded, frozenset(path.stem for path in paths))
    except SpecErrors as exc:
        errors.extend(exc.errors)
        resolved = []
    if errors:
        raise SpecErrors(errors)
    return resolved


def render_project(root: Path, specs_dir: str = "specs") -> dict[str, str]:
    return render_all(load_specs(root, specs_dir), spec_schema())


def _existing_generated(root: Path) -> set[str]:
    folder = root / GENERATED_PACKAGE_DIR
    return {p.relative_to(root).as_posix() for p in folder.glob("*.py")} if folder.is_dir() else set()


@dataclass(frozen=True)
class CheckResult:
    diffs: list[str]
    orphans: list[str]

    @property
    def ok(self) -> bool:
        return not self.diffs and not self.orphans


def check(root: Path, files: dict[str, str]) -> CheckResult:
    diffs: list[str] = []
    for path, expected in sorted(files.items()):
        target = root / path
        actual = target.read_text(encoding="utf-8") if target.exists() else ""
        if actual != expected:
            diffs.append(
                "".join(
                    difflib.unified_diff(
                        actual.splitlines(keepends=True),
                        expected.splitlines(keepends=True),
                        fromfile=f"{path} (on disk)",
                        tofile=f"{path} (from specs)",
                    )
                )
                or f"--- {path}\n(missing)\n"
            )
    orphans = sorted(_existing_generated(root) - set(files))
    return CheckResult(diffs, orphans)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(root: Path, files: dict[str, str]) -> tuple[list[str], list[str]]:
    """Write changed files, delete orphans; returns (written, deleted)."""
    written = []
    for path, text in sorted(files.items()):
        target = root / path
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            _atomic_write(target, text)
            written.append(path)
    deleted = sorted(_existing_generated(root) - set(files))
    for path in deleted:
        (root / path).unlink()
    return written, deleted


__all__ = ["CheckResult", "SCHEMA_PATH", "check", "load_specs", "render_project", "spec_schema", "write"]
