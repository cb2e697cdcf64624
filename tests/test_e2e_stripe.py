"""Stripe through the real stripe library and a running proxy: signed webhooks applied as
Stripe's current state in any delivery order, plan changes on the next request, metered
overage from the outbox exactly once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from stripe_double import StripeDouble, event, sign
from stripe_sequences import EXPECTED, SEQUENCES, event_object, state

from conftest import (
    ROOT,
    ApiKey,
    Proxy,
    openai_client,
    set_plan,
    start_proxy,
    stop_proxy,
    usage_doc,
    wait_for_events,
    wait_for_usage,
    write_config,
)
from fake_upstream import FakeUpstream

SECRET = "whsec_test_" + "s" * 32
STRIPE_ENV = {"STRIPE_SECRET_KEY": "sk_test_" + "k" * 24, "STRIPE_WEBHOOK_SECRET": SECRET}
PROMPT = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def billing(tmp_path_factory, mongo_uri: str, upstream: FakeUpstream,
            stripe_double: StripeDouble) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("stripe")
    extra = f'[stripe]\napi_base = "{stripe_double.url}"\ngrace_days = 0\n'
    config = write_config(tmp / "config.toml", upstream.url, "http://127.0.0.1:9", extra)
    proxy = start_proxy(tmp, mongo_uri, config, "--set", "stripe_report_interval_ms=200",
                        env=STRIPE_ENV)
    yield proxy
    stop_proxy(proxy)


def post(proxy: Proxy, payload: bytes, signature: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/json",
               "stripe-signature": signature if signature is not None
               else sign(payload, SECRET)}
    return httpx.post(f"{proxy.url}/webhook/stripe", content=payload, headers=headers)


def chat(proxy: Proxy, key: ApiKey, max_tokens: int = 20):
    return openai_client(proxy, key.token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=PROMPT, max_tokens=max_tokens)


def cli(mongo_uri: str, config: str, *args: str) -> str:
    env = {**os.environ, **STRIPE_ENV, "MONGODB_URI": mongo_uri, "LLM_BILLING_CONFIG": config}
    result = subprocess.run([sys.executable, str(ROOT / "scripts/billing.py"), *args],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def subscription(user: str, customer: str, price: str, status: str = "active",
                 double: StripeDouble | None = None) -> dict:
    """A subscription as an event carries it; with ``double``, also Stripe's current state
    (what the webhook fetches: events are only a signal)."""
    doc = {"id": f"sub_{user.replace('-', '_')}", "object": "subscription",
           "customer": customer, "status": status, "metadata": {"user_id": user},
           "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
                                                 "price": {"id": price, "object": "price"}}]}}
    if double is not None:
        double.subscriptions[doc["id"]] = doc
    return doc


def test_forged_and_stale_signatures_change_nothing(billing: Proxy, key: ApiKey, db):
    set_plan(db, key.user_id, "free")
    payload = event("customer.subscription.updated",
                    subscription(key.user_id, "cus_x", "price_pro_llmgateway"))
    forged = sign(payload, "whsec_wrong")
    assert post(billing, payload, forged).status_code == 400
    assert post(billing, payload, "").status_code == 400
    stale = sign(payload, SECRET, int(time.time()) - 301)
    response = post(billing, payload, stale)
    assert response.status_code == 400 and response.json() == {"error": "invalid signature"}
    tampered = payload.replace(b"price_pro", b"price_ent")
    assert post(billing, tampered, sign(payload, SECRET)).status_code == 400
    assert db.billing.users.find_one({"_id": key.user_id})["plan"] == "free"
    assert chat(billing, key).headers["x-ratelimit-limit-tokens"] == "1000"


def test_replayed_event_is_a_no_op(billing: Proxy, stripe_double: StripeDouble, key: ApiKey,
                                   db):
    set_plan(db, key.user_id, "free")
    payload = event("customer.subscription.updated",
                    subscription(key.user_id, "cus_r", "price_pro_llmgateway",
                                 double=stripe_double))
    assert post(billing, payload).json() == {"received": True}
    assert db.billing.users.find_one({"_id": key.user_id})["plan"] == "pro"
    set_plan(db, key.user_id, "starter")  # changed since, by someone else
    again = post(billing, payload)  # Stripe delivers the same event again
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert db.billing.users.find_one({"_id": key.user_id})["plan"] == "starter"


def test_upgrade_downgrade_and_cancel_apply_on_the_next_request(
        billing: Proxy, stripe_double: StripeDouble, key: ApiKey, db):
    set_plan(db, key.user_id, "free")
    assert chat(billing, key).headers["x-ratelimit-limit-tokens"] == "1000"
    customer = f"cus_{uuid.uuid4().hex[:10]}"
    steps = [("customer.subscription.created", "price_pro_llmgateway", "active", "100000"),
             ("customer.subscription.updated", "price_starter_llmgateway", "active", "10000"),
             ("customer.subscription.deleted", "price_starter_llmgateway", "canceled",
              "1000")]
    for kind, price, status, limit in steps:
        obj = subscription(key.user_id, customer, price, status, stripe_double)
        assert post(billing, event(kind, obj)).status_code == 200
        assert chat(billing, key).headers["x-ratelimit-limit-tokens"] == limit, kind
    assert db.billing.users.find_one({"_id": key.user_id})["plan"] == "free"


def test_payment_failed_blocks_and_paid_unblocks(billing: Proxy, stripe_double: StripeDouble,
                                                 key: ApiKey, db):
    customer = f"cus_{uuid.uuid4().hex[:10]}"
    db.billing.users.update_one({"_id": key.user_id}, {"$set": {
        "plan": "starter", "stripe_customer_id": customer}}, upsert=True)
    sub = subscription(key.user_id, customer, "price_starter_llmgateway", "past_due",
                       stripe_double)
    invoice = {"id": "in_1", "object": "invoice", "customer": customer, "status": "open",
               "parent": {"type": "subscription_details",
                          "subscription_details": {"subscription": sub["id"]}}}
    assert post(billing, event("invoice.payment_failed", invoice)).status_code == 200
    with pytest.raises(openai.RateLimitError) as err:  # grace_days = 0 in this config
        chat(billing, key)
    assert err.value.code == "insufficient_quota" and "payment failed" in err.value.message
    subscription(key.user_id, customer, "price_starter_llmgateway", "active", stripe_double)
    paid = dict(invoice, status="paid")
    assert post(billing, event("invoice.paid", paid)).status_code == 200
    assert chat(billing, key).status_code == 200


def test_late_created_and_retried_updated_end_in_stripes_current_state(
        billing: Proxy, stripe_double: StripeDouble, make_key, db):
    """Issue 10.1 and 10.2 through the proxy: a late ``created`` (incomplete, t=1001)
    after ``updated`` (active, t=1002) leaves Starter; a retried ``updated`` (active,
    t=1002) after ``deleted`` (t=1003) does not give Pro back."""
    starter, cancelled = make_key(), make_key()
    customer = f"cus_{uuid.uuid4().hex[:10]}"
    created = subscription(starter.user_id, customer, "price_starter_llmgateway", "incomplete")
    updated = subscription(starter.user_id, customer, "price_starter_llmgateway", "active",
                           stripe_double)
    for kind, obj, at in [("customer.subscription.updated", updated, 1002),
                          ("customer.subscription.created", created, 1001)]:
        assert post(billing, stamped(kind, obj, at)).status_code == 200
    assert chat(billing, starter).headers["x-ratelimit-limit-tokens"] == "10000"

    customer = f"cus_{uuid.uuid4().hex[:10]}"
    pro = subscription(cancelled.user_id, customer, "price_pro_llmgateway", "active")
    retried = stamped("customer.subscription.updated", pro, 1002)
    assert post(billing, retried).status_code == 200
    deleted = subscription(cancelled.user_id, customer, "price_pro_llmgateway", "canceled",
                           stripe_double)
    assert post(billing, stamped("customer.subscription.deleted", deleted, 1003)) \
        .status_code == 200
    assert post(billing, retried).status_code == 200  # Stripe's retry, delivered late
    assert chat(billing, cancelled).headers["x-ratelimit-limit-tokens"] == "1000"
    assert db.billing.users.find_one({"_id": cancelled.user_id})["plan"] == "free"


def stamped(kind: str, obj: dict, created: int) -> bytes:
    """An event created at ``created`` (Stripe's own clock, seconds)."""
    payload = json.loads(event(kind, obj))
    return json.dumps({**payload, "created": created}).encode()


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4, 5), (5, 4, 3, 2, 1, 0),
                                   (3, 5, 0, 4, 1, 2), (1, 3, 2, 5, 4, 0)])
