"""Deprecated alias of ``bridgegen.bridge.weight_rules`` (moved in 0.2; this path goes in the next release)."""

import warnings

from bridgegen.bridge.weight_rules import GateUp, HFLayout, WeightKind, WeightRule

warnings.warn(
    "bridgegen.runtime.weight_rules moved to bridgegen.bridge.weight_rules; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["GateUp", "HFLayout", "WeightKind", "WeightRule"]
