"""Reading megatron-core distributed checkpoints written by any megatron-core from 0.16 on.

The tensors are torch.distributed.checkpoint (DCP) items keyed by the model's
``sharded_state_dict()`` names. The "common state" (``args``, ``iteration``, ...) is, up to
megatron-core 0.18, a ``common.pt`` beside them; from 0.19 it is a pickled DCP object
``common_state/shard_0_1`` (``torch.save([state])``) and there is no ``common.pt``
(megatron-core 0.19.2 ``dist_checkpointing/serialization.py``, ``load_common_state_dict``).
megatron-core 0.16.1 reads only ``common.pt``, so we read the common state ourselves, with an
unpickler that stands in for classes this megatron-core lacks (a newer Megatron-LM's ``args``
names enums 0.16 does not have).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import torch

from bridgegen.runtime.errors import WeightError

COMMON_FILE = "common.pt"
COMMON_OBJECT = "common_state"
# Checkpoint items that are not model weights: optimizer and RNG state, the common state.
NOT_MODEL_PREFIXES = ("optimizer.", "rng_state", COMMON_OBJECT, "rerun_state_machine")


class _Unknown:
    """Stands in for a class the installed packages do not define."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (AttributeError, ImportError):
            return type(name, (_Unknown,), {"qualified_name": f"{module}.{name}"})


class _TolerantPickle:
    Unpickler = _TolerantUnpickler
    load = staticmethod(pickle.load)


def tensor_metadata(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor item of the checkpoint, with its global shape and dtype."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise WeightError(f"{folder}: cannot read the checkpoint's .metadata: {exc}") from None
    return {
        key: (tuple(item.size), item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }


def object_keys(folder: Path) -> list[str]:
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    return [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]


def model_keys(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The model's tensors only (no optimizer or RNG state)."""
    return {k: v for k, v in tensor_metadata(folder).items() if not k.startswith(NOT_MODEL_PREFIXES)}


def read_common_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's common state, from ``common.pt`` or the DCP object."""
    legacy = folder / COMMON_FILE
    if legacy.is_file():
        with legacy.open("rb") as handle:
            common = _unpickle(handle, legacy)
        if not isinstance(common, dict):
            raise WeightError(f"{legacy}: the common state is not a mapping")
        return common
    keys = [k for k in object_keys(folder) if k.split("/")[0] == COMMON_OBJECT]
    if not keys:
        raise WeightError(f"{folder}: no common state (neither {COMMON_FILE} nor a {COMMON_OBJECT} object)")
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    class RawBytesPlanner(DefaultLoadPlanner):
        """Hands the object's bytes back unpickled, so we unpickle them tolerantly."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            target = self.state_dict[read_item.dest_index.fqn]
            target.seek(0)
            target.truncate()
            target.write(value.read())
            target.seek(0)

    state: dict[str, Any] = {keys[0]: io.BytesIO()}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": we read on one process
        dcp_load(state, storage_reader=FileSystemReader(str(folder)), planner=RawBytesPlanner(), no_dist=True)
    buffer = state[keys[0]]
    buffer.seek(0)
    loaded = _unpickle(buffer, folder / keys[0])
    common = loaded[0] if isinstance(loaded, list) else loaded
    if not isinstance(common, dict):
        raise WeightError(f"{folder / keys[0]}: the common state is not a mapping")
    return common


def _unpickle(handle: Any, where: Path) -> Any:
    try:
        return torch.load(handle, map_location="cpu", weights_only=False, pickle_module=_TolerantPickle)
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise WeightError(f"{where}: cannot read the common state: {exc}") from None


def common_load_strategy() -> Any:
    """A megatron-core 0.16 common-state strategy that also reads 0.19's format."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class CommonStateLoadStrategy(TorchCommonLoadStrategy):  # type: ignore[misc]
        def load_common(self, checkpoint_dir: Any) -> Any:
            return read_common_state(Path(checkpoint_dir))

    return CommonStateLoadStrategy()


# ------------------------------------------------------------------------ checksums
#
# Every item of a .distcp file that torch writes for a tensor (and for a pickled object) is a
# torch.save archive: a zip whose records (data.pkl, the tensor's bytes, ...) each carry a CRC32,
# whoever wrote the checkpoint (us, Megatron-LM, Megatron-Bridge). torch's own readers never
# check those CRCs (PyTorch builds its zip reader with the CRC check disabled), so a flipped
# byte in a tensor would load as a different weight. ``VerifyingReader`` checks every record of
# every item it reads. Not covered: the ``.metadata`` index (a pickle without a checksum; a
# corrupt one fails to unpickle or to match the model's keys and shapes).

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
CRC_CHUNK = 8 * 2**20


class _Window(io.RawIOBase):
    """Bytes ``start`` to ``start + length`` of an open file, as a file of their own."""

    def __init__(self, file: Any, start: int, length: int) -> None:
        super().__init__()
        self.file, self.start, self.length, self.position = file, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = min(max(base + offset, 0), self.length)
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: self.length - self.position]
        self.file.seek(self.start + self.position)
        count = self.file.readinto(view) or 0
        self.position += count
        return count


def archive_problem(file: Any, start: int, length: int) -> str | None:
    """What is wrong with the zip archive (a torch.save item) at bytes ``start`` to ``start +
    length`` of ``file``: a record whose bytes do not match its CRC32, or an archive that does
    not parse. None if every record checks. Reads the records in chunks: an item is never held
    in memory whole."""
    window = _Window(file, start, length)
    if window.read(4) != _LOCAL_SIGNATURE:
        return "is not a torch.save archive (no zip signature)"
    try:
        with zipfile.ZipFile(window) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        return f"is not a readable torch.save archive ({exc})"
    buffer = memoryview(bytearray(min(CRC_CHUNK, length)))
    for record in records:
        window.seek(record.header_offset)
        header = window.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size:
            return f"record {record.filename!r} lies outside the item"
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != _LOCAL_SIGNATURE or record.compress_type != zipfile.ZIP_STORED:
            return f"record {record.filename!r} has a damaged header"
        window.seek(record.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])
        left, found = record.compress_size, 0
        while left:
            count = window.readinto(buffer[: min(left, len(buffer))])
            if not count:
                return f"record {record.filename!r} lies outside the item"
            found = zlib.crc32(buffer[:count], found)
            left -= count
        if found != record.CRC:
            return f"record {record.filename!r} fails its CRC32 check (stored {record.CRC:08x}, read {found:08x})"
    return None


def verifying_reader(folder: str | Path) -> Any:
    """A torch DCP FileSystemReader for ``folder`` that checks each item before torch reads it
    (``archive_problem``) and raises a WeightError naming the file and the item's place."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class VerifyingReader(FileSystemReader):
        def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
            where = f"{Path(folder) / sinfo.relative_path}: item at bytes {sinfo.offset}-{sinfo.offset + sinfo.length}"
            size = os.fstat(file.fileno()).st_size
            if sinfo.offset + sinfo.length > size:
                raise WeightError(f"{where}: the file ends at byte {size}; the checkpoint file is truncated")
            if not getattr(sinfo, "transform_descriptors", None):
                problem = archive_problem(file, sinfo.offset, sinfo.length)
                if problem is not None:
                    raise WeightError(f"{where}: {problem}; the checkpoint file is corrupt")
            return super()._slice_file(file, sinfo)

    return VerifyingReader(str(folder))
