"""StripeWebhook addon: ``POST /webhook/stripe`` on the proxy's own port (seed 000).

Answered here, never forwarded. The signature is verified by the stripe library
(``Stripe-Signature``, 300 s tolerance): a bad or stale one gets 400 and changes nothing.
Each event id is recorded in ``billing.stripe_events`` before it is applied, so a replayed
event is a no-op; a failure to apply removes the record and answers 503, so Stripe
retries. Plan changes reach this instance's next request at once (its user cache entry is
dropped) and other instances within ``user_cache_ttl``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from mitmproxy import http
from pymongo.errors import DuplicateKeyError, PyMongoError

from .core.dates import aware
from .core.stripe_rules import user_change
from .settings import Settings
from .storage.database import Database
from .users import UserPlans

logger = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhook/stripe"
STALE_PROCESSING = timedelta(minutes=2)  # a marker left by a crash mid-event


def _reply(status: int, body: dict[str, Any]) -> http.Response:
    return http.Response.make(status, json.dumps(body), {"content-type": "application/json"})


class StripeWebhook:
    def __init__(self, database: Database, settings: Settings, users: UserPlans) -> None:
        self.database = database
        self.settings = settings
        self.users = users

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.request.path.partition("?")[0] != WEBHOOK_PATH:
            return
        flow.response = await self.handle(flow.request.method, flow.request.raw_content or b"",
                                          flow.request.headers.get("stripe-signature"))

    async def handle(self, method: str, payload: bytes, signature: str | None) -> http.Response:
        config = self.settings.config
        assert config is not None
        if method != "POST":
            return _reply(405, {"error": "POST only"})
        secret = config.stripe.webhook_secret
        if not secret:
            logger.warning("Stripe webhook received, but STRIPE_WEBHOOK_SECRET is not set")
            return _reply(400, {"error": "Stripe webhooks are not configured"})
        try:
            stripe.Webhook.construct_event(payload, signature or "", secret, tolerance=300)
        except (stripe.SignatureVerificationError, ValueError) as e:
            logger.warning(f"Stripe webhook refused: {e}")
            return _reply(400, {"error": "invalid signature"})
        event = json.loads(payload)
        try:
            return await self._process(event)
        except PyMongoError as e:
            logger.warning(f"Stripe event {event.get('id')} not applied ({type(e).__name__})")
            return _reply(503, {"error": "temporarily unavailable"})

    async def _process(self, event: dict[str, Any]) -> http.Response:
        client = await self.database.client()
        events = client.billing.stripe_events
        now = datetime.now(UTC)
        try:
            await events.insert_one({"_id": event["id"], "type": event["type"],
                                     "status": "processing", "received": now})
        except DuplicateKeyError:
            seen = await events.find_one({"_id": event["id"]}) or {}
            received = seen.get("received") or now
            received = aware(received)
            if seen.get("status") == "done" or now - received < STALE_PROCESSING:
                return _reply(200, {"received": True, "duplicate": True})
        try:
            applied = await self._apply(client, event)
        except BaseException:
            await events.delete_one({"_id": event["id"], "status": "processing"})
            raise
        await events.update_one({"_id": event["id"]}, {"$set": {
            "status": "done", "applied": applied, "done": datetime.now(UTC)}})
        return _reply(200, {"received": True})

    async def _apply(self, client, event: dict[str, Any]) -> str:
        config = self.settings.config
        assert config is not None
        change = user_change(event, config.plans, config.stripe)
        if change is None:
            logger.info(f"Stripe event {event['type']} ({event['id']}): not handled; ignored")
            return "ignored"
        users = client.billing.users
        if change.user_id:
            await users.update_one({"_id": change.user_id}, {"$set": change.fields},
                                   upsert=True)
            user_id = change.user_id
        else:
            doc = await users.find_one_and_update({"stripe_customer_id": change.customer},
                                                  {"$set": change.fields})
            if doc is None:
                logger.warning(f"Stripe event {event['type']} ({event['id']}): no user with "
                               f"customer {change.customer}")
                return "unknown customer"
            user_id = doc["_id"]
        self.users.cache.invalidate(user_id)
        logger.info(f"Stripe event {event['type']}: user {user_id} {change.fields}")
        return f"user {user_id}"
