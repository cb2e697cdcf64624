"""Checks shared by the parsers of config.toml's sections (sans-I/O)."""

from __future__ import annotations

from typing import Any


class ConfigValueError(ValueError):
    """A bad value in config.toml; the message names its key."""


def non_negative_int(value: Any, where: str, note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigValueError(f"{where}: must be a non-negative integer{note}")
    return value
