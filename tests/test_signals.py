"""Real signals to real process trees: ``bridgegen import`` / ``export`` stopped while writing,
on one process and on two local ranks. Whatever the signal, every process the run started ends,
its temp folders go (beside ``--out`` and in TMPDIR), no output appears, the input is untouched
and the exit code says the run failed; SIGINT and SIGTERM end with one error line.

Each run is caught while it writes: the test waits for the temp folder beside ``--out``,
freezes the whole process tree (SIGSTOP), sends the signal and lets only the main process, the
watcher and the resource tracker go on. The ranks stay frozen, as ranks blocked in a collective
would be, so the run cannot finish first, and whatever ends them is the main process or the kernel
(a frozen process still dies of SIGKILL). Mechanism: ``bridgegen/runtime/supervise.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama of ~120 MB, so writing it takes long enough to be caught."""
    import test_weights
    from transformers import AutoModelForCausalLM

    config = test_weights.hf_config("llama")
    config.update(
        dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            vocab_size=32000,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
        )
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("signals") / "llama"
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def checkpoint(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("signals-megatron") / "megatron"
    done = subprocess.run(
        [sys.executable, "-m", "bridgegen", "import", "--hf", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return out


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def is_rank(process: psutil.Process) -> bool:
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:  # already ended
        return False
    return "--multiprocessing-fork" in command and "resource_tracker" not in command


def stop_while_writing(
    argv: list[str], out: Path, signum: int, whole_job: bool, temp: Path
) -> tuple[int, str, list[psutil.Process]]:
    """Run ``bridgegen ARGV``, send ``signum`` while it writes; its exit code, stderr and tree."""
    env = {**os.environ, "TMPDIR": str(temp), "TORCHINDUCTOR_CACHE_DIR": str(temp.parent / "inductor")}
    run = subprocess.Popen(
        [sys.executable, "-m", "bridgegen", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own job, as a shell runs it: the group signal reaches it all
    )
    main_process = psutil.Process(run.pid)
    deadline = time.monotonic() + 180
    while not list(out.parent.glob(f".{out.name}.tmp-*")):
        assert run.poll() is None, f"the run ended before writing: {run.communicate()[1]}"
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.002)
    tree = [main_process, *main_process.children(recursive=True)]
    for process in tree:
        process.suspend()
    assert list(out.parent.glob(f".{out.name}.tmp-*")), "the run finished before it was caught"
    if whole_job:
        os.killpg(run.pid, signum)
    else:
        os.kill(run.pid, signum)
    for process in tree:
        if not is_rank(process):
            try:
                process.resume()
            except psutil.Error:
                pass
    _, err = run.communicate(timeout=120)
    return run.returncode, err, tree


def wait_until(condition: Callable[[], object], what: Callable[[], str], seconds: float = 120.0) -> None:
    """Wait for ``condition``; ``seconds`` only guards against a hang (it takes well under a
    second here), it is not a time the test checks."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)


CASES = [
    # command, layout, signal, sent to the whole job (a terminal's Ctrl-C) or the main process only
    ("import", [], signal.SIGINT, True),
    ("import", [], signal.SIGTERM, False),
    ("import", [], signal.SIGKILL, False),
    ("import", ["--tp", "2"], signal.SIGINT, False),
    ("import", ["--tp", "2"], signal.SIGINT, True),
    ("import", ["--tp", "2"], signal.SIGTERM, False),
    ("import", ["--tp", "2"], signal.SIGKILL, False),
    ("export", [], signal.SIGHUP, False),
    ("export", ["--tp", "2"], signal.SIGKILL, False),
]


@pytest.mark.parametrize(
    ("command", "layout", "signum", "whole_job"),
    CASES,
    ids=[f"{c}-{'tp2' if tp else 'one'}-{s.name}{'-job' if j else ''}" for c, tp, s, j in CASES],
)
def test_a_stopped_run_leaves_nothing_behind(
    command: str,
    layout: list[str],
    signum: signal.Signals,
    whole_job: bool,
    source: Path,
    checkpoint: Path,
    tmp_path: Path,
) -> None:
    given = source if command == "import" else checkpoint
    flag = "--hf" if command == "import" else "--megatron"
    out = tmp_path / "out"
    temp = tmp_path / "temp"
    temp.mkdir()
    before = listing(given)
    code, err, tree = stop_while_writing(
        [command, flag, str(given), "--out", str(out), *layout], out, signum, whole_job, temp
    )

    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 128 + signum, err
        shown = [line.rsplit("\r", 1)[-1].strip() for line in err.split("\n")]
        shown = [line for line in shown if line]
        assert shown[-1] == f"bridgegen {command}: error: stopped by {signum.name}", err
        assert not any(line.startswith("bridgegen") for line in shown[:-1]), err
        assert "Traceback" not in err and "Warning" not in err, err

    # Every process ends: ranks with their parent, the watcher once it has cleaned up.
    wait_until(
        lambda: not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
        lambda: f"processes left: {[p.pid for p in tree if p.is_running()]}",
    )
    # The temp folders go: beside --out (the watcher removes a killed run's) and in TMPDIR.
    beside = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name not in ("inductor", "temp"))  # noqa: E731
    wait_until(lambda: beside() == [], lambda: f"left beside --out: {beside()}")
    assert sorted(temp.iterdir()) == []
    assert not out.exists()
    assert listing(given) == before
