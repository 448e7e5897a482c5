"""``dist_items.MappedItems``: a checkpoint item holding one plainly stored tensor, read as
a view of the memory-mapped ``.distcp`` file instead of through ``torch.load``.

Every tensor item of the checkpoints Megatron-Bridge and Megatron-LM wrote (and of ours) must
read exactly as torch reads it; an item it does not take is read by torch's reader, with the
same result; a flipped bit is refused naming file, item and record, as ``CheckedItem`` does.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from checkpoints import assert_bit_exact
from test_checksums import archive

from bridgegen.bridge.errors import WeightError
from bridgegen.engines.model import ModelBridge
from bridgegen.engines.stream_export import stream_export
from bridgegen.engines.stream_import import stream_import
from bridgegen.formats.dist_items import MappedItems, verifying_reader

FIXTURES = Path(__file__).parent / "data" / "megatron_checkpoints"


def checkpoint_folders(tmp_path: Path) -> list[Path]:
    """The fixtures' iteration folders (Megatron-Bridge at TP 1 and 2, MoE; Megatron-LM) and a
    streaming import of ours."""
    ours = tmp_path / "ours"
    hf = FIXTURES / "mb-llama" / "hf"
    stream_import(ModelBridge.from_hf_dir(hf), hf, ours, dtype=torch.bfloat16)
    return sorted(path.parent for path in FIXTURES.rglob(".metadata")) + [ours / "release"]


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_every_tensor_item_reads_as_torch_loads_it(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    views = copies = 0
    for folder in checkpoint_folders(tmp_path):
        metadata = verifying_reader(folder).read_metadata()
        items = MappedItems(folder)
        tensor_keys = {
            key for key, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)
        }
        checked = 0
        for index, info in metadata.storage_data.items():
            if index.fqn not in tensor_keys:
                continue
            mapped = items.tensor(info)
            assert mapped is not None, f"{folder}: {index} is a tensor item the mapped reader does not take"
            with (folder / info.relative_path).open("rb") as handle:
                handle.seek(info.offset)
                loaded = torch.load(io.BytesIO(handle.read(info.length)), weights_only=True)
            assert (mapped.dtype, mapped.shape, mapped.stride()) == (loaded.dtype, loaded.shape, loaded.stride())
            assert torch.equal(raw_bytes(mapped), raw_bytes(loaded)), f"{folder}: {index}"
            is_view = mapped.untyped_storage().nbytes() > info.length  # a view of the whole file
            views, copies = views + is_view, copies + (not is_view)
            items.release(info)
            checked += 1
        assert checked == sum(1 for index in metadata.storage_data if index.fqn in tensor_keys) > 0
    # Items lie at any byte offset in their file: a 2-byte storage at an odd one is copied.
    assert views > 0 and copies > 0, (views, copies)


class Info:
    """A DCP storage entry (``_StorageInfo``) for an archive written by hand into a file."""

    def __init__(self, relative_path: str, offset: int, length: int) -> None:
        self.relative_path, self.offset, self.length = relative_path, offset, length
        self.transform_descriptors = None


def test_a_flipped_bit_in_a_mapped_item_is_refused_naming_the_record(tmp_path: Path) -> None:
    for flip in (False, True):
        file, _ = archive(flip=flip)  # a tensor's archive behind 100 bytes of other data
        (tmp_path / "f.distcp").write_bytes(file.getvalue())
        info = Info("f.distcp", 100, len(file.getvalue()) - 100)
        if not flip:
            assert torch.equal(MappedItems(tmp_path).tensor(info), torch.arange(4096, dtype=torch.float32))
            continue
        with pytest.raises(WeightError, match=r"f\.distcp: item at bytes 100-\d+: record 'archive/data/0' fails its CRC32"):
            MappedItems(tmp_path).tensor(info)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    file, _ = archive()
    (tmp_path / "f.distcp").write_bytes(file.getvalue()[:-10])
    with pytest.raises(WeightError, match="the checkpoint file is truncated"):
        MappedItems(tmp_path).tensor(Info("f.distcp", 100, len(file.getvalue()) - 100))


def test_an_archive_of_something_else_is_left_to_torch(tmp_path: Path) -> None:
    saved = io.BytesIO()
    torch.save({"not": "a tensor"}, saved)
    (tmp_path / "f.distcp").write_bytes(saved.getvalue())
    assert MappedItems(tmp_path).tensor(Info("f.distcp", 0, len(saved.getvalue()))) is None


@pytest.mark.parametrize("taken", ["none", "every_other"])
def test_items_the_mapped_reader_leaves_are_read_by_torch(
    taken: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streaming export with the mapped reader declining every item, or every other one:
    torch's reader reads those, and the HF folder is the same bit for bit."""
    hf = FIXTURES / "mb-llama" / "hf"
    stream_import(ModelBridge.from_hf_dir(hf), hf, tmp_path / "megatron", dtype=torch.float32)
    original = MappedItems.tensor
    calls = {"n": 0}

    def declining(self: MappedItems, info: object) -> torch.Tensor | None:
        calls["n"] += 1
        if taken == "none" or calls["n"] % 2:
            return None
        return original(self, info)

    monkeypatch.setattr(MappedItems, "tensor", declining)
    stream_export(tmp_path / "megatron", tmp_path / "back")
    assert calls["n"] > 0
    assert_bit_exact(hf, tmp_path / "back")
