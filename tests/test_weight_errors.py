"""Bad checkpoints and failed exports: a clear error naming the tensor or file, nothing left on disk.

Every case starts from one tiny random Llama checkpoint (built once for the module), copies it
and breaks the copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridgegen.bridge.errors import ConfigError, UnsupportedModelError, WeightError

VOCAB = 250


def snapshot(folder: Path) -> dict[str, int]:
    """Every path under ``folder`` (relative) with its size; folders as -1."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1)
        for p in sorted(folder.rglob("*"))
    }


def hidden_entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("errors") / "llama"
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def bridge(source: Path) -> Any:
    from bridgegen.engines.model import ModelBridge

    return ModelBridge.from_hf_dir(source)


@pytest.fixture(scope="module")
def loaded(bridge: Any) -> Any:
    """A Megatron model with the source's weights (do not modify)."""
    model = bridge.build_model()
    bridge.load_hf_weights(model)
    return model


@pytest.fixture
def broken(source: Path, tmp_path: Path) -> Path:
    """A private copy of the source checkpoint to break."""
    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    return folder


def rewrite(folder: Path, edit: Any) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_error(bridge: Any, folder: Path, error: type[Exception], match: str) -> None:
    """Loading ``folder`` raises ``error`` matching ``match``; the folder is left as it was."""
    before = snapshot(folder.parent)
    model = bridge.build_model(dtype="fp32")
    with pytest.raises(error, match=match):
        bridge.load_hf_weights(model, folder)
    assert snapshot(folder.parent) == before


# ---------------------------------------------------------------- bad checkpoints


