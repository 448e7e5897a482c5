"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(scope="session")
def megatron_transformer_config() -> Callable[..., Any]:
    """``bridgegen.megatron.config.transformer_config``, with megatron-core imported once (~8 s)."""
    import megatron.core.transformer.transformer_config  # noqa: F401

    from bridgegen.megatron.config import transformer_config

    return transformer_config
