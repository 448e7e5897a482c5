"""Run a function on N local processes joined in a gloo (or NCCL) process group — the same
setting torchrun gives, without torchrun. Used by tests and by users on one machine."""

from __future__ import annotations

import gc
import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes

from bridgegen.bridge.errors import BridgeError
from bridgegen.engines.supervise import current_watcher, die_with_parent, end_processes


class RankErrors(BridgeError):
    """Conversion errors raised on local ranks, by rank."""

    def __init__(self, errors: dict[int, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"rank {rank}: {message}" for rank, message in sorted(errors.items())))

    def by_message(self) -> dict[str, list[int]]:
        """Each distinct message with the ranks that raised it, in rank order."""
        grouped: dict[str, list[int]] = {}
        for rank, message in sorted(self.errors.items()):
            grouped.setdefault(message, []).append(rank)
        return grouped


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    init_file: str,
    result_dir: str,
    parent_pid: int,
    args: tuple[Any, ...],
) -> None:
    die_with_parent(parent_pid)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        Path(result_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
        code = 0
    except (BridgeError, OSError) as exc:
        Path(result_dir, f"{rank}.error").write_text(str(exc))
        code = 2  # said by the parent (RankErrors), no traceback here
    except Exception as exc:  # noqa: BLE001 - said by the parent as this rank's one line
        lines = str(exc).strip().splitlines()
        Path(result_dir, f"{rank}.error").write_text(
            f"{type(exc).__name__}: {lines[0] if lines else 'no message'} (an error inside the conversion)"
        )
        code = 2
    finally:
        end_process_groups()
    # A rank that is done leaves without the interpreter's teardown, where gloo threads of
    # groups still referenced (megatron-core keeps some) have aborted a finished rank
    # ("terminate called without an active exception"). Another error goes to torch's spawn,
    # which records its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_process_groups() -> None:
    """Drop megatron-core's parallel state (if it was set up) and every torch.distributed
    group, so that their gloo threads end while the interpreter is whole."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` spawned processes; returns each rank's result.

    ``fn`` must be importable (a module-level function). If any rank raises, the others are
    stopped and the error is raised here: ``RankErrors`` with every failed rank's one-line
    reason (a conversion error as it is, an OSError with its file, any other error with its
    type); torch.multiprocessing's exceptions for a rank that died without raising. If
    this process is interrupted (``supervise.Stopped``, KeyboardInterrupt, any error), every
    rank is ended before the exception leaves; a rank dies with this process if it is killed.
    """
    with tempfile.TemporaryDirectory(prefix="bridgegen-ranks-") as scratch:
        watcher = current_watcher()
        if watcher is not None:
            watcher.remove(scratch)
        init_file = str(Path(scratch) / "store")
        # torch's spawn leaves a failed process's traceback file (pytorch-errorfile-*) in the
        # system temp folder; made in this run's folder instead, it goes with it.
        system_temp = tempfile.tempdir
        tempfile.tempdir = scratch
        try:
            context = start_processes(  # type: ignore[no-untyped-call]
                _entry,
                args=(fn, world_size, init_file, scratch, os.getpid(), args),
                nprocs=world_size,
                join=False,
                start_method="spawn",
            )
        finally:
            tempfile.tempdir = system_temp
        try:
            # With a timeout: a signal caught by another thread of this process runs its Python
            # handler only when the main thread next runs Python code.
            while not context.join(timeout=0.2, grace_period=3.0):
                pass
        except BaseException as exc:
            end_processes([process.pid for process in context.processes if process.pid is not None])
            for process in context.processes:
                process.join()
            said = {int(path.stem): path.read_text() for path in Path(scratch).glob("*.error")}
            if said:
                raise RankErrors(said) from exc
            raise
        return [pickle.loads(Path(scratch, f"{rank}.pkl").read_bytes()) for rank in range(world_size)]
