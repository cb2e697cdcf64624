"""The StripeWebhook addon on its own: a real database, the real stripe library talking to
the Stripe double, real signatures — without a proxy process, so thousands of deliveries
stay fast."""

from __future__ import annotations

import json
import time
from typing import Any

from mitmproxy import http
from pymongo import AsyncMongoClient
from stripe_double import StripeDouble, sign

from llm_billing.core.config import parse_config
from llm_billing.settings import Settings
from llm_billing.users import UserPlans
from llm_billing.webhook import StripeWebhook

SECRET = "whsec_test_" + "s" * 32
STRIPE_ENV = {"STRIPE_SECRET_KEY": "sk_test_" + "k" * 24, "STRIPE_WEBHOOK_SECRET": SECRET}
BACKEND = '[[backends]]\nname = "b"\nurl = "http://127.0.0.1:9"\nmodels = ["m"]\n'


class OneClient:
    """The Database addon's interface, over one client."""

    def __init__(self, client: AsyncMongoClient) -> None:
        self._client = client

    async def client(self) -> AsyncMongoClient:
        return self._client


def webhook_addon(database: Any, double: StripeDouble, stripe_table: str = "",
                  env: dict[str, str] | None = None) -> StripeWebhook:
    settings = Settings()
    text = BACKEND + f'[stripe]\napi_base = "{double.url}"\n{stripe_table}'
    settings.config = parse_config(text, STRIPE_ENV if env is None else env)
    return StripeWebhook(database, settings, UserPlans(database, settings))


def stripe_event(kind: str, obj: dict[str, Any], event_id: str,
                 created: int | None = None) -> bytes:
    """A webhook payload as Stripe sends it, ``created`` when its state was current."""
    return json.dumps({
        "id": event_id, "object": "event", "api_version": "2025-09-30.clover",
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj}, "livemode": False, "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None}, "type": kind}).encode()


async def deliver(addon: StripeWebhook, payload: bytes) -> http.Response:
    return await addon.handle("POST", payload, sign(payload, SECRET))


def answer(response: http.Response) -> tuple[int, Any]:
    return response.status_code, json.loads(response.content or b"null")
