"""Looking up the bridge for an HF config, among the built-in bridges and those of the folders
named by ``BRIDGEGEN_BRIDGES``.

A bridges folder is what ``bridgegen generate --specs DIR --out FOLDER`` writes: a Python
package whose ``__init__.py`` lists its bridges in ``BRIDGES``. It is imported under its folder
name from the folder above it, which is added to ``sys.path``; local ranks that a conversion
spawns get that path, so they import the same bridge classes.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import keyword
import os
import stat
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridgegen.bridge.base import Bridge, find_bridge
from bridgegen.bridge.errors import BridgeError, BridgeWarning

BRIDGES_ENV = "BRIDGEGEN_BRIDGES"


class BridgesFolderError(BridgeError):
    """A bridges folder that cannot be used, or two bridges that claim the same model."""


def bridge_folders(value: str) -> list[Path]:
    """The folders a ``BRIDGEGEN_BRIDGES`` value names (separated by ``os.pathsep``)."""
    return [Path(part) for part in value.split(os.pathsep) if part]


def _package_folder(name: str) -> Path | None:
    """Where the package ``name`` is imported from now, or None if nothing of that name is."""
    found = sys.modules.get(name)
    origin = getattr(found, "__file__", None)
    if found is None:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
    return Path(origin).resolve().parent if origin else None


def load_bridge_folder(folder: Path) -> tuple[type[Bridge], ...]:
    """The bridges of one bridges folder (see the module docstring)."""
    where = f"{BRIDGES_ENV}: {folder}"
    if not folder.is_dir():
        raise BridgesFolderError(f"{where}: no such folder")
    init = folder / "__init__.py"
    if not init.is_file():
        raise BridgesFolderError(
            f"{where}: holds no bridges (no __init__.py); write one with "
            f"`bridgegen generate --specs SPECS --out {folder}`"
        )
    name = folder.resolve().name
    if not name.isidentifier() or keyword.iskeyword(name):
        raise BridgesFolderError(f"{where}: {name!r} is not a Python package name; rename the folder")
    imported_from = _package_folder(name)
    if imported_from is not None and imported_from != folder.resolve():
        raise BridgesFolderError(
            f"{where}: its package name {name!r} is already taken by {imported_from}; rename the folder"
        )
    if imported_from is None:
        _warn_if_others_can_write(folder, where)
        sys.path.append(str(folder.resolve().parent))
    try:
        package = importlib.import_module(name)
    except Exception as exc:  # a broken or foreign __init__.py: say which folder it is
        raise BridgesFolderError(f"{where}: importing {init} failed: {exc}") from exc
    bridges = getattr(package, "BRIDGES", ())
    if not isinstance(bridges, tuple) or not bridges:
        raise BridgesFolderError(f"{where}: {init} lists no bridges (BRIDGES is empty or missing)")
    for bridge in bridges:
        if not (isinstance(bridge, type) and issubclass(bridge, Bridge)):
            raise BridgesFolderError(f"{where}: {init}: BRIDGES holds {bridge!r}, which is not a bridge")
    return bridges


def _warn_if_others_can_write(folder: Path, where: str) -> None:
    """A bridges folder is code that runs in every conversion, like a folder on PYTHONPATH:
    say so when users other than its owner may change it (the folder or a module in it
    writable by group or others), once, before it is first imported."""
    writable = [
        path
        for path in (folder, *sorted(folder.glob("*.py")))
        if path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ]
    if writable:
        names = ", ".join(str(path) for path in writable[:3]) + (" ..." if len(writable) > 3 else "")
        warnings.warn(
            f"{where}: writable by other users ({names}); its code runs in this process: "
            "make it writable by its owner only (chmod go-w)",
            BridgeWarning,
            stacklevel=3,
        )


def _described(bridge: type[Bridge]) -> str:
    return f"{bridge.__name__} ({inspect.getfile(bridge)})"


def check_claims(bridges: tuple[type[Bridge], ...]) -> None:
    """Refuse two bridges that claim one family, HF architecture or model type."""
    claimed: dict[tuple[str, str], type[Bridge]] = {}
    for bridge in bridges:
        claims = [("family", bridge.family)]
        claims += [("architecture", a) for a in bridge.architectures]
        claims += [("model type", m) for m in bridge.model_types]
        for claim in claims:
            other = claimed.setdefault(claim, bridge)
            if other is not bridge:
                raise BridgesFolderError(
                    f"{_described(other)} and {_described(bridge)} both claim {claim[0]} {claim[1]!r}"
                )


def all_bridges() -> tuple[type[Bridge], ...]:
    """The built-in bridges, then those of each folder ``BRIDGEGEN_BRIDGES`` names."""
    from bridgegen.generated import BRIDGES

    found = list(BRIDGES)
    for folder in bridge_folders(os.environ.get(BRIDGES_ENV, "")):
        found += load_bridge_folder(folder)
    bridges = tuple(found)
    check_claims(bridges)
    return bridges


def bridge_for_config(hf_config: Mapping[str, Any]) -> type[Bridge]:
    """The bridge serving an HF config dict, among all bridges (see ``all_bridges``)."""
    return find_bridge(all_bridges(), hf_config)


def bridge_for_family(family: str) -> type[Bridge] | None:
    """The bridge of a family by name, among all bridges, or None."""
    return next((bridge for bridge in all_bridges() if bridge.family == family), None)
