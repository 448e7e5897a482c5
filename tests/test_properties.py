"""Property-based tests of the two readers of untrusted files: the spec loader (specs come from
pull requests) and the safetensors header reader (checkpoints come from anywhere).

Random and mutated inputs must either be accepted or end in the project's own error type
(``SpecErrors`` naming lines of the files read, ``WeightError`` naming the file) and, for
specs, within a memory bound: the process's peak resident memory may grow by at most
``SPEC_MEMORY_LIMIT`` during one example (tracemalloc would be exact but makes loading four
times slower). No example has a time bound (hypothesis' ``deadline`` is off): a busy machine
is slower, not wrong.
Accepted safetensors headers must describe the file exactly: the tensors tile the data region
and each one's shape and dtype give its byte length.

Settings are derandomized, so CI runs the same examples every time; the example counts keep
the whole file at about 20 s on two cores.
"""

from __future__ import annotations

import json
import math
import resource
import struct
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bridgegen.bridge.errors import WeightError
from bridgegen.formats.safetensors import DTYPES, read_header
from bridgegen.spec.errors import SpecErrors
from bridgegen.spec.generate import load_specs
from bridgegen.spec.models import SpecFile

ROOT = Path(__file__).parents[1]
SPECS = {path.name: path.read_text(encoding="utf-8") for path in sorted((ROOT / "specs").glob("*.yaml"))}
RUNTIME_MODULES = (ROOT / "specs" / "runtime_modules.py").read_bytes()

SPEC_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
HEADER_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)
SPEC_MEMORY_LIMIT = 64 * 2**20


# ---------------------------------------------------------------- the spec loader


def spec_chain(name: str) -> list[str]:
    """``name`` and the spec files it extends, so that a folder of them resolves."""
    names = [name]
    while (parent := yaml.safe_load(SPECS[names[-1]]).get("extends")) is not None:
        names.append(f"{parent}.yaml")
    return names


def assert_loaded_or_refused(files: dict[str, bytes]) -> None:
    """Load ``files`` as a spec folder the way ``bridgegen check`` does: it must succeed or
    raise SpecErrors whose every error names one of the files and a line within it."""
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            (Path(folder) / name).write_bytes(content)
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_specs(Path(folder), ".")
        except SpecErrors as exc:
            assert exc.errors
            for error in exc.errors:
                assert error.location.path in files, error
                # splitlines() breaks at every character YAML counts as a line break, and more.
                lines = len(files[error.location.path].decode("utf-8", "replace").splitlines())
                assert 1 <= error.location.line <= lines + 1, error
                assert error.location.col >= 1, error
                assert error.message, error
        finally:
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024  # KiB on Linux
    assert grown < SPEC_MEMORY_LIMIT


def folder_with(name: str, text: str) -> dict[str, bytes]:
    """The specs ``name`` needs, with ``text`` in place of ``name``; a concrete spec beside the
    base so that resolution runs whichever file is broken."""
    files = {other: SPECS[other].encode() for other in {*spec_chain(name), "llama.yaml", "_base.yaml"}}
    files[name] = text.encode("utf-8", "surrogatepass")
    files["runtime_modules.py"] = RUNTIME_MODULES  # the modules the built-in specs select
    return files


YAML_CHARACTERS = st.sampled_from(list(":-[]{}&*!|>'\"#%@`,?\n\r\t {}.0123456789eE_xX+~")) | st.characters()
# Plain scalars PyYAML resolves to a type and then fails to build, or that mean more than text.
TRICKY_SCALARS = st.sampled_from(
    ["2001-02-30", "0000-01-01", "2001-01-01 00:00:00 +99", "0x_", "+0b_", "1" * 5000, "1e999", ".nan", "~"]
    + ["<<: {a: 1}", "*a", "&a x", "!!binary x", "!x y", "? [a]", "=", "|\n x", "{a: 1, a: 2}", "'"]
) | st.text(YAML_CHARACTERS, max_size=8)
MUTATIONS = st.one_of(
    st.tuples(st.just("set-value"), st.integers(min_value=0), TRICKY_SCALARS),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.text(YAML_CHARACTERS, min_size=1, max_size=6)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(min_value=1, max_value=40)),
    st.tuples(st.just("replace"), st.integers(min_value=0), st.text(YAML_CHARACTERS, min_size=1, max_size=1)),
    st.tuples(st.just("swap-lines"), st.integers(min_value=0), st.integers(min_value=0)),
    st.tuples(st.just("repeat-line"), st.integers(min_value=0), st.integers(min_value=1, max_value=3)),
)


