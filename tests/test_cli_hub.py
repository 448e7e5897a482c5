"""``--hf org/name``: a Hugging Face Hub id, resolved through huggingface_hub to a snapshot of
the local cache (offline here: ``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` a cache this test lays
out as the Hub's client does: ``models--org--name/{blobs,refs,snapshots/<commit>}`` with the
snapshot's files linking into ``blobs/``), with ``--revision``; a clear error when the cache
cannot serve it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_early import refusal

from bridgegen.cli.hub import MODEL_FILES, is_hub_id

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache: Path, repo_id: str, source: Path, *, refs: tuple[str, ...] = ("main",)) -> Path:
    """``source``'s files as the Hub client caches ``repo_id`` at ``COMMIT``; the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot.mkdir(parents=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(COMMIT)
    for file in sorted(source.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))
    return snapshot


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import test_weights
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(test_weights.hf_config("llama"), dtype=torch.float32)
    folder = tmp_path_factory.mktemp("hub") / "llama"
    model.save_pretrained(str(folder))
    return folder


def offline(cache: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def bridgegen(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridgegen", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=cwd,
        timeout=600,  # a hang guard only
    )


def test_a_hub_id_is_read_from_the_cache(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    snapshot = cached_repo(cache, "acme/tiny-llama", source, refs=("main", "v1"))
    out = tmp_path / "megatron"
    done = bridgegen(["import", "--hf", "acme/tiny-llama", "--out", str(out)], offline(cache), tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"acme/tiny-llama: read from the Hugging Face cache, {snapshot}" in done.stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    # The tokenizer / generation files came along, through the snapshot's links.
    assert (out / "hf_side_files" / "generation_config.json").read_bytes() == (
        source / "generation_config.json"
    ).read_bytes()
    tagged = tmp_path / "tagged"
    done = bridgegen(
        ["import", "--hf", "acme/tiny-llama", "--revision", "v1", "--out", str(tagged)],
        offline(cache),
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert f"acme/tiny-llama at v1: read from the Hugging Face cache, {snapshot}" in done.stdout


def test_a_hub_id_the_cache_does_not_hold(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    message = refusal(
        ["import", "--hf", "meta-llama/Llama-3.2-1B", "--out", str(tmp_path / "out")], **offline(cache)
    )
    assert message == (
        f"meta-llama/Llama-3.2-1B: no such folder; as a Hugging Face Hub id it is not in the local cache "
        f"({cache}) and HF_HUB_OFFLINE is set"
    )


def test_a_revision_the_cache_does_not_hold(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cached_repo(cache, "acme/tiny-llama", source)
    argv = ["verify", "--hf", "acme/tiny-llama", "--revision", "v2"]
    assert refusal(argv, **offline(cache)) == (
        f"acme/tiny-llama: no such folder; as a Hugging Face Hub id at revision 'v2' it is not in the local "
        f"cache ({cache}) and HF_HUB_OFFLINE is set"
    )


def test_a_cached_config_without_weights(source: Path, tmp_path: Path) -> None:
    """What ``AutoConfig.from_pretrained`` leaves in the cache: config.json only."""
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    shutil.copyfile(source / "config.json", only_config / "config.json")
    cache = tmp_path / "cache"
    snapshot = cached_repo(cache, "acme/tiny-llama", only_config)
    assert refusal(
        ["import", "--hf", "acme/tiny-llama", "--out", str(tmp_path / "out")], **offline(cache)
    ) == (
        f"acme/tiny-llama: no such folder; as a Hugging Face Hub id it is in the local cache without its files "
        f"({snapshot}: no *.safetensors weights (bridgegen reads safetensors only)) ({cache}) and "
        "HF_HUB_OFFLINE is set"
    )


def test_what_is_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("meta-llama/Llama-3.2-1B")
    assert is_hub_id("Qwen/Qwen3-0.6B")
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert not is_hub_id("models/llama")  # an existing folder is a folder
    for value in ("llama", "a/b/c", "./a/b", "/a/b", "../a", "a/..", "~/x", "a/ b"):
        assert not is_hub_id(value), value


def test_the_files_fetched_are_those_a_conversion_reads() -> None:
    from bridgegen.formats.folders import HF_SIDE_FILES

    assert set(HF_SIDE_FILES) | {"config.json", "*.safetensors", "*.safetensors.index.json"} == set(MODEL_FILES)
