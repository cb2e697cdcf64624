"""The usage page: a month's tokens per day and per model, as charts, a table and CSV.

Reads the daily rollups (``billing.usage_daily``: one document per user, UTC day and
model) when the month has any; otherwise it aggregates ``billing.events_completion`` for
the month (a ``$match`` on user and date, then ``$group`` by day and model) — a scan of
the month's events, acceptable until the rollups cover every month shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bson import Decimal128
from pymongo import AsyncMongoClient
from starlette.requests import Request
from starlette.responses import Response

from ...core.dates import month_of
from ...settings import Settings
from ...storage.database import Database
from .admin import BATCH, csv_response, own_user
from .charts import horizontal_bars, stacked_bars
from .render import render
from .session import requires

CLASSES = ("prompt_tokens", "completion_tokens", "cache_read_tokens", "cache_write_tokens")
SHOWN = {"prompt_tokens": "prompt", "completion_tokens": "completion",
         "cache_read_tokens": "cache read", "cache_write_tokens": "cache write"}
MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


@dataclass
class Row:
    day: str
    model: str
    requests: int = 0
    tokens: int = 0  # billed
    classes: dict[str, int] = field(default_factory=dict)
    cost: Decimal = Decimal(0)


def month_bounds(month: str) -> tuple[datetime, datetime]:
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    return start, (start + timedelta(days=32)).replace(day=1)


def days_of(month: str, now: datetime) -> list[str]:
    start, end = month_bounds(month)
    last = min(end, now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1))
    if last <= start:
        last = end
    return [(start + timedelta(days=i)).strftime("%Y-%m-%d")
            for i in range((last - start).days)]


def number(value: Any) -> Any:
    if isinstance(value, Decimal128):
        return value.to_decimal()
    return value if isinstance(value, int | float | Decimal) and not isinstance(value, bool) \
        else 0


async def usage_rows(client: AsyncMongoClient, user: str | None,
                     month: str) -> tuple[list[Row], str]:
    """The month's rows (day and model) and where they came from."""
    rollups = client.billing.usage_daily
    query: dict[str, Any] = {"day": {"$gte": f"{month}-01", "$lte": f"{month}-31"}}
    if user is not None:
        query["user_id"] = user
    rows: dict[tuple[str, str], Row] = {}
    async for doc in rollups.find(query).batch_size(BATCH):  # everyone's: many batches
        row = rows.setdefault((doc["day"], str(doc.get("model"))),
                              Row(doc["day"], str(doc.get("model"))))
        tokens = doc.get("tokens") or doc.get("usage") or {}
        row.requests += int(number(doc.get("requests")))
        row.tokens += int(number(doc.get("tokens_billed")))
        for name in CLASSES:
            row.classes[name] = row.classes.get(name, 0) + int(number(tokens.get(name)))
        row.cost += Decimal(number(doc.get("cost")))
    if rows:
        return sorted(rows.values(), key=lambda r: (r.day, r.model)), "daily rollups"
    start, end = month_bounds(month)
    match: dict[str, Any] = {"date_created": {"$gte": start, "$lt": end}}
    if user is not None:
        match["user_id"] = user
    group: dict[str, Any] = {
        "_id": {"day": {"$dateToString": {"format": "%Y-%m-%d", "date": "$date_created"}},
                "model": "$model"},
        "requests": {"$sum": 1}, "tokens": {"$sum": "$tokens_billed"},
        "cost": {"$sum": "$cost"},
        **{name: {"$sum": f"$usage.{name}"} for name in CLASSES}}
    cursor = await client.billing.events_completion.aggregate([{"$match": match},
                                                              {"$group": group}])
    result = []
    async for doc in cursor:
        result.append(Row(doc["_id"]["day"], str(doc["_id"]["model"]),
                          int(number(doc["requests"])), int(number(doc["tokens"])),
                          {name: int(number(doc.get(name))) for name in CLASSES},
                          Decimal(number(doc.get("cost")))))
    return sorted(result, key=lambda r: (r.day, r.model)), "completion events"


class UsagePages:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings

    @requires()
    async def usage(self, request: Request) -> Response:
        now = datetime.now(UTC)
        month = request.query_params.get("month", "")
        if not MONTH.fullmatch(month):
            month = month_of(now)
        user = own_user(request, request.query_params.get("user"))
        client = await self.database.client()
        rows, source = await usage_rows(client, user, month)
        if request.query_params.get("format") == "csv":
            return csv_response(f"usage-{month}.csv", [
                "day", "model", "requests", "tokens_billed", *CLASSES, "cost"],
                [[r.day, r.model, r.requests, r.tokens, *(r.classes.get(c, 0) for c in CLASSES),
                  r.cost] for r in rows])
        days = days_of(month, now)
        per_day = {SHOWN[c]: [0] * len(days) for c in CLASSES}
        index = {d: i for i, d in enumerate(days)}
        per_model: dict[str, int] = {}
        for r in rows:
            if (i := index.get(r.day)) is not None:
                for c in CLASSES:
                    per_day[SHOWN[c]][i] += r.classes.get(c, 0)
            per_model[r.model] = per_model.get(r.model, 0) + r.tokens
        totals = Row("total", "", sum(r.requests for r in rows), sum(r.tokens for r in rows),
                     {c: sum(r.classes.get(c, 0) for r in rows) for c in CLASSES},
                     sum((r.cost for r in rows), Decimal(0)))
        return render(
            request, "usage.html", month=month, user=user or "", rows=rows, totals=totals,
            source=source, classes=CLASSES, shown=SHOWN,
            day_chart=stacked_bars(f"Tokens per day, {month}", days, per_day, "chart-days"),
            model_chart=horizontal_bars("Tokens billed per model", list(per_model.items()),
                                        "chart-models"))
