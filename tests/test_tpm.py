"""Tokens per minute across instances (storage/tpm.py, issue 12 goal 4): leases of one
shared bucket per user. Races are driven by holding a database call at its await."""

from __future__ import annotations

import asyncio
import heapq
import math
import time
import uuid
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from test_ledger import Gate
from test_review_issue9 import Database, limits_for, request_flow, run_limits

from llm_billing.api_info import ApiInfo
from llm_billing.limits import Hold
from llm_billing.storage import tpm as tpm_module
from llm_billing.storage.tpm import TpmAccount, TpmLeases


class Tpm:
    """``billing.tpm`` through a gate, counting the calls made."""

    def __init__(self, collection, gate: Gate) -> None:
        self._collection = collection
        self._gate = gate
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._collection, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            await self._gate.pass_()
            return await method(*args, **kwargs)

        return call


class Clock:
    """tpm.py's wall clock and its sleeps, moved on by the test: a minute of refill takes
    no time, and a sleeper wakes exactly when the clock passes its deadline."""

    def __init__(self) -> None:
        self.now = time.time()
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []

    monotonic = staticmethod(time.monotonic)  # idleness stays real: nobody is idle here

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, id(future), future))
        await future

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while self._sleepers and self._sleepers[0][0] <= self.now:
            heapq.heappop(self._sleepers)[2].set_result(None)

    def sleeping(self) -> int:
        return sum(not future.done() for *_, future in self._sleepers)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(tpm_module, "time", clock)
    monkeypatch.setattr(tpm_module, "sleep", clock.sleep, raising=False)
    return clock


async def background_done(clock: Clock, *accounts: TpmAccount) -> None:
    """Until every background top-up of ``accounts`` has finished or sleeps on the clock
    (waits for real database replies: a condition, not a guess)."""
    async def quiet() -> None:
        while any(getattr(a, "topping", None) is not None for a in accounts) \
                and clock.sleeping() < sum(getattr(a, "topping", None) is not None
                                           for a in accounts):
            await asyncio.sleep(0.001)
    await asyncio.wait_for(quiet(), 5)


async def acquire_counted(leases: TpmLeases, account: TpmAccount, tokens: int) -> \
        tuple[bool, bool]:
    """``acquire`` run eagerly: (admitted, whether it waited — for the database or for a
    lease another task is taking — instead of finishing in memory)."""
    task = asyncio.eager_task_factory(asyncio.get_running_loop(),
                                      leases.acquire(account, tokens))
    waited = not task.done()
    return await task, waited


def leases_for(mongo_uri: str) -> tuple[TpmLeases, Tpm, Gate]:
    """An instance's leases, its database calls gated and counted."""
    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    leases, gate = TpmLeases(Database(mongo_uri)), Gate()
    tpm = Tpm(client.billing.tpm, gate)

    async def collection() -> Tpm:
        return tpm

    leases._collection = collection  # type: ignore[method-assign]
    return leases, tpm, gate


def level(db, account: TpmAccount) -> float:
    """The shared bucket's level now, read from the database."""
    doc = db.billing.tpm.find_one({"_id": account.key})
    return account.capacity - max(0.0, doc["full_at"] - time.time()) / account.per_token


def level_at(db, account: TpmAccount, now: float) -> float:
    """The shared bucket's level at ``now`` (the test's clock), read from the database."""
    doc = db.billing.tpm.find_one({"_id": account.key})
    return account.capacity - max(0.0, doc["full_at"] - now) / account.per_token


def refilled(started: float, capacity: int) -> float:
    """The most a bucket has refilled since ``started``."""
    return (time.time() - started) * capacity / 60 + 1


