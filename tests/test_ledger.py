"""The usage ledger against the real database, with races driven deterministically: a
database call is paused at the await that matters while a request runs."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect

from llm_billing.core.dates import month_of
from llm_billing.core.plans import parse_plans
from llm_billing.core.usage import Usage
from llm_billing.storage.ledger import QuotaLedger

PLANS = parse_plans({"capped": {"monthly_tokens": 400, "overage": "blocked"},
                     "metered": {"monthly_tokens": 400, "overage": "0.5"}})
MONTH = month_of(datetime.now(UTC))


class Database:
    def __init__(self, uri: str) -> None:
        self._client = AsyncMongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=2000)

    async def client(self) -> AsyncMongoClient:
        return self._client


class Gate:
    """Pauses the first database call a ledger makes once armed, until opened."""

    def __init__(self) -> None:
        self.armed = False
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def pass_(self) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            await self.opened.wait()


class Usage_:
    """``billing.usage`` seen through a gate and a fault plan: ``faults`` maps a method to
    a function deciding, per call, whether it fails before or after it is applied."""

    def __init__(self, collection, gate: Gate,
                 faults: dict[str, Callable[[dict], str | None]] | None = None) -> None:
        self._collection = collection
        self._gate = gate
        self._faults = faults or {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._collection, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await self._gate.pass_()
            fault = self._faults.get(name, lambda update: None)(args[1] if len(args) > 1
                                                                 else {})
            if fault == "before":
                raise AutoReconnect("injected: not applied")
            result = await method(*args, **kwargs)
            if fault == "after":
                raise AutoReconnect("injected: applied, reply lost")
            return result

        return call


def ledger_for(mongo_uri: str, gate: Gate, faults=None) -> QuotaLedger:
    ledger = QuotaLedger(Database(mongo_uri), f"test-{uuid.uuid4().hex[:8]}")
    client = ledger.database._client

    async def collection():
        return Usage_(client.billing.usage, gate, faults)

    ledger._collection = collection  # type: ignore[method-assign]
    return ledger


def stored(db, user: str) -> dict[str, Any]:
    return db.billing.usage.find_one({"_id": f"{user}:{MONTH}"}) or {}


async def run_request(ledger: QuotaLedger, user: str, plan: str, reserve: int, used: int):
    account = ledger.account(user, MONTH, PLANS[plan])
    assert await ledger.reserve(account, reserve)
    ledger.settle(account, reserve, used, Usage(prompt_tokens=used))


@pytest.mark.parametrize("plan", ["capped", "metered"])
def test_a_request_during_the_flush_of_an_idle_account_is_not_lost(mongo_uri, db, plan):
    """Item 1: the flush awaits its write; meanwhile a request takes the same account; the
    flush must not drop the account the request then settles into."""
    user = f"u-{uuid.uuid4().hex[:10]}"

    async def go():
        gate = Gate()
        ledger = ledger_for(mongo_uri, gate)
        await run_request(ledger, user, plan, 300, 300)
        ledger.accounts[(user, MONTH)].last_used -= 60  # idle: a candidate to drop
        gate.armed = True
        flush = asyncio.create_task(ledger.flush())
        await gate.reached.wait()  # the flush is at its write's await
        account = ledger.account(user, MONTH, PLANS[plan])
        held = await ledger.reserve(account, 100 if plan == "capped" else 180)
        gate.opened.set()
        await flush
        ledger.settle(account, held, 180 if plan == "metered" else 100,
                      Usage(prompt_tokens=180 if plan == "metered" else 100))
        await ledger.close(timeout=5)

    asyncio.run(go())
    doc = stored(db, user)
    if plan == "metered":
        assert doc["tokens"] == 480 and doc["requests"] == 2
        assert doc["overage_tokens"] == 80
    else:
        assert doc["tokens"] == 400 and doc["requests"] == 2


@pytest.mark.parametrize("when", ["before", "after"])
def test_tokens_and_overage_are_one_write(mongo_uri, db, when):
    """Item 2: the write that carries tokens past the quota fails (before it is applied,
    or after, its reply lost): after a retry the tokens AND the overage are there, once."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    db.billing.usage.insert_one({"_id": f"{user}:{MONTH}", "user_id": user, "month": MONTH,
                                 "tokens": 99_000})
    plans = parse_plans(None)
    failures = {"n": 0}

    def once(update: dict) -> str | None:
        if failures["n"] == 0 and "overage_tokens" in str(update) + str(
                update.get("$inc", {})):
            failures["n"] += 1
            return when
        return None

    async def go():
        ledger = ledger_for(mongo_uri, Gate(), faults={"update_one": once,
                                                     "find_one_and_update": once})
        account = ledger.account(user, MONTH, plans["starter"])
        await ledger.reserve(account, 1_500)
        ledger.settle(account, 1_500, 1_500, Usage(prompt_tokens=1_500))
        for _ in range(3):
            with contextlib.suppress(AutoReconnect):
                await ledger.flush()
        await ledger.close(timeout=5)

    asyncio.run(go())
    doc = stored(db, user)
    assert failures["n"] == 1
    assert doc["tokens"] == 100_500 and doc["requests"] == 1
    assert doc["overage_tokens"] == 500
    assert str(doc["overage_cost"]) == "1.000"


