"""Looking up the bridge for an HF config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridgegen.runtime.bridge import Bridge
from bridgegen.runtime.errors import UnsupportedModelError


def find_bridge(bridges: tuple[type[Bridge], ...], hf_config: Mapping[str, Any]) -> type[Bridge]:
    """The bridge whose spec claims the config's architecture (or, failing that, model_type)."""
    architectures = list(hf_config.get("architectures") or [])
    for architecture in architectures:
        for bridge in bridges:
            if architecture in bridge.architectures:
                return bridge
    model_type = hf_config.get("model_type")
    for bridge in bridges:
        if model_type in bridge.model_types:
            return bridge
    supported = sorted(a for bridge in bridges for a in bridge.architectures)
    raise UnsupportedModelError(
        f"no bridge for architectures {architectures} / model_type {model_type!r}; "
        f"supported architectures: {', '.join(supported)}"
    )
