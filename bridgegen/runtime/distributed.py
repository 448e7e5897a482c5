"""Deprecated alias of ``bridgegen.engines.distributed`` (moved in 0.2; this path goes in the next release)."""

import warnings

from bridgegen.engines.distributed import ParallelLayout, build_chunks, export_hf, forward_logits, load_hf

warnings.warn(
    "bridgegen.runtime.distributed moved to bridgegen.engines.distributed; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["ParallelLayout", "build_chunks", "export_hf", "forward_logits", "load_hf"]
