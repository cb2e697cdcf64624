"""Stripe events late, out of order, twice, and during failures: the StripeWebhook addon
with a real database, the real stripe library and the Stripe double, without a proxy.

Every delivery order of realistic sequences ends in the newest state; a database blip
never leaves an event marked applied that was not; Stripe being unreachable answers 503.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect
from stripe_double import StripeDouble, subscription
from stripe_sequences import EXPECTED, SEQUENCES, event_object, state
from webhook_harness import OneClient, answer, deliver, stripe_event, webhook_addon

STARTER, PRO = "price_starter_llmgateway", "price_pro_llmgateway"


@pytest.fixture(scope="module")
def double() -> Iterator[StripeDouble]:
    stripe = StripeDouble().start()
    yield stripe
    stripe.stop()


def ids() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:12]
    return f"user-{tag}", f"cus_{tag}", f"sub_{tag}"


def user(db, user_id: str) -> dict[str, Any]:
    return db.billing.users.find_one({"_id": user_id}) or {}


def test_late_created_does_not_undo_updated(mongo_uri: str, db, double: StripeDouble):
    """Issue 10.1: ``updated`` (active, t=1002), then a late ``created`` (incomplete,
    t=1001): the Starter subscriber stays on Starter."""
    user_id, customer, sub = ids()
    created = subscription(sub, customer, STARTER, "incomplete", user_id)
    updated = subscription(sub, customer, STARTER, "active", user_id)
    double.subscriptions[sub] = updated  # Stripe's state once both were sent

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        for kind, obj, created_at in [("customer.subscription.updated", updated, 1002),
                                      ("customer.subscription.created", created, 1001)]:
            response = await deliver(addon, stripe_event(kind, obj, f"evt_{uuid.uuid4().hex}",
                                                         created_at))
            assert answer(response) == (200, {"received": True})

    asyncio.run(go())
    doc = user(db, user_id)
    assert (doc["plan"], doc["subscription_status"]) == ("starter", "active")


def test_retried_updated_does_not_revive_a_deleted_subscription(mongo_uri: str, db,
                                                                double: StripeDouble):
    """Issue 10.2: ``deleted`` (t=1003), then a retried ``updated`` (active, t=1002): the
    cancelled user does not get Pro for free."""
    user_id, customer, sub = ids()
    updated = subscription(sub, customer, PRO, "active", user_id)
    deleted = subscription(sub, customer, PRO, "canceled", user_id)
    double.subscriptions[sub] = deleted

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        assert (await deliver(addon, stripe_event(
            "customer.subscription.deleted", deleted, f"evt_{uuid.uuid4().hex}",
            1003))).status_code == 200
        # ``updated`` timed out on its first delivery; Stripe's retry comes after ``deleted``
        return await deliver(addon, stripe_event("customer.subscription.updated", updated,
                                                 f"evt_{uuid.uuid4().hex}", 1002))

    assert answer(asyncio.run(go()))[0] == 200
    doc = user(db, user_id)
    assert (doc["plan"], doc["subscription_status"]) == ("free", "canceled")


async def _deliver_in_order(addon, double: StripeDouble, name: str, order: tuple[int, ...],
                            semaphore: asyncio.Semaphore) -> tuple[str, tuple[int, ...]]:
    steps = SEQUENCES[name]
    user_id, customer, sub = ids()
    payloads = [stripe_event(step.kind, event_object(step, sub, customer, user_id, n),
                             f"evt_{sub}_{n}", 1000 + n) for n, step in enumerate(steps)]
    async with semaphore:
        for k, n in enumerate(order):
            newest = max(order[:k + 1])  # Stripe emitted it: its state is current (at least)
            double.subscriptions[sub] = state(steps[newest], sub, customer, user_id)
            response = await deliver(addon, payloads[n])
            assert response.status_code == 200, (order, response.content)
    return user_id, order


def sample(orders: list[tuple[int, ...]], count: int) -> list[tuple[int, ...]]:
    """Every n-th order (lexicographic, so each event comes last equally often) and the
    reversed one; every order is checked in test_stripe_billing.py against the pure rules
    this addon applies, and a few through a running proxy in test_e2e_stripe.py."""
    return sorted({*orders[::max(1, len(orders) // count)], orders[-1]})


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_delivery_orders_end_in_the_newest_state(mongo_uri: str, db, double: StripeDouble,
                                                 name: str):
    """Orders of whole sequences (checkout, subscription created/updated/deleted,
    invoice.paid/payment_failed), delivered with Stripe's state moving on meanwhile: the
    final plan, subscription status and payment status are those of the newest state."""
    orders = sample(list(itertools.permutations(range(len(SEQUENCES[name])))), 36)

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        semaphore = asyncio.Semaphore(8)
        return await asyncio.gather(*(_deliver_in_order(addon, double, name, order, semaphore)
                                      for order in orders))

    results = asyncio.run(go())
    wrong = []
    for user_id, order in results:
        doc = user(db, user_id)
        got = (doc.get("plan"), doc.get("subscription_status"), doc.get("status"))
        if got != EXPECTED[name]:
            wrong.append((order, got))
    assert not wrong, f"{len(wrong)} of {len(orders)} orders end wrong, e.g. {wrong[:3]}"


def test_checkout_before_or_after_the_subscription_events(mongo_uri: str, db,
                                                          double: StripeDouble):
    """Checkout completion first, last, or twice: the same end state, customer linked."""
    ends = []
    for checkout_at in (0, 1, 2):
        user_id, customer, sub = ids()
        double.subscriptions[sub] = subscription(sub, customer, PRO, "active", user_id)
        events = [stripe_event(kind, subscription(sub, customer, price, status, user_id),
                               f"evt_{uuid.uuid4().hex}")
                  for kind, price, status in [
                      ("customer.subscription.created", STARTER, "incomplete"),
                      ("customer.subscription.updated", PRO, "active")]]
        checkout = stripe_event("checkout.session.completed", {
            "id": f"cs_{sub}", "object": "checkout.session", "client_reference_id": user_id,
            "customer": customer, "subscription": sub, "metadata": {"plan": "starter"}},
            f"evt_{uuid.uuid4().hex}")
        events.insert(checkout_at, checkout)

        async def go(deliveries: list[bytes]):
            addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
            for payload in deliveries:
                assert (await deliver(addon, payload)).status_code == 200

        asyncio.run(go([*events, checkout]))  # and Stripe's retry of the checkout
        doc = user(db, user_id)
        ends.append((doc["plan"], doc["subscription_status"], doc["stripe_customer_id"]
                     == customer, doc["stripe_subscription_id"] == sub))
    assert ends == [("pro", "active", True, True)] * 3


def test_an_old_subscription_ending_leaves_the_current_one(mongo_uri: str, db,
                                                           double: StripeDouble):
    """The user subscribed again; the first subscription's late ``deleted`` changes
    nothing, nor does a new checkout's unfinished one."""
    user_id, customer, old = ids()
    new, pending = f"{old}_new", f"{old}_pending"
    double.subscriptions[old] = subscription(old, customer, STARTER, "canceled", user_id)
    double.subscriptions[new] = subscription(new, customer, PRO, "active", user_id)
    double.subscriptions[pending] = subscription(pending, customer, STARTER, "incomplete",
                                                 user_id)

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        for kind, sub in [("customer.subscription.updated", new),
                          ("customer.subscription.deleted", old),
                          ("customer.subscription.created", pending)]:
            payload = stripe_event(kind, double.subscriptions[sub], f"evt_{uuid.uuid4().hex}")
            assert (await deliver(addon, payload)).status_code == 200

    asyncio.run(go())
    doc = user(db, user_id)
    assert (doc["plan"], doc["stripe_subscription_id"]) == ("pro", new)


