"""QuotaAlerts addon: tell a configured URL when a user crosses 80 % and 100 % of the
monthly quota, once per threshold per user, month and quota, from a durable outbox.

In the background, never on the request path (``alert_interval_ms``):
1. The month's ``billing.usage`` documents are scanned (like stripe_reporter.py); each
   threshold a user's tokens reached gets one item in ``billing.alert_outbox`` with the
   deterministic ``_id`` ``<user>:<month>:<monthly_tokens>:<threshold>`` — a restart, or a
   second instance scanning the same documents, only finds the same item again; a plan
   with another quota (an upgrade mid-month) is a new series (core/alerts.py). An item of
   the old id format (``<user>:<month>:<threshold>``) for the same quota counts as there.
2. Pending items are POSTed (httpx), signed with HMAC-SHA256 over the raw body
   (core/alerts.py); an answer other than 2xx, or none, is retried with backoff. Only a
   2xx marks an item ``sent``. An item is claimed before it is sent, so two instances
   never send one at once (a claim expires after a minute, should its instance die).

Configured by ``[alerts] url`` and the environment's ``LLM_BILLING_ALERT_SECRET``;
without both, nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from mitmproxy import ctx
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from . import background
from .core.alerts import (
    AlertSettings,
    alert_body,
    alert_id,
    crossed,
    legacy_alert_id,
    signature,
)
from .core.dates import month_of
from .settings import Settings
from .storage.database import Database
from .stripe_reporter import CLAIM, backoff

logger = logging.getLogger(__name__)

SENDABLE = ("pending", "retry")
SEND_TIMEOUT = 10.0  # seconds for the receiver to answer


class QuotaAlerts:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self._task: asyncio.Task | None = None
        self._outboxed: dict[str, str] = {}  # id → month of items known to be outboxed
        self._stopping = asyncio.Event()

    def load(self, loader) -> None:
        loader.add_option("alert_interval_ms", int, 10_000,
                          "How often quota alerts are looked for and sent.")

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def done(self) -> None:
        # A POST in flight is let finish and marked, so a restart never sends it again.
        await background.stop(self._task, self._stopping, grace=SEND_TIMEOUT + 2)

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=SEND_TIMEOUT) as client:
            while not await background.pause(self._stopping,
                                             ctx.options.alert_interval_ms / 1000):
                config = self.settings.config
                if config is None or not config.alerts.enabled:
                    continue  # a reload may turn them on
                try:
                    await self.fill_outbox()
                    await self.send_outbox(client, config.alerts)
                except PyMongoError as e:
                    logger.warning(f"Quota alerts paused ({type(e).__name__})")
                except Exception:  # a bug must not end alerts for the process's lifetime
                    logger.exception("Quota alert round failed")

    async def fill_outbox(self) -> None:
        config = self.settings.config
        assert config is not None
        db = (await self.database.client()).billing
        now = datetime.now(UTC)
        months = {month_of(now), month_of(now - timedelta(days=1))}  # a month's last hours
        docs = await db.usage.find({"month": {"$in": sorted(months)}, "tokens": {"$gt": 0}},
                                   {"user_id": 1, "month": 1, "tokens": 1}).to_list()
        users = {doc["user_id"] for doc in docs if "user_id" in doc}
        plans = {user["_id"]: user.get("plan") async for user in
                 db.users.find({"_id": {"$in": list(users)}}, {"plan": 1})}
        new: list[tuple[str, str, dict[str, Any]]] = []  # (id, legacy id, item)
        for doc in docs:
            if "user_id" not in doc:
                continue
            plan = config.plan(plans.get(doc["user_id"]))
            for threshold in crossed(doc["tokens"], plan.monthly_tokens,
                                     config.alerts.thresholds):
                identifier = alert_id(doc["user_id"], doc["month"], plan.monthly_tokens,
                                      threshold)
                if identifier not in self._outboxed:
                    new.append((identifier, legacy_alert_id(doc["user_id"], doc["month"],
                                                            threshold), {
                        "user_id": str(doc["user_id"]), "month": doc["month"],
                        "threshold": threshold, "tokens": doc["tokens"],
                        "monthly_tokens": plan.monthly_tokens, "plan": plan.id,
                        "created": now, "status": "pending", "attempts": 0,
                        "next_attempt": now}))
        legacy = {item["_id"]: item.get("monthly_tokens") async for item in db.alert_outbox.find(
            {"_id": {"$in": [old for _, old, _ in new]}}, {"monthly_tokens": 1})} if new else {}
        for identifier, old, item in new:
            if legacy.get(old) != item["monthly_tokens"]:  # else outboxed before the upgrade
                with contextlib.suppress(DuplicateKeyError):  # another instance, just now
                    await db.alert_outbox.update_one(
                        {"_id": identifier}, {"$setOnInsert": item}, upsert=True)
            self._outboxed[identifier] = item["month"]
        self._outboxed = {i: m for i, m in self._outboxed.items()
                          if m in months}  # older months are never outboxed again

    async def send_outbox(self, client: httpx.AsyncClient, alerts: AlertSettings) -> None:
        db = (await self.database.client()).billing
        while not self._stopping.is_set():
            now = datetime.now(UTC)
            item = await db.alert_outbox.find_one_and_update(
                {"$or": [{"status": {"$in": list(SENDABLE)}, "next_attempt": {"$lte": now}},
                         {"status": "sending", "claimed_until": {"$lte": now}}]},
                {"$set": {"status": "sending", "claimed_until": now + CLAIM}},
                return_document=ReturnDocument.AFTER)
            if item is None:
                return
            if not await self._send(db, client, alerts, item):
                return  # the receiver is down: back off, stop this round

    async def _send(self, db, client: httpx.AsyncClient, alerts: AlertSettings,
                    item: dict[str, Any]) -> bool:
        assert alerts.url is not None and alerts.secret is not None
        sent_at = datetime.now(UTC)
        body = alert_body(item, sent_at)
        headers = {"content-type": "application/json", "x-alert-id": item["_id"],
                   "x-signature": signature(alerts.secret, body),
                   "x-signature-timestamp": str(int(sent_at.timestamp()))}
        try:
            response = await client.post(alerts.url, content=body, headers=headers)
        except httpx.HTTPError as e:
            await self._later(db, item, f"{type(e).__name__}")
            logger.warning(f"Quota alert {item['_id']} not delivered ({type(e).__name__}); "
                           "retried later")
            return False
        if not response.is_success:
            await self._later(db, item, f"status {response.status_code}")
            return True
        await db.alert_outbox.update_one({"_id": item["_id"]}, {"$set": {
            "status": "sent", "sent_at": sent_at}, "$unset": {"error": ""}})
        logger.info(f"Quota alert sent: {item['_id']}")
        return True

    async def _later(self, db, item: dict[str, Any], error: str) -> None:
        attempts = item.get("attempts", 0) + 1
        await db.alert_outbox.update_one({"_id": item["_id"]}, {"$set": {
            "status": "retry", "error": error, "attempts": attempts,
            "next_attempt": datetime.now(UTC) + backoff(attempts)}})
