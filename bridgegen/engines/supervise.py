"""What a conversion does when it is stopped: every process it started ends, its temp folders
go, and the exit code says it did not finish.

- In the main process, SIGINT (Ctrl-C), SIGTERM and SIGHUP raise ``Stopped`` (a BaseException,
  like KeyboardInterrupt), so the cleanup that runs on any error runs: the temp folder beside
  ``--out`` is removed, an old output is kept. The command exits with 128 + the signal number.
- Local rank processes (``launch.run_on_ranks``) are killed by the kernel when their parent
  dies (``die_with_parent``: PR_SET_PDEATHSIG), ignore SIGINT (a terminal sends Ctrl-C to every
  process of the job; the parent decides) and are ended by the parent on any signal or failure,
  with SIGKILL after a short grace: a rank waiting in a collective never runs a Python handler.
  They start no processes of their own (the checkpoint writer runs in the rank's thread).
- ``kill -9`` of the main process cannot be handled by it: a small watcher process
  (``watching``), started before any work, reads a pipe from the main process. If the pipe
  closes without the main process saying it finished, the watcher waits for the ranks to die
  and removes what the run left: temp folders beside ``--out`` whose owning process is gone
  (exact names, as ``folders.remove_partial_outputs`` finds them) and the folders it was told of.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO

from bridgegen.formats.folders import leftovers_of, process_alive, remove_partial_outputs

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1
# How long the watcher waits for the processes owning temp folders to end before giving up.
WATCHER_PATIENCE_S = 30.0


class Stopped(BaseException):
    """A stop signal reached the main process; ``exit_code`` is 128 + its number."""

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {self.signal_name}")


@contextmanager
def signals_as_stops() -> Iterator[None]:
    """While inside, a stop signal raises ``Stopped`` in the main thread, once: a second signal
    during the cleanup it starts is ignored, so the cleanup finishes. Outside the main thread
    (where handlers cannot be set) nothing changes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def die_with_parent(parent_pid: int) -> None:
    """Make the kernel SIGKILL this process when its parent ends (Linux; elsewhere nothing),
    and end now if the parent already has. SIGINT is left to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def end_processes(pids: list[int], grace_s: float = 3.0) -> None:
    """SIGTERM each process, then SIGKILL those still alive after ``grace_s`` (the caller
    reaps its own children)."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(process_alive(pid) for pid in pids):
        time.sleep(0.02)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class Watcher:
    """The main process's side of the watcher: tell it what to clean, and that all went well."""

    def __init__(self, pipe: IO[str], process: subprocess.Popen[str]) -> None:
        self._pipe = pipe
        self._process = process

    def clean_outputs_of(self, target: str | os.PathLike[str]) -> None:
        self._say(f"out {Path(target).absolute()}")

    def remove(self, folder: str | os.PathLike[str]) -> None:
        self._say(f"remove {Path(folder).absolute()}")

    def _say(self, line: str) -> None:
        self._pipe.write(line + "\n")
        self._pipe.flush()

    def finish(self) -> None:
        """The run ended on its own (done, or failed and cleaned up): the watcher ends too."""
        try:
            self._say("done")
            self._pipe.close()
        except (BrokenPipeError, ValueError):
            pass
        self._process.wait()


_current: Watcher | None = None


def current_watcher() -> Watcher | None:
    """The watcher of the run in this process, if any (ranks and library callers have none)."""
    return _current


@contextmanager
def watching(out: str | os.PathLike[str] | None) -> Iterator[Watcher]:
    """Start the watcher for a run writing ``out``; it ends when the block ends."""
    global _current
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-c", "from bridgegen.engines.supervise import watch; watch()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert process.stdin is not None
    watcher = Watcher(process.stdin, process)
    if out is not None:
        watcher.clean_outputs_of(out)
    previous, _current = _current, watcher
    try:
        yield watcher
    finally:
        _current = previous
        watcher.finish()


def watch() -> None:
    """The watcher process: read the main process's lines until the pipe closes; if it closed
    without ``done``, the main process was killed: clean up after it."""
    import shutil

    for signum in STOP_SIGNALS:  # a Ctrl-C to the whole job must not end the watcher first
        signal.signal(signum, signal.SIG_IGN)
    targets: list[str] = []
    folders: list[str] = []
    for line in sys.stdin:
        command, _, value = line.rstrip("\n").partition(" ")
        if command == "done":
            return
        if command == "out":
            targets.append(value)
        elif command == "remove":
            folders.append(value)
    # The ranks die with the main process (SIGKILL from the kernel); wait until the temp
    # folders' owners are gone, then remove them.
    deadline = time.monotonic() + WATCHER_PATIENCE_S
    while True:
        for target in targets:
            remove_partial_outputs(target)
        if not any(leftovers_of(target) for target in targets) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
