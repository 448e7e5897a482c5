"""What long work shows on stderr: progress bars, and third-party notices kept off it.

megatron-core, torch and transformers say things a user of a conversion cannot act on
("Transformer Engine and Apex are not installed", deprecations of their own options, their
own progress bars). Where a process is ours (the ``bridgegen`` command, ``make demo``)
``quiet_third_party`` keeps them off for good; the Python API (``engines.model.ModelBridge``)
runs its work inside ``third_party_quieted``, which leaves the caller's warning filters and
logger levels as they were. ``BRIDGEGEN_SHOW_WARNINGS=1`` shows them everywhere.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

SHOW_WARNINGS = "BRIDGEGEN_SHOW_WARNINGS"
# Modules whose warnings are kept off the terminal (regular expressions of module names).
THIRD_PARTY_MODULES = (r"megatron(\..*)?", r"torch(\..*)?", r"transformers(\..*)?", r"huggingface_hub(\..*)?")
# Loggers held at ERROR. torch.utils.cpp_extension: "No CUDA runtime is found" from torch's
# CUDA build on a CPU machine, once per process (so once per local rank).
THIRD_PARTY_LOGGERS = ("megatron", "megatron.core", "torch.distributed", "torch.utils.cpp_extension")

P = ParamSpec("P")
R = TypeVar("R")


def showing_third_party() -> bool:
    """``BRIDGEGEN_SHOW_WARNINGS`` is set (to anything but 0)."""
    return os.environ.get(SHOW_WARNINGS, "") not in ("", "0")


def _filter_third_party_warnings() -> None:
    for module in THIRD_PARTY_MODULES:
        warnings.filterwarnings("ignore", module=module)


def quiet_third_party() -> None:
    """Keep megatron-core's, torch's and transformers' warnings and log notices off the
    terminal for the rest of this process, so our own output is what a user reads: for
    processes that are ours (the command line, the demo), not for a caller's."""
    if showing_third_party():
        return
    _filter_third_party_warnings()
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def third_party_quieted() -> Iterator[None]:
    """Within the block, third-party warnings (import-time notices of megatron-core and torch
    included) and log lines are kept off the terminal; after it, the caller's warning filters
    and logger levels are as they were. Nothing is hidden with ``BRIDGEGEN_SHOW_WARNINGS``."""
    if showing_third_party():
        yield
        return
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        _filter_third_party_warnings()
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def quietly(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` run inside ``third_party_quieted``: an entry point of the Python API."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with third_party_quieted():
            return function(*args, **kwargs)

    return run


@contextmanager
def transformers_bars_hidden() -> Iterator[None]:
    """transformers' progress bars (``from_pretrained``'s "Loading weights",
    ``save_pretrained``'s "Writing model shards") off within the block, as they were after it."""
    if showing_third_party():
        yield
        return
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def share(what: str, rank: int, world_size: int) -> str:
    """A bar's label: ``what``, or on one of several ranks ``what (rank N's share of W)``."""
    return what if world_size == 1 else f"{what} (rank {rank}'s share of {world_size})"


class Bar:
    """A running tqdm bar: called with a count to advance it."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def __call__(self, count: int) -> None:
        self._bar.update(count)

    def set_total(self, total: int) -> None:
        """What the bar counts up to, once known (a rank's share of the work)."""
        self._bar.total = total
        self._bar.refresh()


@contextmanager
def progress_bar(enabled: bool, total: int, what: str, unit: str = "tensor") -> Iterator[Bar | None]:
    """A tqdm bar counting ``total`` tensors (or other ``unit``s), as a callable that advances
    it (None when not ``enabled``). On an error the bar is cleared, so the error is the last
    thing on the screen."""
    if not enabled:
        yield None
        return
    import threading

    from tqdm import tqdm

    # tqdm's default lock includes a multiprocessing semaphore, which a rank killed while a bar
    # is open leaks (the resource tracker then prints a warning after the run); the bars of one
    # process need a thread lock only.
    tqdm.set_lock(threading.RLock())
    bar = tqdm(total=total, desc=what, unit=unit)
    try:
        yield Bar(bar)
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
