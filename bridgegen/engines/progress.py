"""Progress of long work, on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], object] | None]:
    """A tqdm bar counting ``total`` tensors, as its ``update`` (None when not ``enabled``).
    On an error the bar is cleared, so the error is the last thing on the screen."""
    if not enabled:
        yield None
        return
    import threading

    from tqdm import tqdm

    # tqdm's default lock includes a multiprocessing semaphore, which a rank killed while a bar
    # is open leaks (the resource tracker then prints a warning after the run); the bars of one
    # process need a thread lock only.
    tqdm.set_lock(threading.RLock())
    bar = tqdm(total=total, desc=what, unit="tensor")
    try:
        yield bar.update
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
