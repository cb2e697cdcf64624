"""Dates and durations (sans-I/O): billing months, resets, OpenAI's duration format."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any


def aware(moment: Any) -> datetime:
    """A datetime from the database as UTC-aware; anything else as the distant past."""
    if not isinstance(moment, datetime):
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def month_of(moment: datetime) -> str:
    """The calendar month (UTC) a request is counted in: ``YYYY-MM``."""
    return f"{moment.year:04d}-{moment.month:02d}"


def next_month_start(moment: datetime) -> datetime:
    """Midnight UTC on the first day of the month after ``moment``'s."""
    return datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)


def within_month(moment: datetime, month: str) -> datetime:
    """``moment`` moved into the ``YYYY-MM`` month (UTC) if outside it: to the month's
    first or last millisecond (the database keeps milliseconds). ValueError for a
    malformed month."""
    year, _, number = month.partition("-")
    first = datetime(int(year), int(number), 1, tzinfo=UTC)
    last = next_month_start(first) - timedelta(milliseconds=1)
    return min(max(moment, first), last)


def seconds_to_next_month(now: datetime) -> int:
    first = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return math.ceil((first - now).total_seconds())


def openai_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``1h2m3s``, ``1m30s``, ``6s``, ``1.25s``,
    ``120ms``. Rounded first (to the millisecond below a second, else the centisecond),
    then split, so no part ever reaches 60."""
    seconds = max(0.0, seconds)
    if (millis := round(seconds * 1000)) < 1000:
        return f"{millis}ms"
    centis = round(seconds * 100)  # from the input, not from millis: one rounding only
    minutes, centis = divmod(centis, 6000)
    hours, minutes = divmod(minutes, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    if centis or not text:
        text += f"{centis / 100:.2f}".rstrip("0").rstrip(".") + "s"
    return text
