"""Plans, quotas, tokens per minute and overage through a real mitmdump: SDK clients,
pymongo over the wire."""

from __future__ import annotations

import asyncio
import json
import re
import time
from decimal import Decimal

import anthropic
import openai
import pytest
from bson import Decimal128
from google.genai import errors as genai_errors
from pymongo import MongoClient

from conftest import (
    ApiKey,
    Proxy,
    anthropic_client,
    gemini_client,
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

PROMPT = [{"role": "user", "content": "Hello!"}]

def test_free_quota_exhausted_in_every_format(proxy: Proxy, key: ApiKey, db,
                                              upstream: FakeUpstream):
    set_plan(db, key.user_id, "free", tokens_used=9_990)
    with pytest.raises(openai.RateLimitError) as err:
        openai_client(proxy, key.token).chat.completions.create(
            model="gpt-4o-mini", messages=PROMPT, max_tokens=50)
    assert err.value.code == "insufficient_quota"
    assert int(err.value.response.headers["retry-after"]) > 0
    assert err.value.response.headers["x-ratelimit-limit-tokens"] == "1000"
    client = anthropic_client(proxy, key.token)
    with pytest.raises(anthropic.RateLimitError) as aerr:
        client.messages.create(model="claude-opus-4-7", max_tokens=50, messages=PROMPT)
    assert aerr.value.body["error"]["type"] == "rate_limit_error"
    google = gemini_client(proxy, key.token)
    with pytest.raises(genai_errors.ClientError) as gerr:
        google.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert gerr.value.code == 429 and gerr.value.status == "RESOURCE_EXHAUSTED"
    time.sleep(1)
    assert db.billing.events_completion.count_documents({"user_id": key.user_id}) == 0
    assert usage_doc(db, key.user_id)["tokens"] == 9_990


def test_first_request_of_the_month_creates_the_usage_document(proxy: Proxy, key: ApiKey,
                                                              db):
    set_plan(db, key.user_id, "free")  # no usage document yet
    openai_client(proxy, key.token).chat.completions.create(model="gpt-4o-mini", messages=PROMPT,
                                                   max_tokens=20)
    [event] = wait_for_events(db, key.user_id, 1)
    doc = wait_for_usage(db, key.user_id, event["tokens_billed"])
    assert doc["tokens"] == event["tokens_billed"] and doc["requests"] == 1
    assert doc["user_id"] == key.user_id and len(doc["leases"]) == 1


def test_plan_header_and_rate_limit_headers_on_success(proxy: Proxy, key: ApiKey, db,
                                                       upstream: FakeUpstream, test_id: str):
    set_plan(db, key.user_id, "starter")
    raw = openai_client(proxy, key.token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=PROMPT, max_tokens=20,
        extra_headers={"X-Test-Id": test_id})
    assert upstream.exchange(test_id).headers["x-plan-id"] == "starter"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
    assert 10_000 - 40 <= remaining < 10_000  # the request's hold: prompt + max_tokens
    assert re.fullmatch(r"\d+(ms|(\d+m)?[\d.]+s)", raw.headers["x-ratelimit-reset-tokens"])


def test_tokens_per_minute_refuses_then_recovers(proxy: Proxy, key: ApiKey, db):
    set_plan(db, key.user_id, "tpm-test")  # 600 tokens per minute: 10 per second
    client = openai_client(proxy, key.token)
    with pytest.raises(openai.RateLimitError) as too_big:
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=700)
    assert "Request too large" in too_big.value.message
    client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=500)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=590)
    assert err.value.code == "rate_limit_exceeded"
    wait = int(err.value.response.headers["retry-after"])
    assert 1 <= wait <= 10
    time.sleep(wait)
    client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=590)
    assert len(wait_for_events(db, key.user_id, 2)) == 2


