"""Database indexes: the proxy creates the ones its and the portal's queries need, in the
background at startup (pymongo reads them over the wire), and retries what failed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pymongo import MongoClient
from pymongo.errors import AutoReconnect, OperationFailure

from conftest import Proxy
from llm_billing.storage import indexes
from llm_billing.storage.indexes import INDEXES, Index

EXPECTED = {
    ("cgc", "api_keys"): [("secret", 1)],
    ("billing", "usage_daily"): [("user_id", 1), ("day", 1)],
    ("billing", "events_completion"): [("user_id", 1), ("date_created", -1)],
    ("billing", "stripe_outbox"): [("status", 1), ("next_attempt", 1)],
    ("billing", "alert_outbox"): [("status", 1), ("next_attempt", 1)],
}


def index_keys(db: MongoClient, database: str, collection: str) -> list[list[tuple[str, int]]]:
    info = db[database][collection].index_information()
    return [[(name, int(direction)) for name, direction in spec["key"]]
            for spec in info.values()]


def test_proxy_creates_the_indexes_at_startup(proxy: Proxy, db: MongoClient):
    deadline = time.monotonic() + 30  # a background task: wait until it has run
    while True:
        missing = [(where, keys) for where, keys in EXPECTED.items()
                   if keys not in index_keys(db, *where)]
        if not missing:
            break
        assert time.monotonic() < deadline, missing
        time.sleep(0.1)
    for index in INDEXES:  # every one the module lists
        assert list(index.keys) in index_keys(db, index.database, index.collection), index
    assert "Database indexes:" not in proxy.log  # no failure was logged


class FlakyCollection:
    def __init__(self, failures: list[BaseException], documents: int = 0) -> None:
        self.failures = failures
        self.documents = documents
        self.created: list[list[tuple[str, int]]] = []

    async def index_information(self) -> dict[str, Any]:
        return {"_id_": {"key": [("_id", 1)]}}

    async def estimated_document_count(self) -> int:
        return self.documents

    async def create_index(self, keys: list[tuple[str, int]]) -> str:
        if self.failures:
            raise self.failures.pop(0)
        self.created.append(keys)
        return "_".join(f"{k}_{d}" for k, d in keys)


class FakeClient:
    def __init__(self, collection: FlakyCollection) -> None:
        self.collection = collection

    def __getitem__(self, name: str) -> Any:
        return {"usage_daily": self.collection, "other": self.collection}


def test_a_failed_index_is_retried_after_a_pause(caplog):
    collection = FlakyCollection([AutoReconnect("down"), AutoReconnect("still down")])
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    wanted = (Index("billing", "usage_daily", (("user_id", 1), ("day", 1)), "test"),)
    asyncio.run(indexes.ensure(FakeClient(collection), wanted, sleep,  # type: ignore[arg-type]
                               embedded=False))
    assert collection.created == [[("user_id", 1), ("day", 1)]]
    assert pauses == [indexes.FIRST_RETRY, indexes.FIRST_RETRY * 2]
    assert "retrying in 5s" in caplog.text


def test_an_index_made_by_hand_with_other_options_is_kept(caplog):
    conflict = OperationFailure("Index already exists with a different name", code=85)
    collection = FlakyCollection([conflict])

    async def sleep(seconds: float) -> None:
        raise AssertionError("a conflict is not retried")

    wanted = (Index("billing", "usage_daily", (("day", 1),), "test"),
              Index("billing", "other", (("user_id", 1),), "test"))
    asyncio.run(indexes.ensure(FakeClient(collection), wanted, sleep,  # type: ignore[arg-type]
                               embedded=False))
    assert collection.created == [[("user_id", 1)]]
    assert "exists already (85)" in caplog.text


def test_the_embedded_database_indexes_only_small_collections(caplog):
    async def sleep(seconds: float) -> None:
        raise AssertionError("a skipped index is not retried")

    wanted = (Index("billing", "usage_daily", (("day", 1),), "test"),)
    big = FlakyCollection([], documents=indexes.EMBEDDED_BUILD_LIMIT + 1)
    asyncio.run(indexes.ensure(FakeClient(big), wanted, sleep, embedded=True))  # type: ignore[arg-type]
    assert big.created == []
    assert "would stop answering while it indexes 5001 documents" in caplog.text
    asyncio.run(indexes.ensure(FakeClient(big), wanted, sleep,  # type: ignore[arg-type]
                               embedded=False))
    assert big.created == [[("day", 1)]]  # a real MongoDB builds without stopping
    small = FlakyCollection([], documents=indexes.EMBEDDED_BUILD_LIMIT)
    asyncio.run(indexes.ensure(FakeClient(small), wanted, sleep, embedded=True))  # type: ignore[arg-type]
    assert small.created == [[("day", 1)]]