class PausedFetches:
    """Holds the addon's subscription fetches until released: two deliveries in flight."""

    def __init__(self, addon) -> None:
        self.fetch = addon._subscription
        self.started: list[asyncio.Event] = []
        self.release: list[asyncio.Event] = []
        addon._subscription = self

    async def __call__(self, settings, subscription_id: str):
        started, release = asyncio.Event(), asyncio.Event()
        self.started.append(started)
        self.release.append(release)
        result = await self.fetch(settings, subscription_id)  # the state when it was sent
        started.set()
        await release.wait()
        return result


def test_an_older_fetch_finishing_last_does_not_win(mongo_uri: str, db,
                                                    double: StripeDouble):
    """Two deliveries at once: the first fetch reads ``active``, Stripe then cancels and
    the second reads ``canceled``; the first one's write, arriving last, is refused."""
    user_id, customer, sub = ids()
    active = subscription(sub, customer, PRO, "active", user_id)
    canceled = subscription(sub, customer, PRO, "canceled", user_id)

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        fetches = PausedFetches(addon)
        double.subscriptions[sub] = active
        first = asyncio.create_task(deliver(addon, stripe_event(
            "customer.subscription.updated", active, f"evt_{uuid.uuid4().hex}")))
        while not fetches.started:
            await asyncio.sleep(0)
        await fetches.started[0].wait()
        double.subscriptions[sub] = canceled
        second = asyncio.create_task(deliver(addon, stripe_event(
            "customer.subscription.deleted", canceled, f"evt_{uuid.uuid4().hex}")))
        while len(fetches.started) < 2:
            await asyncio.sleep(0)
        await fetches.started[1].wait()
        fetches.release[1].set()
        assert (await second).status_code == 200
        fetches.release[0].set()
        assert (await first).status_code == 200

    asyncio.run(go())
    assert user(db, user_id)["plan"] == "free"


