"""Realistic Stripe event sequences for one subscription, as timelines: each event with
the subscription's state right after it (what Stripe's API answers from then on).

Delivered in any order, the user must end in the state of the newest event. Delivery
model: events arrive in a permuted order, each after it was emitted, so when the k-th
delivery arrives Stripe's subscription is (at least) in the newest state among those
delivered so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stripe_double import subscription


@dataclass(frozen=True)
class Step:
    kind: str  # the event type
    status: str  # the subscription's status after it
    price: str


STARTER, PRO = "price_starter_llmgateway", "price_pro_llmgateway"

SEQUENCES: dict[str, list[Step]] = {
    "subscribe-upgrade-fail-cancel": [
        Step("customer.subscription.created", "incomplete", STARTER),
        Step("checkout.session.completed", "active", STARTER),
        Step("invoice.paid", "active", STARTER),
        Step("customer.subscription.updated", "active", PRO),
        Step("invoice.payment_failed", "past_due", PRO),
        Step("customer.subscription.deleted", "canceled", PRO),
    ],
    "subscribe-fail-recover-upgrade": [
        Step("customer.subscription.created", "incomplete", STARTER),
        Step("checkout.session.completed", "active", STARTER),
        Step("invoice.payment_failed", "past_due", STARTER),
        Step("invoice.paid", "active", STARTER),
        Step("customer.subscription.updated", "active", PRO),
    ],
    "subscribe-upgrade-fail": [
        Step("customer.subscription.created", "incomplete", STARTER),
        Step("checkout.session.completed", "active", STARTER),
        Step("invoice.paid", "active", STARTER),
        Step("customer.subscription.updated", "active", PRO),
        Step("invoice.payment_failed", "past_due", PRO),
    ],
}

# What the user holds after the newest state (payment_failed = "block", fallback "free")
EXPECTED = {
    "subscribe-upgrade-fail-cancel": ("free", "canceled", "active"),
    "subscribe-fail-recover-upgrade": ("pro", "active", "active"),
    "subscribe-upgrade-fail": ("pro", "past_due", "payment_failed"),
}


def state(step: Step, subscription_id: str, customer: str, user_id: str) -> dict[str, Any]:
    return subscription(subscription_id, customer, step.price, step.status, user_id)


def event_object(step: Step, subscription_id: str, customer: str, user_id: str,
                 n: int) -> dict[str, Any]:
    """The object an event carries: a snapshot of when it was emitted."""
    if step.kind.startswith("customer.subscription."):
        return state(step, subscription_id, customer, user_id)
    if step.kind.startswith("invoice."):
        return {"id": f"in_{subscription_id}_{n}", "object": "invoice", "customer": customer,
                "status": "paid" if step.kind == "invoice.paid" else "open",
                "parent": {"type": "subscription_details", "subscription_details": {
                    "subscription": subscription_id, "metadata": {}}}}
    return {"id": f"cs_{subscription_id}", "object": "checkout.session",
            "mode": "subscription", "client_reference_id": user_id, "customer": customer,
            "subscription": subscription_id, "status": "complete", "payment_status": "paid",
            "metadata": {"user_id": user_id, "plan": "starter"}}
