"""Hostile and broken inputs through the CLI: each case ends with one clear error line naming
the file, tensor or argument, a non-zero exit, the inputs untouched, no output (or the old
output unchanged), no temp folder beside the output and no process left behind. Every case
checks all of that (``assert_refused``), not only the message.

Mechanisms: ``safetensors_io.read_header`` (offsets tile the data exactly, whole numbers, no
duplicate names), ``Checkpoint.open`` (an index names plain file names in its folder),
``convert_cli.argument_problem`` (numbers in range; --out checked before any work, never an
input, never holding or inside one) and ``runtime/folders.py`` (temp folders owned by one
process, found by exact name; the old output kept until the new one is in place).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from bridgegen.cli.main import main

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama, saved in three shards with an index."""
    import test_weights
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(test_weights.hf_config("llama"), dtype=torch.float32)
    folder = tmp_path_factory.mktemp("hostile") / "llama"
    model.save_pretrained(str(folder), max_shard_size="200KB")
    return folder


@pytest.fixture(scope="module")
def checkpoint(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile-megatron") / "megatron"
    assert main(["import", "--hf", str(source), "--out", str(out)]) == 0
    return out


@pytest.fixture
def hf(source: Path, tmp_path: Path) -> Path:
    """A copy of the source checkpoint for one case to break."""
    return Path(shutil.copytree(source, tmp_path / "hf"))


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under the folders, with its bytes."""
    return {
        str(p): p.read_bytes()
        for folder in folders
        if folder.exists()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_refused(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    match: str,
    *,
    inputs: list[Path],
    out: Path,
) -> None:
    command = argv[0]
    before = snapshot(*inputs, out)
    existed = out.exists()
    siblings = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    children = running_children()
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # a conversion error ends the process with its code
        code = exc.code if isinstance(exc.code, int) else 1
    err = capsys.readouterr().err
    assert code != 0, f"exit 0 for {argv}"
    # What a terminal shows: a progress bar cleared with carriage returns leaves nothing.
    lines = [shown for line in err.split("\n") if (shown := line.rsplit("\r", 1)[-1].strip())]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert re.match(rf"^bridgegen {command}: (rank \d+: )?error: ", lines[0]), lines[0]
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    assert snapshot(*inputs, out) == before, "an input (or the old output) changed"
    assert out.exists() == existed
    if out.parent.exists():
        assert sorted(p.name for p in out.parent.iterdir()) == siblings, (
            "something was left beside the output"
        )
    assert running_children() <= children, "a process was left behind"


def running_children() -> set[int]:
    """This process's descendants, bar multiprocessing's resource tracker: started with the
    first local ranks, it serves this (test) process for its lifetime and ends with it."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" not in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            pass  # ended meanwhile
    return found


def import_refused(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], match: str) -> None:
    """``bridgegen import`` of ``hf`` into ``tmp_path/out`` is refused (``assert_refused``)."""
    out = tmp_path / "out"
    assert_refused(["import", "--hf", str(hf), "--out", str(out)], capsys, match, inputs=[hf], out=out)


# ------------------------------------------------------------ safetensors headers that lie


