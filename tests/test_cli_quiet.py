"""Quiet by default wherever a user starts us: ``make demo`` (``python -m bridgegen.cli.demo``),
the command line and the Python API (``ModelBridge``) print no line of megatron-core's,
torch's or transformers' ("Transformer Engine and Apex are not installed", deprecations,
their progress bars); ``BRIDGEGEN_SHOW_WARNINGS=1`` shows them. The API leaves the caller's
warning filters as they were."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]

API_SCRIPT = """
import sys
import warnings

import torch

before = list(warnings.filters)
from bridgegen.engines.model import ModelBridge

bridge = ModelBridge.from_hf_dir(sys.argv[1])
model = bridge.build_model(torch.float32)
stats = bridge.load_hf_weights(model)
names = [name for name, _ in bridge.iter_hf_weights(model)]
bridge.export_hf(model, sys.argv[2])
if len(sys.argv) > 3:  # quiet: our own filters are gone (shown, the imports' own filters stay)
    assert list(warnings.filters) == before, "the caller's warning filters changed"
print(stats.tensors, len(names))
"""


def run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "BRIDGEGEN_SHOW_WARNINGS"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**environment, **env},
        timeout=900,
    )


def shown(stderr: str) -> list[str]:
    """The lines a terminal is left with (a bar redrawn with carriage returns is its last state)."""
    return [
        line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n") if line.rsplit("\r", 1)[-1].strip()
    ]


def warns_without_us() -> bool:
    """megatron-core says something at import here: Transformer Engine or Apex is missing."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is None or importlib.util.find_spec("apex") is None


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import test_weights
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(test_weights.hf_config("llama"), dtype=torch.float32)
    folder = tmp_path_factory.mktemp("quiet") / "hf"
    model.save_pretrained(str(folder))
    return folder


def test_make_demo_prints_only_its_report(tmp_path: Path) -> None:
    done = run(["-m", "bridgegen.cli.demo"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "result: OK" in done.stdout
    assert done.stderr == "", done.stderr


def test_the_python_api_prints_nothing(hf: Path, tmp_path: Path) -> None:
    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    done = run([str(script), str(hf), str(tmp_path / "out"), "check-filters"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["15", "21"]  # Megatron tensors loaded, HF tensors streamed back
    assert done.stderr == "", done.stderr
    if warns_without_us():
        (tmp_path / "out").rename(tmp_path / "first")
        loud = run([str(script), str(hf), str(tmp_path / "out")], tmp_path, BRIDGEGEN_SHOW_WARNINGS="1")
        assert loud.returncode == 0, loud.stderr
        assert "Warning" in loud.stderr, "nothing to hide here: this test would not see noise"


def test_the_command_line_shows_only_our_lines(hf: Path, tmp_path: Path) -> None:
    done = run(["-m", "bridgegen", "import", "--hf", str(hf), "--out", str(tmp_path / "megatron")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert [line for line in shown(done.stderr) if not line.startswith("import")] == []
    done = run(
        ["-m", "bridgegen", "verify", "--hf", str(hf), "--megatron", str(tmp_path / "megatron")], tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert [
        line
        for line in shown(done.stderr)
        if not line.startswith(("load Megatron checkpoint", "Megatron forward", "HF forward"))
    ] == []
    assert done.stdout.startswith("OK: ")
