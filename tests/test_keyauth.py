"""Key lookups: seed 002's query over the wire, cached so the hot path rarely queries."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta

from mitmproxy.test import taddons
from pymongo import AsyncMongoClient, monitoring

from llm_billing.keyauth import KeyAuth, token_hash
from llm_billing.settings import Settings


class FindCounter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.finds = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command.get("find") == "api_keys":
            self.finds += 1

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


class CountingDatabase:
    def __init__(self, uri: str) -> None:
        self.counter = FindCounter()
        self._client = AsyncMongoClient(uri, tz_aware=True, event_listeners=[self.counter])

    async def client(self) -> AsyncMongoClient:
        return self._client


def insert_key(db, **fields) -> str:
    token = uuid.uuid4().hex
    db.cgc.api_keys.insert_one({"secret": hashlib.sha256(token.encode()).hexdigest(),
                                "access_level": "COMPLETION", "date_expiry": None,
                                "user_id": f"u-{token[:8]}", **fields})
    return token


def test_cache_single_flight_stale_refresh_and_revocation(mongo_uri: str, db):
    token = insert_key(db)
    unknown = token_hash("unknown-" + uuid.uuid4().hex)

    async def go():
        database = CountingDatabase(mongo_uri)
        auth = KeyAuth(database, Settings())
        with taddons.context(auth) as tctx:
            tctx.configure(auth, key_cache_ttl=1, key_cache_negative_ttl=60)
            callers = await asyncio.gather(*(auth.lookup(token_hash(token)) for _ in range(20)))
            assert {c.user_id for c in callers} == {f"u-{token[:8]}"}
            assert database.counter.finds == 1  # twenty concurrent requests, one query
            for _ in range(50):
                assert await auth.lookup(token_hash(token)) is not None
            assert await auth.lookup(unknown) is None
            assert await auth.lookup(unknown) is None
            assert database.counter.finds == 2  # cached hits and a cached miss
            db.cgc.api_keys.delete_one({"secret": token_hash(token)})  # revoked
            await asyncio.sleep(1.05)
            assert await auth.lookup(token_hash(token)) is not None  # stale, refreshing
            await asyncio.sleep(0.2)
            assert database.counter.finds == 3
            assert await auth.lookup(token_hash(token)) is None  # the refresh saw it gone

    asyncio.run(go())


def test_cached_key_still_expires_on_time(mongo_uri: str, db):
    token = insert_key(db, date_expiry=datetime.now(UTC) + timedelta(seconds=1))

    async def go():
        auth = KeyAuth(CountingDatabase(mongo_uri), Settings())
        with taddons.context(auth) as tctx:
            tctx.configure(auth, key_cache_ttl=3600)
            assert await auth.lookup(token_hash(token)) is not None
            await asyncio.sleep(1.1)
            assert await auth.lookup(token_hash(token)) is None

    asyncio.run(go())


def test_key_without_user_id_is_refused(mongo_uri: str, db):
    token = uuid.uuid4().hex
    db.cgc.api_keys.insert_one({"secret": token_hash(token), "access_level": "COMPLETION",
                                "date_expiry": None})

    async def go():
        auth = KeyAuth(CountingDatabase(mongo_uri), Settings())
        with taddons.context(auth):
            return await auth.lookup(token_hash(token))

    assert asyncio.run(go()) is None
