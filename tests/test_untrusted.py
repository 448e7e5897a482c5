"""Checkpoints as an attacker would hand them over (downloaded, or written by a shared job):
no pickle runs code, no file outside the inputs reaches the output, no small text input is
read whole, and a checkpoint whose config disagrees with its tensors is refused before
anything is written. Each case goes through ``test_hostile.assert_refused``: one error line,
non-zero exit, inputs unchanged, nothing written, nothing left behind; a payload writes a
marker file, which must never appear.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_hostile import assert_refused, checkpoint, source  # noqa: F401 - fixtures

from bridgegen.bridge.errors import WeightError
from bridgegen.cli.main import main
from bridgegen.formats import pickles

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "data" / "megatron_checkpoints"
# torch.save writes protocol 2, which names builtins "__builtin__".
BUILTIN_EXEC = r"names class (builtins|__builtin__)\.exec"


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted pickle does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def copy_of(folder: Path, tmp_path: Path, name: str = "megatron") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name, symlinks=True))


def dist_folder(checkpoint_root: Path) -> Path:
    return next(p.parent for p in checkpoint_root.rglob(".metadata"))


def export_refused(megatron: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], match: str, *extra: str) -> None:
    out = tmp_path / "out"
    assert_refused(
        ["export", "--megatron", str(megatron), "--out", str(out), *extra],
        capsys,
        match,
        inputs=[megatron],
        out=out,
    )


# ------------------------------------------------------------------------------ pickles


def test_a_payload_in_the_dcp_index_never_runs(
    source: Path,  # noqa: F811
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """torch reads ``.metadata`` with a plain ``pickle.load`` (FileSystemReader.read_metadata,
    torch/distributed/checkpoint/filesystem.py). Here the real index carries a payload in
    ``planner_data``: export and verify refuse it naming the file and the class."""
    megatron = copy_of(checkpoint, tmp_path)
    index = dist_folder(megatron) / ".metadata"
    with index.open("rb") as handle:
        metadata = pickles.load(handle, index)
    marker = tmp_path / "marker"
    metadata.planner_data = {"x": Payload(marker)}
    index.write_bytes(pickle.dumps(metadata))
    export_refused(megatron, tmp_path, capsys, rf"{re.escape(str(index))}: names class builtins\.exec")
    assert not marker.exists()
    with pytest.raises(SystemExit):
        main(["verify", "--megatron", str(megatron), "--hf", str(source)])
    assert not marker.exists()


@pytest.mark.parametrize("where", ["args", "top"])
def test_a_payload_in_the_common_state_never_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """The common state holds Megatron-LM's ``args``, which an export of a Megatron-LM
    checkpoint reads for the model's config. A ``common.pt`` (read first when present, whatever
    the megatron-core version) with a payload inside ``args`` or beside it is refused, never
    run."""
    from bridgegen.formats.dist_checkpoint import read_common_state

    megatron = copy_of(FIXTURES / "mlm-llama-iter" / "megatron", tmp_path)
    folder = megatron / "iter_0000010"
    common = read_common_state(folder)
    for name, value in vars(common["args"]).items():  # saved enum members back as plain values
        if isinstance(value, pickles.SavedEnum):
            setattr(common["args"], name, value.value)
    marker = tmp_path / "marker"
    if where == "args":
        common["args"].evil = Payload(marker)
    else:
        common["evil"] = Payload(marker)
    torch.save(common, folder / "common.pt")
    export_refused(megatron, tmp_path, capsys, BUILTIN_EXEC, "--family", "llama")
    assert not marker.exists()


def test_a_torch_save_payload_is_refused_in_memory(tmp_path: Path) -> None:
    """The bytes of a ``common_state`` object (megatron-core >= 0.19) go through the same
    reader as ``common.pt``: a payload there is refused too; tensors and args still read."""
    import argparse

    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save([{"args": argparse.Namespace(n=1), "evil": Payload(marker)}], buffer)
    with pytest.raises(WeightError, match=rf"item: {BUILTIN_EXEC}"):
        pickles.torch_load(buffer.getvalue(), "item")
    assert not marker.exists()
    buffer = io.BytesIO()
    torch.save([{"args": argparse.Namespace(n=1), "t": torch.arange(3), "dtype": torch.bfloat16}], buffer)
    (loaded,) = pickles.torch_load(buffer.getvalue(), "item")
    assert loaded["args"].n == 1 and loaded["t"].tolist() == [0, 1, 2] and loaded["dtype"] is torch.bfloat16


def test_megatron_lm_args_read_with_enums_this_megatron_core_lacks() -> None:
    """Megatron-LM's args (d98e8a64) hold megatron-core enums (AttnBackend, ModelType and
    0.19's InferenceCudaGraphScope, absent from 0.16): kept as saved values, never imported."""
    from bridgegen.formats.dist_checkpoint import read_common_state

    common = read_common_state(FIXTURES / "mlm-llama-iter" / "megatron" / "iter_0000010")
    backend = common["args"].attention_backend
    assert isinstance(backend, pickles.SavedEnum)
    assert backend.enum_class == "megatron.core.transformer.enums.AttnBackend"


