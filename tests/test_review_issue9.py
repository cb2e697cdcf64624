"""Review of issue 9 (billing exact under races, crashes, hostile data): admission and the
usage ledger, each case a way a blocking quota could be overshot or usage lost. Races
are driven by holding a database call at its await (test_ledger's Gate)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import pytest
from mitmproxy.test import taddons, tflow
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect
from test_ledger import MONTH, PLANS, Gate, ledger_for, run_request, stored

from conftest import ONE_BACKEND
from llm_billing import context
from llm_billing.core.config import parse_config
from llm_billing.core.usage import Protocol, Usage
from llm_billing.limits import Hold, Limits
from llm_billing.settings import Settings
from llm_billing.storage.ledger import QuotaLedger, UsageContention

CONFIG = ONE_BACKEND + """
[plans.capped]
monthly_tokens = 1000
overage = "blocked"

[plans.capped_tpm]
monthly_tokens = 1000000
tokens_per_minute = 5000
overage = "blocked"
"""

PATHS = {Protocol.OPENAI_CHAT: "/v1/chat/completions",
         Protocol.OPENAI_COMPLETIONS: "/v1/completions",
         Protocol.GEMINI: "/v1beta/models/m:generateContent",
         Protocol.ANTHROPIC_MESSAGES: "/v1/messages"}


class Database:
    def __init__(self, uri: str) -> None:
        self._client = AsyncMongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=2000)

    async def client(self) -> AsyncMongoClient:
        return self._client


def first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a parser that keeps a key's first value reads it."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        result.setdefault(key, value)
    return result


def limits_for(mongo_uri: str) -> Limits:
    settings = Settings()
    settings.config = parse_config(CONFIG, {})
    return Limits(Database(mongo_uri), settings)


def request_flow(limits: Limits, body: dict[str, Any] | bytes, plan: str = "capped",
                 protocol: Protocol = Protocol.OPENAI_CHAT, user: str | None = None) -> tuple:
    config = limits.settings.config
    assert config is not None
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    route = config.route_for(PATHS[protocol])
    assert route is not None
    flow = tflow.tflow()
    flow.request.content = raw
    rc = context.RequestContext(caller=context.Caller(key_id=1, user_id=user or "u"),
                                route=route, path=PATHS[protocol], model="m",
                                backend=config.backends[0], plan=config.plans[plan],
                                prompt_tokens=0, prompt_bound=0, body=json.loads(raw))
    context.attach(flow, rc)
    return flow, rc


async def run_limits(limits: Limits, flow) -> None:
    with taddons.context(limits):
        await limits.request(flow)


def admit(mongo_uri: str, body: dict[str, Any] | bytes, plan: str = "capped",
          protocol: Protocol = Protocol.OPENAI_CHAT, user: str | None = None) -> tuple:
    """Run ``Limits.request`` on one request; the flow, its context and the Limits."""
    limits = limits_for(mongo_uri)
    flow, rc = request_flow(limits, body, plan, protocol,
                            user or f"u-{uuid.uuid4().hex[:10]}")
    asyncio.run(run_limits(limits, flow))
    return flow, rc, limits


def output_sent(flow, protocol: Protocol) -> int:
    """The most output the upstream may produce for the request as sent, read by a parser
    that honours the largest of the limits and keeps duplicate keys' first values."""
    body = json.loads(flow.request.content, object_pairs_hook=first_wins)
    limits = [body.get(f) for f in ("max_tokens", "max_completion_tokens",
                                    "max_output_tokens")]
    answers = [body.get("n"), body.get("best_of")]
    for name in ("generationConfig", "generation_config"):
        config = body.get(name) or {}
        limits += [config.get("maxOutputTokens"), config.get("max_output_tokens")]
        answers += [config.get("candidateCount"), config.get("candidate_count")]
    limit = max(int(v) for v in limits if v is not None)
    return limit * max([1] + [int(v) for v in answers if v is not None])


