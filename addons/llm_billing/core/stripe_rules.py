"""Stripe, the pure part: ``[stripe]`` settings, the shape of a webhook event and what it
points at, and what a subscription's current state means for its user (seed 000's Stripe
integration: plans map to prices, Free has no payment). Sans-I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .dates import aware
from .plans import Plan
from .validation import ConfigValueError, non_negative_int

PAYMENT_FAILED_POLICIES = ("downgrade", "block")


class StripeConfigError(ConfigValueError):
    pass


@dataclass(frozen=True, slots=True)
class StripeSettings:
    secret_key: str | None  # None: Stripe is off
    webhook_secret: str | None
    api_base: str | None = None
    meter_event_name: str = "llm_overage_tokens"
    success_url: str = "http://localhost:8080/portal?checkout=success"
    cancel_url: str = "http://localhost:8080/portal?checkout=cancel"
    portal_return_url: str = "http://localhost:8080/portal"
    payment_failed: str = "block"  # "downgrade" to fallback_plan, or "block" after grace
    grace_days: int = 3
    fallback_plan: str = "free"  # after a cancellation (seed 000: back to Free)

    @property
    def enabled(self) -> bool:
        return bool(self.secret_key)

    def __repr__(self) -> str:  # never show the keys
        return f"StripeSettings(enabled={self.enabled}, api_base={self.api_base!r})"


def parse_stripe(data: Any, env: Mapping[str, str]) -> StripeSettings:
    """``[stripe]`` of config.toml; keys come from STRIPE_SECRET_KEY / STRIPE_WEBHOOK_SECRET."""
    data = data or {}
    if not isinstance(data, dict):
        raise StripeConfigError("stripe: must be a table")
    known = {"api_base", "meter_event_name", "success_url", "cancel_url",
             "portal_return_url", "payment_failed", "grace_days", "fallback_plan"}
    if unknown := set(data) - known:
        raise StripeConfigError(f"stripe: unknown field {sorted(unknown)[0]!r} (keys come "
                                "from STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET)")
    policy = data.get("payment_failed", "block")
    if policy not in PAYMENT_FAILED_POLICIES:
        raise StripeConfigError(f"stripe.payment_failed: {policy!r} is not one of "
                                f"{', '.join(PAYMENT_FAILED_POLICIES)}")
    grace = non_negative_int(data.get("grace_days", 3), "stripe.grace_days")
    strings = {k: data[k] for k in ("api_base", "meter_event_name", "success_url",
                                    "cancel_url", "portal_return_url", "fallback_plan")
               if k in data}
    for name, value in strings.items():
        if not isinstance(value, str) or not value:
            raise StripeConfigError(f"stripe.{name}: must be a non-empty string")
    return StripeSettings(
        secret_key=env.get("STRIPE_SECRET_KEY") or None,
        webhook_secret=env.get("STRIPE_WEBHOOK_SECRET") or None,
        payment_failed=policy, grace_days=grace, **strings)


# --- Webhook events: their shape, and what they point at --------------------------------

MAX_EVENT_BYTES = 1 << 20  # Stripe's events are a few KiB; anything larger is not one
_EVENT_ID = re.compile(r"[\x21-\x7e]{1,255}")  # evt_…: printable ASCII, no spaces
_EVENT_TYPE = re.compile(r"[a-z0-9_.]{1,100}")  # customer.subscription.updated, …
_STRIPE_ID = re.compile(r"[A-Za-z0-9_]{1,255}")  # sub_…, cus_…, in_…
_USER_ID = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,500}")  # a metadata value's limit
SUBSCRIPTION_EVENTS = "customer.subscription."  # created, updated, deleted, paused, …
INVOICE_EVENTS = ("invoice.paid", "invoice.payment_succeeded", "invoice.payment_failed",
                  "invoice.payment_action_required")
CHECKOUT_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")


class EventError(ValueError):
    """A signed payload that is not an event we can ever take (answered 400: retrying
    it cannot help)."""


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    id: str
    type: str
    object: dict[str, Any]  # data.object, as the event carried it


@dataclass(frozen=True, slots=True)
class Signal:
    """What an event is about. Only the subscription's *current* state, fetched from
    Stripe, decides a plan; the event's own copy of it may be older than what is stored."""

    subscription_id: str | None  # None: a checkout without a subscription
    user_id: str | None  # as the event names it (client_reference_id, metadata.user_id)
    customer: str | None


def payload_text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise EventError("payload is not UTF-8") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_event(text: str) -> WebhookEvent:
    """A webhook payload's event, or EventError for anything but a JSON object with a
    string ``id`` and ``type`` and an object in ``data.object``."""
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise EventError("payload nests too deeply") from None
    except ValueError:  # not JSON, NaN, an integer too long to convert
        raise EventError("payload is not JSON") from None
    if not isinstance(doc, dict):
        raise EventError("an event is a JSON object")
    event_id, kind = doc.get("id"), doc.get("type")
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise EventError("event id must be a string like evt_…")
    if not isinstance(kind, str) or not _EVENT_TYPE.fullmatch(kind):
        raise EventError("event type must be a string like customer.subscription.updated")
    data = doc.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise EventError("event data.object must be an object")
    return WebhookEvent(event_id, kind, data["object"])


