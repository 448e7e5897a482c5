"""Folders: inputs read without leaving them, outputs made whole or not at all, never at the
expense of the user's data.

An input's files are read only where they lie inside the input folder (``inside_input``) and
small text files only up to a size (``read_small_text``). Every conversion writes into a temp folder beside its target, owned by one run (its name holds
the writing process's id), then ``publish_folder`` swaps it in. Leftovers of killed runs are
removed only when the process that made them is gone, and found by exact name, never by
pattern. ``output_problem`` refuses an output that would overwrite or sit inside an input.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from bridgegen.bridge.config_checks import wait_for_config_checks
from bridgegen.bridge.errors import BridgeWarning, ConfigError, WeightError

TEMP_MARK = ".tmp-"
OLD_MARK = ".old-"
# The most a small text input may hold: a tracker file holds an iteration number, a config a
# few KiB (the largest index of a published checkpoint, DeepSeek-V3's, is under 10 MiB).
# The tokenizer and generation files an HF folder holds beside its weights, which a conversion
# carries from the source to the output.
HF_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
TRACKER_LIMIT = 1024
CONFIG_LIMIT = 16 * 2**20
INDEX_LIMIT = 64 * 2**20


def inside_input(path: Path, folder: Path) -> Path:
    """``path``, a file read from the input ``folder``, where it really lies, which must be
    inside ``folder`` (symlinks followed): a symlink leaving it would carry another file, a
    secret or another model, into the output. A Hugging Face cache snapshot
    (``.../snapshots/<revision>/``) may link into its repository's ``blobs/``, as the cache
    does for every file."""
    target = path.resolve()
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(target.is_relative_to(place) for place in allowed):
        raise WeightError(f"{path}: a symlink to {target}, outside {folder}; refused (an input is read only from its folder)")
    return target


def read_small_text(path: Path, limit: int, what: str) -> str:
    """The text of ``path`` (a tracker, a config), refused without reading it whole when it
    holds more than ``limit`` bytes: such a file is not what it claims to be."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
        if len(data) > limit:
            size = os.fstat(handle.fileno()).st_size
            raise WeightError(f"{path}: {size} bytes, more than the {limit} a {what} can hold; not a {what}")
    return data.decode("utf-8", errors="replace")


def _owned_prefix(target: Path, mark: str, pid: int) -> str:
    return f".{target.name}{mark}{pid}-"


def make_temp_folder(target: Path) -> Path:
    """A new, empty temp folder beside ``target`` that this process owns. Temp folders of
    earlier runs writing ``target`` whose process is gone (killed with ``kill -9``, nothing of
    them left to clean up) are removed first, whichever command left them."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_partial_outputs(target)
    folder = Path(tempfile.mkdtemp(prefix=_owned_prefix(target, TEMP_MARK, os.getpid()), dir=target.parent))
    # mkdtemp makes it readable by its owner only; the output is a folder like any other.
    folder.chmod(0o777 & ~_umask())
    return folder


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (ended, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here: it exists
    return state not in ("Z", "X")


def _owner(target: Path, entry: str) -> int | None:
    """The process id in a temp / trash folder name of ``target``, or None if not one of ours."""
    for mark in (TEMP_MARK, OLD_MARK):
        prefix = f".{target.name}{mark}"
        if entry.startswith(prefix):
            pid, dash, _ = entry[len(prefix) :].partition("-")
            if dash and pid.isdigit():
                return int(pid)
    return None


def leftovers_of(out_dir: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """The temp / trash folders of runs writing ``out_dir``, with the process owning each:
    found by exact name beside it, never by pattern."""
    target = Path(out_dir)
    if not target.parent.is_dir():
        return []
    found = []
    for entry in target.parent.iterdir():
        pid = _owner(target, entry.name)
        if pid is not None and entry.is_dir() and not entry.is_symlink():
            found.append((entry, pid))
    return sorted(found)


def remove_partial_outputs(out_dir: str | os.PathLike[str], *, own: bool = False) -> list[str]:
    """Remove the temp folders that runs writing ``out_dir`` left beside it when they were
    killed: only folders whose name is exactly ours for that target and whose process is gone
    (another run still writing the same target keeps its folder); with ``own``, also this
    process's (a stopped run's last word)."""
    removed = []
    for entry, pid in leftovers_of(out_dir):
        if not process_alive(pid) or (own and pid == os.getpid()):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return sorted(removed)


def shared_temp_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """The temp folder every rank writes ``out_dir``'s content into, beside it: rank 0 checks
    the target, clears leftovers of killed runs and creates it; all ranks get its path. Every
    rank raises the same error if the target exists and ``overwrite`` is not set."""
    import torch.distributed as dist

    target = Path(out_dir)
    holder: list[str | None] = [None, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        if target.exists() and not overwrite:
            holder[0] = f"{target}: output folder exists; pass overwrite=True (--overwrite) to replace it"
        else:
            holder[1] = str(make_temp_folder(target))
    if dist.is_initialized():
        dist.broadcast_object_list(holder, src=0)
    if holder[0] is not None:
        raise WeightError(holder[0])
    assert holder[1] is not None
    return Path(holder[1])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(tmp: Path, target: Path) -> None:
    """Make the finished folder ``tmp`` the folder ``target``: its files and folders are first
    flushed to disk, so a crash right after cannot leave a complete-looking folder of truncated
    files; an existing ``target`` is moved aside and removed only once ``tmp`` is in its place
    (put back if that rename fails), so no moment leaves neither. A check of the input still
    running beside the conversion is waited for first."""
    wait_for_config_checks()
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=_owned_prefix(target, OLD_MARK, os.getpid()), dir=target.parent))
        os.replace(target, trash / "old")
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(trash / "old", target)
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)
        if trash.exists():
            warnings.warn(
                f"{target}: written; the folder it replaced could not be removed completely and is left "
                f"at {trash}",
                BridgeWarning,
                stacklevel=2,
            )
    else:
        os.replace(tmp, target)
    _fsync(target.parent)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def output_problem(out: str | os.PathLike[str], inputs: list[str | os.PathLike[str] | None]) -> str | None:
    """Why ``out`` may not be written, given the command's input folders: it is an input,
    holds one (replacing it would delete the input) or lies inside one. Paths are compared
    resolved, symlinks followed. None if it may."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            return f"{out}: is the input {given}; write the output to another folder"
        if _inside(source, target):
            return f"{out}: holds the input {given}; replacing it would delete the input"
        if _inside(target, source):
            return f"{out}: lies inside the input {given}; write the output outside it"
    return None


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """An HF folder's config.json as a dict (bounded read; no torch, so checks before any work use it)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the HF folder")
    try:
        data = json.loads(read_small_text(path, CONFIG_LIMIT, "config file"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
