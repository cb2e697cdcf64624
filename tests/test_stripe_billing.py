"""What Stripe events mean for a user, and the [stripe] settings (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from llm_billing.core.config import ConfigError, parse_config
from llm_billing.core.plans import parse_plans
from llm_billing.core.stripe_rules import parse_stripe, payment_blocked, user_change

PLANS = parse_plans(None)
NOW = datetime(2026, 11, 23, tzinfo=UTC)


def change(kind: str, obj: dict, **settings):
    event = {"id": "evt_1", "type": kind, "data": {"object": obj}}
    return user_change(event, PLANS, parse_stripe(settings, {}), NOW)


def test_subscription_states():
    sub = {"id": "sub_1", "customer": "cus_1", "metadata": {"user_id": "u"},
           "items": {"data": [{"price": {"id": "price_pro_llmgateway"}}]}}
    assert change("customer.subscription.updated", {**sub, "status": "active"}).fields[
        "plan"] == "pro"
    assert change("customer.subscription.updated", {**sub, "status": "unpaid"}).fields[
        "plan"] == "free"
    assert change("customer.subscription.deleted", sub).fields["plan"] == "free"
    assert change("customer.subscription.deleted", sub, fallback_plan="starter").fields[
        "plan"] == "starter"


def test_payment_failed_policies():
    invoice = {"id": "in_1", "customer": "cus_1"}
    blocked = change("invoice.payment_failed", invoice)
    assert blocked.customer == "cus_1" and blocked.fields["status"] == "payment_failed"
    user = {"status": "payment_failed", "payment_failed_at": NOW}
    settings = parse_stripe({"grace_days": 3}, {})
    assert not payment_blocked(user, settings, NOW + timedelta(days=2))
    assert payment_blocked(user, settings, NOW + timedelta(days=4))
    assert change("invoice.payment_failed", invoice, payment_failed="downgrade").fields[
        "plan"] == "free"
    assert not change("invoice.paid", invoice).fields["payment_failed_at"]


def test_unknown_events_change_nothing():
    assert change("customer.created", {"id": "cus_1"}) is None


def test_keys_only_from_the_environment():
    settings = parse_stripe({}, {"STRIPE_SECRET_KEY": "sk_test_1", "STRIPE_WEBHOOK_SECRET":
                                 "whsec_1"})
    assert settings.enabled and "sk_test_1" not in repr(settings)
    assert not parse_stripe({}, {}).enabled


@pytest.mark.parametrize(("table", "message"), [
    ('secret_key = "sk_live_x"', "unknown field 'secret_key'"),
    ('payment_failed = "ignore"', "stripe.payment_failed"),
    ('fallback_plan = "gold"', "stripe.fallback_plan"),
])
def test_stripe_config_errors(table: str, message: str):
    text = f'[[backends]]\nname="b"\nurl="http://x"\nmodels=["m"]\n[stripe]\n{table}\n'
    with pytest.raises(ConfigError, match=message):
        parse_config(text, {})
