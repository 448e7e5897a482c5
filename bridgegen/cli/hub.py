"""``--hf`` (and ``--hf-config``) given as a Hugging Face Hub id (``org/name``), with ``--revision``.

Only a value that is not an existing path and reads ``org/name`` is a Hub id. It is resolved
to a snapshot folder of the Hugging Face cache (``HF_HUB_CACHE``) through huggingface_hub:
from the cache alone first, then, unless ``HF_HUB_OFFLINE`` is set, from the Hub, fetching
only what a conversion reads (config, safetensors weights and their index, tokenizer and
generation files). A snapshot links its files into the repository's ``blobs/``, which
``formats.folders.inside_input`` accepts. No torch here: this runs before any work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bridgegen.formats.folders import HF_SIDE_FILES

# org/name as the Hub spells repository ids (no path of more than two parts, no "..").
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
CONFIG_FILES = ["config.json", *HF_SIDE_FILES]
MODEL_FILES = [*CONFIG_FILES, "*.safetensors", "*.safetensors.index.json"]


class HubError(Exception):
    """A Hub id that cannot be resolved to a snapshot folder; the message says why."""


@dataclass(frozen=True)
class Resolved:
    repo_id: str
    revision: str | None
    folder: Path
    fetched: bool  # from the Hub, not from the cache alone


def is_hub_id(value: str) -> bool:
    """``value`` names no existing path and reads ``org/name``."""
    return ".." not in value and HUB_ID.match(value) is not None and not Path(value).exists()


def _complete(folder: Path, weights: bool) -> str | None:
    """What a snapshot folder lacks for a conversion (None: nothing)."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    if weights and not any(folder.glob("*.safetensors")):
        return "no *.safetensors weights (bridgegen reads safetensors only)"
    return None


def resolve(repo_id: str, revision: str | None = None, *, weights: bool = True) -> Resolved:
    """The snapshot folder of Hub model ``repo_id`` at ``revision`` (default: main), holding
    its config (and, with ``weights``, its safetensors): from the local cache when it holds
    them, else fetched from the Hub. ``HubError`` says why neither works."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = MODEL_FILES if weights else CONFIG_FILES
    at = f" at revision {revision!r}" if revision else ""
    cache = constants.HF_HUB_CACHE
    lacking = "not in the local cache"
    try:
        local = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    else:
        missing = _complete(local, weights)
        if missing is None:
            return Resolved(repo_id, revision, local, fetched=False)
        lacking = f"in the local cache without its files ({local}: {missing})"
    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"{repo_id}: no such folder; as a Hugging Face Hub id{at} it is {lacking} ({cache}) and "
            "HF_HUB_OFFLINE is set"
        )
    try:
        fetched = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise HubError(
            f"{repo_id}: a gated model on the Hugging Face Hub: accept its terms on "
            f"https://huggingface.co/{repo_id} and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id}: no such folder, and no model of that id on the Hugging Face Hub (a private one "
            "needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: the Hugging Face Hub has no revision {revision!r} of it") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        said = str(exc).strip().splitlines()
        reason = said[0].removeprefix("Got: ") if said else type(exc).__name__
        raise HubError(
            f"{repo_id}: no such folder; as a Hugging Face Hub id{at} it is {lacking} ({cache}) and "
            f"fetching it failed ({reason})"
        ) from None
    missing = _complete(fetched, weights)
    if missing is not None:
        raise HubError(f"{repo_id}: the Hub snapshot{at} ({fetched}) holds {missing}")
    return Resolved(repo_id, revision, fetched, fetched=True)
