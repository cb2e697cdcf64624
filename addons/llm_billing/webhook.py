"""StripeWebhook addon: ``POST /webhook/stripe`` on the proxy's own port (seed 000).

Answered here, never forwarded: every request to the path gets an answer from this addon,
whatever it carries.

- **Size**: a body over 1 MiB gets 413 — from its ``Content-Length`` as soon as the
  headers arrive, or from its length when it was sent chunked.
- **Signature**: verified by the stripe library (``Stripe-Signature``, 300 s tolerance);
  a bad or stale one gets 400 and changes nothing.
- **Shape**: a signed payload that is not an event (not UTF-8, not JSON, too deep, not
  an object, no string ``id``/``type``, no object in ``data.object``, malformed ids) gets
  400 with a JSON error — retrying it could never help (core/stripe_rules.py).
- **Order and retries**: Stripe delivers events late, out of order and more than once,
  so an event's own copy of a subscription may be older than what was already applied
  (``updated`` t=1002, then a late ``created`` t=1001; or ``deleted``, then a retried
  ``updated``). As Stripe recommends, subscription, invoice and checkout events are only
  a signal: the subscription they name is fetched from Stripe's API (``GET
  /v1/subscriptions/{id}``) and its *current* state decides the plan, so any order of
  delivery ends in the newest state. Per-user event timestamps would not do: Stripe's
  ``created`` has one-second resolution and a checkout's events share one second. Each
  write carries ``stripe_synced_at`` (when its fetch began) and never replaces a later
  one, so two deliveries handled at once cannot put an older fetch over a newer one. An
  ended subscription that is not the user's current one changes nothing. A customer
  with several subscriptions (a new checkout, the old one cancelled at period end) gets
  the plan of their newest active one, listed from Stripe, whichever event arrives. If
  Stripe cannot be reached, the answer is 503 and Stripe retries. Stripe is called with
  the async client: a slow Stripe holds no thread of the loop's default executor (which
  also resolves upstream host names).
- **Applied once, or again**: the event id goes into ``billing.stripe_events`` as
  ``processing`` before it is applied and becomes ``done`` only after; a ``done`` event
  is answered ``200 duplicate``, anything else is applied (again — applying is
  idempotent). A database failure answers 503, so Stripe retries.

Plan changes reach this instance's next request at once (its user cache entry is
dropped) and other instances within ``user_cache_ttl``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import stripe
from mitmproxy import http
from pymongo.errors import DuplicateKeyError, PyMongoError

from .core.stripe_rules import (
    ACTIVE_SUBSCRIPTION,
    MAX_EVENT_BYTES,
    EventError,
    Signal,
    StripeSettings,
    WebhookEvent,
    event_signal,
    parse_event,
    payload_text,
    subscription_customer,
    subscription_fields,
    subscription_user,
)
from .settings import Settings
from .storage.database import Database
from .stripe_billing import client_for
from .users import UserPlans

logger = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhook/stripe"


class StripeUnavailable(Exception):
    """Stripe's API could not say what a subscription is now (answered 503)."""


def _reply(status: int, body: dict[str, Any]) -> http.Response:
    return http.Response.make(status, json.dumps(body), {"content-type": "application/json"})


def _too_large() -> http.Response:
    return _reply(413, {"error": f"payload larger than {MAX_EVENT_BYTES} bytes"})


def _is_webhook(flow: http.HTTPFlow) -> bool:
    return flow.request.path.partition("?")[0] == WEBHOOK_PATH


