"""The Limits addon's admission under concurrency, driven deterministically: the quota
lease's database call is held at its await while the other requests run."""

from __future__ import annotations

import asyncio
import uuid

from mitmproxy.test import taddons, tflow
from pymongo import AsyncMongoClient

from conftest import ONE_BACKEND
from llm_billing import context
from llm_billing.core.admission import least_output, need_of, output_limit, set_output_limit
from llm_billing.core.config import parse_config
from llm_billing.core.plans import parse_plans
from llm_billing.core.usage import Protocol
from llm_billing.limits import Limits
from llm_billing.settings import Settings

CONFIG = ONE_BACKEND


class HeldDatabase:
    """The database, with every call held until ``opened`` once ``armed``."""

    def __init__(self, uri: str) -> None:
        self._client = AsyncMongoClient(uri, tz_aware=True)
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def client(self) -> AsyncMongoClient:
        self.reached.set()
        await self.opened.wait()
        return self._client


def request_flow(config, plan_id: str, user: str, output: int) -> tuple:
    flow = tflow.tflow()
    route = config.route_for("/v1/chat/completions")
    body = {"model": "m", "messages": [], "max_tokens": output}
    rc = context.RequestContext(caller=context.Caller(key_id=1, user_id=user), route=route,
                                path=route.path, model="m", backend=config.backends[0],
                                plan=config.plans[plan_id], prompt_tokens=0, prompt_bound=0,
                                body=body)
    context.attach(flow, rc)
    return flow, rc


def test_tokens_per_minute_is_taken_before_the_quota_is_awaited(mongo_uri: str):
    """Item 3: Free (1,000 TPM), six concurrent requests of 400 tokens while the first
    waits for its quota lease: at most two may pass."""
    config = parse_config(CONFIG, {})
    settings = Settings()
    settings.config = config
    user = f"u-{uuid.uuid4().hex[:10]}"

    async def go() -> list:
        database = HeldDatabase(mongo_uri)
        limits = Limits(database, settings)
        with taddons.context(limits):
            flows = [request_flow(config, "free", user, 400) for _ in range(6)]
            tasks = [asyncio.create_task(limits.request(flow)) for flow, _ in flows]
            await database.reached.wait()  # the first is at its lease's await
            for _ in range(20):
                await asyncio.sleep(0)  # every other request runs as far as it can
            database.opened.set()
            await asyncio.gather(*tasks)
            bucket = limits.buckets[user]
            return [flow for flow, _ in flows if flow.response is None], bucket

    admitted, bucket = asyncio.run(go())
    assert len(admitted) <= 2
    assert bucket.level(bucket._at) >= 0


def test_output_limit_in_every_dialect():
    assert output_limit({"max_tokens": 7}) == 7
    assert output_limit({"max_completion_tokens": 9}) == 9
    assert output_limit({"max_output_tokens": 11}) == 11
    assert output_limit({"generationConfig": {"maxOutputTokens": 13}}) == 13
    assert output_limit({"max_tokens": True}) is None
    cases = [
        (Protocol.OPENAI_CHAT, {}, False, {"max_tokens": 5}),
        (Protocol.OPENAI_CHAT, {}, True, {"max_completion_tokens": 5}),
        (Protocol.OPENAI_CHAT, {"max_completion_tokens": 50}, False,
         {"max_completion_tokens": 5}),
        (Protocol.OPENAI_COMPLETIONS, {"max_tokens": 50}, False, {"max_tokens": 5}),
        (Protocol.OPENAI_RESPONSES, {}, False, {"max_output_tokens": 5}),
        (Protocol.ANTHROPIC_MESSAGES, {"max_tokens": 50}, False, {"max_tokens": 5}),
        (Protocol.GEMINI, {"generationConfig": {"temperature": 0}}, False,
         {"generationConfig": {"temperature": 0, "maxOutputTokens": 5}}),
        (Protocol.OPENAI_EMBEDDINGS, {}, False, {}),
    ]
    for protocol, body, native, expected in cases:
        set_output_limit(body, protocol, 5, openai_native=native)
        assert body == expected, protocol


def test_anthropic_thinking_budget_stays_below_the_clamped_limit():
    body = {"max_tokens": 8000, "thinking": {"type": "enabled", "budget_tokens": 6000}}
    assert least_output(body, Protocol.ANTHROPIC_MESSAGES) == 1025
    set_output_limit(body, Protocol.ANTHROPIC_MESSAGES, 3000)
    assert body["max_tokens"] == 3000 and body["thinking"]["budget_tokens"] == 2999


def test_need_of_a_request_under_each_policy():
    plans = parse_plans({"strict": {"monthly_tokens": 100, "overage": "blocked",
                                    "when_over": "refuse"}})
    chat = Protocol.OPENAI_CHAT
    clamp = need_of({}, chat, plans["free"], prompt=10, prompt_bound=40, reserve_output=256)
    assert (clamp.output, clamp.minimum, clamp.prompt_bound) == (4096, 11, 40)
    refuse = need_of({"max_tokens": 50}, chat, plans["strict"], 10, 40, 256)
    assert (refuse.output, refuse.minimum) == (50, 60)
    metered = need_of({}, chat, plans["starter"], 10, 40, 256)
    assert not plans["starter"].clamps and metered.output == 256
    embeddings = need_of({}, Protocol.OPENAI_EMBEDDINGS, plans["free"], 10, 40, 256)
    assert embeddings.output == 0 and embeddings.tokens == 10
