"""StripeReporter addon: overage tokens to Stripe Billing Meters, from a durable outbox.

In the background, never on the request path:
1. Each user-month whose ``overage_tokens`` grew past what was already put in the outbox
   gets one outbox item in ``billing.stripe_outbox`` for the difference. Its ``_id`` — the
   meter event's ``identifier`` — is ``overage:<user>:<month>:<tokens already outboxed>``:
   deterministic, so a crash between writing the item and advancing ``outboxed_tokens``
   only finds the same item again.
2. Pending items are sent with ``billing.MeterEvent.create`` (``stripe_customer_id`` and
   ``value``); a failure is retried with backoff, and Stripe refuses a second event with
   the same identifier, so a retry can never count twice.

Each item carries when its usage happened (``usage_at``): the usage document's
``overage_at`` (the ledger's settle time of the newest request that added overage), never
outside the document's month. That is the meter event's ``timestamp``, so usage of a
month's last seconds is billed in that period however late it is sent. Right after each
month ends (once the ledger's last writes of it landed) a round runs whatever the
interval, so that month's last overage reaches Stripe before its invoice closes; and one
more round runs at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from mitmproxy import ctx
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from . import background
from .core.dates import aware, next_month_start, within_month
from .settings import Settings
from .storage.database import Database
from .stripe_billing import client_for

logger = logging.getLogger(__name__)

SENDABLE = ("pending", "retry", "no_customer")
CLAIM = timedelta(seconds=60)
# Stripe takes a meter event's timestamp from the past 35 days up to 5 minutes ahead (by
# its clock); an hour's margin keeps clock skew and a slow request clear of the edge.
OLDEST_TIMESTAMP = timedelta(days=35) - timedelta(hours=1)
# A month's last usage reaches billing.usage within usage_flush_interval_ms (0.5 s) of
# settling: the period-end round waits this long after midnight for it.
PERIOD_END_DELAY = timedelta(seconds=2)
SHUTDOWN_REPORT_TIMEOUT = 5.0  # seconds for the last round at shutdown


def backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(300, 2 ** min(attempts, 9)))


def usage_time(doc: dict[str, Any], month: str, now: datetime) -> datetime:
    """When the overage of a usage document happened: its ``overage_at`` (the newest),
    else — usage written without one — ``now``; moved into the document's month."""
    at = doc.get("overage_at")
    moment = aware(at) if isinstance(at, datetime) else now
    try:
        return within_month(moment, month)
    except ValueError:  # a malformed month: the time as it is
        return moment


def meter_timestamp(usage_at: datetime, now: datetime) -> int:
    """A meter event's ``timestamp``: when the usage happened, clamped into what Stripe
    accepts — not in the future (another instance's clock may run ahead) and not older
    than 35 days less a margin (an item left unsent that long, e.g. for want of a
    customer, is then billed in the current period rather than never)."""
    return int(min(max(usage_at, now - OLDEST_TIMESTAMP), now).timestamp())


def already_recorded(error: stripe.StripeError) -> bool:
    """Stripe's answer to a second meter event with the same identifier."""
    text = f"{error.code} {error.user_message or ''} {error}".lower()
    return error.code == "resource_already_exists" or "already exists" in text