@pytest.mark.parametrize(("protocol", "body"), [
    (Protocol.OPENAI_CHAT, {"model": "m", "messages": [], "max_tokens": 800, "n": 4}),
    (Protocol.OPENAI_CHAT, {"model": "m", "messages": [], "max_tokens": 800, "n": "4"}),
    (Protocol.OPENAI_COMPLETIONS, {"model": "m", "prompt": "", "max_tokens": 800,
                                   "best_of": 4}),
    (Protocol.GEMINI, {"contents": [], "generationConfig": {"maxOutputTokens": 800,
                                                            "candidateCount": 4}}),
], ids=["chat-n", "chat-n-string", "completions-best_of", "gemini-candidateCount"])
def test_every_answer_of_a_request_is_held(mongo_uri, protocol, body):
    """n / best_of / candidateCount answers each may use the whole output limit: the
    request must hold all of them, or be clamped so that all of them fit."""
    flow, rc, _ = admit(mongo_uri, body, protocol=protocol)
    assert flow.response is None
    assert isinstance(rc.hold, Hold)
    assert output_sent(flow, protocol) <= rc.hold.tokens <= 1000


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": [], "max_tokens": 10, "max_completion_tokens": 5000},
    {"model": "m", "messages": [], "max_completion_tokens": 5000, "max_tokens": 10},
], ids=["max_tokens-first", "max_completion_tokens-first"])
def test_the_largest_of_two_output_limits_is_held(mongo_uri, body):
    """vLLM takes max_completion_tokens over max_tokens: whichever field a server honours,
    it may not produce more than the request holds."""
    flow, rc, _ = admit(mongo_uri, body)
    assert output_sent(flow, Protocol.OPENAI_CHAT) <= rc.hold.tokens <= 1000


def test_gemini_snake_case_generation_config_is_limited(mongo_uri):
    """Gemini's REST API reads proto field names too (generation_config,
    max_output_tokens): that limit must be seen and clamped like the camelCase one."""
    body = {"contents": [], "generation_config": {"max_output_tokens": 5000,
                                                  "candidate_count": 2}}
    flow, rc, _ = admit(mongo_uri, body, protocol=Protocol.GEMINI)
    sent = json.loads(flow.request.content)
    assert "generationConfig" not in sent  # one config: a second one is a 400 at Google
    assert output_sent(flow, Protocol.GEMINI) <= rc.hold.tokens <= 1000


def test_a_duplicate_key_reads_the_same_upstream(mongo_uri):
    """A JSON object with a key twice: Python keeps the last value, other parsers the
    first. On a blocking plan the upstream must get the body the proxy measured."""
    raw = b'{"model": "m", "messages": [], "max_tokens": 100000, "max_tokens": 10}'
    flow, rc, _ = admit(mongo_uri, raw)
    assert output_sent(flow, Protocol.OPENAI_CHAT) <= rc.hold.tokens


def test_a_lone_surrogate_in_the_prompt_still_gets_the_output_limit(mongo_uri):
    """``"\\ud800"`` is valid JSON but no UTF-8: the clamped body must still be sent, with
    its output limit (a failed re-encoding sent the request unlimited)."""
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    flow, rc, _ = admit(mongo_uri, raw)
    sent = json.loads(flow.request.content)
    assert sent["messages"][0]["content"] == "hi \ud800"
    assert output_sent(flow, Protocol.OPENAI_CHAT) <= rc.hold.tokens <= 1000


def test_a_quota_held_by_requests_in_flight_is_retryable(mongo_uri, db):
    """Nothing used yet, but requests in flight hold the whole quota: the next request is
    refused for now (retryable 429), not told it can never fit (x-should-retry: false).
    Once the quota is used up, it is."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    body = {"model": "m", "messages": [], "max_tokens": 600}

    async def go() -> list:
        limits = limits_for(mongo_uri)
        flows = [request_flow(limits, body, user=user)[0] for _ in range(3)]
        for flow in flows:
            await run_limits(limits, flow)
        await asyncio.to_thread(db.billing.usage.update_one, {"_id": f"{user}:{MONTH}"},
                                {"$inc": {"tokens": 1000}})
        other = Limits(limits.ledger.database, limits.settings)  # another instance
        flows.append(request_flow(other, body, user=user)[0])
        await run_limits(other, flows[-1])
        return [flow.response for flow in flows]

    first, second, third, used_up = asyncio.run(go())
    assert first is None and second is None  # the second, clamped
    assert third is not None and third.status_code == 429
    assert "x-should-retry" not in third.headers
    assert used_up is not None and used_up.status_code == 429
    assert used_up.headers["x-should-retry"] == "false"


def test_an_unexpected_quota_error_holds_nothing(mongo_uri, db):
    """A usage document the ledger cannot read (hostile or corrupt data) must fail
    closed like a database error: 503, the TPM tokens given back, the account let go."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    db.billing.usage.insert_one({"_id": f"{user}:{MONTH}", "tokens": "a lot", "version": 1})
    flow, _, limits = admit(mongo_uri, {"model": "m", "messages": [], "max_tokens": 100},
                            plan="capped_tpm", user=user)
    assert flow.response is not None and flow.response.status_code == 503
    account = limits.ledger.accounts[(user, MONTH)]
    assert account.holds == 0 and account.reserved == 0
    bucket = limits.buckets[user]
    assert bucket.level(bucket._at) == bucket.capacity