def test_delivery_orders_through_the_proxy(billing: Proxy, stripe_double: StripeDouble,
                                           make_key, db, order: tuple[int, ...]):
    """A checkout, an upgrade, a failed payment and a cancellation, delivered in a few
    orders while Stripe's state moves on: the user ends on Free (the newest state)."""
    name = "subscribe-upgrade-fail-cancel"
    key = make_key()
    steps = SEQUENCES[name]
    tag = uuid.uuid4().hex[:10]
    sub, customer = f"sub_{tag}", f"cus_{tag}"
    for k, n in enumerate(order):
        stripe_double.subscriptions[sub] = state(steps[max(order[:k + 1])], sub, customer,
                                                 key.user_id)
        obj = event_object(steps[n], sub, customer, key.user_id, n)
        assert post(billing, stamped(steps[n].kind, obj, 1000 + n)).status_code == 200
    doc = db.billing.users.find_one({"_id": key.user_id})
    assert (doc["plan"], doc["subscription_status"], doc["status"]) == EXPECTED[name]
    assert chat(billing, key).headers["x-ratelimit-limit-tokens"] == "1000"


def test_unknown_events_are_acknowledged(billing: Proxy, db):
    payload = event("customer.created", {"id": "cus_new", "object": "customer"})
    assert post(billing, payload).status_code == 200
    assert "customer.created" in billing.log and "ignored" in billing.log