class StripeWebhook:
    def __init__(self, database: Database, settings: Settings, users: UserPlans) -> None:
        self.database = database
        self.settings = settings
        self.users = users
        self._stripe: tuple[StripeSettings, stripe.StripeClient] | None = None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not _is_webhook(flow):
            return
        length = flow.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_EVENT_BYTES:
            flow.response = _too_large()  # decided before the body; never handled

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not _is_webhook(flow):
            return
        try:
            flow.response = await self.handle(flow.request.method,
                                              flow.request.raw_content or b"",
                                              flow.request.headers.get("stripe-signature"))
        except Exception:  # a bug must not let the request fall through to a reverse target
            logger.exception("Stripe webhook failed")
            flow.response = _reply(500, {"error": "internal error"})

    async def handle(self, method: str, payload: bytes, signature: str | None) -> http.Response:
        config = self.settings.config
        assert config is not None
        if method != "POST":
            return _reply(405, {"error": "POST only"})
        if len(payload) > MAX_EVENT_BYTES:
            return _too_large()
        secret = config.stripe.webhook_secret
        if not secret:
            logger.warning("Stripe webhook received, but STRIPE_WEBHOOK_SECRET is not set")
            return _reply(400, {"error": "Stripe webhooks are not configured"})
        try:
            text = payload_text(payload)
        except EventError as e:
            return _reply(400, {"error": str(e)})
        try:
            if not (signature or "").isascii():  # the library's compare would raise TypeError
                raise stripe.SignatureVerificationError("non-ASCII signature", signature)
            stripe.WebhookSignature.verify_header(text, signature or "", secret, tolerance=300)
        except (stripe.SignatureVerificationError, ValueError) as e:
            logger.warning(f"Stripe webhook refused: {e}")
            return _reply(400, {"error": "invalid signature"})
        try:
            event = parse_event(text)
            signal = event_signal(event)
        except EventError as e:
            logger.warning(f"Stripe webhook refused: {e}")
            return _reply(400, {"error": str(e)})
        try:
            return await self._process(event, signal)
        except (PyMongoError, StripeUnavailable) as e:
            logger.warning(f"Stripe event {event.id} not applied ({type(e).__name__}: {e})")
            return _reply(503, {"error": "temporarily unavailable"})

    async def _process(self, event: WebhookEvent, signal: Signal | None) -> http.Response:
        client = await self.database.client()
        events = client.billing.stripe_events
        try:
            await events.insert_one({"_id": event.id, "type": event.type,
                                     "status": "processing", "received": datetime.now(UTC)})
        except DuplicateKeyError:
            seen = await events.find_one({"_id": event.id}) or {}
            if seen.get("status") == "done":
                return _reply(200, {"received": True, "duplicate": True})
            # "processing": an earlier delivery did not finish applying it; apply it again
        applied = await self._apply(client, event, signal)
        await events.update_one({"_id": event.id}, {"$set": {
            "status": "done", "applied": applied, "done": datetime.now(UTC)}})
        return _reply(200, {"received": True})

    async def _apply(self, client, event: WebhookEvent, signal: Signal | None) -> str:
        config = self.settings.config
        assert config is not None
        if signal is None:
            logger.info(f"Stripe event {event.type} ({event.id}): not handled; ignored")
            return "ignored"
        users = client.billing.users
        if signal.subscription_id is None:  # a checkout without a subscription
            if not (signal.user_id and signal.customer):
                return "ignored"
            await users.update_one({"_id": signal.user_id},
                                   {"$set": {"stripe_customer_id": signal.customer}}, upsert=True)
            return f"user {signal.user_id}: customer {signal.customer}"
        synced = datetime.now(UTC)  # before the fetch: a later fetch sees a newer state
        subscription = await self._subscription(config.stripe, signal.subscription_id)
        if subscription is None:
            logger.warning(f"Stripe event {event.type} ({event.id}): Stripe has no "
                           f"subscription {signal.subscription_id}; ignored")
            return "unknown subscription"
        user_id = signal.user_id if event.type.startswith("checkout.") else None
        user_id = user_id or subscription_user(subscription) or signal.user_id
        if user_id is not None:
            user = await users.find_one({"_id": user_id}) or {}
        else:
            customer = subscription_customer(subscription) or signal.customer
            user = await users.find_one({"stripe_customer_id": customer}) if customer else None
            if user is None:
                logger.warning(f"Stripe event {event.type} ({event.id}): no user with "
                               f"customer {customer}")
                return "unknown customer"
            user_id = user["_id"]
        customer = subscription_customer(subscription)
        newest = customer and await self._newest_active(config.stripe, customer, user_id)
        if newest:
            subscription = newest  # several subscriptions: the newest paid one decides
        fields = subscription_fields(subscription, user, config.plans, config.stripe)
        if fields is None:
            return f"user {user_id}: not their current subscription"
        fields["stripe_synced_at"] = synced
        try:
            await users.update_one(
                {"_id": user_id, "stripe_synced_at": {"$not": {"$gt": synced}}},
                {"$set": fields}, upsert=True)
        except DuplicateKeyError:  # the user exists with a state fetched later than ours
            return f"user {user_id}: a newer state is stored"
        self.users.cache.invalidate(user_id)
        logger.info(f"Stripe event {event.type}: user {user_id} {fields}")
        return f"user {user_id}: {fields['plan']} ({fields['subscription_status']})"

    def _client(self, settings: StripeSettings) -> stripe.StripeClient:
        if not settings.secret_key:
            raise StripeUnavailable("STRIPE_SECRET_KEY is not set: subscriptions cannot "
                                    "be fetched")
        if self._stripe is None or self._stripe[0] is not settings:  # config reloaded
            self._stripe = (settings, client_for(settings))
        return self._stripe[1]

    async def _subscription(self, settings: StripeSettings,
                            subscription_id: str) -> dict[str, Any] | None:
        """The subscription as Stripe has it now; None if Stripe has no such subscription."""
        client = self._client(settings)
        try:
            subscription = await client.v1.subscriptions.retrieve_async(subscription_id)
        except stripe.InvalidRequestError as e:
            if e.http_status == 404:
                return None
            raise StripeUnavailable(type(e).__name__) from None
        except stripe.StripeError as e:
            raise StripeUnavailable(type(e).__name__) from None
        return subscription.to_dict()

    async def _newest_active(self, settings: StripeSettings, customer: str,
                             user_id: Any) -> dict[str, Any] | None:
        """The customer's newest active subscription (Stripe lists newest first) that is
        not another user's, or None."""
        try:
            page = await self._client(settings).v1.subscriptions.list_async(
                params={"customer": customer, "limit": 100})
        except stripe.StripeError as e:
            raise StripeUnavailable(type(e).__name__) from None
        for listed in page.data:
            subscription = listed.to_dict()
            owner = subscription_user(subscription)
            if subscription.get("status") in ACTIVE_SUBSCRIPTION and owner in (None, user_id):
                return subscription
        return None
