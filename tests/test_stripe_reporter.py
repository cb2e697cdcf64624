"""Overage meter events carry the time the usage happened, and a month's last overage is
sent right after it ends: the reporter against the real database and the real stripe
library talking to the Stripe double, with time driven by a fake clock (no real waits).

Each test uses its own database in place of ``billing``, so no other test's overage is
reported here (nor this one's there)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy.test import taddons
from pymongo import AsyncMongoClient
from stripe_double import StripeDouble

from llm_billing.core.dates import within_month
from llm_billing.core.plans import parse_plans
from llm_billing.core.stripe_rules import parse_stripe
from llm_billing.core.usage import Usage
from llm_billing.storage.ledger import QuotaLedger
from llm_billing.stripe_reporter import StripeReporter, meter_timestamp

PLANS = parse_plans({"metered": {"monthly_tokens": 400, "overage": "0.5"}})
OCTOBER_LAST_SECOND = datetime(2026, 10, 31, 23, 59, 59, 400_000, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)


class Billing:
    """The ``Database`` addon's interface, its ``billing`` database being a fresh one."""

    def __init__(self, uri: str) -> None:
        self.name = f"billing_reporter_{uuid.uuid4().hex[:10]}"
        self._client = AsyncMongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=2000)

    async def client(self) -> SimpleNamespace:
        return SimpleNamespace(billing=self._client[self.name])

    async def close(self) -> None:
        await self._client.drop_database(self.name)
        await self._client.close()


class FakeTime:
    """The reporter's clock and sleep. Sleeping moves the clock on at once, running what
    was scheduled on the way; past ``stop`` it sets ``stopped`` and sleeps for good."""

    def __init__(self, now: datetime, stop: datetime | None = None) -> None:
        self.now = now
        self.stop = stop
        self.stopped = asyncio.Event()
        self.scheduled: list[tuple[datetime, Callable[[], Awaitable[None]]]] = []
        self.rounds: list[datetime] = []  # when each sleep ended: a round starts

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + timedelta(seconds=seconds)
        for at, action in sorted(self.scheduled, key=lambda entry: entry[0]):
            if at <= until and (at, action) in self.scheduled:
                self.scheduled.remove((at, action))
                self.now = max(self.now, at)
                await action()
        if self.stop is not None and until > self.stop:
            self.now = self.stop
            self.stopped.set()
            await asyncio.Future()  # until cancelled
        self.now = until
        self.rounds.append(until)


def reporter_for(billing: Billing, double: StripeDouble, time: FakeTime) -> StripeReporter:
    stripe = parse_stripe({"api_base": double.url}, {"STRIPE_SECRET_KEY": "sk_test_" + "r" * 24})
    reporter = StripeReporter(billing, SimpleNamespace(config=SimpleNamespace(stripe=stripe)))
    reporter.clock = time.clock
    reporter.sleep = time.sleep
    return reporter


async def add_user(billing: Billing, user: str) -> str:
    customer = f"cus_{user}"
    db = (await billing.client()).billing
    await db.users.insert_one({"_id": user, "plan": "metered", "stripe_customer_id": customer})
    return customer


async def add_overage(billing: Billing, user: str, month: str, tokens: int,
                      at: datetime | None) -> None:
    """A usage document as the ledger leaves it (``overage_at``: None as it was before)."""
    db = (await billing.client()).billing
    update: dict[str, Any] = {"$inc": {"tokens": 400 + tokens, "overage_tokens": tokens},
                              "$setOnInsert": {"user_id": user, "month": month}}
    if at is not None:
        update["$max"] = {"overage_at": at}
    await db.usage.update_one({"_id": f"{user}:{month}"}, update, upsert=True)


def events_of(double: StripeDouble, customer: str) -> list[dict[str, Any]]:
    return [e for e in double.meter_events.values()
            if e["payload"].get("stripe_customer_id") == customer]