def test_stripe_down_then_up_reports_exactly_once(billing: Proxy, stripe_double: StripeDouble,
                                                  key: ApiKey, db):
    customer = f"cus_{uuid.uuid4().hex[:10]}"
    db.billing.users.update_one({"_id": key.user_id}, {"$set": {
        "plan": "starter", "stripe_customer_id": customer}}, upsert=True)
    set_plan(db, key.user_id, "starter", tokens_used=100_000)  # every token now is overage
    stripe_double.down = True
    try:
        chat(billing, key)
        [first] = wait_for_events(db, key.user_id, 1)
        wait_for_usage(db, key.user_id, first["tokens_billed"], "overage_tokens")
        deadline = time.monotonic() + 15
        while not db.billing.stripe_outbox.find_one({"user_id": key.user_id, "attempts":
                                                     {"$gte": 1}}):
            assert time.monotonic() < deadline, "no attempt while Stripe was down"
            time.sleep(0.1)
    finally:
        stripe_double.down = False
    db.billing.stripe_outbox.update_many({"user_id": key.user_id},
                                         {"$set": {"next_attempt": None}})  # skip backoff
    mine = wait_for_meter_events(stripe_double, customer, first["tokens_billed"])
    assert [e["payload"]["value"] for e in mine] == [str(first["tokens_billed"])]
    tries = [r for r in stripe_double.calls("/v1/billing/meter_events")
             if r.params["payload"]["stripe_customer_id"] == customer]
    assert len(tries) >= 2  # failed attempt(s), then the one that counted
    assert len({r.params["identifier"] for r in tries}) == 1