class Contended:
    """``billing.usage`` where another instance wins every compare-and-set."""

    def __init__(self, collection) -> None:
        self._collection = collection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    async def update_one(self, query: dict, update: dict, upsert: bool = False):
        await self._collection.update_one({"_id": query["_id"]}, {"$inc": {"version": 1}},
                                          upsert=True)
        return await self._collection.update_one(query, update, upsert=False)


def test_lease_contention_is_retryable_not_an_exhausted_quota(mongo_uri):
    """Losing every compare-and-set is not an exhausted quota: the client must be told to
    retry (503), not 429 with x-should-retry: false."""
    ledger = QuotaLedger(Database(mongo_uri), "contended")

    async def collection():
        return Contended((await ledger.database.client()).billing.usage)

    ledger._collection = collection  # type: ignore[method-assign]

    async def go() -> None:
        account = ledger.account(f"u-{uuid.uuid4().hex[:10]}", MONTH, PLANS["capped"])
        await ledger.reserve(account, 100)

    with pytest.raises(UsageContention):
        asyncio.run(go())


def lease_of(db, user: str, ledger: QuotaLedger) -> int:
    return stored(db, user).get("leases", {}).get(ledger.instance, {}).get("amount", 0)


def test_a_request_during_a_lease_release_keeps_a_lease(mongo_uri, db):
    """The flush hands an idle lease back; while that write is awaited a request reserves
    against the lease still in memory. The request's tokens must stay leased in the
    database (else another instance is granted them too), and memory must agree."""
    user = f"u-{uuid.uuid4().hex[:10]}"

    async def go() -> tuple[int, int, int, QuotaLedger]:
        gate = Gate()
        ledger = ledger_for(mongo_uri, gate)
        await run_request(ledger, user, "capped", 100, 50)
        await ledger.flush()  # usage written; 50 left leased
        account = ledger.accounts[(user, MONTH)]
        account.last_used -= 60
        gate.armed = True
        flush = asyncio.create_task(ledger.flush())
        await gate.reached.wait()  # at the release's await
        request = ledger.account(user, MONTH, PLANS["capped"])
        reserve = asyncio.create_task(ledger.reserve(request, 30))
        for _ in range(50):
            await asyncio.sleep(0)
        gate.opened.set()
        await flush
        held = await reserve
        return held, account.reserved, account.lease, ledger

    held, reserved, lease, ledger = asyncio.run(go())
    assert held == reserved == 30
    assert lease_of(db, user, ledger) == lease >= reserved


def test_a_lease_release_whose_reply_is_lost_is_applied_once(mongo_uri, db):
    """The release is applied but its reply is lost; retried, it must not hand the lease
    back twice (a negative lease in the database lets other instances over-grant)."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    failed = {"n": 0}

    def release_reply_lost(update: dict) -> str | None:
        is_release = "tokens" not in update.get("$inc", {}) and "version" not in update.get(
            "$inc", {})
        if is_release and failed["n"] == 0:
            failed["n"] += 1
            return "after"
        return None

    async def go() -> tuple[int, QuotaLedger]:
        ledger = ledger_for(mongo_uri, Gate(), faults={"update_one": release_reply_lost})
        await run_request(ledger, user, "capped", 100, 50)
        await ledger.flush()
        account = ledger.accounts[(user, MONTH)]
        account.last_used -= 60
        for _ in range(3):
            with contextlib.suppress(AutoReconnect):
                await ledger.flush()
        account = ledger.account(user, MONTH, PLANS["capped"])
        held = await ledger.reserve(account, 30)
        ledger.settle(account, held, 30, Usage(prompt_tokens=30))
        return account.lease, ledger

    lease, ledger = asyncio.run(go())
    assert failed["n"] == 1
    assert lease_of(db, user, ledger) == lease > 0