def test_missing_tensor(bridge: Any, broken: Path) -> None:
    rewrite(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    model = bridge.build_model(dtype="fp32")
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(0.5)
    with pytest.raises(
        WeightError,
        match=rf"^{re.escape(str(broken))}: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
        r"\(needed for Megatron 'decoder\.layers\.1\.mlp\.linear_fc1\.weight'\)$",
    ):
        bridge.load_hf_weights(model, broken)
    # checked before anything is copied: the model is untouched
    assert all(bool((p == 0.5).all()) for p in model.parameters())


def test_missing_lm_head_in_untied_model(bridge: Any, broken: Path) -> None:
    rewrite(broken, lambda t: t.pop("lm_head.weight"))
    load_error(
        bridge,
        broken,
        WeightError,
        r"missing tensor 'lm_head\.weight' \(needed for Megatron 'output_layer\.weight'\)",
    )


def test_unexpected_tensor(bridge: Any, broken: Path) -> None:
    rewrite(broken, lambda t: t.__setitem__("model.layers.0.self_attn.extra_proj.weight", torch.zeros(4, 4)))
    load_error(
        bridge,
        broken,
        WeightError,
        rf"^{re.escape(str(broken))}: unexpected tensor\(s\) 'model\.layers\.0\.self_attn\.extra_proj\.weight': "
        r"the llama spec maps no Megatron tensor to them$",
    )


def test_many_unexpected_tensors_are_summarised(bridge: Any, broken: Path) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        for i in range(10):
            tensors[f"extra.{i}.weight"] = torch.zeros(2)

    rewrite(broken, add)
    load_error(bridge, broken, WeightError, r"unexpected tensor\(s\) 'extra\.0\.weight', .* and 2 more")


def test_rotary_inv_freq_is_ignored(bridge: Any, broken: Path) -> None:
    """Old checkpoints carry rotary_emb.inv_freq buffers; the spec ignores them."""
    rewrite(broken, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    model = bridge.build_model(dtype="fp32")
    bridge.load_hf_weights(model, broken)


@pytest.mark.parametrize(
    ("hf_name", "shape", "match"),
    [
        (
            "model.layers.0.self_attn.q_proj.weight",
            (60, 64),
            r"model\.layers\.0\.self_attn\.q_proj\.weight: shape \[60, 64\] does not match the expected \[64, 64\] "
            r"\(loading Megatron 'decoder\.layers\.0\.self_attention\.linear_qkv\.weight'\)",
        ),
        (
            "model.layers.1.self_attn.v_proj.weight",
            (32, 63),
            r"model\.layers\.1\.self_attn\.v_proj\.weight: shape \[32, 63\] does not match the expected \[32, 64\]",
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            (64, 100),
            r"model\.layers\.0\.mlp\.down_proj\.weight: shape \[64, 100\] does not match the expected \[64, 128\]",
        ),
        (
            "model.norm.weight",
            (63,),
            r"model\.norm\.weight: shape \[63\] does not match the expected \[64\] "
            r"\(loading Megatron 'decoder\.final_layernorm\.weight'\)",
        ),
        (
            "model.embed_tokens.weight",
            (249, 64),
            r"model\.embed_tokens\.weight: 249 rows, but the config's vocab_size is 250",
        ),
        (
            "model.layers.0.mlp.up_proj.weight",
            (100, 64),
            r"model\.layers\.0\.mlp\.up_proj\.weight: shape \[100, 64\]",
        ),
    ],
    ids=["q_proj", "v_proj", "down_proj", "norm", "embed_rows", "up_proj"],
)
def test_wrong_shape(bridge: Any, broken: Path, hf_name: str, shape: tuple[int, ...], match: str) -> None:
    rewrite(broken, lambda t: t.__setitem__(hf_name, torch.zeros(shape)))
    load_error(bridge, broken, WeightError, rf"^{re.escape(str(broken))}: {match}")


def test_wrong_shape_is_found_before_the_model_is_touched(bridge: Any, broken: Path) -> None:
    rewrite(broken, lambda t: t.__setitem__("model.norm.weight", torch.zeros(63)))  # the last tensor loaded
    model = bridge.build_model(dtype="fp32")
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(0.5)
    with pytest.raises(WeightError, match="model.norm.weight: shape"):
        bridge.load_hf_weights(model, broken)
    assert all(bool((p == 0.5).all()) for p in model.parameters())


def test_integer_tensor(bridge: Any, broken: Path) -> None:
    rewrite(broken, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    load_error(
        bridge,
        broken,
        WeightError,
        rf"^{re.escape(str(broken / 'model.safetensors'))}: tensor 'model\.norm\.weight' has dtype torch\.int32; "
        r"expected floating point$",
    )


def test_truncated_file(bridge: Any, broken: Path) -> None:
    path = broken / "model.safetensors"
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size // 2)
    match = rf"^{re.escape(str(path))}: truncated: tensor '[\w.]+' ends at byte \d+ but the file has {size // 2} bytes$"
    load_error(bridge, broken, WeightError, match)
    # building with the checkpoint's dtype reads the header too, with the same error
    from bridgegen.engines.model import ModelBridge

    with pytest.raises(WeightError, match=match):
        ModelBridge.from_hf_dir(broken).build_model()


@pytest.mark.parametrize(
    ("offset", "data", "match"),
    [
        (0, b"\xff" * 8, r"corrupt or truncated safetensors header \(length \d+, file \d+ bytes\)"),
        (8, b"#garbage#", r"corrupt safetensors header: "),
        (0, struct.pack("<Q", 2), r"corrupt safetensors header: "),
    ],
    ids=["length", "json", "short-length"],
)
def test_corrupt_header(bridge: Any, broken: Path, offset: int, data: bytes, match: str) -> None:
    path = broken / "model.safetensors"
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    load_error(bridge, broken, WeightError, rf"^{re.escape(str(path))}: {match}")


def test_header_entry_with_wrong_byte_count(bridge: Any, broken: Path) -> None:
    path = broken / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["model.norm.weight"]["shape"] = [65]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))
    assert len(text) == length
    path.write_bytes(raw[:8] + text + raw[8 + length :])
    load_error(
        bridge,
        broken,
        WeightError,
        rf"^{re.escape(str(path))}: tensor 'model\.norm\.weight' header says 256 bytes for shape \[65\]$",
    )


def test_file_shorter_than_header_length(bridge: Any, broken: Path) -> None:
    path = broken / "model.safetensors"
    path.write_bytes(b"abc")
    load_error(bridge, broken, WeightError, rf"^{re.escape(str(path))}: not a safetensors file")


def test_no_weights_in_folder(bridge: Any, broken: Path) -> None:
    (broken / "model.safetensors").unlink()
    load_error(bridge, broken, WeightError, rf"^{re.escape(str(broken))}: no \*\.safetensors files")


def test_missing_folder(bridge: Any, tmp_path: Path) -> None:
    model = bridge.build_model(dtype="fp32")
    with pytest.raises(
        WeightError, match=rf"^{re.escape(str(tmp_path / 'nope'))}: no such checkpoint folder$"
    ):
        bridge.load_hf_weights(model, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_index_names_a_missing_shard(bridge: Any, loaded: Any, tmp_path: Path) -> None:
    folder = bridge.export_hf(loaded, tmp_path / "sharded", max_shard_bytes=100_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    load_error(
        bridge,
        folder,
        WeightError,
        rf"{re.escape(str(folder / 'model.safetensors.index.json'))}: names shard '{shards[-1].name}', which does not exist",
    )


def test_unreadable_index(bridge: Any, loaded: Any, tmp_path: Path) -> None:
    folder = bridge.export_hf(loaded, tmp_path / "sharded", max_shard_bytes=100_000)
    index = folder / "model.safetensors.index.json"
    index.write_text("{not json")
    load_error(bridge, folder, WeightError, rf"^{re.escape(str(index))}: unreadable index")


def test_index_disagrees_with_shard(bridge: Any, loaded: Any, tmp_path: Path) -> None:
    folder = bridge.export_hf(loaded, tmp_path / "sharded", max_shard_bytes=100_000)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    moved = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][moved] = files[1]
    index_path.write_text(json.dumps(index))
    load_error(
        bridge,
        folder,
        WeightError,
        rf"{re.escape(str(folder / files[0]))}: tensor '{re.escape(moved)}' is not listed for this shard",
    )


# ---------------------------------------------------------------- bad configs and requests


def test_unknown_dtype_name(bridge: Any) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^unknown dtype 'float33'; choose one of bf16, bfloat16, float16, float32, fp16, fp32$",
    ):
        bridge.build_model(dtype="float33")


def test_unsupported_torch_dtype(bridge: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"^dtype torch\.int8 is not supported; choose one of bf16, .*fp32$"
    ):
        bridge.build_model(dtype=torch.int8)


def test_export_with_unknown_dtype_writes_nothing(bridge: Any, loaded: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown dtype 'float33'"):
        bridge.export_hf(loaded, tmp_path / "out", dtype="float33")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture(source: Path, tmp_path: Path) -> None:
    from bridgegen.generated import BRIDGES

    from bridgegen.engines.model import ModelBridge

    folder = tmp_path / "foo"
    folder.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.update(architectures=["FooForCausalLM"], model_type="foo")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedModelError,
        match=r"^no bridge for architectures \['FooForCausalLM'\] / model_type 'foo'; supported architectures: ",
    ) as info:
        ModelBridge.from_hf_dir(folder)
    for bridge in BRIDGES:
        for architecture in bridge.architectures:
            assert architecture in str(info.value)
    assert "LlamaForCausalLM" in str(info.value)


def test_missing_config(tmp_path: Path) -> None:
    from bridgegen.engines.model import ModelBridge

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: no config\.json"):
        ModelBridge.from_hf_dir(tmp_path)


def test_invalid_config_json(tmp_path: Path) -> None:
    from bridgegen.engines.model import ModelBridge

    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: not valid JSON"):
        ModelBridge.from_hf_dir(tmp_path)


# ---------------------------------------------------------------- exports


def test_export_refuses_existing_folder(bridge: Any, loaded: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(
        WeightError, match=rf"^{re.escape(str(out))}: output folder exists; pass overwrite=True"
    ):
        bridge.export_hf(loaded, out)
    assert snapshot(tmp_path) == before


def test_export_overwrite_replaces_folder(bridge: Any, loaded: Any, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    bridge.export_hf(loaded, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    exported, original = (
        load_file(str(out / "model.safetensors")),
        load_file(str(source / "model.safetensors")),
    )
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert hidden_entries(tmp_path) == []  # no .out.tmp-* / .out.old-* left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_creates_missing_parents(bridge: Any, loaded: Any, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    bridge.export_hf(loaded, out)
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


class DiskFull(OSError):
    pass


def failing_save(monkeypatch: pytest.MonkeyPatch, fail_on_call: int) -> list[str]:
    """Make the writer's safetensors save raise on call ``fail_on_call`` (1-based)."""
    import bridgegen.formats.hf_writer as io

    real = io.write_safetensors
    calls: list[str] = []

    def save(path: Path, entries: Any, produce: Any) -> int:
        calls.append(str(path))
        if len(calls) == fail_on_call:
            raise DiskFull(28, "No space left on device")
        return real(path, entries, produce)

    monkeypatch.setattr(io, "write_safetensors", save)
    return calls


SHARD_BYTES = 100_000  # the tiny llama in fp32 is ~420 kB: several shards


def _shard_count(bridge: Any, loaded: Any, tmp_path: Path) -> int:
    out = bridge.export_hf(loaded, tmp_path / "count", max_shard_bytes=SHARD_BYTES)
    count = len(list(out.glob("*.safetensors")))
    shutil.rmtree(out)
    return count


def test_export_failing_after_first_shard_leaves_nothing(
    bridge: Any, loaded: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _shard_count(bridge, loaded, tmp_path) >= 3
    calls = failing_save(monkeypatch, fail_on_call=2)
    out = tmp_path / "out"
    with pytest.raises(DiskFull):
        bridge.export_hf(loaded, out, max_shard_bytes=SHARD_BYTES)
    assert len(calls) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_failing_on_last_shard_leaves_nothing(
    bridge: Any, loaded: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = _shard_count(bridge, loaded, tmp_path)
    failing_save(monkeypatch, fail_on_call=count)
    out = tmp_path / "out"
    with pytest.raises(DiskFull):
        bridge.export_hf(loaded, out, max_shard_bytes=SHARD_BYTES)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_single_shard_export_failing_leaves_nothing(
    bridge: Any, loaded: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_save(monkeypatch, fail_on_call=1)
    out = tmp_path / "out"
    with pytest.raises(DiskFull):
        bridge.export_hf(loaded, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder(
    bridge: Any, loaded: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    failing_save(monkeypatch, fail_on_call=2)
    with pytest.raises(DiskFull):
        bridge.export_hf(loaded, out, overwrite=True, max_shard_bytes=SHARD_BYTES)
    assert snapshot(tmp_path) == before


def test_export_of_unmapped_parameter_names_it_and_leaves_nothing(bridge: Any, tmp_path: Path) -> None:
    model = bridge.build_model(dtype="fp32")
    bridge.load_hf_weights(model)
    model.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(WeightError, match=r"^Megatron tensor 'extra_scale' has no rule in the llama spec"):
        bridge.export_hf(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_and_reload_round_trip(bridge: Any, loaded: Any, source: Path, tmp_path: Path) -> None:
    """The sanity baseline for the cases above: the unbroken source converts and back."""
    out = bridge.export_hf(loaded, tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"]
    model = bridge.build_model()
    bridge.load_hf_weights(model, out)
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
