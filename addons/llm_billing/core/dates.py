"""Dates and durations (sans-I/O): billing months, resets, OpenAI's duration format."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any


def aware(moment: Any) -> datetime:
    """A datetime from the database as UTC-aware; anything else as the distant past."""
    if not isinstance(moment, datetime):
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def month_of(moment: datetime) -> str:
    """The calendar month (UTC) a request is counted in: ``YYYY-MM``."""
    return f"{moment.year:04d}-{moment.month:02d}"


def seconds_to_next_month(now: datetime) -> int:
    first = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return math.ceil((first - now).total_seconds())


def openai_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``1m30s``, ``6s``, ``120ms``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{int(minutes)}m" if minutes else ""
    return text + (f"{rest:.3g}s" if rest or not minutes else "")
