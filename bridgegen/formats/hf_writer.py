"""Writing HF folders: safetensors shards planned ahead from names, dtypes and shapes, filled
tensor by tensor (bounded memory), with their index and side files, published atomically."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.formats.folders import HF_SIDE_FILES, inside_input, make_temp_folder, publish_folder
from bridgegen.formats.safetensors import DTYPES, INDEX_NAME, SINGLE_NAME, Checkpoint
from bridgegen.plan.values import checked_cast, warn_if_not_finite

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor an export will write: known before any byte is produced."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


def plan_shards(planned: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = []
    size = 0
    for tensor in planned:
        if not shards or (shards[-1] and size + tensor.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def safetensors_header(entries: list[PlannedTensor]) -> bytes:
    """A safetensors header (JSON, space-padded to 8 bytes) for tensors stored in this order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": DTYPE_NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)


def write_safetensors(
    path: Path, entries: list[PlannedTensor], produce: Iterator[tuple[str, torch.Tensor]]
) -> int:
    """Write one safetensors file, streaming each tensor from ``produce`` as it comes.

    The header is written first from the plan, then every tensor's bytes straight from its
    memory: at most one tensor is materialised at a time, and nothing is copied into Python
    bytes objects.
    """
    encoded = safetensors_header(entries)
    offset = sum(entry.nbytes for entry in entries)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for entry in entries:
            name, tensor = next(produce)
            if name != entry.name or tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise WeightError(
                    f"{path}: produced {name!r} {tensor.dtype} {list(tensor.shape)} where the plan has "
                    f"{entry.name!r} {entry.dtype} {list(entry.shape)}"
                )
            warn_if_not_finite(tensor, f"HF {name!r}")
            flat = tensor.detach().contiguous().reshape(-1)
            if flat.numel():
                handle.write(flat.view(torch.uint8).numpy().data)
    return offset