def rewrite_header(path: Path, change: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length, "the test's header must not grow"
    text += b" " * (length - len(text))
    path.write_bytes(raw[:8] + text + raw[8 + length :])


def shard_of(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / index[tensor]


def test_two_tensors_on_the_same_bytes(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """o_proj's offsets made q_proj's (same shape): the safetensors library refuses such a
    file; a reader that did not would import o_proj equal to q_proj."""
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    path = shard_of(hf, q)
    assert shard_of(hf, o) == path

    def overlap(header: dict) -> None:  # type: ignore[type-arg]
        header[o]["data_offsets"] = header[q]["data_offsets"]

    rewrite_header(path, overlap)
    import_refused(
        hf,
        tmp_path,
        capsys,
        rf"{re.escape(str(path))}: tensors '[\w.]+' and '[\w.]+' overlap \(data bytes \d+-\d+ and \d+-\d+\): "
        "the header is corrupt",
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda h, n: h[n].update(shape=[-8, -8]), r"has a corrupt header entry"),
        (
            lambda h, n: h[n].update(data_offsets=[float(x) for x in h[n]["data_offsets"]]),
            r"corrupt header entry",
        ),
        (lambda h, n: h[n].update(shape=[str(d) for d in h[n]["shape"]]), r"corrupt header entry"),
        (lambda h, n: h.update(__metadata__={"format": 1}), r"__metadata__ must map names to strings"),
    ],
    ids=["negative-dims", "float-offsets", "string-dims", "metadata"],
)
def test_malformed_header_entries(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Callable[..., None], match: str
) -> None:
    name = "model.norm.weight"
    path = shard_of(hf, name)
    rewrite_header(path, lambda header: change(header, name))
    out = tmp_path / "out"
    assert_refused(
        ["import", "--hf", str(hf), "--out", str(out)],
        capsys,
        re.escape(str(path)) + ": .*" + match,
        inputs=[hf],
        out=out,
    )


def test_a_tensor_listed_twice(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A JSON header naming a tensor twice (a plain JSON reader keeps the last one)."""
    path = shard_of(hf, "model.norm.weight")
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + length]
    other = re.search(rb'"(model\.layers\.\d+\.[\w.]+)":', text)
    assert other is not None
    doubled = text.replace(other.group(0), b'"model.norm.weight":', 1)
    path.write_bytes(raw[:8] + doubled + b" " * (length - len(doubled)) + raw[8 + length :])
    import_refused(
        hf,
        tmp_path,
        capsys,
        rf"{re.escape(str(path))}: corrupt safetensors header: tensor 'model\.norm\.weight' is listed twice",
    )


def test_bytes_after_the_last_tensor(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = shard_of(hf, "model.norm.weight")
    with path.open("ab") as handle:
        handle.write(b"\0" * 64)
    import_refused(
        hf,
        tmp_path,
        capsys,
        rf"{re.escape(str(path))}: the tensors end at data byte \d+ but the file holds \d+ bytes of data",
    )


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_an_index_naming_a_file_outside_its_folder(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """A shard name must be a file name in the checkpoint folder: an index naming
    ``../outside.safetensors`` or an absolute path would read a file the folder does not hold.
    Symlinked shards (the Hugging Face cache's layout) are still read: the name is checked, not
    where the link points."""
    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(hf / first, outside)
    name = {"parent": "../outside.safetensors", "absolute": str(outside), "subfolder": f"sub/{first}"}[where]
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_refused(
        ["import", "--hf", str(hf), "--out", str(out)],
        capsys,
        rf"{re.escape(str(index_path))}: names shard '{re.escape(name)}', which is not a file name in",
        inputs=[hf, outside],
        out=out,
    )


def test_symlinked_shards_are_read(source: Path, tmp_path: Path) -> None:
    """The Hugging Face cache keeps shards as symlinks into its repository's blob folder:
    still a checkpoint (a link anywhere else is refused: tests/test_untrusted.py)."""
    repo = tmp_path / "models--acme--llama"
    blobs, snapshot_dir = repo / "blobs", repo / "snapshots" / "main"
    blobs.mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for file in source.iterdir():
        shutil.copy(file, blobs / file.name)
        (snapshot_dir / file.name).symlink_to(blobs / file.name)
    assert main(["import", "--hf", str(snapshot_dir), "--out", str(tmp_path / "out")]) == 0


# ------------------------------------------------------------------------- data loss


@pytest.mark.parametrize("relation", ["same", "holds", "inside", "same-through-symlink"])
def test_an_output_that_is_holds_or_lies_in_the_input_is_refused(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], relation: str
) -> None:
    out = {
        "same": hf,
        "holds": tmp_path,
        "inside": hf / "megatron",
        "same-through-symlink": tmp_path / "link",
    }[relation]
    if relation == "same-through-symlink":
        out.symlink_to(hf)
    words = {"same": "is the input", "holds": "holds the input", "inside": "lies inside the input"}
    assert_refused(
        ["import", "--hf", str(hf), "--out", str(out), "--overwrite"],
        capsys,
        rf"{re.escape(str(out))}: {words.get(relation, 'is the input')}",
        inputs=[hf],
        out=out,
    )


def test_export_over_its_own_checkpoint_is_refused(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(
        ["export", "--megatron", str(checkpoint), "--out", str(checkpoint / "release"), "--overwrite"],
        capsys,
        r"lies inside the input",
        inputs=[checkpoint],
        out=checkpoint / "release",
    )


def test_an_existing_output_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked first: the input need not even exist for the error to be about --out."""
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(
        ["export", "--megatron", str(tmp_path / "not-yet-read"), "--out", str(out)],
        capsys,
        rf"{re.escape(str(out))}: output folder exists; pass --overwrite to replace it",
        inputs=[],
        out=out,
    )


def test_a_failed_replace_keeps_the_old_output(
    hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--overwrite moves the old output aside and removes it only once the new one is in
    place: when renaming the new one in fails, the old one is put back as it was."""
    import bridgegen.formats.folders as folders

    out = tmp_path / "out"
    assert main(["import", "--hf", str(hf), "--out", str(out)]) == 0
    real = os.replace

    def failing(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(".out.tmp-") and Path(str(dst)) == out:
            raise OSError(5, "injected: cannot rename the new output in")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(folders.os, "replace", failing)
    before = snapshot(out)
    with pytest.raises(OSError, match="cannot rename the new output in"):
        from bridgegen.engines.model import ModelBridge
        from bridgegen.engines.stream_import import stream_import

        stream_import(ModelBridge.from_hf_dir(hf), hf, out, dtype=torch.float32, overwrite=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_temp_folders_belong_to_one_run(tmp_path: Path) -> None:
    """Leftovers are matched by exact name and owner: a folder of a run still alive (another
    process writing the same --out), a folder of another target whose name a glob of this one
    would match, and a folder not in our naming stay; a dead run's folder goes."""
    from bridgegen.formats.folders import remove_partial_outputs

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(finished.stdout)
    try:
        target = tmp_path / "m?"
        live = tmp_path / f".m?.tmp-{sleeper.pid}-abc"
        gone = tmp_path / f".m?.tmp-{dead}-abc"
        other = tmp_path / f".mx.tmp-{dead}-abc"  # the glob '.m?.tmp-*' would match this one
        foreign = tmp_path / ".m?.tmp-notapid"
        for folder in (live, gone, other, foreign):
            folder.mkdir()
        assert remove_partial_outputs(target) == [gone.name]
        assert live.exists() and other.exists() and foreign.exists() and not gone.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["import", "--tp", "0"], r"--tp must be at least 1, got 0"),
        (["import", "--tp", "-1"], r"--tp must be at least 1, got -1"),
        (["import", "--pp", "0"], r"--pp must be at least 1, got 0"),
        (["import", "--vpp", "0"], r"--vpp must be at least 1, got 0"),
        (["import", "--workers", "0"], r"--workers must be at least 1, got 0"),
        (["import", "--ep", "0"], r"--ep must be at least 1, got 0"),
        (["export", "--etp", "-2"], r"--etp must be at least 1, got -2"),
        (["import", "--vocab-multiple", "0"], r"--vocab-multiple must be at least 1, got 0"),
        (["import", "--first-stage-layers", "0"], r"--first-stage-layers must be at least 1, got 0"),
        (["export", "--max-shard-gb", "0"], r"--max-shard-gb must be a positive number, got 0.0"),
        (["export", "--max-shard-gb", "nan"], r"--max-shard-gb must be a positive number, got nan"),
        (["export", "--workers", "-3"], r"--workers must be at least 1, got -3"),
        (["verify", "--seq-len", "0"], r"--seq-len must be at least 1, got 0"),
        (["verify", "--batch", "0"], r"--batch must be at least 1, got 0"),
        (["verify", "--tolerance", "-1"], r"--tolerance must be a number of at least 0, got -1.0"),
        (["verify", "--pp", "0"], r"--pp must be at least 1, got 0"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_numbers_out_of_range_are_refused(
    argv: list[str],
    match: str,
    source: Path,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    command = argv[0]
    given = {
        "import": ["--hf", str(source), "--out", str(out)],
        "export": ["--megatron", str(checkpoint), "--out", str(out)],
        "verify": ["--hf", str(source)],
    }[command]
    assert_refused([command, *given, *argv[1:]], capsys, match, inputs=[source, checkpoint], out=out)


# ------------------------------------------------------------------ leftovers, noise


def test_a_failed_local_run_leaves_nothing_in_the_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's spawn keeps a failed process's traceback in a pytorch-errorfile-* file of the
    temp folder, our launcher its rendezvous folder: both go with the run."""
    import tempfile

    import dist_cases

    from bridgegen.engines.launch import RankErrors, run_on_ranks

    private = tmp_path / "temp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    with pytest.raises(RankErrors, match="this rank always fails"):
        run_on_ranks(dist_cases.always_fail, 2)
    assert sorted(p.name for p in private.iterdir()) == []
    assert tempfile.tempdir == str(private)


def test_a_conversion_leaves_nothing_in_the_temp_folder(source: Path, tmp_path: Path) -> None:
    """A whole `bridgegen import` and `export` (their own processes, TMPDIR a fresh folder)
    leave the temp folder as they found it: no process-group store, no stray file."""
    private = tmp_path / "temp"
    private.mkdir()
    env = {**os.environ, "TMPDIR": str(private)}
    for argv in (
        ["import", "--hf", str(source), "--out", str(tmp_path / "megatron")],
        ["export", "--megatron", str(tmp_path / "megatron"), "--out", str(tmp_path / "hf")],
    ):
        done = subprocess.run([sys.executable, "-m", "bridgegen", *argv], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in private.iterdir()) == []
    # Killed while writing: its temp folder beside --out stays (the next run removes it), the
    # temp folder holds nothing of it either.
    import time

    killed = subprocess.Popen(
        [sys.executable, "-m", "bridgegen", "import", "--hf", str(source), "--out", str(tmp_path / "killed")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".killed.tmp-*")) and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    assert sorted(p.name for p in private.iterdir()) == []


def test_outputs_are_made_with_the_users_umask(source: Path, tmp_path: Path) -> None:
    """A temp folder is its owner's only; the published output follows the umask like any
    folder the user makes."""
    mask = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert main(["import", "--hf", str(source), "--out", str(out)]) == 0
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------ expert parallel CLI


@pytest.mark.parametrize(
    ("layout", "ranks"), [(["--ep", "2"], 2), (["--tp", "2", "--ep", "2", "--etp", "1"], 2)]
)
def test_the_cli_takes_expert_parallel_layouts(layout: list[str], ranks: int, tmp_path: Path) -> None:
    """--ep / --etp reach the runtime: an import at that layout on local processes, exported
    back, is the HF checkpoint bit for bit."""
    import argparse

    import test_moe
    from checkpoints import assert_bit_exact

    from bridgegen.cli.convert import ranks_for

    hf = test_moe.make_qwen3_moe(tmp_path / "hf")
    parsed = argparse.Namespace(tp=1, pp=1, ep=1, etp=None)
    for flag, value in zip(layout[::2], layout[1::2], strict=True):
        setattr(parsed, flag.removeprefix("--"), int(value))
    assert ranks_for(parsed) == ranks
    megatron, out = tmp_path / "megatron", tmp_path / "out"
    assert main(["import", "--hf", str(hf), "--out", str(megatron), *layout]) == 0
    assert main(["export", "--megatron", str(megatron), "--out", str(out), *layout]) == 0
    assert_bit_exact(hf, out)


# ------------------------------------------------------------------ wrong models


def test_a_tied_config_with_a_different_output_layer_is_refused(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """config.json says tie_word_embeddings but the checkpoint holds its own lm_head: dropping
    it would convert a model other than the one transformers loads from the same folder."""
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    import_refused(
        hf,
        tmp_path,
        capsys,
        r"the config ties the output layer to the embedding \(tie_word_embeddings\) but the checkpoint's "
        r"'lm_head\.weight' differs from 'model\.embed_tokens\.weight'",
    )


def test_a_tied_config_with_an_output_layer_equal_to_the_embedding_imports(hf: Path, tmp_path: Path) -> None:
    """Some tied checkpoints store the output layer too, as a copy: that is the same model."""
    from safetensors.torch import load_file, save_file

    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    embed_file, head_file = shard_of(hf, "model.embed_tokens.weight"), shard_of(hf, "lm_head.weight")
    embedding = load_file(embed_file)["model.embed_tokens.weight"]
    tensors = load_file(head_file)
    tensors["lm_head.weight"] = embedding.clone()
    save_file(tensors, str(head_file), metadata={"format": "pt"})
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("tie_word_embeddings", "false", "bool, got str"),
        ("rms_norm_eps", "1e-6", "float, got str"),
        ("num_hidden_layers", 2.0, "int, got float"),
        ("tie_word_embeddings", 1, "bool, got int"),  # (attention_bias: 1 is refused by the llama spec first)
    ],
)
def test_a_config_value_of_the_wrong_type_is_refused(
    field: str, value: object, expected: str, hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value transformers' config class refuses (``"false"`` is a true string; ``"1e-6"``
    would be carried into the exported config.json, which transformers then refuses to load)
    is refused before anything is read, naming the file, the field and the types."""
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | {field: value}))
    import_refused(hf, tmp_path, capsys, rf"config\.json: Field '{field}' expected {expected} .*LlamaConfig")


def test_an_fp32_tensor_of_a_bf16_model_keeps_its_dtype_both_ways(tmp_path: Path) -> None:
    """DeepSeek-V3 checkpoints store the router's expert bias (e_score_correction_bias) in
    float32 beside bfloat16 weights; megatron-core keeps it in float32 too. Neither the import
    nor the export may round it to the model's dtype: the round trip, local ranks included, is
    exact in values and dtypes."""
    import test_mla
    from checkpoints import assert_bit_exact
    from safetensors.torch import load_file, save_file

    hf, _ = test_mla.build(tmp_path / "hf", "deepseek_v3", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    for path in hf.glob("*.safetensors"):
        tensors = load_file(path)
        biases = [name for name in tensors if name.endswith("e_score_correction_bias")]
        for name in biases:
            value = torch.randn(tensors[name].shape, generator=generator, dtype=torch.float32) * 0.1
            assert not torch.equal(value.to(torch.bfloat16).float(), value)  # bf16 would round it
            tensors[name] = value
        if biases:
            save_file(tensors, str(path), metadata={"format": "pt"})
    megatron, exported, exported_tp2 = tmp_path / "megatron", tmp_path / "exported", tmp_path / "tp2"
    assert main(["import", "--hf", str(hf), "--out", str(megatron)]) == 0
    assert main(["export", "--megatron", str(megatron), "--out", str(exported)]) == 0
    assert_bit_exact(hf, exported)
    assert main(["export", "--megatron", str(megatron), "--out", str(exported_tp2), "--tp", "2"]) == 0
    assert_bit_exact(hf, exported_tp2)


def test_nan_and_inf_values_are_named_in_a_warning(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN and infinite weights convert as they are, but not silently: the import names the
    Megatron tensor and its HF source, the export the HF tensor, with the counts."""
    from safetensors.torch import load_file, save_file

    name = "model.layers.1.mlp.down_proj.weight"
    path = shard_of(hf, name)
    tensors = load_file(path)
    tensors[name][0, :2] = float("nan")
    tensors[name][1, 0] = float("-inf")
    save_file(tensors, str(path), metadata={"format": "pt"})
    megatron, exported = tmp_path / "megatron", tmp_path / "exported"
    capsys.readouterr()
    assert main(["import", "--hf", str(hf), "--out", str(megatron)]) == 0
    warned = [line for line in capsys.readouterr().err.split("\n") if "warning" in line]
    assert len(warned) == 1, warned
    assert re.search(
        rf"bridgegen import: warning: .*Megatron 'decoder\.layers\.1\.mlp\.linear_fc2\.weight' "
        rf"\(from HF '{re.escape(name)}'\) holds 2 NaN and 1 infinite value\(s\)",
        warned[0],
    ), warned[0]
    assert main(["export", "--megatron", str(megatron), "--out", str(exported)]) == 0
    warned = [line for line in capsys.readouterr().err.split("\n") if "warning" in line]
    assert [line.rsplit("\r", 1)[-1] for line in warned] == [
        f"bridgegen export: warning: HF {name!r} holds 2 NaN and 1 infinite value(s) "
        f"of {tensors[name].numel()}; converted as they are"
    ]
    from checkpoints import assert_bit_exact

    assert_bit_exact(hf, exported)  # NaN == NaN bit for bit: converted as they are


def largest_record(release: Path) -> tuple[Path, int, int]:
    """The .distcp file, start and end of the largest record of its torch.save items, found
    through the DCP index (item offsets) and each item's zip directory (the local headers of
    torch's zips hold no sizes)."""
    import io
    import zipfile

    from torch.distributed.checkpoint.filesystem import FileSystemReader

    best = (Path(), 0, 0)
    for info in FileSystemReader(str(release)).read_metadata().storage_data.values():
        path = release / info.relative_path
        item = path.read_bytes()[info.offset : info.offset + info.length]
        for record in zipfile.ZipFile(io.BytesIO(item)).infolist():
            name_length, extra_length = struct.unpack_from("<HH", item, record.header_offset + 26)
            begin = info.offset + record.header_offset + 30 + name_length + extra_length
            if record.compress_size > best[2] - best[1]:
                best = (path, begin, begin + record.compress_size)
    return best


@pytest.mark.parametrize("layout", [[], ["--workers", "2"], ["--tp", "2"]])
def test_a_flipped_bit_in_a_checkpoint_tensor_is_refused(
    layout: list[str], checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A .distcp item is a torch.save zip whose records carry CRC32s that torch's readers never
    check: one flipped bit in a weight would export as a different model. The export (streamed,
    on workers, or through a model at a layout) checks every record it reads and names the file,
    the item and the record."""
    broken = Path(shutil.copytree(checkpoint, tmp_path / "broken"))
    distcp, begin, end = largest_record(broken / "release")
    assert end - begin > 1000
    raw = bytearray(distcp.read_bytes())
    raw[(begin + end) // 2] ^= 0x04
    distcp.write_bytes(bytes(raw))
    out = tmp_path / "out"
    assert_refused(  # capfd: a local rank writes its error to the terminal itself
        ["export", "--megatron", str(broken), "--out", str(out), *layout],
        capfd,
        rf"{re.escape(str(distcp))}: item at bytes \d+-\d+: record '[^']+/data/\d+' fails its CRC32 check "
        r"\(stored [0-9a-f]{8}, read [0-9a-f]{8}\); the checkpoint file is corrupt",
        inputs=[broken],
        out=out,
    )


def test_a_truncated_checkpoint_file_is_refused(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = Path(shutil.copytree(checkpoint, tmp_path / "broken"))
    distcp = next((broken / "release").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])
    out = tmp_path / "out"
    assert_refused(
        ["export", "--megatron", str(broken), "--out", str(out)],
        capsys,
        rf"{re.escape(str(distcp))}: item at bytes \d+-\d+: (the file ends at byte \d+; the checkpoint file is "
        r"truncated|is not a torch\.save archive)",
        inputs=[broken],
        out=out,
    )


def test_an_error_after_the_progress_bar_started_is_the_last_thing_shown(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bar is cleared when the work fails, so the terminal's last line is the error, not a
    stale bar drawn again after it."""
    from checkpoints import FailingOnCall

    import bridgegen.engines.stream_import as stream
    from bridgegen.bridge.errors import WeightError

    failing = FailingOnCall(stream.source_rows, 4, WeightError("injected: the fourth tensor is unreadable"))
    monkeypatch.setattr(stream, "source_rows", failing)
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--hf", str(source), "--out", str(out)])
    assert exit_info.value.code == 2
    screen = capsys.readouterr().err.split("\n")
    shown = [line.rsplit("\r", 1)[-1].strip() for line in screen]
    shown = [line for line in shown if line]
    assert shown[-1] == "bridgegen import: error: injected: the fourth tensor is unreadable", screen
    assert "import:" in "\n".join(screen[:-1]), "the bar was drawn while the work ran"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def with_tensor(hf: Path, name: str, value: torch.Tensor) -> Path:
    """Replace HF tensor ``name`` of ``hf`` by ``value`` (its dtype kept as given)."""
    from safetensors.torch import load_file, save_file

    path = shard_of(hf, name)
    tensors = load_file(path)
    tensors[name] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_a_lossy_cast_happens_only_when_asked_for(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One float64 tensor in a float32 checkpoint, with values float32 cannot hold: the model
    takes the checkpoint's dtype (float32), so rounding it is refused unless --dtype says so."""
    name = "model.layers.0.mlp.down_proj.weight"
    from safetensors.torch import load_file

    value = load_file(shard_of(hf, name))[name].double() + 1e-12
    with_tensor(hf, name, value)
    import_refused(
        hf,
        tmp_path,
        capsys,
        rf"HF '{re.escape(name)}': stored as torch.float64, \d+ value\(s\) change when cast to the model's "
        r"torch.float32; pass --dtype",
    )
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "asked"), "--dtype", "float32"]) == 0


def test_values_exactly_representable_in_the_model_dtype_import(hf: Path, tmp_path: Path) -> None:
    """A float64 tensor whose values are all float32 values is no loss: it imports as it is."""
    name = "model.layers.0.mlp.down_proj.weight"
    from safetensors.torch import load_file

    with_tensor(hf, name, load_file(shard_of(hf, name))[name].double())
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "out")]) == 0


def test_an_overflow_is_an_error_even_when_asked_for(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dtype float16 on weights of 1e5: each would become inf."""
    name = "model.layers.1.self_attn.o_proj.weight"
    from safetensors.torch import load_file

    value = load_file(shard_of(hf, name))[name]
    value[0, :3] = 1e5
    with_tensor(hf, name, value)
    out = tmp_path / "out"
    assert_refused(
        ["import", "--hf", str(hf), "--out", str(out), "--dtype", "float16"],
        capsys,
        rf"HF '{re.escape(name)}': 3 value\(s\) of this torch.float32 tensor overflow to inf in torch.float16 "
        r"\(largest magnitude 100000\)",
        inputs=[hf],
        out=out,
    )


def test_an_export_that_would_overflow_is_refused(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "model.layers.1.self_attn.o_proj.weight"
    from safetensors.torch import load_file

    value = load_file(shard_of(hf, name))[name]
    value[1, 0] = -7e4
    with_tensor(hf, name, value)
    megatron = tmp_path / "megatron"
    assert main(["import", "--hf", str(hf), "--out", str(megatron)]) == 0
    out = tmp_path / "exported"
    assert_refused(
        ["export", "--megatron", str(megatron), "--out", str(out), "--dtype", "float16"],
        capsys,
        rf"HF '{re.escape(name)}': 1 value\(s\) of this torch.float32 tensor overflow to inf in torch.float16",
        inputs=[hf, megatron],
        out=out,
    )