def test_one_accounts_failure_does_not_stop_the_others(mongo_uri, db):
    """An account whose write cannot be encoded must not keep every other user's usage
    out of the database."""
    good, bad = f"u-{uuid.uuid4().hex[:10]}", f"u-{uuid.uuid4().hex[:10]}"

    async def go():
        ledger = ledger_for(mongo_uri, Gate())
        plans = parse_plans(None)
        bad_account = ledger.account(bad, MONTH, plans["pro"])
        await ledger.reserve(bad_account, 10)
        ledger.settle(bad_account, 10, 10**30, Usage(prompt_tokens=10))
        account = ledger.account(good, MONTH, plans["pro"])
        await ledger.reserve(account, 10)
        ledger.settle(account, 10, 10, Usage(prompt_tokens=10))
        await ledger.flush()

    asyncio.run(go())
    assert stored(db, good)["tokens"] == 10


def test_usage_equals_the_sum_of_requests_under_any_interleaving(mongo_uri, db):
    """Property: after any interleaving of requests, flushes and failed writes (before or
    after being applied), billing.usage holds exactly what was settled, per user."""
    rng = random.Random(20261130)
    users = [f"u-{uuid.uuid4().hex[:10]}" for _ in range(4)]
    plans = parse_plans({"capped": {"monthly_tokens": 50_000, "overage": "blocked"}})
    expected = {u: 0 for u in users}

    def flaky(update: dict) -> str | None:
        roll = rng.random()
        return "before" if roll < 0.15 else "after" if roll < 0.3 else None

    async def go():
        ledger = ledger_for(mongo_uri, Gate(), faults={
            "update_one": flaky, "find_one_and_update": flaky, "find_one": flaky})

        async def request(user: str, plan: str) -> None:
            account = ledger.account(user, MONTH, plans[plan])
            try:
                held = await ledger.reserve(account, 200)
            except AutoReconnect:
                ledger.release(account)
                return
            if not held:
                ledger.release(account)
                return
            await asyncio.sleep(0)
            used = rng.randrange(0, held + 1)
            ledger.settle(account, held, used, Usage(prompt_tokens=used))
            expected[user] += used

        async def flusher() -> None:
            for _ in range(40):
                for account in ledger.accounts.values():
                    if rng.random() < 0.3:
                        account.last_used -= 60  # idle now and then
                with contextlib.suppress(AutoReconnect):
                    await ledger.flush()
                await asyncio.sleep(0)

        tasks = [request(rng.choice(users), rng.choice(["capped", "starter", "pro"]))
                 for _ in range(300)]
        await asyncio.gather(flusher(), *tasks)
        for _ in range(30):  # until every write got through the faults
            with contextlib.suppress(AutoReconnect):
                await ledger.flush()
        assert all(not a.unflushed and a.pending is None for a in ledger.accounts.values())

    asyncio.run(go())
    for user in users:
        assert stored(db, user).get("tokens", 0) == expected[user], user


def test_an_account_dropped_and_taken_again_keeps_counting(mongo_uri, db):
    """Write numbers grow across an instance's accounts: a user whose idle account was
    dropped and who comes back gets a write the database has not seen, not 'applied'."""
    user = f"u-{uuid.uuid4().hex[:10]}"

    async def go():
        ledger = ledger_for(mongo_uri, Gate())
        for used in (120, 80):
            await run_request(ledger, user, "metered", used, used)
            await ledger.flush()
            ledger.accounts[(user, MONTH)].last_used -= 60
            await ledger.flush()
            assert (user, MONTH) not in ledger.accounts  # dropped while idle
        assert ledger.applied_below() == 3

    asyncio.run(go())
    assert stored(db, user)["tokens"] == 200


def test_recovery_counts_what_a_stopped_instance_never_wrote_once(mongo_uri, db):
    user = f"u-{uuid.uuid4().hex[:10]}"
    key, dead = f"{user}:{MONTH}", uuid.uuid4().hex[:12]
    db.billing.usage.insert_one({"_id": key, "user_id": user, "month": MONTH, "tokens": 390,
                                 "writes": {dead: 3}, "leases": {dead: {"amount": 50}}})

    def event(tokens: int, write: int | None) -> dict:
        ledger = {"usage": key, "instance": dead} | ({} if write is None else {"write": write})
        return {"user_id": user, "plan_id": "metered", "tokens_billed": tokens,
                "usage": {"prompt_tokens": tokens}, "ledger": ledger}

    events = [event(40, 3),  # in write 3: applied before the stop
              event(30, 4),  # settled, its write never made
              event(5, None)]  # admitted, never finished: its estimate

    async def go():
        ledger = ledger_for(mongo_uri, Gate())
        await ledger.recover(dead, events, PLANS)
        await ledger.recover(dead, events, PLANS)  # a second replay changes nothing

    asyncio.run(go())
    doc = stored(db, user)
    assert doc["tokens"] == 390 + 35 and doc["requests"] == 2
    assert doc["usage"]["prompt_tokens"] == 35
    assert doc["overage_tokens"] == 25  # past the 400 of "metered"
    assert dead in doc["recovered"] and dead not in doc.get("leases", {})


def test_a_segment_is_kept_until_its_usage_is_written(tmp_path):
    from llm_billing.storage.journal import Journal

    applied_below = {"n": 1}
    journal = Journal(tmp_path, segment_events=2, usage_applied_below=lambda: applied_below["n"])
    first = journal.append("events_completion", {"_id": 1}, usage_write=1)
    journal.append("events_completion", {"_id": 2}, usage_write=2)
    assert first is not None and first.closed
    journal.stored(first)
    journal.stored(first)
    journal.collect()
    assert first.path.exists()  # stored, but write 2 is not applied: a crash must see it
    applied_below["n"] = 3
    journal.collect()
    assert not first.path.exists()
