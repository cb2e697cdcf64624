"""Checks shared by the parsers of config.toml's sections (sans-I/O)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any


class ConfigValueError(ValueError):
    """A bad value in config.toml; the message names its key."""


def non_negative_int(value: Any, where: str, note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigValueError(f"{where}: must be a non-negative integer{note}")
    return value


def non_negative_decimal(value: Any, where: str) -> Decimal:
    """An exact amount: a string like "0.15" (or an int, or a float taken as written)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigValueError(f"{where}: must be a number, preferably a string like \"0.15\"")
    try:
        result = Decimal(str(value))  # str(): a float like 0.1 becomes exactly "0.1"
    except InvalidOperation:
        raise ConfigValueError(f"{where}: {value!r} is not a number") from None
    if not result.is_finite() or result < 0:
        raise ConfigValueError(f"{where}: must be a non-negative number, got {value!r}")
    return result
