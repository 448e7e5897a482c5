"""Deprecated alias of ``bridgegen.engines.launch`` (moved in 0.2; this path goes in the next release)."""

import warnings

from bridgegen.engines.launch import run_on_ranks

warnings.warn(
    "bridgegen.runtime.launch moved to bridgegen.engines.launch; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["run_on_ranks"]
