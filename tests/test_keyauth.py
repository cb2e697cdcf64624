"""Key lookups: seed 002's query over the wire, cached so the hot path rarely queries;
unknown keys neither evict valid ones nor cost more than a rate per client address."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from mitmproxy.test import taddons, tflow, tutils
from pymongo import AsyncMongoClient, monitoring

from llm_billing import context
from llm_billing.core.client_limit import ClientRate, client_network
from llm_billing.core.config import parse_config
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


# --- Unknown keys: evictions and a rate per client address, with a fake database -----------

class FakeKeys:
    """``cgc.api_keys`` holding the given tokens; counts every query."""

    def __init__(self, *tokens: str) -> None:
        self.docs = {token_hash(t): {"_id": t, "user_id": f"u-{t}", "secret": token_hash(t),
                                     "date_expiry": None} for t in tokens}
        self.queries = 0

    async def find_one(self, query: dict[str, Any], projection: Any = None) -> Any:
        self.queries += 1
        return self.docs.get(query["secret"])


class FakeDatabase:
    def __init__(self, *tokens: str) -> None:
        self.keys = FakeKeys(*tokens)

    async def client(self) -> Any:
        return type("Client", (), {"cgc": type("Db", (), {"api_keys": self.keys})})()


def test_a_spray_of_unknown_keys_does_not_evict_a_valid_key():
    database = FakeDatabase("valid")
    auth = KeyAuth(database, Settings(), max_keys=10, max_unknown_keys=5)  # type: ignore

    async def go():
        with taddons.context(auth):
            assert await auth.lookup(token_hash("valid")) is not None
            for i in range(10 + 7):  # max_keys + k unknown keys
                assert await auth.lookup(token_hash(f"unknown-{i}")) is None
            queries = database.keys.queries
            assert await auth.lookup(token_hash("valid")) is not None
            assert database.keys.queries == queries  # a cache hit

    asyncio.run(go())


def settings_with_routes() -> Settings:
    settings = Settings()
    settings.config = parse_config(
        '[[backends]]\nname = "b"\nurl = "http://127.0.0.1:9"\nmodels = ["m"]\n', {})
    return settings


def chat_flow(token: str, address: str) -> Any:
    flow = tflow.tflow(req=tutils.treq(path=b"/v1/chat/completions", headers=(
        (b"authorization", f"Bearer {token}".encode()),)))
    flow.client_conn.peername = (address, 50_000)
    return flow


def test_unknown_key_lookups_are_rate_limited_per_client_address():
    database = FakeDatabase("valid", "cold-valid", "other-valid")
    auth = KeyAuth(database, settings_with_routes())  # type: ignore

    async def request(token: str, address: str):
        flow = chat_flow(token, address)
        await auth.requestheaders(flow)
        return flow

    async def go():
        with taddons.context(auth) as tctx:
            tctx.configure(auth, unknown_key_lookups_per_minute=3)
            assert context.of(await request("valid", "10.0.0.1")) is not None
            for i in range(3):  # the budget: three queries for unknown keys
                assert (await request(f"bad-{i}", "10.0.0.1")).response.status_code == 401
            assert database.keys.queries == 4
            refused = await request("bad-3", "10.0.0.1")
            assert refused.response.status_code == 429
            assert 1 <= int(refused.response.headers["retry-after"]) <= 20  # 3 a minute
            assert b"unknown API keys" in refused.response.content
            assert (await request("bad-0", "10.0.0.1")).response.status_code == 401  # cached
            assert context.of(await request("valid", "10.0.0.1")) is not None  # cached
            assert database.keys.queries == 4  # none of these queried
            assert (await request("cold-valid", "10.0.0.1")).response.status_code == 429
            # other addresses are not affected, and valid keys do not use up the budget
            for _ in range(2):
                assert context.of(await request("other-valid", "10.0.0.2")) is not None
            for i in range(3):
                assert (await request(f"bad-{i + 10}", "10.0.0.2")).response.status_code \
                    == 401
            assert context.of(await request("cold-valid", "10.0.0.3")) is not None
            tctx.configure(auth, unknown_key_lookups_per_minute=0)  # no limit
            assert (await request("bad-20", "10.0.0.1")).response.status_code == 401

    asyncio.run(go())


@pytest.mark.parametrize(("address", "network"), [
    ("10.1.2.3", "10.1.2.3"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("not-an-address", "not-an-address"),
])
def test_clients_are_limited_by_address_or_ipv6_64(address: str, network: str):
    assert client_network(address) == network


def test_client_rate_refills_gives_back_and_forgets_the_least_recent_client():
    rate = ClientRate(per_minute=2, max_clients=2)
    assert rate.take("a", 0.0) == 0 and rate.take("a", 0.0) == 0
    assert rate.take("a", 0.0) == pytest.approx(30.0)  # one more in 60/2 seconds
    rate.give_back("a", 1.0)
    assert rate.take("a", 1.0) == 0
    assert rate.take("a", 31.0) == 0  # refilled
    rate.take("b", 31.0)
    rate.take("c", 31.0)  # a third client: "a" is forgotten
    assert rate.take("a", 31.0) == 0 and rate.take("a", 31.0) == 0
