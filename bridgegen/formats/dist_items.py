"""The items of a megatron-core distributed checkpoint's ``.distcp`` files, read with every
record checked against its CRC32: through torch's reader (``verifying_reader``), or as views of
the memory-mapped files (``MappedItems``).

Every item of a .distcp file that torch writes for a tensor (and for a pickled object) is a
torch.save archive: a zip whose records (data.pkl, the tensor's bytes, ...) each carry a CRC32,
whoever wrote the checkpoint (us, Megatron-LM, Megatron-Bridge). torch's own readers never
check those CRCs (PyTorch builds its zip reader with the CRC check disabled), so a flipped
byte in a tensor would load as a different weight. ``verifying_reader`` hands torch each item
through ``CheckedItem``, which checks every record against its CRC32 as torch reads it: every
byte torch uses is checked, and read once. Not covered: the ``.metadata`` index (a pickle
without a checksum; a corrupt one fails to unpickle or to match the model's keys and shapes).
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import threading
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.formats.safetensors import drop_pages

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass
class _Record:
    """One record of a zip archive: where its bytes lie in the item, their CRC32, and how far a
    reader has come through them in order (``checked``, with the CRC of those bytes)."""

    name: str
    start: int
    size: int
    crc: int
    checked: int = 0
    running: int = 0
    touched: bool = False  # read out of order (e.g. the zip directory search at the item's end)


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


class CheckedItem(_Window):
    """An item (bytes ``start`` to ``start + length`` of ``file``) as a file of its own, whose
    reads are checked against the CRC32 of the record they fall in. A record read in order
    (whole, or in pieces) is checked as its last byte passes; one read only out of order is read
    again whole at ``finish``. A mismatch raises WeightError (and is kept in ``problem``: torch
    may wrap what a read raises)."""

    def __init__(self, file: Any, start: int, length: int, where: str) -> None:
        super().__init__(file, start, length)
        self.where = where
        self.problem: WeightError | None = None
        self.records = self._records()

    def _records(self) -> list[_Record]:
        if self._pread(0, 4) != _LOCAL_SIGNATURE:
            raise self._corrupt("is not a torch.save archive (no zip signature)")
        try:
            with zipfile.ZipFile(_Window(self.file, self.start, self.length)) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
            raise self._corrupt(f"is not a readable torch.save archive ({exc})") from None
        records = []
        for info in infos:
            header = self._pread(info.header_offset, _LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size:
                raise self._corrupt(f"record {info.filename!r} lies outside the item")
            fields = _LOCAL_HEADER.unpack(header)
            if fields[0] != _LOCAL_SIGNATURE or info.compress_type != zipfile.ZIP_STORED:
                raise self._corrupt(f"record {info.filename!r} has a damaged header")
            begin = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
            if begin + info.compress_size > self.length:
                raise self._corrupt(f"record {info.filename!r} lies outside the item")
            records.append(_Record(info.filename, begin, info.compress_size, info.CRC))
        return records

    def _corrupt(self, problem: str) -> WeightError:
        self.problem = WeightError(f"{self.where}: {problem}; the checkpoint file is corrupt")
        return self.problem

    def _pread(self, position: int, count: int) -> bytes:
        self.file.seek(self.start + position)
        return bytes(self.file.read(count))

    def readinto(self, buffer: Any) -> int:
        position = self.position
        count = super().readinto(buffer)
        self._check(position, memoryview(buffer).cast("B")[:count])
        return count

    def _check(self, position: int, data: memoryview) -> None:
        end = position + len(data)
        for record in self.records:
            if record.checked == record.size or end <= record.start or position >= record.start + record.size:
                continue
            first = max(position, record.start)
            if first != record.start + record.checked:
                record.touched = True  # checked when read in order, or by ``finish``
                continue
            last = min(end, record.start + record.size)
            record.running = zlib.crc32(data[first - position : last - position], record.running)
            record.checked = last - record.start
            if record.checked == record.size:
                self._compare(record)

    def _compare(self, record: _Record) -> None:
        if record.running != record.crc:
            raise self._corrupt(
                f"record {record.name!r} fails its CRC32 check (stored {record.crc:08x}, read {record.running:08x})"
            )

    def check_whole(self, record: _Record, data: Any) -> None:
        """Check ``record`` against ``data``, all of its bytes (a buffer)."""
        record.running = zlib.crc32(data)
        record.checked = record.size
        self._compare(record)

    def finish(self) -> None:
        """Check the records torch read only out of order: read again whole."""
        for record in self.records:
            if record.touched and record.checked < record.size:
                self.check_whole(record, self._pread(record.start, record.size))


class ItemChecks:
    """The items a verifying reader handed torch: each is finished (``CheckedItem.finish``)
    when the next is handed and at ``finish``; ``problem`` is the error a failed read should be
    reported as."""

    def __init__(self) -> None:
        self.current: CheckedItem | None = None
        self.failed: WeightError | None = None

    def hand(self, item: CheckedItem) -> CheckedItem:
        self.finish()
        self.current = item
        return item

    def finish(self) -> None:
        item, self.current = self.current, None
        if item is not None:
            try:
                item.finish()
            finally:
                self.failed = self.failed or item.problem

    def problem(self) -> WeightError | None:
        current = self.current.problem if self.current is not None else None
        return self.failed or current


def _item_in_file(folder: Path, sinfo: Any, file: Any) -> str:
    """How errors name item ``sinfo`` (a DCP ``_StorageInfo``) of the open ``file``, once it is
    known to lie whole in the file (a truncated file is a WeightError)."""
    where = f"{folder / sinfo.relative_path}: item at bytes {sinfo.offset}-{sinfo.offset + sinfo.length}"
    size = os.fstat(file.fileno()).st_size
    if sinfo.offset + sinfo.length > size:
        raise WeightError(f"{where}: the file ends at byte {size}; the checkpoint file is truncated")
    return where


def verifying_reader(folder: str | Path) -> Any:
    """A torch DCP FileSystemReader for ``folder`` whose items are read through
    ``CheckedItem``. After each load call ``reader.checks.finish()``; when a load fails,
    ``reader.checks.problem()`` is the WeightError to report (naming the file, the item's bytes
    and the record), if a check caused it."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from bridgegen.formats.dist_checkpoint import read_metadata

    class VerifyingReader(FileSystemReader):
        checks: ItemChecks

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(folder)  # through the restricted unpickler
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
            where = _item_in_file(Path(folder), sinfo, file)
            if getattr(sinfo, "transform_descriptors", None):
                return super()._slice_file(file, sinfo)  # not a plain torch.save archive
            return cast(IO[bytes], self.checks.hand(CheckedItem(file, sinfo.offset, sinfo.length, where)))

    reader = VerifyingReader(str(folder))
    reader.checks = ItemChecks()
    return reader


