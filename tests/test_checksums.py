"""``dist_items.CheckedItem``: a torch.save archive read through it has every record torch
reads checked against its CRC32, in order as it passes or, read out of order, again at
``finish``. The CLI cases (a flipped bit in a .distcp at three layouts, a truncated file) are in
test_hostile.py."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.formats.dist_items import CheckedItem


def archive(flip: bool = False) -> tuple[io.BytesIO, tuple[int, int]]:
    """A torch.save archive of a tensor, behind 100 bytes of other data (as items lie in a
    .distcp), with the tensor record's place; ``flip`` flips one bit in the middle of it."""
    saved = io.BytesIO()
    torch.save(torch.arange(4096, dtype=torch.float32), saved)
    raw = bytearray(saved.getvalue())
    record = next(r for r in zipfile.ZipFile(io.BytesIO(bytes(raw))).infolist() if "/data/" in r.filename)
    name_length, extra_length = (
        int.from_bytes(raw[record.header_offset + 26 : record.header_offset + 28], "little"),
        int.from_bytes(raw[record.header_offset + 28 : record.header_offset + 30], "little"),
    )
    start = record.header_offset + 30 + name_length + extra_length
    if flip:
        raw[start + record.compress_size // 2] ^= 0x01
    return io.BytesIO(b"x" * 100 + bytes(raw)), (start, record.compress_size)


def test_a_sound_archive_loads_with_every_record_it_read_checked() -> None:
    file, _ = archive()
    item = CheckedItem(file, 100, len(file.getvalue()) - 100, "f.distcp: item")
    value = torch.load(item, weights_only=True)
    item.finish()
    assert torch.equal(value, torch.arange(4096, dtype=torch.float32))
    data = next(r for r in item.records if "/data/" in r.name)
    assert data.checked == data.size and data.running == data.crc
    assert item.problem is None


def test_a_flipped_bit_fails_the_load_and_names_the_record() -> None:
    file, _ = archive(flip=True)
    item = CheckedItem(file, 100, len(file.getvalue()) - 100, "f.distcp: item")
    try:
        torch.load(item, weights_only=True)
    except Exception:  # torch's zip reader turns what the read raised into an error of its own
        pass
    else:
        pytest.fail("a corrupt archive loaded")
    assert isinstance(item.problem, WeightError)
    assert "f.distcp: item: record 'archive/data/0' fails its CRC32 check" in str(item.problem)


def test_a_record_read_out_of_order_is_checked_at_finish() -> None:
    file, (start, size) = archive(flip=True)
    item = CheckedItem(file, 100, len(file.getvalue()) - 100, "f.distcp: item")
    half = size // 2
    for position, count in ((start + half, size - half), (start, half)):  # second half first
        item.seek(position)
        assert item.readinto(bytearray(count)) == count
    assert item.problem is None  # not in order: nothing concluded yet
    with pytest.raises(WeightError, match="fails its CRC32 check"):
        item.finish()


def test_not_an_archive_is_refused() -> None:
    with pytest.raises(WeightError, match="is not a torch.save archive"):
        CheckedItem(io.BytesIO(b"y" * 200), 0, 200, "f.distcp: item")
