"""Deprecated alias of ``bridgegen.bridge.config`` (moved in 0.2; this path goes in the next release)."""

import warnings

from bridgegen.bridge.config import HFConfigReader, MegatronConfig

warnings.warn(
    "bridgegen.runtime.config moved to bridgegen.bridge.config; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["HFConfigReader", "MegatronConfig"]
