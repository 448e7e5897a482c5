"""Progress and summaries: a bar for every long step (a distributed export, an export on
--workers, verify's forward), summaries that count every rank's share, and the streaming
import's LoadStats counting the HF tensors it read."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import test_weights
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(test_weights.hf_config("llama"), dtype=torch.float32)
    folder = tmp_path_factory.mktemp("progress") / "hf"
    model.save_pretrained(str(folder))
    return folder


def bridgegen(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "bridgegen", *argv],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    return done


def finished_bar(stderr: str, label: str) -> str:
    """The last state of the bar ``label`` (bars redraw with carriage returns): it must have
    reached its total."""
    states = [
        part.strip() for line in stderr.split("\n") for part in line.split("\r") if part.startswith(label)
    ]
    assert states, f"no {label!r} bar in:\n{stderr}"
    done = re.search(r"\| (\d+)/(\d+) ", states[-1])
    assert done and done.group(1) == done.group(2), states[-1]
    return states[-1]


def test_stream_import_counts_the_hf_tensors_it_reads(hf: Path, tmp_path: Path) -> None:
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.stream_import import stream_import
    from bridgegen.formats.safetensors import Checkpoint

    stats = stream_import(ModelBridge.from_hf_dir(hf), hf, tmp_path / "out", dtype=torch.float32)
    assert stats.tensors > 0
    assert stats.hf_tensors_used == len(Checkpoint.open(hf).tensors)
    assert stats.bytes_requested == Checkpoint.open(hf).total_bytes


@pytest.mark.slow
def test_workers_show_their_share_and_sum_every_ranks(hf: Path, tmp_path: Path) -> None:
    alone = bridgegen("import", "--hf", str(hf), "--out", str(tmp_path / "one"))
    summary = next(line for line in alone.stdout.splitlines() if line.startswith("read "))
    assert re.fullmatch(r"read [\d.]+ MiB for \d+ tensors, no model built", summary), summary
    two = bridgegen("import", "--hf", str(hf), "--out", str(tmp_path / "two"), "--workers", "2")
    assert f"{summary.removesuffix(', no model built')} on 2 ranks, no model built" in two.stdout
    finished_bar(two.stderr, "import (rank 0's share of 2)")
    exported = bridgegen(
        "export", "--megatron", str(tmp_path / "two"), "--out", str(tmp_path / "hf2"), "--workers", "2"
    )
    finished_bar(exported.stderr, "export (rank 0's share of 2)")
    assert re.search(r"wrote HF folder \S+ \(21 tensors, [\d.]+ MiB\) in", exported.stdout), exported.stdout


@pytest.mark.slow
def test_a_distributed_export_and_verify_show_progress(hf: Path, tmp_path: Path) -> None:
    megatron = tmp_path / "megatron"
    imported = bridgegen("import", "--hf", str(hf), "--out", str(megatron), "--tp", "2")
    assert re.search(r"read [\d.]+ MiB for \d+ tensor shards on 2 ranks", imported.stdout), imported.stdout
    exported = bridgegen("export", "--megatron", str(megatron), "--out", str(tmp_path / "out"), "--pp", "2")
    finished_bar(exported.stderr, "load Megatron checkpoint (rank 0's share of 2)")
    finished_bar(exported.stderr, "export (rank 0's share of 2)")
    checked = bridgegen("verify", "--hf", str(hf), "--megatron", str(megatron), "--pp", "2")
    finished_bar(checked.stderr, "load Megatron checkpoint (rank 0's share of 2)")
    assert finished_bar(checked.stderr, "Megatron forward").endswith("layer/s]")
    finished_bar(checked.stderr, "HF forward")
    assert checked.stdout.startswith("OK: ")