# ------------------------------------------------------------------------ reading without a copy
#
# A tensor item is a torch.save archive: ``data.pkl`` says how the tensor views its storage
# (``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)``, the storage
# a persistent id ``("storage", <dtype>Storage, key, location, numel)``), the record
# ``data/<key>`` holds the storage's bytes, uncompressed, in the byte order of ``byteorder``.
# ``MappedItems`` reads such an item as a view of the memory-mapped file: the bytes are read
# once, by the CRC32 check, and never copied. An item that says anything else (another
# pickle, compression, big-endian bytes) is left to torch's reader.


class _NotPlain(Exception):
    """The item is not one plainly stored tensor."""


@dataclass(frozen=True)
class _StorageId:
    dtype: torch.dtype
    key: str


@dataclass(frozen=True)
class _TensorView:
    storage: _StorageId
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> _TensorView:
    if not isinstance(storage, _StorageId) or not isinstance(storage_offset, int):
        raise _NotPlain
    if not all(isinstance(x, int) and x >= 0 for x in (*size, *stride)) or len(size) != len(stride):
        raise _NotPlain
    return _TensorView(storage, storage_offset, tuple(size), tuple(stride))


class _TensorPickle(pickle.Unpickler):
    """Reads a tensor archive's data.pkl into a ``_TensorView``; anything but a plain tensor
    (any other class) raises ``_NotPlain``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage") and name != "UntypedStorage":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy storage classes say they are deprecated
                dtype = getattr(getattr(torch, name, None), "dtype", None)
            if isinstance(dtype, torch.dtype):
                return dtype
        raise _NotPlain

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _NotPlain
        _, dtype, key, _, _ = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise _NotPlain
        return _StorageId(dtype, key)


class MappedItems:
    """The ``.distcp`` files of a checkpoint folder, memory-mapped. ``tensor`` reads an item
    holding one plainly stored tensor as a view of its file, every record checked against its
    CRC32 (the storage's bytes by the one pass that reads them from the disk); ``release``
    hands a view's pages back once it is used."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}
        self._lock = threading.Lock()  # items are read from several threads

    def _mapped(self, relative_path: str) -> tuple[mmap.mmap, torch.Tensor]:
        with self._lock:
            if relative_path not in self._maps:
                with (self.folder / relative_path).open("rb") as handle:
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a read-only buffer: views are never written
                    self._maps[relative_path] = (mapped, torch.frombuffer(mapped, dtype=torch.uint8))
            return self._maps[relative_path]

    def tensor(self, sinfo: Any) -> torch.Tensor | None:
        """The tensor of item ``sinfo`` (a DCP ``_StorageInfo``) as a view of its file, or
        None when the item is not one plainly stored tensor (torch's reader reads it then). A
        truncated file or a failed CRC32 check is a WeightError naming file, item and record."""
        if getattr(sinfo, "transform_descriptors", None):
            return None  # not a plain torch.save archive
        with (self.folder / sinfo.relative_path).open("rb") as handle:
            where = _item_in_file(self.folder, sinfo, handle)
            item = CheckedItem(handle, sinfo.offset, sinfo.length, where)
            # Record names are "<archive>/data.pkl", "<archive>/data/0", ...: keyed without the prefix.
            records = {record.name.partition("/")[2]: record for record in item.records}
            small = {
                name: item._pread(record.start, record.size)
                for name, record in records.items()
                if not name.startswith("data/")
            }
        for name, content in small.items():
            item.check_whole(records[name], content)
        view = _plain_tensor(small)
        record = records.get(f"data/{view.storage.key}") if view is not None else None
        if view is None or record is None:
            return None
        itemsize = torch.empty((), dtype=view.storage.dtype).element_size()
        if record.size % itemsize or (view.storage_offset * itemsize + _span(view.size, view.stride) * itemsize) > record.size:
            return None
        _, buffer = self._mapped(sinfo.relative_path)
        start = sinfo.offset + record.start
        data = buffer[start : start + record.size]
        item.check_whole(record, data.numpy().data)  # reads the bytes from the disk
        if start % itemsize:
            # torch aligns a storage within its archive, not the archive within the file: a
            # storage at an odd offset cannot be viewed as 2-byte values, so it is copied.
            storage = torch.empty(record.size // itemsize, dtype=view.storage.dtype)
            storage.view(torch.uint8).copy_(data)
            self.release(sinfo)
        else:
            storage = data.view(view.storage.dtype)
        return storage.as_strided(view.size, view.stride, storage.storage_offset() + view.storage_offset)

    def release(self, sinfo: Any) -> None:
        """Drop the pages of item ``sinfo`` from this process's mapping and from the page cache
        once its tensor is used: each item is read once."""
        mapped, _ = self._mapped(sinfo.relative_path)
        drop_pages(mapped, self.folder / sinfo.relative_path, sinfo.offset, sinfo.offset + sinfo.length, True)


def _plain_tensor(small: dict[str, bytes]) -> _TensorView | None:
    """How the archive's tensor views its storage, from its data.pkl; None for anything else
    than one little-endian tensor."""
    if small.get("byteorder", b"little") != b"little" or "data.pkl" not in small:
        return None
    try:
        view = _TensorPickle(io.BytesIO(small["data.pkl"])).load()
    except (_NotPlain, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError):
        return None
    return view if isinstance(view, _TensorView) else None


def _span(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from a strided tensor's first to its last, inclusive (0 when empty)."""
    if not all(size):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