def test_stripe_unreachable_answers_503_then_the_retry_applies(mongo_uri: str, db,
                                                               double: StripeDouble):
    user_id, customer, sub = ids()
    double.subscriptions[sub] = subscription(sub, customer, PRO, "active", user_id)
    payload = stripe_event("customer.subscription.updated", double.subscriptions[sub],
                           f"evt_{uuid.uuid4().hex}")

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double,
                              'payment_failed = "block"\n')
        double.down = True
        try:
            down = answer(await deliver(addon, payload))
        finally:
            double.down = False
        return down, answer(await deliver(addon, payload))

    down, retried = asyncio.run(go())
    assert down == (503, {"error": "temporarily unavailable"})
    assert retried == (200, {"received": True})
    assert user(db, user_id)["plan"] == "pro"


# --- A database blip between the marker and the update --------------------------------------

class FaultyClient:
    """A database client whose calls fail (AutoReconnect) while ``fails(call)`` says so;
    ``call`` is "<collection>.<method>", ``done`` the calls that succeeded so far."""

    def __init__(self, client: AsyncMongoClient, fails: Callable[[str], bool]) -> None:
        self.real, self.fails = client, fails
        self.done: list[str] = []
        self.failed: list[str] = []

    async def client(self) -> FaultyClient:
        return self

    def __getattr__(self, database: str) -> _Database:
        return _Database(self, self.real[database])


class _Database:
    def __init__(self, faulty: FaultyClient, database) -> None:
        self.faulty, self.database = faulty, database

    def __getattr__(self, collection: str) -> _Collection:
        return _Collection(self.faulty, self.database[collection])


class _Collection:
    def __init__(self, faulty: FaultyClient, collection) -> None:
        self.faulty, self.collection = faulty, collection

    def __getattr__(self, method: str):
        real = getattr(self.collection, method)
        where = f"{self.collection.name}.{method}"

        async def call(*args, **kwargs):
            if self.faulty.fails(where):
                self.faulty.failed.append(where)
                raise AutoReconnect(f"connection reset ({where})")
            result = await real(*args, **kwargs)
            self.faulty.done.append(where)
            return result

        return call


def test_a_database_blip_never_marks_an_event_applied(mongo_uri: str, db,
                                                      double: StripeDouble):
    """Issue 10.3: the database goes away right after the event's marker is written, so
    the user update fails (503) and so does any cleanup; Stripe's redelivery a moment
    later must apply the event, not answer ``200 duplicate``."""
    user_id, customer, sub = ids()
    double.subscriptions[sub] = subscription(sub, customer, PRO, "active", user_id)
    db.billing.users.insert_one({"_id": user_id, "plan": "free"})
    payload = stripe_event("customer.subscription.updated", double.subscriptions[sub],
                           f"evt_{uuid.uuid4().hex}")
    blip = {"on": True}

    async def go():
        faulty = FaultyClient(AsyncMongoClient(mongo_uri, tz_aware=True), lambda call: (
            blip["on"] and "stripe_events.insert_one" in faulty.done))
        addon = webhook_addon(faulty, double)
        during = answer(await deliver(addon, payload))
        assert any(call.startswith("users.") for call in faulty.failed), faulty.failed
        blip["on"] = False
        return during, answer(await deliver(addon, payload)), answer(await deliver(
            addon, payload))

    during, redelivered, again = asyncio.run(go())
    assert during == (503, {"error": "temporarily unavailable"})
    assert redelivered == (200, {"received": True})
    assert again == (200, {"received": True, "duplicate": True})  # applied now: done
    assert user(db, user_id)["plan"] == "pro"
    marker = db.billing.stripe_events.find_one({"_id": json.loads(payload)["id"]})
    assert marker["status"] == "done"


def test_a_failed_done_mark_is_applied_again(mongo_uri: str, db, double: StripeDouble):
    """The update succeeded but marking the event ``done`` failed (503): the redelivery
    applies it again (idempotent), then it is done."""
    user_id, customer, sub = ids()
    double.subscriptions[sub] = subscription(sub, customer, STARTER, "active", user_id)
    payload = stripe_event("customer.subscription.updated", double.subscriptions[sub],
                           f"evt_{uuid.uuid4().hex}")

    async def go():
        faulty = FaultyClient(AsyncMongoClient(mongo_uri, tz_aware=True), lambda call: (
            call == "stripe_events.update_one" and not faulty.failed))
        addon = webhook_addon(faulty, double)
        return [answer(await deliver(addon, payload)) for _ in range(3)]

    first, redelivered, again = asyncio.run(go())
    assert first == (503, {"error": "temporarily unavailable"})
    assert redelivered == (200, {"received": True})
    assert again == (200, {"received": True, "duplicate": True})
    assert user(db, user_id)["plan"] == "starter"
