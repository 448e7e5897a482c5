"""Conversion subcommands (import / export / verify); filled in with the weight runtime."""

from __future__ import annotations

import argparse
from typing import Any


def add_conversion_commands(sub: Any) -> None:
    del sub


__all__ = ["add_conversion_commands", "argparse"]