def moment(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def user_id() -> str:
    return f"u{uuid.uuid4().hex[:10]}"


def test_overage_of_a_months_last_second_outboxed_after_midnight_is_billed_in_that_month(
        mongo_uri, stripe_double):
    """Overage at 23:59:59 on 31 October, put in the outbox at 00:00:05 on 1 November:
    its meter event's timestamp is that second of October, not the outboxing time."""
    user = user_id()

    async def go():
        billing = Billing(mongo_uri)
        time = FakeTime(NOVEMBER + timedelta(seconds=5))
        customer = await add_user(billing, user)
        await add_overage(billing, user, "2026-10", 500, OCTOBER_LAST_SECOND)
        await reporter_for(billing, stripe_double, time).report_once()
        await billing.close()
        return customer

    customer = asyncio.run(go())
    [sent] = events_of(stripe_double, customer)
    assert sent["payload"]["value"] == "500"
    assert moment(sent["timestamp"]) == OCTOBER_LAST_SECOND.replace(microsecond=0)
    request = next(r for r in stripe_double.calls("/v1/billing/meter_events")
                   if r.params["identifier"] == sent["identifier"])
    assert request.params["timestamp"] == str(int(OCTOBER_LAST_SECOND.timestamp()))


def test_the_ledger_records_when_overage_happened_and_the_reporter_sends_that_time(
        mongo_uri, stripe_double):
    """Driven through the ledger: a request of October settles with overage, its write
    records overage_at (never past October's end), the fill on 1 November sends it as an
    October meter event. This month's overage_at is the settle time, not the write's."""
    user, now_user = user_id(), user_id()

    async def go():
        billing = Billing(mongo_uri)
        ledger = QuotaLedger(billing, f"test-{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
        october = ledger.account(user, "2026-10", PLANS["metered"])
        assert await ledger.reserve(october, 600)
        ledger.settle(october, 600, 600, Usage(prompt_tokens=600))
        month = f"{datetime.now(UTC):%Y-%m}"
        current = ledger.account(now_user, month, PLANS["metered"])
        assert await ledger.reserve(current, 450)
        before = datetime.now(UTC)
        ledger.settle(current, 450, 450, Usage(prompt_tokens=450))
        after = datetime.now(UTC)
        await asyncio.sleep(0.05)  # the write comes later than the settle
        await ledger.close(timeout=5)
        db = (await billing.client()).billing
        docs = {d["user_id"]: d async for d in db.usage.find()}
        customer = await add_user(billing, user)
        await reporter_for(billing, stripe_double,
                           FakeTime(NOVEMBER + timedelta(seconds=5))).report_once()
        await billing.close()
        return docs, customer, (before, after, month)

    docs, customer, (before, after, month) = asyncio.run(go())
    assert docs[user]["overage_tokens"] == 200
    assert docs[user]["overage_at"] == datetime(2026, 10, 31, 23, 59, 59, 999_000, tzinfo=UTC)
    assert docs[now_user]["overage_tokens"] == 50
    settled = docs[now_user]["overage_at"]  # the database keeps milliseconds
    assert within_month(before.replace(microsecond=before.microsecond // 1000 * 1000),
                        month) <= settled <= within_month(after, month)
    [sent] = events_of(stripe_double, customer)
    assert sent["payload"]["value"] == "200"
    assert moment(sent["timestamp"]) == datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)


def test_recovered_overage_is_dated_by_its_requests(mongo_uri):
    """Usage a stopped instance never wrote, recovered from its journal in November: its
    overage is dated when its newest request finished, in October."""
    user = user_id()
    finished = datetime(2026, 10, 31, 23, 59, 58, 250_000, tzinfo=UTC)

    async def go():
        billing = Billing(mongo_uri)
        ledger = QuotaLedger(billing, "recovering")  # type: ignore[arg-type]
        events = [{"user_id": user, "plan_id": "metered", "tokens_billed": 300,
                   "date_created": finished - timedelta(seconds=n),
                   "ledger": {"usage": f"{user}:2026-10", "instance": "dead", "write": 1}}
                  for n in (3, 0)]
        await ledger.recover("dead", events, PLANS)
        doc = await (await billing.client()).billing.usage.find_one({})
        await billing.close()
        return doc

    doc = asyncio.run(go())
    assert doc["overage_tokens"] == 200 and doc["overage_at"] == finished


def test_usage_written_without_overage_at_is_billed_no_later_than_its_months_end(
        mongo_uri, stripe_double):
    """A usage document from before overage_at existed, outboxed in November: its event
    is dated October's last second, the latest its usage can be."""
    user = user_id()

    async def go():
        billing = Billing(mongo_uri)
        customer = await add_user(billing, user)
        await add_overage(billing, user, "2026-10", 70, None)
        await reporter_for(billing, stripe_double,
                           FakeTime(NOVEMBER + timedelta(seconds=5))).report_once()
        await billing.close()
        return customer

    [sent] = events_of(stripe_double, asyncio.run(go()))
    assert moment(sent["timestamp"]) == datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)


def test_a_round_runs_right_after_a_month_ends_whatever_the_interval(
        mongo_uri, stripe_double):
    """Reporting runs every 10 s from 23:59:58, and the month's last overage is written at
    00:00:00.3 (the ledger's flush after its last request): it is at Stripe, dated
    October, by 00:00:05 — not at the next 10 s tick, 00:00:08."""
    user = user_id()

    async def go():
        billing = Billing(mongo_uri)
        time = FakeTime(NOVEMBER - timedelta(seconds=2), stop=NOVEMBER + timedelta(seconds=5))
        customer = await add_user(billing, user)

        async def last_write() -> None:
            await add_overage(billing, user, "2026-10", 42, OCTOBER_LAST_SECOND)

        time.scheduled.append((NOVEMBER + timedelta(milliseconds=300), last_write))
        reporter = reporter_for(billing, stripe_double, time)
        with taddons.context(reporter):
            assert reporter.settings.config.stripe.enabled
            run = asyncio.create_task(reporter._run())
            try:  # real time only bounds a reporter that ignores the fake one
                await asyncio.wait_for(time.stopped.wait(), timeout=3)
            finally:
                run.cancel()
        sent = events_of(stripe_double, customer)
        outbox = await (await billing.client()).billing.stripe_outbox.find_one({})
        await billing.close()
        return sent, outbox, time.rounds

    sent, outbox, rounds = asyncio.run(go())
    assert rounds == [NOVEMBER + timedelta(seconds=2)]
    [event] = sent
    assert event["payload"]["value"] == "42"
    assert moment(event["timestamp"]) == OCTOBER_LAST_SECOND.replace(microsecond=0)
    assert outbox["status"] == "sent" and outbox["sent_at"] <= NOVEMBER + timedelta(seconds=5)


@pytest.mark.parametrize(("now", "seconds"), [
    (datetime(2026, 11, 15, 12, tzinfo=UTC), 10.0),  # mid-month: the interval
    (NOVEMBER - timedelta(seconds=2), 4.0),  # to 2 s after midnight
    (NOVEMBER + timedelta(seconds=1), 1.0),  # midnight passed, its round not run yet
    (NOVEMBER + timedelta(seconds=2), 10.0),  # its round ran: the interval again
    (datetime(2026, 12, 31, 23, 59, 55, tzinfo=UTC), 7.0),  # into the next year
])
def test_seconds_to_next_round(now: datetime, seconds: float):
    reporter = StripeReporter(None, None)  # type: ignore[arg-type]
    with taddons.context(reporter):
        assert reporter.seconds_to_next_round(now) == seconds


def test_shutdown_sends_what_is_left(mongo_uri, stripe_double):
    """The proxy stops between two rounds: the last round at shutdown still sends the
    overage written since the previous one."""
    user = user_id()

    async def go():
        billing = Billing(mongo_uri)
        start = datetime(2026, 11, 15, 12, tzinfo=UTC)
        time = FakeTime(start, stop=start)  # the reporter's first sleep never ends
        customer = await add_user(billing, user)
        reporter = reporter_for(billing, stripe_double, time)
        with taddons.context(reporter):
            reporter.running()
            await add_overage(billing, user, "2026-11", 9, datetime(2026, 11, 15, 11,
                                                                   tzinfo=UTC))
            await reporter.done()
        await billing.close()
        return customer

    [sent] = events_of(stripe_double, asyncio.run(go()))
    assert sent["payload"]["value"] == "9"
    assert moment(sent["timestamp"]) == datetime(2026, 11, 15, 11, tzinfo=UTC)


def test_timestamps_stay_within_what_stripe_accepts(mongo_uri, stripe_double):
    """Stripe takes timestamps of the past 35 days up to 5 minutes ahead. An item left
    40 days without a customer is sent dated 35 days less an hour ago (billed now rather
    than refused forever); one from a clock running ahead is dated now."""
    now = datetime(2026, 11, 20, 12, tzinfo=UTC)
    assert moment(meter_timestamp(now - timedelta(days=40), now)) == \
        now - timedelta(days=35) + timedelta(hours=1)
    assert moment(meter_timestamp(now + timedelta(minutes=2), now)) == now
    assert moment(meter_timestamp(now - timedelta(days=3), now)) == now - timedelta(days=3)
    user = user_id()

    async def go():
        billing = Billing(mongo_uri)
        db = (await billing.client()).billing
        old = now - timedelta(days=40)
        await db.stripe_outbox.insert_one({
            "_id": f"overage:{user}:2026-10:0", "user_id": user, "month": "2026-10",
            "value": 5, "status": "no_customer", "usage_at": old, "created": old,
            "attempts": 3, "next_attempt": old})
        customer = await add_user(billing, user)
        await reporter_for(billing, stripe_double, FakeTime(now)).send_outbox()
        await billing.close()
        return customer

    [sent] = events_of(stripe_double, asyncio.run(go()))
    assert now - timedelta(days=35) < moment(sent["timestamp"]) <= now
