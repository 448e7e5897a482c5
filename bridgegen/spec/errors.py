"""Spec errors: values that carry where in which file they come from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Location:
    """A place in a spec file: 1-based line and column."""

    path: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


@dataclass(frozen=True, order=True)
class SpecError:
    """One problem found in a spec, printed as ``file:line:col: field.path: message``."""

    location: Location
    field_path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.field_path}: " if self.field_path else ""
        return f"{self.location}: {where}{self.message}"


class SpecErrors(Exception):
    """Raised when a run collected one or more spec errors; holds all of them."""

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = sorted(set(errors))
        super().__init__("\n".join(str(e) for e in self.errors))


class FolderError(ValueError):
    """A folder of specs, or one bridges are written to, that cannot be used; names it."""


def format_field_path(parts: tuple[str | int, ...]) -> str:
    """``('weights', 'x.y', 'kind')`` -> ``weights[x.y].kind``; dotted keys are bracketed."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "." in part or "{" in part or not part.isidentifier():
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
