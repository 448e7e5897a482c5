"""Deprecated alias of ``bridgegen.engines.checkpoint`` (moved in 0.2; this path goes in the
next release)."""

import warnings

from bridgegen.engines.checkpoint import load_megatron, save_megatron
from bridgegen.engines.model import bridge_for_checkpoint

warnings.warn(
    "bridgegen.runtime.megatron_checkpoint moved to bridgegen.engines.checkpoint (save_megatron, "
    "load_megatron) and bridgegen.engines.model (bridge_for_checkpoint); the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["bridge_for_checkpoint", "load_megatron", "save_megatron"]