def test_two_instances_never_lease_more_than_the_bucket_holds(mongo_uri, db):
    """Both see a full bucket (1,000) and ask for 600 at once: the first one's update is
    held at its await while the other's is applied; when it lands, its condition sees
    what is left (400), so it grants nothing. Then the 400 left go to the first."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    (first, _, gate), (second, _, _) = leases_for(mongo_uri), leases_for(mongo_uri)

    async def go() -> tuple[bool, bool, bool, bool]:
        a, b = first.account(user, 1000), second.account(user, 1000)
        gate.armed = True
        held = asyncio.create_task(first.acquire(a, 600))
        await gate.reached.wait()  # first: at its grant's await, the bucket seen full
        taken = await second.acquire(b, 600)
        gate.opened.set()
        refused = await held
        rest = await first.acquire(a, 400)
        more = await second.acquire(b, 50)  # 3 s of refill
        return taken, refused, rest, more

    started = time.time()
    taken, refused, rest, more = asyncio.run(go())
    assert taken and not refused and rest and not more
    account = first.accounts[(user, 1000)]
    assert account.lease == 0 and second.accounts[(user, 1000)].lease == 0
    assert level(db, account) <= refilled(started, 1000)  # all of it leased


def test_requests_are_admitted_from_the_lease_in_memory(mongo_uri, db):
    """One database call takes a slice (a tenth of 100,000); the next requests that fit
    in it make none. What a request did not use goes back to the lease; the lease goes
    back to the bucket when the user is idle."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    leases, tpm, _ = leases_for(mongo_uri)

    async def go() -> TpmAccount:
        account = leases.account(user, 100_000)
        assert await leases.acquire(account, 500)
        calls = tpm.calls
        for _ in range(19):
            assert await leases.acquire(account, 500)
        assert tpm.calls == calls  # the hot path: no database round trip
        assert account.lease == 0 and account.holds == 20
        for _ in range(20):
            leases.settle(account, 100 - 500)  # each used 100 of its 500
        assert account.lease == 20 * 400 and account.holds == 0
        account.last_used = -math.inf  # idle
        await leases.flush()
        return account

    started = time.time()
    account = asyncio.run(go())
    assert 98_000 - 1 <= level(db, account) <= 98_000 + refilled(started, 100_000)
    assert (user, 100_000) not in leases.accounts  # nothing of it left here


def test_concurrent_requests_of_one_instance_share_one_lease(mongo_uri):
    """Five concurrent requests of 300 on a 1,000 bucket while the first one's lease is
    held at its await: they wait for it on the account's lock and take from it in
    memory or take the next slice; three pass, and the other two are refused without a
    database call (the bucket as last seen, plus its refill, cannot cover them)."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    leases, tpm, gate = leases_for(mongo_uri)

    async def go() -> list[bool]:
        account = leases.account(user, 1000)
        gate.armed = True
        tasks = [asyncio.create_task(leases.acquire(account, 300)) for _ in range(5)]
        await gate.reached.wait()
        for _ in range(20):
            await asyncio.sleep(0)
        gate.opened.set()
        return await asyncio.gather(*tasks)

    admitted = asyncio.run(go())
    assert admitted == [True, True, True, False, False]
    assert tpm.calls == 3  # one a slice; none after (the top-up waits for the refill)
    account = leases.accounts[(user, 1000)]
    assert account.lease == 0 and 0 < account.wait_for(300, time.time()) <= 18


def test_a_debt_is_charged_to_the_bucket_before_the_next_lease(mongo_uri, db):
    """A request that used more than it took leaves the lease in debt: the bucket is
    charged for it, so another instance sees it too."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    (first, _, _), (second, _, _) = leases_for(mongo_uri), leases_for(mongo_uri)

    async def go() -> tuple[bool, bool]:
        a, b = first.account(user, 1000), second.account(user, 1000)
        assert await first.acquire(a, 100)
        first.settle(a, 900 - 100)  # used 900
        assert a.lease == -800
        charged = await first.acquire(a, 100)  # 800 + 100 of 1,000
        return charged, await second.acquire(b, 200)

    charged, other = asyncio.run(go())
    assert charged and not other


