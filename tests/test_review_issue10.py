"""Adversarial review of issue 10's fixes: what still broke, each as a test.

The StripeWebhook addon on its own (tests/webhook_harness.py): a real database, the real
stripe library talking to the Stripe double, real signatures.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest
from mitmproxy.test import taddons, tflow, tutils
from pymongo import AsyncMongoClient
from stripe_double import StripeDouble, sign
from webhook_harness import SECRET, OneClient, webhook_addon

STARTER, PRO = "price_starter_llmgateway", "price_pro_llmgateway"


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
