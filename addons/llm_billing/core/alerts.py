"""Quota alerts (sans-I/O): settings, which thresholds a month's usage crossed, and the
signed JSON that tells the configured URL.

The body is signed with HMAC-SHA256 over its raw bytes (``X-Signature: sha256=<hex>``); it
carries the time it was sent (``sent_at``, also ``X-Signature-Timestamp``), so a receiver
can refuse a replayed old alert, and its ``id``, the same on every retry, so it can drop a
duplicate delivery.

The id is ``<user>:<month>:<monthly_tokens>:<threshold>``: one alert per threshold of each
quota a user's month is measured against. A user who crossed 80 % of Free (10,000) and then
moves to Pro (1,000,000) is told again at 80 % of Pro's quota; moving back to Free, or to a
plan with the same quota, tells nothing twice. (Before, the id was
``<user>:<month>:<threshold>``: see ``legacy_alert_id``.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from .validation import ConfigValueError

SECRET_ENV = "LLM_BILLING_ALERT_SECRET"
THRESHOLDS = (80, 100)  # percent of the monthly quota
ALERT_TYPE = "quota.threshold_crossed"


@dataclass(frozen=True, slots=True)
class AlertSettings:
    url: str | None = None
    secret: str | None = field(default=None, repr=False)  # from the environment only
    thresholds: tuple[int, ...] = THRESHOLDS

    @property
    def enabled(self) -> bool:
        return bool(self.url and self.secret)


def parse_alerts(data: Any, env: Mapping[str, str]) -> AlertSettings:
    if data is None:
        return AlertSettings()
    if not isinstance(data, dict):
        raise ConfigValueError("alerts: must be a table")
    if unknown := set(data) - {"url", "thresholds"}:
        raise ConfigValueError(f"alerts: unknown field {sorted(unknown)[0]!r}")
    url = data.get("url")
    if url is not None and (not isinstance(url, str) or urlsplit(url).scheme not in
                            ("http", "https") or not urlsplit(url).hostname):
        raise ConfigValueError(f"alerts.url: expected an http(s) URL, got {url!r}")
    thresholds = data.get("thresholds", list(THRESHOLDS))
    if not isinstance(thresholds, list) or not thresholds or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 < t <= 1000
            for t in thresholds):
        raise ConfigValueError("alerts.thresholds: must be a list of percentages (1..1000)")
    return AlertSettings(url, env.get(SECRET_ENV) or None, tuple(sorted(set(thresholds))))


def alert_id(user_id: Any, month: str, monthly_tokens: int, threshold: int) -> str:
    return f"{user_id}:{month}:{monthly_tokens}:{threshold}"


def legacy_alert_id(user_id: Any, month: str, threshold: int) -> str:
    """The id items had before it named the quota: an item of that id for the same quota
    was already outboxed (by a proxy before the upgrade), so it is not sent again."""
    return f"{user_id}:{month}:{threshold}"


def crossed(tokens: int, monthly_tokens: int, thresholds: tuple[int, ...]) -> list[int]:
    """The thresholds (percent) that ``tokens`` of a ``monthly_tokens`` quota reached."""
    if monthly_tokens <= 0:
        return []
    return [t for t in thresholds if tokens * 100 >= monthly_tokens * t]


def alert_body(item: Mapping[str, Any], sent_at: datetime) -> bytes:
    """The JSON posted for an outbox item (see quota_alerts.py)."""
    return json.dumps({
        "id": item["_id"], "type": ALERT_TYPE, "user_id": item["user_id"],
        "month": item["month"], "threshold": item["threshold"], "tokens": item["tokens"],
        "monthly_tokens": item["monthly_tokens"], "plan": item["plan"],
        "created": item["created"].isoformat(), "sent_at": int(sent_at.timestamp()),
    }, separators=(",", ":")).encode()


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
