"""Lazy safetensors reading: an HF folder's tensors as zero-copy views of its mapped files.

Reading maps each file into memory and hands out zero-copy tensor views; a conversion then
copies only the slices it needs straight into the model's parameters, so each byte of the
checkpoint is touched once and a tensor-parallel rank touches only its own shard. Headers are
validated against the file size up front, so a truncated or corrupt file is an error that
names the file and tensor, never a crash or garbage weights.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.formats.folders import INDEX_LIMIT, inside_input, read_small_text

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Validated tensor table of one safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise WeightError(
                f"{path}: corrupt or truncated safetensors header (length {header_len}, file {size} bytes)"
            )
        try:
            header = json.loads(handle.read(header_len), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
            # RecursionError: JSON nested a few thousand levels deep, which no header needs.
            raise WeightError(f"{path}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    base = 8 + header_len
    table: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(_whole_number(d) for d in entry["shape"])
            start, end = (_whole_number(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightError(f"{path}: tensor {name!r} has a corrupt header entry {entry!r}") from None
        numel = 1
        for dim in shape:
            numel *= dim
        if end - start != numel * dtype.itemsize:
            raise WeightError(
                f"{path}: tensor {name!r} header says {end - start} bytes for shape {list(shape)}"
            )
        if base + end > size:
            raise WeightError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes"
            )
        table[name] = TensorInfo(path, dtype, shape, base + start, base + end)
    # As the safetensors format requires: the tensors tile the data exactly, in offset order,
    # with no overlap (two names for the same bytes) and no gap.
    ordered = sorted(table.items(), key=lambda item: (item[1].start, item[1].end))
    for (before, first), (name, info) in zip(ordered, ordered[1:], strict=False):
        if info.start < first.end:
            raise WeightError(
                f"{path}: tensors {before!r} and {name!r} overlap (data bytes {first.start - base}-{first.end - base} "
                f"and {info.start - base}-{info.end - base}): the header is corrupt"
            )
    expected = base
    for name, info in ordered:
        if info.start != expected:
            raise WeightError(
                f"{path}: tensor {name!r} starts at data byte {info.start - base}, leaving bytes "
                f"{expected - base}-{info.start - base} to no tensor: the header is corrupt"
            )
        expected = info.end
    if expected != size:
        raise WeightError(
            f"{path}: the tensors end at data byte {expected - base} but the file holds {size - base} bytes of data"
        )
    return table


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"tensor {key!r} is listed twice")
        seen[key] = value
    return seen


def _whole_number(value: object) -> int:
    """A JSON integer of at least 0 (not a float, bool or string)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value


MXFP4_KEPT = 2  # dequantized MXFP4 tensors a Checkpoint keeps