def stripe_id(value: Any, where: str = "") -> str | None:
    """A Stripe id (or an expanded object's), None if absent; EventError if malformed."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or (isinstance(value, str) and _STRIPE_ID.fullmatch(value)):
        return value
    raise EventError(f"data.object.{where} is not a Stripe id")


def _user_id(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, str) and _USER_ID.fullmatch(value)):
        return value
    raise EventError(f"data.object.{where} is not a user id")


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = obj.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise EventError("data.object.metadata must be an object")
    return metadata


def event_signal(event: WebhookEvent) -> Signal | None:
    """What the event points at, or None for an event that never changes a plan (other
    types, and invoices outside a subscription). EventError for malformed fields."""
    obj = event.object
    if event.type.startswith(SUBSCRIPTION_EVENTS):
        subscription = stripe_id(obj.get("id"), "id")
        if subscription is None:
            raise EventError("data.object.id is missing")
        return Signal(subscription, _user_id(_metadata(obj).get("user_id"), "metadata.user_id"),
                      stripe_id(obj.get("customer"), "customer"))
    if event.type in INVOICE_EVENTS:
        parent = obj.get("parent")  # API 2025-03-31 and later: parent.subscription_details
        details = parent.get("subscription_details") if isinstance(parent, dict) else None
        subscription = stripe_id(obj.get("subscription"), "subscription") or stripe_id(
            details.get("subscription") if isinstance(details, dict) else None,
            "parent.subscription_details.subscription")
        if subscription is None:
            return None
        return Signal(subscription, None, stripe_id(obj.get("customer"), "customer"))
    if event.type in CHECKOUT_EVENTS:
        user = _user_id(obj.get("client_reference_id"), "client_reference_id") or \
            _user_id(_metadata(obj).get("user_id"), "metadata.user_id")
        return Signal(stripe_id(obj.get("subscription"), "subscription"), user,
                      stripe_id(obj.get("customer"), "customer"))
    return None


# --- What a subscription's current state means for its user ---------------------------------

ACTIVE_SUBSCRIPTION = ("active", "trialing", "past_due")


def plan_for_price(plans: Mapping[str, Plan], price_id: str | None) -> Plan | None:
    return next((p for p in plans.values() if price_id and p.stripe_price == price_id), None)


def _subscription_plan(subscription: Mapping[str, Any],
                       plans: Mapping[str, Plan]) -> Plan | None:
    items = subscription.get("items")
    for item in (items.get("data") if isinstance(items, dict) else None) or []:
        price = item.get("price") if isinstance(item, dict) else None
        if plan := plan_for_price(plans, price.get("id") if isinstance(price, dict) else None):
            return plan
    metadata = subscription.get("metadata")
    plan_id = metadata.get("plan") if isinstance(metadata, dict) else None
    return plans.get(plan_id) if isinstance(plan_id, str) else None


def subscription_user(subscription: Mapping[str, Any]) -> str | None:
    """The user our checkout put in the subscription's metadata, if any."""
    metadata = subscription.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    return user if isinstance(user, str) and _USER_ID.fullmatch(user) else None


def subscription_customer(subscription: Mapping[str, Any]) -> str | None:
    """The subscription's customer id, if it is one (never a query fragment)."""
    customer = subscription.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    return customer if isinstance(customer, str) and _STRIPE_ID.fullmatch(customer) else None


def subscription_fields(subscription: Mapping[str, Any], user: Mapping[str, Any],
                        plans: Mapping[str, Plan], settings: StripeSettings,
                        now: datetime | None = None) -> dict[str, Any] | None:
    """The ``billing.users`` fields a subscription's current state gives its user, or None
    when it no longer concerns them: an ended or unfinished subscription that is not the
    user's current one (say, the old one, cancelled after the user subscribed again).

    Plan: the subscription's price while it is active (or trialing, or past due), else
    ``fallback_plan``. Past due: ``payment_failed`` — "block" after ``grace_days`` counted
    from when it was first seen, or "downgrade" to ``fallback_plan``; anything else
    clears the failure. An administrator's ``status: "blocked"`` is never changed."""
    now = now or datetime.now(UTC)
    subscription_id = subscription.get("id")
    if not isinstance(subscription_id, str) or not _STRIPE_ID.fullmatch(subscription_id):
        return None
    status = subscription.get("status")
    status = status if isinstance(status, str) else None
    active = status in ACTIVE_SUBSCRIPTION
    current = user.get("stripe_subscription_id")
    if not active and current and current != subscription_id:
        return None
    plan = _subscription_plan(subscription, plans) if active else None
    fields: dict[str, Any] = {
        "stripe_subscription_id": subscription_id, "subscription_status": status,
        "plan": plan.id if plan is not None else settings.fallback_plan,
        "status": "active", "payment_failed_at": None}
    if customer := subscription_customer(subscription):
        fields["stripe_customer_id"] = customer
    if status == "past_due":
        failed = user.get("payment_failed_at")
        fields["payment_failed_at"] = failed if isinstance(failed, datetime) else now
        if settings.payment_failed == "downgrade":
            fields["plan"] = settings.fallback_plan
        else:
            fields["status"] = "payment_failed"
    if user.get("status") == "blocked":
        del fields["status"]
    return fields


def payment_blocked(user: Mapping[str, Any], settings: StripeSettings,
                    now: datetime | None = None) -> bool:
    """A user whose payment failed more than ``grace_days`` ago (policy "block")."""
    failed = user.get("payment_failed_at")
    if user.get("status") == "blocked":
        return True
    if user.get("status") != "payment_failed" or not isinstance(failed, datetime):
        return False
    failed = aware(failed)
    return (now or datetime.now(UTC)) - failed > timedelta(days=settings.grace_days)