def mutate(text: str, mutation: tuple[str, int, Any]) -> str:
    kind, where, what = mutation
    if kind in {"swap-lines", "repeat-line", "set-value"}:
        lines = text.splitlines(keepends=True) or [""]
        first = where % len(lines)
        if kind == "set-value":
            key, colon, _ = lines[first].partition(": ")
            lines[first] = f"{key}{colon or ': '}{what}\n"
        elif kind == "repeat-line":
            lines[first:first] = [lines[first]] * what
        else:
            second = what % len(lines)
            lines[first], lines[second] = lines[second], lines[first]
        return "".join(lines)
    index = where % (len(text) + 1)
    if kind == "insert":
        return text[:index] + what + text[index:]
    if kind == "delete":
        return text[:index] + text[index + what :]
    return text[:index] + what + text[index + 1 :]


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        ["gpt", "mla", "silu", "row", "column", "vocab", "default", "{layer}", "{Layer}", "a ** 9"]
    )
)
YAML_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
# Documents shaped like specs: the real top-level keys, anything under them.
SPEC_SHAPED = st.fixed_dictionaries({}, optional={key: YAML_VALUES for key in SpecFile.model_fields})


@SPEC_SETTINGS
@given(st.text(max_size=400))
def test_random_text_is_loaded_or_refused(text: str) -> None:
    assert_loaded_or_refused({"spec.yaml": text.encode()})


@SPEC_SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_are_loaded_or_refused(data: bytes) -> None:
    assert_loaded_or_refused({"spec.yaml": data})


@SPEC_SETTINGS
@given(st.sampled_from(sorted(SPECS)), st.lists(MUTATIONS, min_size=1, max_size=6))
def test_a_mutated_real_spec_is_loaded_or_refused(name: str, mutations: list[tuple[str, int, Any]]) -> None:
    text = SPECS[name]
    for mutation in mutations:
        text = mutate(text, mutation)
    assert_loaded_or_refused(folder_with(name, text))


@SPEC_SETTINGS
@given(st.sampled_from(sorted(SPECS)), st.data())
def test_a_real_spec_with_a_random_part_is_loaded_or_refused(name: str, data: st.DataObject) -> None:
    document = yaml.safe_load(SPECS[name])
    node: Any = document
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        if not isinstance(node[key], dict | list) or not node[key] or data.draw(st.booleans()):
            node[key] = data.draw(YAML_VALUES)
            break
        node = node[key]
    assert_loaded_or_refused(folder_with(name, yaml.safe_dump(document, sort_keys=False, allow_unicode=True)))


@SPEC_SETTINGS
@given(YAML_VALUES | SPEC_SHAPED, st.booleans())
def test_a_random_yaml_document_is_loaded_or_refused(document: Any, extends_base: bool) -> None:
    if extends_base and isinstance(document, dict):
        document = {"extends": "_base", **document}
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    assert_loaded_or_refused(folder_with("llama.yaml", SPECS["llama.yaml"]) | {"random.yaml": text.encode()})


def test_every_unmutated_folder_loads() -> None:
    # The folders above are sound before a mutation: every error the properties meet is the
    # mutation's, and the properties exercise the whole loader rather than a broken harness.
    for name, text in SPECS.items():
        with tempfile.TemporaryDirectory() as folder:
            for file, content in folder_with(name, text).items():
                (Path(folder) / file).write_bytes(content)
            assert [spec.family for spec in load_specs(Path(folder), ".")], name


# ---------------------------------------------------------------- the safetensors header reader


def _valid_file() -> bytes:
    return safetensors.torch.save(
        {
            "a": torch.zeros(2, 3),
            "b": torch.arange(4),
            "c": torch.ones(1, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 5, dtype=torch.float16),
        }
    )


VALID = _valid_file()
VALID_HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]
VALID_HEADER: dict[str, Any] = json.loads(VALID[8 : 8 + VALID_HEADER_LEN])
VALID_DATA = VALID[8 + VALID_HEADER_LEN :]


