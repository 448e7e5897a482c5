"""Stage 1: YAML text -> plain Python values plus the location of every node.

PyYAML's safe composer keeps a mark on every node; we walk the node tree ourselves so that
duplicate keys become errors (PyYAML silently keeps the last one) and so that every value can
be traced back to ``file:line:col`` when a later stage rejects it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridgegen.spec.errors import Location, SpecError, format_field_path

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class LoadedSpec:
    """One spec file as plain data, with a location for every field path in it."""

    name: str
    path: str
    data: Any
    locations: dict[FieldPath, Location] = field(default_factory=dict)

    def location_of(self, path: FieldPath) -> Location:
        """The location of ``path``, or of its nearest ancestor that has one."""
        for cut in range(len(path), -1, -1):
            found = self.locations.get(tuple(path[:cut]))
            if found is not None:
                return found
        return Location(self.path, 1, 1)

    def error(self, path: FieldPath, message: str) -> SpecError:
        return SpecError(self.location_of(path), format_field_path(path), message)


def _mark(path: str, node: yaml.Node) -> Location:
    return Location(path, node.start_mark.line + 1, node.start_mark.column + 1)


def _construct(
    node: yaml.Node,
    file: str,
    field_path: FieldPath,
    locations: dict[FieldPath, Location],
    errors: list[SpecError],
    constructor: yaml.constructor.SafeConstructor,
) -> Any:
    locations[field_path] = _mark(file, node)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                errors.append(
                    SpecError(
                        _mark(file, key_node),
                        format_field_path(field_path),
                        "mapping keys must be plain scalars",
                    )
                )
                continue
            key = constructor.construct_object(key_node)
            if not isinstance(key, str):
                key = str(key)
            if key in result:
                first = locations[(*field_path, key)]
                errors.append(
                    SpecError(
                        _mark(file, key_node),
                        format_field_path((*field_path, key)),
                        f"duplicate key (first defined at line {first.line})",
                    )
                )
                continue
            locations[(*field_path, key)] = _mark(file, key_node)
            result[key] = _construct(value_node, file, (*field_path, key), locations, errors, constructor)
            locations[(*field_path, key)] = _mark(file, key_node)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(item, file, (*field_path, index), locations, errors, constructor)
            for index, item in enumerate(node.value)
        ]
    return constructor.construct_object(node)


def load_spec_text(text: str, path: str) -> tuple[LoadedSpec | None, list[SpecError]]:
    """Parse one spec's text. Returns the loaded spec (None if unreadable) and its errors."""
    name = Path(path).stem
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        return None, [SpecError(Location(path, line, col), "", f"invalid YAML: {exc.problem}")]
    if node is None:
        return None, [SpecError(Location(path, 1, 1), "", "spec file is empty")]
    locations: dict[FieldPath, Location] = {}
    errors: list[SpecError] = []
    constructor = yaml.constructor.SafeConstructor()
    try:
        data = _construct(node, path, (), locations, errors, constructor)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        return None, [SpecError(Location(path, line, col), "", f"invalid YAML: {exc.problem}")]
    return LoadedSpec(name=name, path=path, data=data, locations=locations), errors


def load_spec_file(path: Path, display_path: str) -> tuple[LoadedSpec | None, list[SpecError]]:
    return load_spec_text(path.read_text(encoding="utf-8"), display_path)
