"""Deprecated alias of ``bridgegen.engines.stream_import`` / ``stream_export`` (moved in 0.2;
this path goes in the next release)."""

import warnings

from bridgegen.engines.stream_export import stream_export
from bridgegen.engines.stream_import import stream_import

warnings.warn(
    "bridgegen.runtime.stream moved to bridgegen.engines.stream_import and bridgegen.engines.stream_export; "
    "the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["stream_export", "stream_import"]
