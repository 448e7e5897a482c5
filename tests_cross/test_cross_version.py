"""A checkpoint written by our import under one megatron-core version loads under the other,
strictly, and exports bit-exact. Run by ``make test-latest``, which sets the two Pythons:
BRIDGEGEN_PYTHON_OLD (Python 3.11, megatron-core 0.16.1) and BRIDGEGEN_PYTHON_NEW (Python 3.12,
megatron-core 0.19.2). 0.16 writes ``common.pt``; 0.19 writes the common state into the DCP files
and no ``common.pt``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FIXTURES = HERE.parent / "tests" / "data" / "megatron_checkpoints"
sys.path.insert(0, str(HERE.parent / "tests"))


def python(which: str) -> str:
    value = os.environ.get(f"BRIDGEGEN_PYTHON_{which}")
    if not value:
        pytest.fail(f"BRIDGEGEN_PYTHON_{which} is not set: run these tests with `make test-latest`")
    return value


def run(which: str, *args: str) -> str:
    done = subprocess.run(
        [python(which), str(HERE / "strict_load.py"), *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def version(which: str) -> str:
    return subprocess.run(
        [python(which), "-c", "import megatron.core; print(megatron.core.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.parametrize(("writer", "reader"), [("OLD", "NEW"), ("NEW", "OLD")])
@pytest.mark.parametrize("case", ["mb-llama", "mb-qwen3-moe"])
def test_written_by_one_version_loads_strictly_under_the_other(
    writer: str, reader: str, case: str, tmp_path: Path
) -> None:
    from checkpoints import assert_bit_exact

    assert version("OLD").startswith("0.16") and version("NEW").startswith("0.19")
    hf = FIXTURES / case / "hf"
    out = tmp_path / "ckpt"
    run(writer, "import", str(hf), str(out))
    common_pt = (out / "release" / "common.pt").is_file()
    assert common_pt == (writer == "OLD")  # the two common-state formats
    report = json.loads(run(reader, "load", str(out), str(hf)).splitlines()[-1])
    assert report["megatron_core"] == version(reader)
    assert report["missing"] == [] and report["unexpected"] == []
    assert "embedding.word_embeddings.weight" in report["loaded"]
    exported = tmp_path / "hf"
    done = subprocess.run(
        [python(reader), "-m", "bridgegen", "export", "--megatron", str(out), "--out", str(exported)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert_bit_exact(hf, exported)
