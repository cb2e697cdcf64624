"""Daily usage rollups (pure): per user, UTC day and model, the sums charts read instead of
scanning ``billing.events_completion``. One ``billing.usage_daily`` document per
``"<user_id>:<YYYY-MM-DD>:<model>"``, kept by ``$inc`` upserts (eventlog.py)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from bson import Decimal128

from .money import as_decimal128

TOKEN_CLASSES = ("prompt_tokens", "completion_tokens", "cache_read_tokens",
                 "cache_write_tokens", "reasoning_tokens", "cache_write_1h_tokens")


def rollup_id(user_id: Any, day: str, model: Any) -> str:
    return f"{user_id}:{day}:{model}"


def daily_updates(events: Iterable[dict[str, Any]],
                  now: datetime | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``(_id, update)`` for each user, day and model among completion ``events``: one
    ``$inc`` of their requests, tokens by class, tokens billed and cost (upserted)."""
    groups: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for event in events:
        when = event.get("date_created")
        if not isinstance(when, datetime):
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        day = when.astimezone(UTC).strftime("%Y-%m-%d")
        user_id, model = event.get("user_id"), event.get("model")
        _id = rollup_id(user_id, day, model)
        if _id not in groups:
            groups[_id] = ({"user_id": user_id, "day": day, "model": model}, {"requests": 0})
        fields, inc = groups[_id]
        inc["requests"] += 1
        for name, count in _tokens(event).items():
            inc[f"tokens.{name}"] = inc.get(f"tokens.{name}", 0) + count
        inc["tokens_billed"] = inc.get("tokens_billed", 0) + _number(event.get("tokens_billed"))
        if isinstance(cost := event.get("cost"), Decimal128):
            inc["cost"] = inc.get("cost", Decimal(0)) + cost.to_decimal()
            fields["currency"] = event.get("currency")
    updated = now or datetime.now(UTC)
    updates = []
    for _id, (fields, inc) in groups.items():
        if "cost" in inc:
            inc["cost"] = as_decimal128(inc["cost"])
        updates.append((_id, {"$inc": inc, "$set": {"updated": updated, **fields}}))
    return updates


def _tokens(event: dict[str, Any]) -> dict[str, int | float]:
    usage = event.get("usage")
    if isinstance(usage, dict):
        return {name: _number(usage.get(name)) for name in TOKEN_CLASSES}
    return {"prompt_tokens": _number(event.get("prompt_n")),
            "completion_tokens": _number(event.get("completion_n"))}


def _number(value: Any) -> int | float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0