@pytest.mark.parametrize(
    "name",
    [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"), ("torch", "load"), ("megatron.core", "parallel_state")],
)
def test_the_allowlist_refuses_code(name: tuple[str, str]) -> None:
    assert pickles.allowed_class(*name) is None


# ------------------------------------------------------------------ files outside inputs


def test_a_side_file_linking_out_of_the_checkpoint_is_refused(
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A tokenizer file that is a symlink to a file outside the checkpoint would be copied
    into the export: refused, naming the link and its target."""
    megatron = copy_of(checkpoint, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    link = megatron / "hf_side_files" / "special_tokens_map.json"
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    export_refused(megatron, tmp_path, capsys, rf"{re.escape(str(link))}: a symlink to .*secret\.txt, outside")


def test_a_megatron_bridge_tokenizer_linking_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    megatron = copy_of(FIXTURES / "mb-llama" / "megatron", tmp_path)
    link = megatron / "iter_0000000" / "tokenizer" / "tokenizer_config.json"
    secret = tmp_path / "hostname"
    secret.write_text("a machine's name\n")
    link.unlink()
    link.symlink_to(secret)
    export_refused(megatron, tmp_path, capsys, r"a symlink to .*hostname, outside", "--family", "llama")


def test_a_shard_linking_out_of_the_folder_is_refused(
    source: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A shard symlink pointing at another model's file outside the folder would import that
    model: refused like a side file."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    hf = copy_of(source, tmp_path, "hf")
    shard = sorted(hf.glob("*.safetensors"))[0]
    shutil.move(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)
    out = tmp_path / "out"
    assert_refused(
        ["import", "--hf", str(hf), "--out", str(out)],
        capsys,
        r"a symlink to .*elsewhere.*, outside",
        inputs=[hf],
        out=out,
    )


def test_a_hugging_face_cache_snapshot_still_converts(source: Path, tmp_path: Path) -> None:  # noqa: F811
    """The cache keeps every file of a snapshot as a symlink into the repository's ``blobs/``:
    shards and tokenizer files are read from there."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    files = {file.name: file.read_bytes() for file in source.iterdir()}
    files["tokenizer_config.json"] = b'{"model_max_length": 64}'
    for index, (name, data) in enumerate(sorted(files.items())):
        (blobs / f"blob{index}").write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / f"blob{index}")
    out = tmp_path / "out"
    assert main(["import", "--hf", str(snapshot), "--out", str(out)]) == 0
    assert (out / "hf_side_files" / "tokenizer_config.json").read_bytes() == b'{"model_max_length": 64}'


# --------------------------------------------------------------------- bounded reads


def test_a_huge_tracker_file_is_refused_without_echoing_it(
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    megatron = copy_of(checkpoint, tmp_path)
    (megatron / "latest_checkpointed_iteration.txt").write_bytes(b"9" * (50 * 2**20))
    out = tmp_path / "out"
    assert_refused(
        ["export", "--megatron", str(megatron), "--out", str(out)],
        capsys,
        r"latest_checkpointed_iteration\.txt: 52428800 bytes, more than",
        inputs=[megatron],
        out=out,
    )


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_huge_json_input_is_refused(
    source: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    hf = copy_of(source, tmp_path, "hf")
    (hf / name).write_bytes(b" " * (65 * 2**20) + b"{}")
    out = tmp_path / "out"
    assert_refused(
        ["import", "--hf", str(hf), "--out", str(out)],
        capsys,
        rf"{re.escape(name)}: \d+ bytes, more than",
        inputs=[hf],
        out=out,
    )


def test_a_spec_named_like_a_package_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "__init__.yaml").write_text("description: x\nextends: llama\narchitectures: [XForCausalLM]\n")
    out = tmp_path / "bridges_x"
    assert main(["generate", "--specs", str(specs), "--out", str(out)]) == 1
    assert "__init__.yaml" in capsys.readouterr().err
    assert not out.exists()


def test_a_bridges_folder_others_can_write_is_warned_about(tmp_path: Path) -> None:
    """A bridges folder is code, imported into every conversion: one that other users can
    write is said, with the folder, before it is imported."""
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "acme.yaml").write_text(
        (Path(__file__).parent / "test_external_specs.py").read_text().split('ACME_SPEC = """\\\n')[1].split('"""')[0]
    )
    out = tmp_path / "bridges_writable"
    assert main(["generate", "--specs", str(specs), "--out", str(out)]) == 0
    out.chmod(0o777)
    shown = subprocess.run(
        [sys.executable, "-c", "from bridgegen.plan.bridges import all_bridges; all_bridges()"],
        env={**os.environ, "BRIDGEGEN_BRIDGES": str(out)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"{out}: writable by other users" in shown.stderr
    out.chmod(0o755)
    quiet = subprocess.run(
        [sys.executable, "-c", "from bridgegen.plan.bridges import all_bridges; all_bridges()"],
        env={**os.environ, "BRIDGEGEN_BRIDGES": str(out)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "writable" not in quiet.stderr


# ------------------------------------------------------- configs that disagree with tensors


def edited_run_config(tmp_path: Path, case: str, field: str, value: str) -> Path:
    megatron = copy_of(FIXTURES / case / "megatron", tmp_path)
    run_config = megatron / "iter_0000000" / "run_config.yaml"
    text = run_config.read_text()
    edited = re.sub(rf"^(  {field}): .*$", rf"\1: {value}", text, count=1, flags=re.M)
    assert edited != text
    run_config.write_text(edited)
    return megatron


@pytest.mark.parametrize(
    ("case", "family", "field", "value", "match"),
    [
        ("mb-llama", "llama", "num_layers", "3", r"'decoder\.layers\.\S+' .*\[2, .*\[3, "),
        ("mb-llama", "llama", "num_layers", "1", r"'decoder\.layers\.\S+' .*\[2, .*\[1, "),
        ("mb-llama", "llama", "hidden_size", "32", r"stored with shape .*64.*the config implies .*32"),
        ("mb-llama", "llama", "ffn_hidden_size", "96", r"stored with shape .*the config implies"),
        ("mb-qwen3-moe", "qwen3_moe", "num_moe_experts", "5", r"stored with shape \[2, 4, .*implies \[2, 5, "),
        ("mb-qwen3-moe", "qwen3_moe", "num_moe_experts", "3", r"stored with shape \[2, 4, .*implies \[2, 3, "),
    ],
)
def test_a_config_that_disagrees_with_the_tensors_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    family: str,
    field: str,
    value: str,
    match: str,
) -> None:
    """A Megatron-Bridge checkpoint with ``run_config.yaml`` edited, tensors untouched: every
    region the export reads must be in the checkpoint with the shape the config implies, and
    every stored model tensor read; otherwise one line naming the key and both shapes."""
    megatron = edited_run_config(tmp_path, case, field, value)
    export_refused(megatron, tmp_path, capsys, match, "--family", family)


def test_a_vocab_larger_than_the_embedding_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    megatron = edited_run_config(tmp_path, "mb-llama", "vocab_size", "256")
    export_refused(megatron, tmp_path, capsys, r"embedding has 128 rows, fewer than the config's vocab_size 256", "--family", "llama")


# ----------------------------------------------------------------- processes and leftovers


def test_more_workers_than_cores_are_refused_at_once(
    source: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert_refused(
        ["import", "--hf", str(source), "--out", str(out), "--workers", "1000"],
        capsys,
        rf"--workers 1000: more than this machine's {os.cpu_count()} cores",
        inputs=[source],
        out=out,
    )


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


@pytest.mark.parametrize("command", ["import", "export"])
def test_the_temp_folder_of_a_killed_run_is_removed_by_the_next_run(
    source: Path,  # noqa: F811
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    command: str,
) -> None:
    """A run killed with its whole process group (``kill -9``, nothing of it left to clean up)
    leaves ``.OUT.tmp-PID-*``: the next run of either command to that output removes it."""
    out = tmp_path / "out"
    leftover = tmp_path / f".out.tmp-{dead_pid()}-abcd1234"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    given = ["--hf", str(source)] if command == "import" else ["--megatron", str(checkpoint)]
    assert main([command, *given, "--out", str(out)]) == 0
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_layout_that_does_not_divide_the_model_says_why_once(
    source: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--pp 3`` over 2 layers: refused with the reason, once (not "failed on a rank
    (ProcessRaisedException)"), before any rank starts."""
    out = tmp_path / "out"
    assert_refused(
        ["import", "--hf", str(source), "--out", str(out), "--pp", "3"],
        capsys,
        r"--pp 3 does not divide the 2 layers",
        inputs=[source],
        out=out,
    )


@pytest.mark.slow
def test_a_rank_that_fails_says_its_own_reason(
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two workers exporting a checkpoint whose data file cannot be read (a folder where the
    ``.distcp`` file should be): the ranks' OSError is said as one line with its reason, not
    "failed on a rank (ProcessRaisedException)"."""
    megatron = copy_of(checkpoint, tmp_path)
    data = next(dist_folder(megatron).glob("*.distcp"))
    data.unlink()
    data.mkdir()
    out = tmp_path / "out"
    assert_refused(
        ["export", "--megatron", str(megatron), "--out", str(out), "--workers", "2"],
        capsys,
        r"Is a directory",
        inputs=[megatron],
        out=out,
    )


def test_a_payload_in_a_tensor_item_never_runs_and_is_one_line(
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A ``.distcp`` tensor item replaced by a ``torch.save`` archive of a payload (the index
    rewritten to match): our mapped reader declines it, torch's reads it with
    ``weights_only=True``, which refuses; the refusal is one line naming the checkpoint."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    megatron = copy_of(checkpoint, tmp_path)
    folder = dist_folder(megatron)
    index = folder / ".metadata"
    with index.open("rb") as handle:
        metadata = pickles.load(handle, index)
    items = sorted(metadata.storage_data.items(), key=lambda item: (item[1].relative_path, item[1].offset))
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    key, target = next(
        (k, v)
        for k, v in items
        if k.fqn == "decoder.final_layernorm.weight"
        and isinstance(metadata.state_dict_metadata[k.fqn], TensorStorageMetadata)
    )
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    payload = buffer.getvalue()
    data = (folder / target.relative_path).read_bytes()
    start, end = target.offset, target.offset + target.length
    (folder / target.relative_path).write_bytes(data[:start] + payload + data[end:])
    shift = len(payload) - target.length
    for k, info in items:
        if info.relative_path != target.relative_path:
            continue
        if k == key:
            metadata.storage_data[k] = _StorageInfo(info.relative_path, info.offset, len(payload))
        elif info.offset > target.offset:
            metadata.storage_data[k] = _StorageInfo(info.relative_path, info.offset + shift, info.length)
    index.write_bytes(pickle.dumps(metadata))
    export_refused(megatron, tmp_path, capsys, rf"{re.escape(str(folder))}: a tensor item of .* is not a plain tensor")
    assert not marker.exists()