def test_overage_is_counted_exactly(proxy: Proxy, key: ApiKey, db, upstream: FakeUpstream,
                                    test_id: str):
    set_plan(db, key.user_id, "starter", tokens_used=99_990)
    client = openai_client(proxy, key.token)
    client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=30,
                                   extra_headers={"X-Test-Id": test_id})
    first = upstream.exchange(test_id).usage["total_tokens"]
    doc = wait_for_usage(db, key.user_id, 99_990 + first - 100_000, "overage_tokens")
    assert doc["overage_tokens"] == 99_990 + first - 100_000
    client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=30,
                                   extra_headers={"X-Test-Id": test_id + "b"})
    second = upstream.exchange(test_id + "b").usage["total_tokens"]
    over = 99_990 + first + second - 100_000
    doc = wait_for_usage(db, key.user_id, over, "overage_tokens")
    assert doc["overage_tokens"] == over  # past the quota, every token is overage
    assert doc["overage_cost"] == Decimal128(Decimal(over) * Decimal("0.002"))
    assert doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"] == first + second


def test_enterprise_is_never_limited(proxy: Proxy, key: ApiKey, db):
    set_plan(db, key.user_id, "enterprise", tokens_used=10**12)
    raw = openai_client(proxy, key.token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=PROMPT, max_tokens=100_000)
    assert "x-ratelimit-limit-tokens" not in raw.headers
    assert len(wait_for_events(db, key.user_id, 1)) == 1


async def _storm(urls: list[str], key: ApiKey, n: int, max_tokens: int | None,
                 content: str) -> tuple[int, int]:
    """n concurrent streaming requests, spread over ``urls``, to an upstream that uses
    every output token it is allowed (the worst case): (admitted, refused)."""
    clients = [openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key.token, max_retries=0)
               for url in urls]
    limit = {} if max_tokens is None else {"max_tokens": max_tokens}

    async def one(i: int) -> bool:
        try:
            stream = await clients[i % len(clients)].chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": content}],
                stream=True, extra_headers={"X-Fake-Scenario": "greedy"}, **limit)
            async for _ in stream:
                pass
            return True
        except openai.RateLimitError as e:
            assert e.code in ("insufficient_quota", "rate_limit_exceeded"), e
            return False

    results = await asyncio.gather(*(one(i) for i in range(n)))
    return sum(results), n - sum(results)


def overshoot(db: MongoClient, key: ApiKey, quota: int, before: int, admitted: int) -> int:
    events = wait_for_events(db, key.user_id, admitted)
    assert len(events) == admitted
    billed = sum(e["tokens_billed"] for e in events)
    assert all(not e["usage_estimated"] for e in events)  # what the provider reported
    doc = wait_for_usage(db, key.user_id, before + billed)
    assert doc["tokens"] == before + billed  # the usage document agrees with the events
    return before + billed - quota


CONTENT = "Write a limerick about python exceptions."


@pytest.mark.parametrize("max_tokens", [100, None], ids=["max_tokens=100", "no-limit"])
def test_64_concurrent_requests_never_pass_a_blocking_quota(proxy: Proxy, key: ApiKey, db,
                                                            capsys, max_tokens):
    """A Free user with 450 tokens left; 64 concurrent streams to an upstream that uses its
    whole output budget. The proxy clamps each request's output limit to what is left, so
    the provider itself stops at the quota: zero overshoot."""
    before = 9_550
    set_plan(db, key.user_id, "free", tokens_used=before)
    admitted, refused = asyncio.run(_storm([proxy.url], key, 64, max_tokens, CONTENT))
    assert admitted >= 1 and refused >= 50
    over = overshoot(db, key, 10_000, before, admitted)
    assert over <= 0
    with capsys.disabled():
        print(f"\n64 concurrent ({max_tokens=}), one instance: {admitted} admitted, "
              f"{refused} refused, billed beyond quota: {over} tokens")


def test_two_instances_share_one_quota(tmp_path, mongo_uri: str, upstream: FakeUpstream,
                                       key: ApiKey, db, capsys):
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    second = start_proxy(tmp_path, mongo_uri, config)
    first = start_proxy(tmp_path / "..", mongo_uri, config)
    try:
        before = 3_000  # quota-test: 5,000 a month, blocked after
        set_plan(db, key.user_id, "quota-test", tokens_used=before)
        admitted, refused = asyncio.run(_storm([first.url, second.url], key, 64, 60,
                                               CONTENT))
        over = overshoot(db, key, 5_000, before, admitted)
        assert refused > 0 and admitted >= 5
        assert over <= 0
        with capsys.disabled():
            print(f"\n64 concurrent over two instances: {admitted} admitted, {refused} "
                  f"refused, billed beyond quota: {over} tokens")
    finally:
        stop_proxy(first)
        stop_proxy(second)