class StripeReporter:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self._task: asyncio.Task | None = None
        # Time, as the reporter sees it; tests drive both.
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def load(self, loader) -> None:
        loader.add_option("stripe_report_interval_ms", int, 10_000,
                          "How often overage is put in the outbox and sent to Stripe.")

    def running(self) -> None:
        config = self.settings.config
        assert config is not None
        if not config.stripe.enabled:
            logger.info("Stripe is off (STRIPE_SECRET_KEY is not set): no subscriptions "
                        "or metered overage; the proxy runs normally.")
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def done(self) -> None:
        if self._task is not None:
            await background.stop(self._task)
            # After Limits' last usage write (addon order); bounded: Stripe may be down.
            try:
                await asyncio.wait_for(self.report_once(), SHUTDOWN_REPORT_TIMEOUT)
            except (PyMongoError, TimeoutError) as e:
                logger.warning(f"Last overage round at shutdown unfinished "
                               f"({type(e).__name__}): the outbox keeps the rest")

    def seconds_to_next_round(self, now: datetime) -> float:
        """The report interval, cut short to run a round right after a month ends (once
        its last usage is written), however the interval straddles midnight."""
        period_end = next_month_start(now - PERIOD_END_DELAY) + PERIOD_END_DELAY
        interval = ctx.options.stripe_report_interval_ms / 1000
        return max(0.0, min(interval, (period_end - now).total_seconds()))

    async def _run(self) -> None:
        while True:
            await self.sleep(self.seconds_to_next_round(self.clock()))
            try:
                await self.report_once()
            except PyMongoError as e:
                logger.warning(f"Overage reporting paused ({type(e).__name__})")
            except Exception:  # a bug must not end reporting for the process's lifetime
                logger.exception("Overage reporting round failed")

    async def report_once(self) -> None:
        await self.fill_outbox()
        await self.send_outbox()

    async def fill_outbox(self) -> None:
        db = (await self.database.client()).billing
        now = self.clock()
        async for doc in db.usage.find({"overage_tokens": {"$gt": 0}}):
            base = doc.get("outboxed_tokens", 0)
            if doc["overage_tokens"] <= base:
                continue
            identifier = f"overage:{doc['_id']}:{base}"
            month = str(doc.get("month") or str(doc["_id"]).rpartition(":")[2])
            item = {"_id": identifier, "user_id": doc["user_id"], "month": month,
                    "value": doc["overage_tokens"] - base, "status": "pending",
                    "usage_at": usage_time(doc, month, now), "created": now, "attempts": 0}
            try:
                await db.stripe_outbox.insert_one(item)
            except DuplicateKeyError:  # written before a crash: keep its value
                item = await db.stripe_outbox.find_one({"_id": identifier}) or item
            matches_base = base if "outboxed_tokens" in doc else {"$exists": False}
            await db.usage.update_one({"_id": doc["_id"], "outboxed_tokens": matches_base},
                                      {"$set": {"outboxed_tokens": base + item["value"]}})

    async def send_outbox(self) -> None:
        config = self.settings.config
        assert config is not None
        db = (await self.database.client()).billing
        client = client_for(config.stripe)
        now = self.clock()
        while True:
            item = await db.stripe_outbox.find_one_and_update(
                {"$or": [{"status": {"$in": list(SENDABLE)}, "next_attempt": {"$lte": now}},
                         {"status": {"$in": list(SENDABLE)}, "next_attempt": None},
                         {"status": "sending", "claimed_until": {"$lte": now}}]},
                {"$set": {"status": "sending", "claimed_until": now + CLAIM}},
                return_document=ReturnDocument.AFTER)
            if item is None:
                return
            if not await self._send(db, client, config.stripe.meter_event_name, item):
                return  # Stripe unreachable: stop this round, back off

    async def _send(self, db, client: stripe.StripeClient, event_name: str,
                    item: dict[str, Any]) -> bool:
        user = await db.users.find_one({"_id": item["user_id"]}) or {}
        customer = user.get("stripe_customer_id")
        if not customer:
            await self._later(db, item, "no_customer", "the user has no Stripe customer")
            return True
        # Items outboxed before usage_at existed: the time they were outboxed.
        usage_at = aware(item.get("usage_at") or item["created"])
        try:
            await client.v1.billing.meter_events.create_async(params={
                "event_name": event_name, "identifier": item["_id"],
                "timestamp": meter_timestamp(usage_at, self.clock()),
                "payload": {"stripe_customer_id": customer, "value": str(item["value"])}})
        except stripe.InvalidRequestError as e:
            if not already_recorded(e):
                await self._later(db, item, "retry", str(e))
                return True
        except stripe.StripeError as e:
            logger.warning(f"Stripe unreachable for overage ({type(e).__name__}); "
                           f"{item['_id']} retried later")
            await self._later(db, item, "retry", str(e))
            return False
        await db.stripe_outbox.update_one({"_id": item["_id"]}, {"$set": {
            "status": "sent", "sent_at": self.clock(), "customer": customer}})
        return True

    async def _later(self, db, item: dict[str, Any], status: str, error: str) -> None:
        attempts = item.get("attempts", 0) + 1
        await db.stripe_outbox.update_one({"_id": item["_id"]}, {"$set": {
            "status": status, "error": error, "attempts": attempts,
            "next_attempt": self.clock() + backoff(attempts)}})
