"""Deprecated alias of ``bridgegen.bridge.base`` (moved in 0.2; this path goes in the next release)."""

import warnings

from bridgegen.bridge.base import Bridge, Wrapper

warnings.warn(
    "bridgegen.runtime.bridge moved to bridgegen.bridge.base; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["Bridge", "Wrapper"]