def stream_tensors(source: Checkpoint, planned: list[PlannedTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``planned`` tensors of ``source``, in order, cast to their planned dtype."""
    for entry in planned:
        yield entry.name, source.view(entry.name).to(entry.dtype)
        source.release(entry.name)


def copy_tensors(source: Checkpoint, planned: list[PlannedTensor], path: Path) -> int:
    """Write ``planned`` tensors of ``source`` as one safetensors file."""
    return write_safetensors(path, planned, stream_tensors(source, planned))


def shard_name(index: int, count: int) -> str:
    """The HF name of safetensors shard ``index`` (from 0) of ``count``."""
    return SINGLE_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def file_plan(planned: list[PlannedTensor], max_shard_bytes: int) -> FilePlan:
    """Which tensors go into which HF shard file, in order."""
    shards = plan_shards(planned, max_shard_bytes)
    return FilePlan({shard_name(i, len(shards)): shard for i, shard in enumerate(shards)})


@dataclass(frozen=True)
class FilePlan:
    """Where every tensor of a multi-file export goes: file, byte offset, dtype and shape."""

    files: dict[str, list[PlannedTensor]]

    def header(self, file: str) -> bytes:
        return safetensors_header(self.files[file])

    def create(self, folder: Path) -> None:
        """Write every file's header and size it (the data regions are filled in later)."""
        for file, entries in self.files.items():
            header = self.header(file)
            with (folder / file).open("wb") as handle:
                handle.write(struct.pack("<Q", len(header)))
                handle.write(header)
                handle.truncate(8 + len(header) + sum(e.nbytes for e in entries))


def contiguous_runs(view: torch.Tensor) -> Iterator[tuple[int, int]]:
    """(element offset, element count) of the contiguous runs of a strided view, in row-major
    order of the view's elements."""
    sizes, strides = [int(d) for d in view.shape], [int(d) for d in view.stride()]
    run = 1
    cut = len(sizes)
    while cut > 0 and (sizes[cut - 1] == 1 or strides[cut - 1] == run):
        run *= sizes[cut - 1]
        cut -= 1
    base = int(view.storage_offset())
    for index in itertools.product(*(range(size) for size in sizes[:cut])):
        yield base + sum(i * stride for i, stride in zip(index, strides[:cut], strict=True)), run


class PlannedFiles:
    """The files of a FilePlan, open for writing slices of their tensors at known offsets, so
    several processes can fill disjoint parts of the same files with plain ``pwrite`` calls."""

    def __init__(self, folder: Path, plan: FilePlan) -> None:
        self._where: dict[str, tuple[str, int, PlannedTensor]] = {}
        for file, entries in plan.files.items():
            offset = 8 + len(plan.header(file))
            for entry in entries:
                self._where[entry.name] = (file, offset, entry)
                offset += entry.nbytes
        self._fds = {file: os.open(folder / file, os.O_WRONLY) for file in plan.files}

    def target(self, name: str) -> torch.Tensor:
        """A meta tensor standing for tensor ``name``: slice it to say which part to write."""
        _, _, entry = self._where[name]
        return torch.empty(entry.shape, dtype=entry.dtype, device="meta")

    def write(self, name: str, view: torch.Tensor, data: torch.Tensor) -> int:
        """Write ``data`` into the part of tensor ``name`` that ``view`` (a view of
        ``target(name)``) selects. Returns the bytes written."""
        file, offset, entry = self._where[name]
        if tuple(view.shape) != tuple(data.shape):
            raise WeightError(
                f"{name}: writing shape {list(data.shape)} into a slice of shape {list(view.shape)}"
            )
        cast = checked_cast(data.detach(), entry.dtype, True, f"HF {name!r}")
        warn_if_not_finite(cast, f"HF {name!r}")
        flat = cast.contiguous().reshape(-1).cpu()
        raw = flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")
        size = entry.dtype.itemsize
        fd = self._fds[file]
        consumed = 0
        for start, count in contiguous_runs(view):
            os.pwrite(fd, raw[consumed : consumed + count * size], offset + start * size)
            consumed += count * size
        return consumed

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()




def copy_side_files(source: str | os.PathLike[str] | None, target: Path) -> list[str]:
    """Copy the tokenizer / generation config files an HF folder has into ``target``; each must
    lie in that folder (``inside_input``)."""
    if source is None:
        return []
    copied = []
    for name in HF_SIDE_FILES:
        path = Path(source) / name
        if path.is_file():
            real = inside_input(path, Path(source))
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real, target / name)
            copied.append(name)
    return copied


def write_generation_config(folder: Path, hf_config: Mapping[str, Any]) -> bool:
    """Where the side files brought no ``generation_config.json`` (an export from another
    tool's checkpoint), write the one transformers' ``save_pretrained`` writes for this config
    (its special tokens' ids). Whether it wrote one."""
    target = folder / "generation_config.json"
    if target.exists():
        return False
    from transformers import AutoConfig, GenerationConfig

    fields = dict(hf_config)
    try:
        config = AutoConfig.for_model(str(fields.pop("model_type")), **fields)
    except (KeyError, ValueError):  # a model type this transformers lacks (Kimi K2): it says nothing
        return False
    generation = GenerationConfig.from_model_config(config)
    target.write_text(generation.to_json_string(use_diff=True), encoding="utf-8")
    return True


class HFDirWriter:
    """Writes an HF model folder atomically: everything goes to a temp folder beside the
    target, which is renamed into place only when complete (and removed on any failure)."""

    def __init__(
        self, out_dir: str | os.PathLike[str], *, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise WeightError(
                f"{self.out_dir}: output folder exists; pass overwrite=True (--overwrite) to replace it"
            )
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.tmp = make_temp_folder(self.out_dir)
        self._shards: list[list[str]] = []
        self.bytes_written = 0

    def __enter__(self) -> HFDirWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self.commit()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def write_tensors(
        self, planned: list[PlannedTensor], produce: Iterator[tuple[str, torch.Tensor]]
    ) -> None:
        """Write all tensors, sharded by the plan; ``produce`` yields them in plan order."""
        for shard in plan_shards(planned, self.max_shard_bytes):
            index = len(self._shards)
            self.bytes_written += write_safetensors(self.tmp / f"shard-{index:05d}.tmp", shard, produce)
            self._shards.append([entry.name for entry in shard])

    def write_json(self, name: str, data: object) -> None:
        (self.tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def copy_side_files(self, source: str | os.PathLike[str] | None) -> list[str]:
        return copy_side_files(source, self.tmp)

    def write_generation_config(self, hf_config: Mapping[str, Any]) -> bool:
        return write_generation_config(self.tmp, hf_config)

    def commit(self) -> None:
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for index, names in enumerate(self._shards):
            final = shard_name(index, count)
            os.replace(self.tmp / f"shard-{index:05d}.tmp", self.tmp / final)
            weight_map.update({name: final for name in names})
        if count > 1:
            self.write_json(
                INDEX_NAME, {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
            )
        publish_folder(self.tmp, self.out_dir)
