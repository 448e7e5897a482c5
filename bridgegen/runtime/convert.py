"""Deprecated alias of ``bridgegen.engines.model`` (moved in 0.2; this path goes in the next release)."""

import warnings

from bridgegen.engines.model import (
    DTYPE_NAMES,
    ModelBridge,
    ensure_model_parallel,
    parse_dtype,
    read_hf_config,
)

warnings.warn(
    "bridgegen.runtime.convert moved to bridgegen.engines.model; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["DTYPE_NAMES", "ModelBridge", "ensure_model_parallel", "parse_dtype", "read_hf_config"]
