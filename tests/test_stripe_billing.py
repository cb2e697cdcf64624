"""What Stripe events mean for a user, their shape, and the [stripe] settings (pure)."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stripe_sequences import EXPECTED, SEQUENCES, event_object, state

from llm_billing.core.config import ConfigError, parse_config
from llm_billing.core.plans import parse_plans
from llm_billing.core.stripe_rules import (
    EventError,
    Signal,
    WebhookEvent,
    event_signal,
    parse_event,
    parse_stripe,
    payload_text,
    payment_blocked,
    subscription_fields,
)

PLANS = parse_plans(None)
NOW = datetime(2026, 11, 23, tzinfo=UTC)


STRIPE = parse_stripe({}, {})


def fields(status: str, user: dict | None = None, price: str = "price_pro_llmgateway",
           subscription_id: str = "sub_1", **table) -> dict | None:
    sub = {"id": subscription_id, "customer": "cus_1", "status": status,
           "metadata": {"user_id": "u"}, "items": {"data": [{"price": {"id": price}}]}}
    return subscription_fields(sub, user or {}, PLANS, parse_stripe(table, {}), NOW)


def test_subscription_states():
    assert fields("active")["plan"] == "pro"
    assert fields("trialing")["plan"] == "pro"
    for ended in ("incomplete", "incomplete_expired", "unpaid", "canceled", "paused"):
        assert fields(ended)["plan"] == "free", ended
    assert fields("canceled", fallback_plan="starter")["plan"] == "starter"
    assert fields("active", price="price_unknown")["plan"] == "free"
    assert fields("active")["stripe_customer_id"] == "cus_1"


def test_an_ended_subscription_that_is_not_the_current_one_changes_nothing():
    on_new = {"plan": "pro", "stripe_subscription_id": "sub_new"}
    assert fields("canceled", on_new, subscription_id="sub_old") is None
    assert fields("incomplete", on_new, subscription_id="sub_pending") is None
    assert fields("active", on_new, subscription_id="sub_other")["plan"] == "pro"
    assert fields("canceled", {"stripe_subscription_id": "sub_1"})["plan"] == "free"


def test_payment_failed_policies():
    blocked = fields("past_due")
    assert (blocked["plan"], blocked["status"], blocked["payment_failed_at"]) == (
        "pro", "payment_failed", NOW)
    earlier = NOW - timedelta(days=2)  # the grace period counts from the first failure
    assert fields("past_due", {"status": "payment_failed", "payment_failed_at": earlier})[
        "payment_failed_at"] == earlier
    user = {"status": "payment_failed", "payment_failed_at": NOW}
    settings = parse_stripe({"grace_days": 3}, {})
    assert not payment_blocked(user, settings, NOW + timedelta(days=2))
    assert payment_blocked(user, settings, NOW + timedelta(days=4))
    downgraded = fields("past_due", payment_failed="downgrade")
    assert (downgraded["plan"], downgraded["status"]) == ("free", "active")
    paid = fields("active", {"status": "payment_failed", "payment_failed_at": earlier})
    assert (paid["status"], paid["payment_failed_at"]) == ("active", None)
    assert "status" not in fields("active", {"status": "blocked"})  # an administrator's


def event(kind: str, obj: dict) -> WebhookEvent:
    return parse_event(json.dumps({"id": "evt_1", "type": kind, "data": {"object": obj}}))


def test_what_events_point_at():
    sub = event("customer.subscription.deleted", {"id": "sub_1", "customer": "cus_1",
                                                  "metadata": {"user_id": "u"}})
    assert event_signal(sub) == Signal("sub_1", "u", "cus_1")
    invoice = {"id": "in_1", "customer": "cus_1"}
    new_api = {**invoice, "parent": {"subscription_details": {"subscription": "sub_1"}}}
    assert event_signal(event("invoice.paid", new_api)) == Signal("sub_1", None, "cus_1")
    old_api = {**invoice, "subscription": "sub_1"}
    assert event_signal(event("invoice.payment_failed", old_api)).subscription_id == "sub_1"
    assert event_signal(event("invoice.paid", invoice)) is None  # not a subscription's
    checkout = {"id": "cs_1", "client_reference_id": "u", "customer": {"id": "cus_1"},
                "subscription": "sub_1"}
    assert event_signal(event("checkout.session.completed", checkout)) == Signal(
        "sub_1", "u", "cus_1")
    assert event_signal(event("customer.created", {"id": "cus_1"})) is None


@pytest.mark.parametrize("payload", [
    b"\xff\xfe", "{}", "1", "[]", "null", '"evt"', '{"id": "evt_1"}',
    '{"id": "evt_1", "type": "invoice.paid"}',
    '{"id": ["a"], "type": "invoice.paid", "data": {"object": {}}}',
    '{"id": "evt 1", "type": "invoice.paid", "data": {"object": {}}}',
    '{"id": "evt_1", "type": 7, "data": {"object": {}}}',
    '{"id": "evt_1", "type": "invoice.paid", "data": null}',
    '{"id": "evt_1", "type": "invoice.paid", "data": {"object": []}}',
    '{"id": "evt_1", "type": "invoice.paid", "data": {"object": {}}, "x": NaN}',
    '{"id": "evt_1", "type": "invoice.paid", "data": {"object": {}}, "x": 1' + "0" * 5000
    + "}", "[" * 5000 + "]" * 5000,
    '{"id": "evt_1", "type": "customer.subscription.updated", "data": {"object": {}}}',
    '{"id": "evt_1", "type": "customer.subscription.updated", "data": {"object": '
    '{"id": {"$gt": ""}}}}',
    '{"id": "evt_1", "type": "checkout.session.completed", "data": {"object": '
    '{"client_reference_id": ["u"]}}}',
    '{"id": "evt_1", "type": "checkout.session.completed", "data": {"object": '
    '{"client_reference_id": "\\ud800"}}}',
    '{"id": "evt_1", "type": "invoice.paid", "data": {"object": {"subscription": "../x"}}}',
    '{"id": "evt_1", "type": "customer.subscription.updated", "data": {"object": '
    '{"id": "sub_1", "metadata": "u"}}}',
])
def test_malformed_events_are_refused(payload: str | bytes):
    raw = payload if isinstance(payload, bytes) else payload.encode()
    with pytest.raises(EventError):
        event_signal(parse_event(payload_text(raw)))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["id", "type", "data", "object", "customer",
                                       "subscription", "metadata", "user_id", "parent",
                                       "subscription_details", "client_reference_id"])
                      | st.text(max_size=4), children, max_size=5),
    max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(doc=JSON, kind=st.sampled_from([
    "customer.subscription.updated", "invoice.paid", "checkout.session.completed",
    "customer.created"]), where=st.integers(0, 3))
def test_any_json_is_an_event_or_an_event_error(doc, kind: str, where: int):
    """Pure fuzz: whatever the JSON, the answer is an event (and its signal) or
    EventError — never another exception the webhook would have to survive."""
    shaped = [doc, {"id": "evt_1", "type": kind, "data": doc},
              {"id": "evt_1", "type": kind, "data": {"object": doc}},
              {"id": doc, "type": kind, "data": {"object": {"id": "sub_1"}}}][where]
    try:
        signal = event_signal(parse_event(json.dumps(shaped)))
    except EventError:
        return
    if signal is not None:
        for value in (signal.subscription_id, signal.user_id, signal.customer):
            assert value is None or isinstance(value, str)


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_every_delivery_order_of_the_rules_ends_in_the_newest_state(name: str):
    """All 720 (or 120) orders of each sequence, with Stripe's state moving on as
    deliveries arrive: the fields applied last are the newest state's."""
    steps = SEQUENCES[name]
    payloads = [json.dumps({"id": f"evt_{n}", "type": step.kind, "data": {
        "object": event_object(step, "sub_1", "cus_1", "u", n)}}) for n, step in
        enumerate(steps)]
    orders = list(itertools.permutations(range(len(steps))))
    wrong = []
    for order in orders:
        user: dict = {}
        for k, n in enumerate(order):
            signal = event_signal(parse_event(payloads[n]))
            assert signal is not None and signal.subscription_id == "sub_1"
            newest = state(steps[max(order[:k + 1])], "sub_1", "cus_1", "u")
            change = subscription_fields(newest, user, PLANS, STRIPE, NOW + timedelta(
                minutes=k))
            assert change is not None
            user.update(change)
        if (user["plan"], user["subscription_status"], user["status"]) != EXPECTED[name]:
            wrong.append(order)
    assert not wrong, f"{len(wrong)} of {len(orders)} orders end wrong, e.g. {wrong[:3]}"


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
