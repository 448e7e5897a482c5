"""Errors the runtime raises; each message names the file, field or tensor at fault."""


class BridgeError(Exception):
    """Base class for conversion errors."""


class ConfigError(BridgeError, ValueError):
    """An HF or Megatron config that cannot be converted."""


class WeightError(BridgeError, ValueError):
    """A checkpoint whose tensors do not match what the bridge expects."""


class UnsupportedModelError(BridgeError, LookupError):
    """No bridge serves the given architecture / model type."""


class BridgeWarning(UserWarning):
    """Something a user should know about a conversion that still completes."""