def assert_read_or_refused(data: bytes) -> None:
    """``read_header`` accepts ``data`` only if its tensors tile the data region exactly, and
    otherwise raises WeightError naming the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(data)
        try:
            table = read_header(path)
        except WeightError as exc:
            assert str(exc).startswith(f"{path}: "), exc
            return
    expected = 8 + struct.unpack("<Q", data[:8])[0]
    for info in sorted(table.values(), key=lambda info: (info.start, info.end)):
        assert info.start == expected
        assert info.nbytes == math.prod(info.shape) * info.dtype.itemsize
        assert info.dtype in DTYPES.values()
        expected = info.end
    assert expected == len(data)


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, 3, 4, 5, 6, 24, 32, 56, 58, -1, 2**63, 2**64, 10**30])
    | st.floats()
    | st.sampled_from([*DTYPES, "F4", "", "f32", "U64"])
    | st.text(max_size=6)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=10,
)
TENSOR_NAMES = st.sampled_from([*VALID_HEADER, "new", "__metadata__"])
HEADER_EDITS = st.one_of(
    st.tuples(
        st.just("set"),
        TENSOR_NAMES,
        st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
        JSON_VALUES,
    ),
    st.tuples(
        st.just("drop-field"), TENSOR_NAMES, st.sampled_from(["dtype", "shape", "data_offsets"]), st.none()
    ),
    st.tuples(st.just("replace-entry"), TENSOR_NAMES, st.none(), JSON_VALUES),
    st.tuples(st.just("drop-entry"), TENSOR_NAMES, st.none(), st.none()),
    st.tuples(st.just("duplicate-entry"), TENSOR_NAMES, st.none(), st.none()),
)


def edited_header(edits: list[tuple[str, str, str | None, Any]]) -> str:
    """The valid header with ``edits`` applied, as JSON text (which may repeat a key)."""
    items: list[tuple[str, Any]] = [(name, dict(entry)) for name, entry in VALID_HEADER.items()]
    for kind, name, field, value in edits:
        index = next((i for i, (n, _) in enumerate(items) if n == name), None)
        if index is None:
            items.append((name, {}))
            index = len(items) - 1
        entry = items[index][1]
        if kind == "set" and isinstance(entry, dict):
            entry[field] = value
        elif kind == "drop-field" and isinstance(entry, dict):
            entry.pop(field, None)
        elif kind == "replace-entry":
            items[index] = (name, value)
        elif kind == "drop-entry":
            del items[index]
        elif kind == "duplicate-entry":
            items.append(items[index])
    return "{" + ",".join(f"{json.dumps(name)}:{json.dumps(entry)}" for name, entry in items) + "}"


def safetensors_bytes(header: bytes, data: bytes = VALID_DATA, header_len: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if header_len is None else header_len) + header + data


def test_the_valid_file_is_read() -> None:
    assert_read_or_refused(VALID)
    assert set(read_header_of(VALID)) == {"a", "b", "c", "empty"}


def read_header_of(data: bytes) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(data)
        return dict(read_header(path))


@HEADER_SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes_are_read_or_refused(data: bytes) -> None:
    assert_read_or_refused(data)


@HEADER_SETTINGS
@given(st.integers(min_value=0, max_value=len(VALID)))
def test_a_truncated_file_is_read_or_refused(length: int) -> None:
    assert_read_or_refused(VALID[:length])


@HEADER_SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_a_file_with_flipped_bytes_is_read_or_refused(flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for index, mask in flips:
        data[index] ^= mask
    assert_read_or_refused(bytes(data))


@HEADER_SETTINGS
@given(
    st.lists(HEADER_EDITS, min_size=1, max_size=4),
    st.sampled_from([VALID_DATA, VALID_DATA[:-1], VALID_DATA + b"\0", b""]),
    st.sampled_from(["", " ", "        "]),
)
def test_a_file_with_an_edited_header_is_read_or_refused(
    edits: list[tuple[str, str, str | None, Any]], data: bytes, padding: str
) -> None:
    assert_read_or_refused(safetensors_bytes((edited_header(edits) + padding).encode(), data))


@HEADER_SETTINGS
@given(JSON_VALUES | st.integers(1, 100_000).map(lambda depth: "[" * depth + "]" * depth), st.integers(-3, 3))
def test_a_file_with_any_json_header_is_read_or_refused(header: Any, length_error: int) -> None:
    text = header if isinstance(header, str) and header.startswith("[") else json.dumps(header)
    encoded = text.encode("utf-8", "surrogatepass")
    assert_read_or_refused(safetensors_bytes(encoded, header_len=max(0, len(encoded) + length_error)))
