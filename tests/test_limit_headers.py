"""Every 429 from the Limits addon carries the rate-limit headers a success carries — TPM
(``x-ratelimit-*-tokens``) and the monthly quota (``x-ratelimit-*-quota-tokens``) — through
a real mitmdump with the official openai SDK, and the SDK's retry decision is unchanged."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import openai
import pytest

from conftest import ApiKey, Proxy, openai_client, set_plan
from llm_billing.core.dates import seconds_to_next_month

PROMPT = [{"role": "user", "content": "Hello!"}]
DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?|(\d+)ms")


def seconds(duration: str) -> float:
    """OpenAI's reset format (``412h3m20s``, ``6s``, ``120ms``) in seconds."""
    match = DURATION.fullmatch(duration)
    assert match and duration, duration
    hours, minutes, secs, millis = match.groups()
    if millis:
        return int(millis) / 1000
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs or 0)


def refused(client: openai.OpenAI, **kwargs) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, **kwargs)
    return err.value


def assert_quota_headers(headers, limit: int, remaining: int) -> None:
    assert headers["x-ratelimit-limit-quota-tokens"] == str(limit)
    assert headers["x-ratelimit-remaining-quota-tokens"] == str(remaining)
    to_next_month = seconds_to_next_month(datetime.now(UTC))
    assert to_next_month - 60 <= seconds(headers["x-ratelimit-reset-quota-tokens"]) \
        <= to_next_month + 1


def test_an_exhausted_quota_429_carries_the_quota_headers(proxy: Proxy, make_key, db):
    blocking, free = make_key(), make_key()
    set_plan(db, blocking.user_id, "quota-test", tokens_used=5000)  # 5,000 a month, no TPM
    client = openai_client(proxy, blocking.token)
    err = refused(client, max_tokens=20)
    assert err.code == "insufficient_quota"
    assert_quota_headers(err.response.headers, 5000, 0)
    assert "x-ratelimit-limit-tokens" not in err.response.headers  # the plan has no TPM
    # the SDK's decision is the one before: never retried
    assert err.response.headers["x-should-retry"] == "false"
    assert int(err.response.headers["retry-after"]) >= 1
    assert client._should_retry(err.response) is False

    set_plan(db, free.user_id, "free", tokens_used=10_000)  # quota and TPM
    err = refused(openai_client(proxy, free.token), max_tokens=20)
    assert err.code == "insufficient_quota"
    assert_quota_headers(err.response.headers, 10_000, 0)
    assert err.response.headers["x-ratelimit-limit-tokens"] == "1000"
    assert err.response.headers["x-ratelimit-remaining-tokens"] == "1000"  # given back
    assert seconds(err.response.headers["x-ratelimit-reset-tokens"]) == 0


def test_tokens_per_minute_429s_carry_both_headers(proxy: Proxy, key: ApiKey, db):
    set_plan(db, key.user_id, "free", tokens_used=2_000)  # 1,000 a minute, 10,000 a month
    client = openai_client(proxy, key.token)
    huge = [{"role": "user", "content": "word " * 6_000}]  # ~7,500 tokens estimated
    with pytest.raises(openai.RateLimitError) as err:  # the first request: before any lease
        client.chat.completions.create(model="gpt-4o-mini", messages=huge)
    too_large = err.value
    assert "Request too large" in too_large.message
    headers = too_large.response.headers
    assert headers["x-should-retry"] == "false" and client._should_retry(too_large.response) \
        is False
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "1000"
    assert_quota_headers(headers, 10_000, 8_000)

    reply = client.chat.completions.create(  # uses its whole output limit
        model="gpt-4o-mini", messages=PROMPT, max_tokens=900,
        extra_headers={"X-Fake-Scenario": "greedy"})
    wait = refused(client, max_tokens=900)  # the bucket must refill first: retryable
    assert wait.code == "rate_limit_exceeded"
    headers = wait.response.headers
    assert "x-should-retry" not in headers and client._should_retry(wait.response) is True
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 900
    assert 0 < seconds(headers["x-ratelimit-reset-tokens"]) <= 60
    left = int(headers["x-ratelimit-remaining-quota-tokens"])
    # the first request's tokens are counted: settled, or still held (prompt bound + 900)
    assert 8_000 - 1_000 < left <= 8_000 - reply.usage.total_tokens
    assert_quota_headers(headers, 10_000, left)


def test_a_success_carries_the_quota_reset(proxy: Proxy, key: ApiKey, db):
    set_plan(db, key.user_id, "quota-test", tokens_used=1000)
    raw = openai_client(proxy, key.token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=PROMPT, max_tokens=20)
    to_next_month = seconds_to_next_month(datetime.now(UTC))
    assert to_next_month - 60 <= seconds(raw.headers["x-ratelimit-reset-quota-tokens"]) \
        <= to_next_month + 1
