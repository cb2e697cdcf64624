"""Stripe, the pure part: ``[stripe]`` settings and what webhook events mean for a user
(seed 000's Stripe integration: plans map to prices, Free has no payment). Sans-I/O."""

from __future__ import annotations

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


# --- What webhook events mean for a user -------------------------------------------------

ACTIVE_SUBSCRIPTION = ("active", "trialing", "past_due")


@dataclass(frozen=True, slots=True)
class UserChange:
    """How an event changes a user: find by ``user_id`` or ``customer``, then ``$set``."""

    user_id: str | None
    customer: str | None
    fields: dict[str, Any]


def plan_for_price(plans: Mapping[str, Plan], price_id: str | None) -> Plan | None:
    return next((p for p in plans.values() if price_id and p.stripe_price == price_id), None)


def _subscription_plan(subscription: dict[str, Any], plans: Mapping[str, Plan]) -> Plan | None:
    for item in (subscription.get("items") or {}).get("data") or []:
        if plan := plan_for_price(plans, (item.get("price") or {}).get("id")):
            return plan
    return plans.get((subscription.get("metadata") or {}).get("plan", ""))


def user_change(event: dict[str, Any], plans: Mapping[str, Plan], settings: StripeSettings,
                now: datetime | None = None) -> UserChange | None:
    """The change a webhook event makes to ``billing.users``; None for events we ignore."""
    now = now or datetime.now(UTC)
    default_plan = settings.fallback_plan
    obj = event["data"]["object"]
    kind = event["type"]
    metadata = obj.get("metadata") or {}
    user_id = obj.get("client_reference_id") or metadata.get("user_id")
    customer = obj.get("customer")
    if kind == "checkout.session.completed":
        plan = plans.get(metadata.get("plan", ""))
        fields: dict[str, Any] = {"stripe_customer_id": customer,
                                  "stripe_subscription_id": obj.get("subscription"),
                                  "status": "active", "payment_failed_at": None}
        if plan is not None:
            fields["plan"] = plan.id
        return UserChange(user_id, customer, fields)
    if kind in ("customer.subscription.created", "customer.subscription.updated"):
        plan = _subscription_plan(obj, plans)
        active = obj.get("status") in ACTIVE_SUBSCRIPTION
        fields = {"stripe_customer_id": customer, "stripe_subscription_id": obj.get("id"),
                  "subscription_status": obj.get("status"),
                  "plan": plan.id if plan is not None and active else default_plan}
        return UserChange(user_id, customer, fields)
    if kind == "customer.subscription.deleted":
        return UserChange(user_id, customer, {
            "plan": default_plan, "subscription_status": "canceled",
            "stripe_subscription_id": None})
    if kind == "invoice.paid":
        return UserChange(None, customer, {"status": "active", "payment_failed_at": None,
                                           "last_invoice_paid": obj.get("id")})
    if kind == "invoice.payment_failed":
        if settings.payment_failed == "downgrade":
            return UserChange(None, customer, {"plan": default_plan,
                                               "payment_failed_at": now})
        return UserChange(None, customer, {"status": "payment_failed",
                                           "payment_failed_at": now})
    return None


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