def test_a_hand_back_in_flight_does_not_lend_the_lease_twice(mongo_uri, db):
    """The idle hand-back is held at its await; a request arriving meanwhile must not
    take from the lease being handed back (it takes a new slice, and one more is kept
    ahead in the background)."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    leases, _, gate = leases_for(mongo_uri)

    async def go() -> TpmAccount:
        account = leases.account(user, 1000)
        assert await leases.acquire(account, 100)
        leases.settle(account, -100)  # used nothing: the lease holds 100 again
        account.last_used = -math.inf
        gate.armed = True
        flush = asyncio.create_task(leases.flush())
        await gate.reached.wait()
        assert account.lease == 0  # out of memory before the write
        assert await leases.acquire(account, 100)
        gate.opened.set()
        await flush
        if account.topping is not None:  # the next slice, taken ahead
            await account.topping
        return account

    started = time.time()
    account = asyncio.run(go())
    assert account.lease == 100  # the slice kept ahead
    assert 800 - 1 <= level(db, account) <= 800 + refilled(started, 1000)  # two slices out
    assert leases.accounts[(user, 1000)] is account  # in use: kept


def test_a_second_instance_refuses_what_the_first_took(mongo_uri):
    """Free (1,000 TPM): one Limits admits two requests of 400; another Limits on the same
    database (another worker) refuses the next 400 with a retryable 429 and the TPM
    headers, though its own bucket is full. Settled usage below the hold goes back."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    first, second = limits_for(mongo_uri), limits_for(mongo_uri)
    body = {"model": "m", "messages": [], "max_tokens": 400}

    async def go() -> list:
        flows = []
        for limits in (first, first, second):
            flow, rc = request_flow(limits, body, plan="free", user=user)
            await run_limits(limits, flow)
            flows.append((flow, rc))
        return flows

    flows = asyncio.run(go())
    assert [flow.response for flow, _ in flows[:2]] == [None, None]
    refused = flows[2][0].response
    assert refused is not None and refused.status_code == 429
    assert "x-should-retry" not in refused.headers
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 400
    hold = flows[0][1].hold
    assert isinstance(hold, Hold) and hold.tpm is not None and hold.tpm.holds == 2


def test_a_steady_load_is_admitted_without_waiting_for_the_database(mongo_uri, db, clock):
    """Free (1,000 TPM), a 400-token request every 24 s — exactly the refill — for 10
    minutes: only the first request waits for the database (a first lease); every later
    one finds its tokens already leased, taken in the background once the bucket had
    refilled. And never more than the bucket allows."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    leases, _, _ = leases_for(mongo_uri)

    async def go() -> list[bool]:
        account = leases.account(user, 1000)
        waits = []
        for _ in range(25):
            await background_done(clock, account)
            admitted, waited = await acquire_counted(leases, account, 400)
            assert admitted
            waits.append(waited)
            leases.settle(account, 0)  # used all it took
            clock.advance(24)
        return waits

    started = clock.now
    waits = asyncio.run(go())
    print(f"requests that waited for the database: {sum(waits)} of {len(waits)}")
    assert waits == [True] + [False] * 24
    account = leases.accounts[(user, 1000)]
    leased = 25 * 400 + account.lease  # admitted, and kept ahead
    assert leased <= 1000 + (clock.now - started) * 1000 / 60  # the bucket and its refill
    assert level_at(db, account, clock.now) >= 0


def test_two_instances_sharing_a_steady_load_do_not_wait_either(mongo_uri, db, clock):
    """The same load alternating between two instances (each sees every other request):
    each waits once, for its first lease; then both admit from leases kept topped up."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    (first, _, _), (second, _, _) = leases_for(mongo_uri), leases_for(mongo_uri)

    async def go() -> list[bool]:
        a, b = first.account(user, 1000), second.account(user, 1000)
        waits = []
        for i in range(24):
            await background_done(clock, a, b)
            leases, account = (first, a) if i % 2 == 0 else (second, b)
            admitted, waited = await acquire_counted(leases, account, 400)
            assert admitted
            waits.append(waited)
            leases.settle(account, 0)
            clock.advance(24)
        return waits

    waits = asyncio.run(go())
    assert waits == [True, True] + [False] * 22


def test_usage_shows_the_tpm_left_across_instances(mongo_uri):
    """/v1/usage on another instance (another worker) than the one that admitted two
    requests of 400 (Free, 1,000 TPM) shows what the shared bucket has left, not its own
    full bucket."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    first, second = limits_for(mongo_uri), limits_for(mongo_uri)
    body = {"model": "m", "messages": [], "max_tokens": 400}

    async def go() -> tuple[dict, dict]:
        for _ in range(2):
            flow, _ = request_flow(first, body, plan="free", user=user)
            await run_limits(first, flow)
            assert flow.response is None
        shown = []
        for limits in (second, first):
            _, rc = request_flow(limits, body, plan="free", user=user)
            info = ApiInfo(limits.ledger.database, limits.settings, limits)
            shown.append((await info.usage(rc))["tpm"])
        return shown[0], shown[1]

    started = time.time()
    elsewhere, here = asyncio.run(go())
    most = 200 + refilled(started, 1000)
    assert elsewhere["limit"] == 1000 and 0 <= elsewhere["remaining"] <= most
    assert 0 <= here["remaining"] <= most
    assert elsewhere["reset"] != "0s"
