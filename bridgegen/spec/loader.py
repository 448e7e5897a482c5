"""Stage 1: YAML text -> plain Python values plus the location of every node.

PyYAML's safe composer keeps a mark on every node; we walk the node tree ourselves so that
duplicate keys become errors (PyYAML silently keeps the last one) and so that every value can
be traced back to ``file:line:col`` when a later stage rejects it.

Specs arrive in pull requests, so the loader treats them as hostile input and keeps the work
of reading one proportional to its size:

* A file larger than ``MAX_SPEC_BYTES`` is refused before it is parsed. The largest spec in
  ``specs/`` has about 6 KiB; the limit is forty times that, and PyYAML's pure-Python parser
  (which the checks below hook into) reads it in about a second.
* Anchors and aliases are refused: no spec needs them, and an alias re-uses a node, so a few
  lines of nested aliases expand into billions of values when the node graph is walked as a
  tree (the "billion laughs" document).
* Explicit tags (``!!python/object/apply:...``, ``!foo``, ``!!str``, ``! x``) are refused on
  scalars, sequences and mappings alike: a spec is plain data, and a tag would otherwise be
  dropped silently or change what a value means.
* Nesting deeper than ``MAX_NESTING`` is refused; the composer and the walker below recurse
  once per level, and no spec nests more than six.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from bridgegen.spec.errors import Location, SpecError, format_field_path

FieldPath = tuple[str | int, ...]

MAX_SPEC_BYTES = 256 * 1024
MAX_NESTING = 32
# How much of an offending scalar an error message quotes.
_QUOTE_CHARS = 40


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


class _Mark(Protocol):
    """Where PyYAML saw something (0-based); its pure-Python and C marks both have these."""

    line: int
    column: int


class _Refused(Exception):
    """Input a spec may not contain; carries the mark of the offending node."""

    def __init__(self, message: str, mark: _Mark | None, field_path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark
        self.field_path = field_path


def _shown_tag(tag: str) -> str:
    """A tag as a spec author wrote it: ``tag:yaml.org,2002:str`` -> ``!!str``."""
    standard = "tag:yaml.org,2002:"
    return "!!" + tag[len(standard) :] if tag.startswith(standard) else tag


def _refusal(event: yaml.Event) -> str | None:
    """Why the node that ``event`` starts may not appear in a spec, or None."""
    if isinstance(event, yaml.AliasEvent):
        return f"YAML aliases (*{event.anchor}) are not allowed in specs; write the value out"
    if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
        return f"YAML anchors (&{event.anchor}) are not allowed in specs"
    tag = getattr(event, "tag", None)
    if tag is not None:
        return f"YAML tags ({_shown_tag(tag)}) are not allowed in specs"
    return None


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases, anchors, tags and deep nesting as it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
        refusal = _refusal(event)
        if refusal is not None:
            raise _Refused(refusal, event.start_mark)
        if self._depth >= MAX_NESTING:
            raise _Refused(f"nested more than {MAX_NESTING} levels deep", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _location(path: str, mark: _Mark | None) -> Location:
    return Location(path, mark.line + 1, mark.column + 1) if mark is not None else Location(path, 1, 1)


def _mark(path: str, node: yaml.Node) -> Location:
    return _location(path, node.start_mark)


def _scalar(
    node: yaml.Node, file: str, field_path: FieldPath, constructor: yaml.constructor.SafeConstructor
) -> Any:
    """The value of a scalar node. PyYAML resolves ``2001-02-30`` to a timestamp and a
    5000-digit number to an int, then fails building them with a bare ValueError."""
    try:
        return constructor.construct_object(node)
    except (ValueError, OverflowError) as exc:
        text = str(node.value)
        quoted = repr(text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "...")
        kind = _shown_tag(node.tag).removeprefix("!!")
        raise _Refused(
            f"invalid {kind} {quoted}: {exc}", node.start_mark, format_field_path(field_path)
        ) from None


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
            key = _scalar(key_node, file, field_path, constructor)
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
    return _scalar(node, file, field_path, constructor)


def _line_and_column(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of character ``index`` of ``text``."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def load_spec_text(text: str, path: str) -> tuple[LoadedSpec | None, list[SpecError]]:
    """Parse one spec's text. Returns the loaded spec (None if unreadable) and its errors."""
    name = Path(path).stem
    try:
        node = yaml.compose(text, Loader=_SpecLoader)
    except _Refused as exc:
        return None, [SpecError(_location(path, exc.mark), exc.field_path, exc.message)]
    except yaml.MarkedYAMLError as exc:
        return None, [SpecError(_location(path, exc.problem_mark), "", f"invalid YAML: {exc.problem}")]
    except yaml.reader.ReaderError as exc:
        # Raised for control characters before any mark exists; its position is a text index.
        line, col = _line_and_column(text, exc.position)
        return None, [
            SpecError(Location(path, line, col), "", f"invalid YAML: {exc.reason} (#x{exc.character:04x})")
        ]
    if node is None:
        return None, [SpecError(Location(path, 1, 1), "", "spec file is empty")]
    locations: dict[FieldPath, Location] = {}
    errors: list[SpecError] = []
    constructor = yaml.constructor.SafeConstructor()
    try:
        data = _construct(node, path, (), locations, errors, constructor)
    except _Refused as exc:
        return None, [SpecError(_location(path, exc.mark), exc.field_path, exc.message)]
    except yaml.constructor.ConstructorError as exc:
        return None, [SpecError(_location(path, exc.problem_mark), "", f"invalid YAML: {exc.problem}")]
    return LoadedSpec(name=name, path=path, data=data, locations=locations), errors


def load_spec_file(path: Path, display_path: str) -> tuple[LoadedSpec | None, list[SpecError]]:
    """Read and parse one spec file; a file too large, unreadable or not UTF-8 is one error."""
    start = Location(display_path, 1, 1)
    try:
        with path.open("rb") as handle:
            # One byte past the limit tells "too large" apart without reading the whole file.
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        return None, [SpecError(start, "", f"cannot read spec file: {exc.strerror}")]
    if len(raw) > MAX_SPEC_BYTES:
        return None, [
            SpecError(start, "", f"spec file is larger than {MAX_SPEC_BYTES} bytes; refused unread")
        ]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = raw[: exc.start].decode("utf-8")
        line, col = _line_and_column(good, len(good))
        return None, [
            SpecError(Location(display_path, line, col), "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x})")
        ]
    return load_spec_text(text, display_path)