def wait_for_meter_events(double: StripeDouble, customer: str, total: int,
                          timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        mine = [e for e in double.meter_events.values()
                if e["payload"].get("stripe_customer_id") == customer]
        if sum(int(e["payload"]["value"]) for e in mine) >= total \
                or time.monotonic() > deadline:
            return mine
        time.sleep(0.1)


def test_free_user_subscribes_and_overage_reaches_stripe_once(
        billing: Proxy, stripe_double: StripeDouble, key: ApiKey, db, mongo_uri: str):
    set_plan(db, key.user_id, "free", tokens_used=9_995)
    with pytest.raises(openai.RateLimitError) as err:
        chat(billing, key)
    assert err.value.code == "insufficient_quota"

    config = str(billing.config_path)
    out = cli(mongo_uri, config, "subscribe", key.user_id, "starter")
    assert re.search(r"https://checkout\.stripe\.com/c/pay/cs_test_\d+", out)
    session = stripe_double.calls("/v1/checkout/sessions")[-1].params
    assert session["mode"] == "subscription"
    assert session["line_items"]["0"] == {"price": "price_starter_llmgateway", "quantity": "1"}
    assert session["client_reference_id"] == key.user_id
    assert session["metadata"] == {"user_id": key.user_id, "plan": "starter"}

    customer = f"cus_{uuid.uuid4().hex[:10]}"
    paid = subscription(key.user_id, customer, "price_starter_llmgateway", "active",
                        stripe_double)  # what Checkout created
    completed = {"id": "cs_test_done", "object": "checkout.session", "mode": "subscription",
                 "client_reference_id": key.user_id, "customer": customer,
                 "subscription": paid["id"], "metadata": {"user_id": key.user_id,
                                                          "plan": "starter"},
                 "payment_status": "paid", "status": "complete"}
    assert post(billing, event("checkout.session.completed", completed)).status_code == 200
    assert chat(billing, key).headers["x-ratelimit-limit-tokens"] == "10000"
    user = db.billing.users.find_one({"_id": key.user_id})
    assert (user["plan"], user["stripe_customer_id"]) == ("starter", customer)
    assert "https://billing.stripe.com/p/session/" in cli(mongo_uri, config, "portal",
                                                          key.user_id)
    portal = stripe_double.calls("/v1/billing_portal/sessions")[-1].params
    assert portal["customer"] == customer and portal["return_url"].endswith("/portal")

    used = usage_doc(db, key.user_id).get("tokens", 0)
    db.billing.usage.update_one({"_id": usage_doc(db, key.user_id)["_id"]},
                                {"$inc": {"tokens": 100_000 - 10 - used}})  # 10 left
    chat(billing, key, max_tokens=40)
    events = wait_for_events(db, key.user_id, 2)
    over = 100_000 - 10 + events[-1]["tokens_billed"] - 100_000
    assert wait_for_usage(db, key.user_id, over, "overage_tokens")["overage_tokens"] == over
    mine = wait_for_meter_events(stripe_double, customer, over)
    assert len(mine) == 1 and mine[0]["payload"]["value"] == str(over)
    assert mine[0]["event_name"] == "llm_overage_tokens"
    time.sleep(1)  # more report rounds: nothing new may arrive
    assert len(wait_for_meter_events(stripe_double, customer, over)) == 1
    report = cli(mongo_uri, config, "stripe-reconcile", "--csv")
    assert f"{key.user_id},{over},{over},{over},0,ok" in report


def test_without_stripe_keys_the_proxy_runs_and_says_so_once(proxy: Proxy, key: ApiKey):
    assert chat(proxy, key).status_code == 200
    assert proxy.log.count("Stripe is off") == 1
    payload = event("invoice.paid", {"id": "in_1", "object": "invoice", "customer": "cus_1"})
    response = httpx.post(f"{proxy.url}/webhook/stripe", content=payload,
                          headers={"stripe-signature": sign(payload, SECRET)})
    assert response.status_code == 400  # never forwarded upstream, never applied