def drop_pages(mapped: mmap.mmap, path: Path, start: int, end: int, from_page_cache: bool) -> None:
    """Drop bytes ``start`` to ``end`` of file ``path`` from this process's memory map of it
    (they are read again from the file if touched), and with ``from_page_cache`` from the page
    cache too (for data read once)."""
    start -= start % mmap.PAGESIZE
    if end <= start or not hasattr(mmap, "MADV_DONTNEED"):
        return
    mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
    if from_page_cache and hasattr(os, "posix_fadvise"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, start, end - start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


@dataclass
class Checkpoint:
    """An HF checkpoint folder (single file or sharded with an index), read lazily."""

    folder: Path
    tensors: dict[str, TensorInfo]
    bytes_requested: int = 0
    _maps: dict[Path, torch.Tensor] = field(default_factory=dict, repr=False)
    _mmaps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)
    # Views are taken by the streaming import's read-ahead thread and by the writer's thread.
    _mapping: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Read-once conversions (the streaming import: each tensor read whole by one process) also
    # drop a tensor's pages from the page cache once it is copied, leaving the cache, and the
    # memory its writes need, to the output.
    read_once: bool = False
    # Whether a source may be cast to the model's dtype with a loss (the dtype was asked for);
    # an overflow to inf is an error either way.
    allow_lossy_casts: bool = True
    # The MXFP4 tensors dequantized last, by name, oldest first: every expert of a stacked tensor
    # reads it, and a layer's experts alternate between its two (gate_up_proj, down_proj).
    _dequantized: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @staticmethod
    def open(folder: str | os.PathLike[str]) -> Checkpoint:
        root = Path(folder)
        if not root.is_dir():
            raise WeightError(f"{root}: no such checkpoint folder")
        index = root / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(read_small_text(index, INDEX_LIMIT, "safetensors index"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise WeightError(f"{index}: unreadable index: {exc}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise WeightError(f"{index}: unreadable index: weight_map must map tensor names to file names")
            files = sorted(set(weight_map.values()))
            for name in files:
                # A plain file name in this folder (it may be a symlink, as in the Hugging Face
                # cache); a path elsewhere would read files the folder does not hold.
                if name in ("", ".", "..") or name != Path(name).name or "\\" in name:
                    raise WeightError(
                        f"{index}: names shard {name!r}, which is not a file name in {root}"
                    )
        elif (root / SINGLE_NAME).exists():
            weight_map, files = None, [SINGLE_NAME]
        else:
            found = sorted(p.name for p in root.glob("*.safetensors"))
            if not found:
                raise WeightError(f"{root}: no *.safetensors files and no {INDEX_NAME}")
            weight_map, files = None, found
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = root / name
            if not path.exists():
                raise WeightError(f"{index}: names shard {name!r}, which does not exist")
            inside_input(path, root)
            for tensor_name, info in read_header(path).items():
                if weight_map is not None and weight_map.get(tensor_name) != name:
                    raise WeightError(
                        f"{path}: tensor {tensor_name!r} is not listed for this shard in {INDEX_NAME}"
                    )
                tensors[tensor_name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise WeightError(f"{index}: lists tensors no shard holds: {', '.join(missing[:5])}")
        return Checkpoint(root, tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or self.is_mxfp4(name)

    def is_mxfp4(self, name: str) -> bool:
        """Tensor ``name`` is stored MXFP4-quantized, as ``name_blocks`` and ``name_scales``."""
        from bridgegen.formats.mxfp4 import parts

        return name not in self.tensors and all(part in self.tensors for part in parts(name))

    def is_quantized(self, name: str) -> bool:
        """Tensor ``name`` is dequantized on reading (FP8 with scales, or MXFP4)."""
        from bridgegen.formats.fp8 import FP8_DTYPES

        return self.is_mxfp4(name) or self.tensors[name].dtype in FP8_DTYPES

    def stand_in(self, name: str) -> torch.Tensor:
        """Tensor ``name`` for checking shapes: its view, or a meta tensor of an MXFP4 tensor's
        dequantized shape (nothing is dequantized)."""
        if not self.is_mxfp4(name):
            return self.view(name)
        from bridgegen.formats.mxfp4 import dequantized_shape, parts

        blocks, scales = (self.tensors[part].shape for part in parts(name))
        shape = dequantized_shape(torch.Size(blocks), torch.Size(scales), name)
        return torch.empty(shape, dtype=torch.bfloat16, device="meta")

    def names(self) -> list[str]:
        return sorted(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def view(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only view of tensor ``name`` (copy what you keep)."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise WeightError(f"{self.folder}: missing tensor {name!r}") from None
        buffer = self._maps.get(info.file)
        if buffer is None:
            buffer = self._map(info.file)
        return buffer[info.start : info.end].view(info.dtype).view(info.shape)

    def _map(self, file: Path) -> torch.Tensor:
        with self._mapping:
            buffer = self._maps.get(file)
            if buffer is None:
                with file.open("rb") as handle:
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # read-only buffer: we never write through views
                    buffer = torch.frombuffer(mapped, dtype=torch.uint8)
                self._maps[file] = buffer
                self._mmaps[file] = mapped
            return buffer

    def source(self, name: str, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
        """Tensor ``name`` ready to convert: a zero-copy view, for a block-quantized FP8
        weight (one with a ``_scale_inv`` companion) its dequantized float32 value, for an MXFP4
        tensor (``_blocks`` and ``_scales``) its dequantized bfloat16 value."""
        from bridgegen.formats.fp8 import FP8_DTYPES, dequantize, scale_name

        if self.is_mxfp4(name):
            return self._mxfp4_source(name)
        view = self.view(name)
        if view.dtype not in FP8_DTYPES or scale_name(name) not in self.tensors:
            return view
        return dequantize(view, self.view(scale_name(name)), block, name)

    def _mxfp4_source(self, name: str) -> torch.Tensor:
        from bridgegen.formats import mxfp4

        if name not in self._dequantized:
            while len(self._dequantized) >= MXFP4_KEPT:  # the oldest goes before the next is made
                del self._dequantized[next(iter(self._dequantized))]
            blocks, scales = (self.view(part) for part in mxfp4.parts(name))
            self._dequantized[name] = mxfp4.dequantize(blocks, scales, name)
        return self._dequantized[name]

    def release(self, name: str) -> None:
        """Drop tensor ``name``'s pages from this process's mapping once it is copied, so the
        checkpoint does not sit in our RSS beside the model (the page cache keeps them, unless
        ``read_once``)."""
        info = self.tensors.get(name)
        mapped = self._mmaps.get(info.file) if info is not None else None
        if info is not None and mapped is not None:
            drop_pages(mapped, info.file, info.start, info.end, self.read_once)

    def count(self, tensor: torch.Tensor) -> torch.Tensor:
        """Record that ``tensor`` (a slice of a view) is read; returns it unchanged."""
        self.bytes_requested += tensor.numel() * tensor.element_size()
        return tensor

    def floating_dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's floating-point bytes are stored in."""
        totals: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            # FP8 weights are dequantized on import; the model takes the other tensors' dtype.
            if info.dtype.is_floating_point and info.dtype.itemsize > 1:
                totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
        return max(totals, key=lambda d: totals[d]) if totals else torch.float32
