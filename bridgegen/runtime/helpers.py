"""Deprecated alias of ``bridgegen.bridge.helpers`` (moved in 0.2; this path goes in the next
release): bridges generated before then import ``from bridgegen.runtime import helpers``."""

import warnings

from bridgegen.bridge.helpers import *  # noqa: F403

warnings.warn(
    "bridgegen.runtime.helpers moved to bridgegen.bridge.helpers; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
