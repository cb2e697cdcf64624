"""Seed 000's metering expressions on routes, through a real mitmdump: the expression's
value is billed beside the provider's usage; upstream failures are recorded, not billed."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest
from bson import Decimal128

from conftest import (
    ApiKey,
    Proxy,
    anthropic_client,
    openai_client,
    start_proxy,
    stop_proxy,
    wait_for_events,
    write_config,
)
from fake_upstream import FakeUpstream, openai_completions_stream

ROUTES = """
[[routes]]
path = "/v1/chat/completions"
protocol = "openai-chat"
metering = "json(sseLastData(allData)).usage.total_tokens ?? 1"

[[routes]]
path = "/v1/messages"
protocol = "anthropic-messages"
metering = "(json(sseEvents(allData)[0].data).message.usage.input_tokens ?? 0) + (json(sseEvents(allData)[count(sseEvents(allData))-2].data).usage.output_tokens ?? 0)"

[[routes]]
path = "/v1/completions"
protocol = "openai-completions"
metering = "count(linesNonEmpty(allData))"
max_body_bytes = 100000

[[routes]]
path = "/v1/embeddings"
protocol = "openai-embeddings"
metering = "status < 400 ? respBody.usage.prompt_tokens * 2 : 0"

[[routes]]
path = "/v1/responses"
protocol = "openai-responses"
metering = "responseBytes / 1024"
max_body_bytes = 10

[[routes]]
path = "/v1beta/models/{model}:generateContent"
protocol = "gemini"
metering = "respBody.usageMetadata.totalTokenCount ?? 1"

[[routes]]
path = "/v1beta/models/{model}:streamGenerateContent"
protocol = "gemini"
metering = "json(sseLastData(allData)).usageMetadata.totalTokenCount ?? 1"
max_body_bytes = 300
"""


@pytest.fixture(scope="module")
def metered(tmp_path_factory, mongo_uri: str, upstream: FakeUpstream):
    tmp = tmp_path_factory.mktemp("metered")
    config = write_config(tmp / "config.toml", upstream.url, "http://127.0.0.1:9", ROUTES)
    proxy = start_proxy(tmp, mongo_uri, config)
    yield proxy
    stop_proxy(proxy)

def test_seed_000_chat_expression(metered: Proxy, upstream: FakeUpstream, key: ApiKey, db,
                                  test_id: str):
    list(openai_client(metered, key.token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True,
        extra_headers={"X-Test-Id": test_id}))
    usage = upstream.exchange(test_id).usage
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["metering"]["value"] == usage["total_tokens"]
    assert event["tokens_billed"] == usage["total_tokens"]
    assert event["prompt_n"] == usage["prompt_tokens"]  # provider usage still recorded
    # gpt-4o-mini's price has no per-unit price: the provider's token classes are priced
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    expected = (Decimal(usage["prompt_tokens"] - cached) * Decimal("0.15")
                + Decimal(cached) * Decimal("0.075")
                + Decimal(usage["completion_tokens"]) * Decimal("0.60")) / 1_000_000
    assert event["cost"] == Decimal128(expected)


def test_seed_000_anthropic_expression(metered: Proxy, upstream: FakeUpstream, key: ApiKey,
                                       db, test_id: str):
    client = anthropic_client(metered, key.token)
    with client.messages.stream(model="claude-opus-4-7", max_tokens=7, messages=[
            {"role": "user", "content": "Hi"}], extra_headers={"X-Test-Id": test_id}) as s:
        s.until_done()
    usage = upstream.exchange(test_id).usage
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["metering"]["value"] == usage["input_tokens"] + usage["output_tokens"]
    assert event["tokens_billed"] == event["metering"]["value"]


def test_count_lines_expression(metered: Proxy, key: ApiKey, db, test_id: str):
    list(openai_client(metered, key.token).completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True, max_tokens=4,
        extra_headers={"X-Test-Id": test_id}))
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}
    upstream_lines = b"".join(openai_completions_stream(body, test_id)).decode()
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["metering"]["value"] == len([x for x in upstream_lines.splitlines()
                                              if x.strip()])


def test_ternary_on_non_streamed_body(metered: Proxy, upstream: FakeUpstream, key: ApiKey,
                                      db, test_id: str):
    openai_client(metered, key.token).embeddings.create(model="text-embedding-3-small", input="hi",
                                               extra_headers={"X-Test-Id": test_id})
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["metering"]["value"] == upstream.exchange(test_id).usage["prompt_tokens"] * 2


def test_bytes_expression_needs_no_body(metered: Proxy, key: ApiKey, db, test_id: str):
    """responseBytes needs no body kept, so the tiny max_body_bytes cap does not apply."""
    with httpx.stream("POST", f"{metered.url}/v1/responses", json={
            "model": "gpt-4.1-mini", "input": "hi", "stream": True}, timeout=10,
            headers={"Authorization": f"Bearer {key.token}"}) as response:
        size = sum(len(chunk) for chunk in response.iter_raw())
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["metering"]["value"] == size / 1024
    assert "error" not in event["metering"]
    # gpt-4.1-mini has the default price, whose unit price (1000 per million) bills the value
    assert event["cost"] == Decimal128(Decimal(str(size / 1024)) * 1000 / 1_000_000)


def test_upstream_failure_is_recorded_not_billed(metered: Proxy, key: ApiKey, db):
    with pytest.raises(openai.InternalServerError):
        openai_client(metered, key.token).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"X-Fake-Scenario": "status-503"})
    list(openai_client(metered, key.token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert len(wait_for_events(db, key.user_id, 1)) == 1
    [failure] = wait_for_events(db, key.user_id, 1, collection="events_failed")
    assert failure["status"] == 503 and failure["model"] == "gpt-4o-mini"
    assert "prompt_n" not in failure


def test_gemini_expressions_and_the_body_cap(metered: Proxy, upstream: FakeUpstream,
                                             key: ApiKey, db, test_id: str):
    body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
    headers = {"x-goog-api-key": key.token, "X-Test-Id": test_id}
    url = f"{metered.url}/v1beta/models/gemini-2.5-flash"
    assert httpx.post(f"{url}:generateContent", json=body, headers=headers).status_code == 200
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["metering"]["value"] == upstream.exchange(test_id).usage["totalTokenCount"]
    # the stream is longer than the route's 300-byte cap: no value, provider usage billed
    with httpx.stream("POST", f"{url}:streamGenerateContent", params={"alt": "sse"},
                      json=body, headers=headers) as response:
        assert len(b"".join(response.iter_raw())) > 300
    events = wait_for_events(db, key.user_id, 2)
    assert events[1]["metering"]["value"] is None
    assert "max_body_bytes" in events[1]["metering"]["error"]
    assert events[1]["tokens_billed"] == events[1]["prompt_n"] + events[1]["completion_n"]
