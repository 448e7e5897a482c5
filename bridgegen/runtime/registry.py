"""Deprecated alias of ``bridgegen.plan.bridges`` (moved in 0.2; this path goes in the next release)."""

import warnings

from bridgegen.plan.bridges import all_bridges, bridge_for_config, bridge_for_family

warnings.warn(
    "bridgegen.runtime.registry moved to bridgegen.plan.bridges; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["all_bridges", "bridge_for_config", "bridge_for_family"]