def test_a_request_that_can_never_fit_is_not_retried(proxy: Proxy, key: ApiKey, db,
                                                     upstream: FakeUpstream, test_id: str):
    """Its minimum exceeds the plan's TPM: 429 with x-should-retry: false, which the
    openai and anthropic SDKs honour (they would otherwise retry for minutes)."""
    set_plan(db, key.user_id, "free")
    huge = "word " * 6_000  # ~7,500 tokens estimated: Free allows 1,000 per minute
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key.token, max_retries=5)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": huge}],
                                       extra_headers={"X-Test-Id": test_id})
    assert err.value.response.headers["x-should-retry"] == "false"
    assert time.monotonic() - started < 2  # one attempt, no backoff
    anthropic_sdk = anthropic.Anthropic(base_url=proxy.url, api_key=key.token, max_retries=5)
    started = time.monotonic()
    with pytest.raises(anthropic.RateLimitError):
        anthropic_sdk.messages.create(model="claude-opus-4-7", max_tokens=10,
                                      messages=[{"role": "user", "content": huge}])
    assert time.monotonic() - started < 2
    assert test_id not in upstream.exchanges


def test_a_clamping_plan_lowers_the_output_limit_to_what_is_left(
        proxy: Proxy, key: ApiKey, db, upstream: FakeUpstream, test_id: str):
    set_plan(db, key.user_id, "free", tokens_used=9_700)  # 300 left
    client = openai_client(proxy, key.token)
    client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=1_000,
                                   extra_headers={"X-Test-Id": test_id,
                                                  "X-Fake-Scenario": "greedy"})
    sent = json.loads(upstream.exchange(test_id).body)
    assert 1 <= sent["max_tokens"] < 300
    [event] = wait_for_events(db, key.user_id, 1)
    assert 9_700 + event["tokens_billed"] <= 10_000
    assert event["completion_n"] == sent["max_tokens"]


def test_quota_survives_a_restart(tmp_path, mongo_uri: str, upstream: FakeUpstream,
                                  key: ApiKey, db):
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    set_plan(db, key.user_id, "quota-test", tokens_used=4_700)
    proxy = start_proxy(tmp_path, mongo_uri, config)
    try:
        client = openai_client(proxy, key.token)
        used = 0
        with pytest.raises(openai.RateLimitError):
            for _ in range(10):
                client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT,
                                               max_tokens=60)
                used += 1
        assert used >= 2
    finally:
        stop_proxy(proxy)  # flushes usage and hands its lease back
    doc = usage_doc(db, key.user_id)
    billed = sum(e["tokens_billed"] for e in wait_for_events(db, key.user_id, used))
    assert doc["tokens"] == 4_700 + billed
    assert all(lease["amount"] == 0 for lease in doc["leases"].values())
    proxy = start_proxy(tmp_path, mongo_uri, config)
    try:
        with pytest.raises(openai.RateLimitError):
            openai_client(proxy, key.token).chat.completions.create(
                model="gpt-4o-mini", messages=PROMPT, max_tokens=60)
    finally:
        stop_proxy(proxy)


def test_requests_without_an_output_limit_do_not_drain_the_bucket(
        proxy: Proxy, key: ApiKey, db, upstream: FakeUpstream, test_id: str):
    """A clamping plan gives a request without max_tokens a limit it may use (up to the
    plan's TPM), but the bucket holds only what a request usually uses: back-to-back
    requests of a Free user are served, not refused for a minute."""
    set_plan(db, key.user_id, "free")
    client = openai_client(proxy, key.token)
    for i in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT,
                                       extra_headers={"X-Test-Id": f"{test_id}-{i}"})
        sent = json.loads(upstream.exchange(f"{test_id}-{i}").body)
        assert 256 < sent["max_tokens"] < 1_000  # what fits in a minute of Free
    assert len(wait_for_events(db, key.user_id, 3)) == 3
