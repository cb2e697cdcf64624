"""Daily usage rollups (``billing.usage_daily``): per user, UTC day and model, the sums of
the stored completion events; a replayed or duplicate batch never counts twice."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bson import Decimal128, ObjectId
from pymongo import AsyncMongoClient, MongoClient

from conftest import ApiKey, Proxy, openai_client, wait_for_events
from llm_billing.core.rollups import TOKEN_CLASSES
from llm_billing.eventlog import EventLog

MESSAGES = [{"role": "user", "content": "Roll this up."}]


class FixedDatabase:
    """The one method EventLog uses of the Database addon."""

    def __init__(self, uri: str) -> None:
        self._client = AsyncMongoClient(uri, serverSelectionTimeoutMS=300, tz_aware=True)

    async def client(self) -> AsyncMongoClient:
        return self._client


def expected_rollups(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the rollups must hold: the events summed by user, UTC day and model."""
    sums: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "requests": 0, "tokens_billed": 0, "cost": Decimal(0),
        "tokens": dict.fromkeys(TOKEN_CLASSES, 0)})
    for e in events:
        day = e["date_created"].astimezone(UTC).strftime("%Y-%m-%d")
        row = sums[f"{e['user_id']}:{day}:{e['model']}"]
        row["requests"] += 1
        row["tokens_billed"] += e["tokens_billed"]
        row["cost"] += e["cost"].to_decimal()
        for name in TOKEN_CLASSES:
            row["tokens"][name] += e["usage"][name]
    return dict(sums)


def stored_rollups(db: MongoClient, user_ids: list[str]) -> dict[str, dict[str, Any]]:
    return {doc["_id"]: {"requests": doc["requests"], "tokens_billed": doc["tokens_billed"],
                         "cost": doc["cost"].to_decimal(), "tokens": doc["tokens"]}
            for doc in db.billing.usage_daily.find({"user_id": {"$in": user_ids}})}


def event(user_id: str, model: str, when: datetime, prompt: int, completion: int) -> dict:
    usage = dict.fromkeys(TOKEN_CLASSES, 0) | {"prompt_tokens": prompt,
                                               "completion_tokens": completion,
                                               "cache_read_tokens": prompt // 2}
    return {"_id": ObjectId(), "date_created": when, "user_id": user_id,
            "api_key_id": ObjectId(), "model": model, "prompt_n": prompt,
            "completion_n": completion, "usage": usage, "tokens_billed": prompt + completion,
            "cost": Decimal128(Decimal(prompt) / 1000 + Decimal(completion) / 500),
            "currency": "USD"}


def test_a_duplicate_batch_does_not_count_twice(mongo_uri: str, db: MongoClient):
    users = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    today = datetime.now(UTC).replace(hour=23, minute=59)
    yesterday = today - timedelta(days=1)
    batch = [event(user, model, when, 10 + i, 3 + i)
             for i, (user, model, when) in enumerate(
                 (u, m, w) for u in users for m in ("m1", "m2") for w in (today, yesterday)
                 for _ in range(2))]
    later = [event(users[0], "m1", today, 100, 50) for _ in range(2)]

    async def go():
        log = EventLog(FixedDatabase(mongo_uri))
        await log.write(batch[:5])  # a first attempt stored some...
        await log.write(batch)  # ...the retry (or a journal replay) sends them all again
        await log.write(batch)  # a replay of stored events only
        await log.write([*batch[:3], *later])  # new events among stored ones
        return log.written

    assert asyncio.run(go()) == len(batch) + len(later)
    rollups = stored_rollups(db, users)
    assert rollups == expected_rollups(batch + later)
    assert len(rollups) == 8  # 2 users, 2 models, 2 days
    doc = db.billing.usage_daily.find_one({"_id": f"{users[0]}:{today:%Y-%m-%d}:m1"})
    assert doc["user_id"] == users[0] and doc["day"] == f"{today:%Y-%m-%d}"
    assert doc["model"] == "m1" and doc["currency"] == "USD"


def test_rollups_equal_the_events_after_traffic(proxy: Proxy, make_key: Callable[..., ApiKey],
                                               db: MongoClient):
    keys = [make_key() for _ in range(2)]
    for key, models in zip(keys, (("gpt-4o-mini", "o3-mini"), ("gpt-4o-mini",)), strict=True):
        client = openai_client(proxy, key.token)
        for model in models:
            client.chat.completions.create(model=model, messages=MESSAGES)
            list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True))
    events = [e for key, count in zip(keys, (4, 2), strict=True)
              for e in wait_for_events(db, key.user_id, count)]
    assert len(events) == 6
    users = [key.user_id for key in keys]
    expected = expected_rollups(events)
    deadline = time.monotonic() + 10  # written right after their batch
    while (rollups := stored_rollups(db, users)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rollups == expected
    assert len(rollups) == 3
