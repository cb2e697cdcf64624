"""Adversarial review of issue 10's fixes: what still broke, each as a test.

The StripeWebhook addon on its own (tests/webhook_harness.py): a real database, the real
stripe library talking to the Stripe double, real signatures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy.test import taddons, tflow, tutils
from pymongo import AsyncMongoClient
from stripe_double import StripeDouble, sign, subscription
from webhook_harness import SECRET, OneClient, answer, deliver, stripe_event, webhook_addon

STARTER, PRO = "price_starter_llmgateway", "price_pro_llmgateway"


class HangingStripe(StripeDouble):
    """The double, but ``GET /v1/subscriptions/…`` waits until released (a slow Stripe)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def respond(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, dict]:
        if method == "GET" and path.startswith("/v1/subscriptions/"):
            self.entered.set()
            self.release.wait(30)
        return super().respond(method, path, params)


@pytest.fixture(scope="module")
def double() -> Iterator[StripeDouble]:
    stripe = StripeDouble().start()
    yield stripe
    stripe.stop()


def ids() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:12]
    return f"user-{tag}", f"cus_{tag}", f"sub_{tag}"


def test_a_non_ascii_signature_gets_400_not_500(mongo_uri: str, double: StripeDouble,
                                                caplog):
    """Anyone can send ``Stripe-Signature: t=…,v1=é``: the stripe library's compare
    raises TypeError on non-ASCII text; that must be a 400, not a 500 and a traceback."""
    payload = b'{"id": "evt_1", "type": "customer.created", "data": {"object": {}}}'
    good = sign(payload, SECRET)

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        answers = []
        for signature in ("t=1,v1=\u00e9", good + ",v1=\u00e9", "t=1,v1=\udcff"):
            flow = tflow.tflow(req=tutils.treq(
                method=b"POST", path=b"/webhook/stripe", content=payload,
                headers=((b"stripe-signature",
                          signature.encode("utf-8", "surrogateescape")),)))
            with taddons.context(addon):
                await addon.request(flow)
            answers.append((flow.response.status_code, json.loads(flow.response.content)))
        return answers

    answers = asyncio.run(go())
    assert answers[0] == answers[2] == (400, {"error": "invalid signature"})
    assert answers[1][0] in (200, 400)  # a valid v1 next to a junk one: Stripe's own rule
    assert "Stripe webhook failed" not in caplog.text


def test_a_slow_stripe_does_not_hold_the_default_executor(mongo_uri: str):
    """The subscription fetch must not park a thread of the loop's default executor for
    as long as Stripe takes (80 s, retried): that pool also resolves every upstream host
    name (``loop.getaddrinfo``), so a slow Stripe would stall all proxied requests."""
    stripe = HangingStripe().start()
    user_id, customer, sub = ids()
    stripe.subscriptions[sub] = subscription(sub, customer, PRO, "active", user_id)
    payload = stripe_event("customer.subscription.updated", stripe.subscriptions[sub],
                           f"evt_{uuid.uuid4().hex}")
    waiter = concurrent.futures.ThreadPoolExecutor(1)

    async def go():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), stripe)
        delivery = asyncio.create_task(deliver(addon, payload))
        await loop.run_in_executor(waiter, stripe.entered.wait, 30)  # Stripe is answering
        try:
            await asyncio.wait_for(loop.getaddrinfo("localhost", 80), 5)
            resolved = True
        except TimeoutError:
            resolved = False
        stripe.release.set()
        return resolved, answer(await delivery)

    try:
        resolved, delivered = asyncio.run(go())
    finally:
        stripe.release.set()
        stripe.stop()
        waiter.shutdown()
    assert resolved, "a host name could not be resolved while Stripe was slow"
    assert delivered == (200, {"received": True})


def test_two_subscriptions_the_newest_active_one_decides(mongo_uri: str, db,
                                                          double: StripeDouble):
    """A Starter subscriber buys Pro through a new checkout and cancels Starter at period
    end (the Customer Portal's default): Starter's ``updated`` (still active, cancelling)
    must not put them back on Starter, nor its ``deleted`` at period end on Free, while
    Pro is paid. Then Pro is cancelled while Starter still runs: Starter."""
    user_id, customer, old = ids()
    new = f"{old}_new"
    double.subscriptions[old] = subscription(old, customer, STARTER, "active", user_id)
    double.subscriptions[new] = subscription(new, customer, PRO, "active", user_id)
    ends = []

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)

        async def send(kind: str, sub: str, obj: dict[str, Any] | None = None) -> None:
            payload = stripe_event(kind, obj or double.subscriptions[sub],
                                   f"evt_{uuid.uuid4().hex}")
            assert answer(await deliver(addon, payload))[0] == 200
            doc = db.billing.users.find_one({"_id": user_id}) or {}
            ends.append((kind, doc.get("plan"), doc.get("stripe_subscription_id")))

        await send("checkout.session.completed", new, {
            "id": f"cs_{new}", "object": "checkout.session", "client_reference_id": user_id,
            "customer": customer, "subscription": new})
        await send("customer.subscription.updated", old)  # cancel_at_period_end: true
        double.subscriptions[old] = subscription(old, customer, STARTER, "canceled", user_id)
        await send("customer.subscription.deleted", old)
        # the other way round: Pro ends, an (older) Starter subscription is still paid
        double.subscriptions[old] = subscription(old, customer, STARTER, "active", user_id)
        double.subscriptions[new] = subscription(new, customer, PRO, "canceled", user_id)
        await send("customer.subscription.deleted", new)

    asyncio.run(go())
    assert ends == [("checkout.session.completed", "pro", new),
                    ("customer.subscription.updated", "pro", new),
                    ("customer.subscription.deleted", "pro", new),
                    ("customer.subscription.deleted", "starter", old)]
