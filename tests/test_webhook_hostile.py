"""Hostile webhooks: correctly signed payloads that are not events, and bodies too large.

The bulk runs through the StripeWebhook addon's ``request`` hook with mitmproxy's test
flows, a real database and the Stripe double: every answer is 400 or 200 with a JSON
body, never an exception and never a flow left without an answer (which mitmproxy would
forward). A handful goes through a running mitmdump whose reverse target counts every
connection: it must count none.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mitmproxy.test import taddons, tflow, tutils
from pymongo import AsyncMongoClient
from stripe_double import StripeDouble, sign, subscription
from webhook_harness import SECRET, STRIPE_ENV, OneClient, webhook_addon

from conftest import Proxy, start_proxy, stop_proxy, write_config
from fake_upstream import FakeUpstream

MAX_EVENT_BYTES = 1 << 20  # the cap: Stripe events are a few KiB

HANDLED = ["customer.subscription.created", "customer.subscription.updated",
           "customer.subscription.deleted", "invoice.paid", "invoice.payment_failed",
           "checkout.session.completed", "customer.created"]


def nasty_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value from the corners: wrong types, huge numbers, odd strings, nesting."""
    pick = rng.randrange(15 if depth < 3 else 11)
    if pick < 11:
        return [
            None, True, 0, -1, 10**30, 1e308, -0.0, "",
            "x" * rng.choice([1, 300, 70_000]),
            rng.choice(["sub_1", "cus_1", "evt_1", "sub_weird", "user-é", "\x00", "\ud800",
                        "a\nb", "$gt", "../../v1/charges", "sub_1?expand[]=x", "🙂" * 10]),
            rng.choice([10**4000, 2**63, -(2**63) - 1, 1.5e-320, 12345678901234567890]),
        ][pick]
    if pick == 11:
        return [nasty_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick == 12:
        return rng.choice([{"$gt": ""}, {"id": nasty_value(rng, depth + 1)},
                           {"object": nasty_value(rng, depth + 1)}])
    keys = ["id", "object", "customer", "metadata", "user_id", "a.b", "$set",
            "subscription", "items", "data", "price", "\x00k"]
    return {rng.choice(keys): nasty_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def skeleton(rng: random.Random, n: int) -> dict[str, Any]:
    kind = rng.choice(HANDLED)
    obj: dict[str, Any] = {"id": rng.choice(["sub_1", "sub_weird", f"sub_missing{n}",
                                             "in_1", "cs_1"]),
                           "customer": rng.choice(["cus_1", None, f"cus_{n}"]),
                           "metadata": {"user_id": f"user-hostile-{n % 7}"}}
    if kind.startswith("invoice."):
        obj["parent"] = {"subscription_details": {"subscription": "sub_1"}}
    if kind.startswith("checkout."):
        obj.update(client_reference_id=f"user-hostile-{n % 7}", subscription="sub_1")
    return {"id": f"evt_hostile_{n}", "object": "event", "type": kind, "created": 1,
            "data": {"object": obj}}


def mutate(rng: random.Random, doc: dict[str, Any]) -> None:
    """Replace or drop one field, anywhere the webhook looks."""
    target, key = rng.choice([
        (doc, "id"), (doc, "type"), (doc, "data"), (doc["data"], "object"),
        *[(doc["data"]["object"], k) for k in ("id", "customer", "metadata",
                                                "subscription", "client_reference_id",
                                                "parent")],
    ]) if isinstance(doc.get("data"), dict) and isinstance(doc["data"].get("object"), dict) \
        else (doc, rng.choice(["id", "type", "data"]))
    if rng.random() < 0.2:
        target.pop(key, None)
    else:
        target[key] = nasty_value(rng)


def handwritten() -> list[bytes]:
    base = {"id": "evt_hand", "type": "customer.subscription.updated",
            "data": {"object": {"id": "sub_1", "customer": "cus_1"}}}
    deep = b"[" * 5000 + b"]" * 5000
    return [
        b"", b" ", b"{}", b"1", b"[]", b"null", b"true", b'"evt_1"', b"NaN", b"Infinity",
        b"-Infinity", b'{"id": NaN}', deep, b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"id": "evt_1", "type": "invoice.paid", "data": {"object": ' + deep + b"}}",
        b"1" + b"0" * 5000, b"1e999", b"\xff\xfe\xfd", "{}".encode("utf-16"),
        b"\xef\xbb\xbf" + json.dumps(base).encode(), json.dumps(base).encode() + b" junk",
        json.dumps(base).encode()[:-1], b'{"id": "evt_1", "id": ["a"], "type": "x",'
        b' "data": {"object": {}}}',
        json.dumps({**base, "id": ["a"]}).encode(), json.dumps({**base, "id": None}).encode(),
        json.dumps({**base, "id": 10**40}).encode(), json.dumps({**base, "type": None}).encode(),
        json.dumps({**base, "data": None}).encode(), json.dumps({**base, "data": []}).encode(),
        json.dumps({**base, "data": {"object": None}}).encode(),
        json.dumps({**base, "data": {"object": "sub_1"}}).encode(),
        json.dumps({**base, "data": {"object": {"id": {"$ne": None}}}}).encode(),
        json.dumps({**base, "data": {"object": {"id": "sub_1", "customer": {"$ne": None}}}})
        .encode(),
        json.dumps({**base, "id": "e" * 256}).encode(), json.dumps({**base, "id": "evt\x00"})
        .encode(), json.dumps({**base, "type": "X" * 101}).encode(),
        json.dumps({**base, "id": "evt_\ud800"}).encode(),
        json.dumps({**base, "type": "checkout.session.completed", "data": {"object": {
            "client_reference_id": "u\ud800", "subscription": "sub_1"}}}).encode(),
        json.dumps({**base, "type": "invoice.paid", "data": {"object": {
            "parent": {"subscription_details": {"subscription": ["sub_1"]}}}}}).encode(),
        json.dumps({**base, "id": "evt_weird_state", "data": {"object": {"id": "sub_weird"}}})
        .encode(),
    ]


def hostile_payloads(count: int, seed: int = 10) -> list[bytes]:
    rng = random.Random(seed)
    payloads = handwritten()
    while len(payloads) < count:
        n = len(payloads)
        if rng.random() < 0.15:
            doc: Any = nasty_value(rng)
        else:
            doc = skeleton(rng, n)
            for _ in range(rng.randrange(1, 4)):
                mutate(rng, doc)
        payloads.append(json.dumps(doc).encode())
    return payloads


@pytest.fixture(scope="module")
def double() -> Iterator[StripeDouble]:
    stripe = StripeDouble().start()
    stripe.subscriptions["sub_1"] = subscription("sub_1", "cus_1", "price_pro_llmgateway",
                                                 "active", "user-hostile-0")
    stripe.subscriptions["sub_weird"] = {  # even Stripe's own answer is not trusted blindly
        "id": "sub_weird", "object": "subscription", "status": ["active"],
        "customer": {"$ne": None}, "metadata": {"user_id": {"$gt": ""}}, "items": "none"}
    yield stripe
    stripe.stop()


def webhook_flow(payload: bytes, signature: str | None = None, method: bytes = b"POST",
                 headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    signature = sign(payload, SECRET) if signature is None else signature
    return tflow.tflow(req=tutils.treq(
        method=method, path=b"/webhook/stripe", content=payload, headers=(
            (b"content-type", b"application/json"),
            (b"stripe-signature", signature.encode()), *(headers or []))))


def check_answer(flow, payload: bytes) -> tuple[int, Any]:
    response = flow.response
    assert response is not None, payload[:200]  # no answer: mitmproxy would forward it
    status = response.status_code
    body = json.loads(response.content)
    assert response.headers["content-type"] == "application/json"
    assert status in (200, 400), (status, body, payload[:300])
    assert isinstance(body, dict) and (status == 200 or "error" in body), body
    return status, body


def test_a_thousand_signed_hostile_payloads_get_400_or_200(mongo_uri: str, db,
                                                           double: StripeDouble, caplog):
    """Issue 10.4: 1,200 correctly signed payloads that are not events (or are events
    with poisoned fields): each answered 400 or 200 with JSON, nothing raised, nothing
    left for mitmproxy to forward; a user is only ever changed through Stripe's state."""
    payloads = hostile_payloads(1200)
    db.billing.users.delete_many({"_id": {"$regex": "^user-hostile-"}})
    before = {d["_id"] for d in db.billing.users.find({}, {"_id": 1})}

    async def go() -> list[tuple[int, Any]]:
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        semaphore = asyncio.Semaphore(8)

        async def one(payload: bytes):
            flow = webhook_flow(payload)
            async with semaphore:
                await addon.request(flow)
            return check_answer(flow, payload)

        with taddons.context(addon):
            return await asyncio.gather(*(one(p) for p in payloads))

    answers = asyncio.run(go())
    statuses = [status for status, _ in answers]
    assert statuses.count(400) > 600 and statuses.count(200) > 100, (
        statuses.count(400), statuses.count(200))
    assert "Stripe webhook failed" not in caplog.text  # the catch-all never ran
    changed = {d["_id"] for d in db.billing.users.find({}, {"_id": 1})} - before
    assert {f"user-hostile-{n}" for n in range(7)} & changed
    for doc in db.billing.users.find({"_id": {"$in": sorted(changed)}}):
        assert isinstance(doc["_id"], str), doc  # a signed checkout may name any user
        assert doc.get("plan") in (None, "pro", "free"), doc  # only what sub_1's state says
        for field in ("stripe_customer_id", "stripe_subscription_id"):
            assert doc.get(field) in (None, "cus_1", "sub_1") or doc[field].startswith(
                "cus_"), doc


def test_wrong_method_and_unsigned_hostile_payloads(mongo_uri: str, double: StripeDouble):
    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        flows = [webhook_flow(b"{}", method=b"GET"), webhook_flow(b"[]" * 10, "t=1,v1=00"),
                 webhook_flow(b"1", "t=" + "9" * 5000 + ",v1=ab"), webhook_flow(b"\xff", "")]
        for flow in flows:
            await addon.request(flow)
        return [(f.response.status_code, json.loads(f.response.content)) for f in flows]

    assert asyncio.run(go()) == [(405, {"error": "POST only"}),
                                 (400, {"error": "invalid signature"}),
                                 (400, {"error": "invalid signature"}),
                                 (400, {"error": "payload is not UTF-8"})]


def test_an_event_the_database_cannot_store_gets_400_not_503(mongo_uri: str,
                                                             double: StripeDouble):
    """``"id": ["a"]`` can never be a document's ``_id``: Stripe must not retry it."""
    payload = json.dumps({"id": ["a"], "type": "invoice.paid",
                          "data": {"object": {"id": "in_1"}}}).encode()

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        flow = webhook_flow(payload)
        await addon.request(flow)
        return flow.response.status_code, json.loads(flow.response.content)

    status, body = asyncio.run(go())
    assert status == 400 and "id" in body["error"]


def test_bodies_over_1_mib_get_413(mongo_uri: str, double: StripeDouble):
    """Issue 10.5: refused from Content-Length as soon as the headers are in, or after
    a chunked body grew too large; 1 MiB exactly is still read."""
    event = {"id": "evt_big", "type": "customer.created", "data": {"object": {"id": "cus_1"}}}
    padded = json.dumps({**event, "pad": "x" * MAX_EVENT_BYTES}).encode()

    async def go():
        addon = webhook_addon(OneClient(AsyncMongoClient(mongo_uri, tz_aware=True)), double)
        announced = webhook_flow(b"", headers=[(b"content-length", b"%d" % (10 * 2**30))])
        addon.requestheaders(announced)  # a 10 GiB body: refused before a byte of it
        chunked = webhook_flow(padded)
        chunked.request.headers.pop("content-length", None)
        chunked.request.headers["transfer-encoding"] = "chunked"
        addon.requestheaders(chunked)
        assert chunked.response is None  # not yet known
        await addon.request(chunked)
        at_limit = json.dumps({**event, "pad": ""}).encode()
        at_limit += b" " * (MAX_EVENT_BYTES - len(at_limit))
        exact = webhook_flow(at_limit)
        addon.requestheaders(exact)
        await addon.request(exact)
        return [(f.response.status_code, json.loads(f.response.content))
                for f in (announced, chunked, exact)]

    announced, chunked, exact = asyncio.run(go())
    assert announced == chunked == (413, {"error": f"payload larger than {MAX_EVENT_BYTES} "
                                                   "bytes"})
    assert exact == (200, {"received": True})


# --- Through a running mitmdump whose reverse target counts connections ---------------------

class Sink:
    """A reverse target that counts every connection it is offered."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture(scope="module")
def hostile_proxy(tmp_path_factory, mongo_uri: str, upstream: FakeUpstream,
                  double: StripeDouble) -> Iterator[tuple[Proxy, Sink]]:
    sink = Sink()
    tmp = tmp_path_factory.mktemp("hostile")
    config = write_config(tmp / "config.toml", upstream.url, "http://127.0.0.1:9",
                          f'[stripe]\napi_base = "{double.url}"\n')
    proxy = start_proxy(tmp, mongo_uri, config, "--mode", f"reverse:{sink.url}",
                        env=STRIPE_ENV)
    yield proxy, sink
    stop_proxy(proxy)
    sink.server.close()


def post(proxy: Proxy, content: Any, headers: dict[str, str] | None = None,
         signature: str | None = None) -> httpx.Response:
    signed = {"stripe-signature": signature} if signature is not None else {}
    return httpx.post(f"{proxy.url}/webhook/stripe", content=content,
                      headers={"content-type": "application/json", **signed,
                               **(headers or {})}, timeout=30)


def test_hostile_webhooks_through_mitmdump_are_answered_never_forwarded(hostile_proxy):
    proxy, sink = hostile_proxy
    payloads = handwritten() + hostile_payloads(80, seed=11)[-40:]
    for payload in payloads:
        response = post(proxy, payload, signature=sign(payload, SECRET))
        assert response.status_code in (200, 400), (response.status_code, payload[:200])
        assert response.headers["content-type"] == "application/json"
        assert isinstance(response.json(), dict)
    assert sink.connections == 0
    assert "Traceback" not in proxy.log and "Stripe webhook failed" not in proxy.log


def test_bodies_over_1_mib_through_mitmdump_get_413_never_forwarded(hostile_proxy):
    """Issue 10.5 through the proxy: with a Content-Length, and sent chunked."""
    proxy, sink = hostile_proxy
    too_big = json.dumps({"id": "evt_big", "type": "customer.created", "data": {
        "object": {"id": "cus_1"}}, "pad": " " * (2 * MAX_EVENT_BYTES)}).encode()
    response = post(proxy, too_big, signature=sign(too_big, SECRET))
    assert (response.status_code, response.json()) == (
        413, {"error": f"payload larger than {MAX_EVENT_BYTES} bytes"})

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for start in range(0, len(too_big), MAX_EVENT_BYTES // 2):
            yield too_big[start:start + MAX_EVENT_BYTES // 2]

    response = post(proxy, chunks(), signature=sign(too_big, SECRET))
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413
    assert sink.connections == 0
