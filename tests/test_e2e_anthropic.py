"""Anthropic Messages through a real mitmdump, with the official anthropic SDK."""

from __future__ import annotations

import httpx

from conftest import UPSTREAM_KEYS, ApiKey, Proxy, anthropic_client, wait_for_events
from fake_upstream import FakeUpstream

MESSAGES = [{"role": "user", "content": "Hello!"}]
MODEL = "claude-opus-4-7"

def expected_prompt(usage: dict) -> int:
    return (usage["input_tokens"] + usage["cache_read_input_tokens"]
            + usage["cache_creation_input_tokens"])


def test_messages_stream(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db, test_id: str):
    with anthropic_client(proxy, key.token).messages.stream(
            model=MODEL, max_tokens=9, messages=MESSAGES,
            extra_headers={"X-Test-Id": test_id}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello! How can I help you today?"
    exchange = upstream.exchange(test_id)
    assert exchange.path == "/anthropic/v1/messages"  # the backend's path prefix
    assert exchange.headers["x-api-key"] == UPSTREAM_KEYS["FAKE_ANTHROPIC_KEY"]
    assert exchange.headers["x-user-id"] == key.user_id
    assert "authorization" not in exchange.headers
    assert final.usage.output_tokens == exchange.usage["output_tokens"]
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["prompt_n"] == exchange.usage["input_tokens"]
    assert event["completion_n"] == exchange.usage["output_tokens"]
    assert event["api_key_id"] == key.key_id and event["model"] == MODEL
    assert event["complete"] is True


def test_messages_stream_with_cache_tokens(proxy: Proxy, upstream: FakeUpstream, key: ApiKey,
                                           db, test_id: str):
    with anthropic_client(proxy, key.token).messages.stream(
            model=MODEL, max_tokens=7, messages=[{"role": "user", "content": "cache this"}],
            extra_headers={"X-Test-Id": test_id}) as stream:
        stream.until_done()
    usage = upstream.exchange(test_id).usage
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["prompt_n"] == expected_prompt(usage)
    assert event["completion_n"] == usage["output_tokens"] == 7
    assert event["usage"]["cache_read_tokens"] == usage["cache_read_input_tokens"]
    assert event["usage"]["cache_write_tokens"] == usage["cache_creation_input_tokens"]


def test_messages_stream_bytes_identical(proxy: Proxy, upstream: FakeUpstream, key: ApiKey,
                                         test_id: str):
    body = {"model": MODEL, "max_tokens": 50, "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/messages", json=body, timeout=10,
                      headers={"X-API-Key": key.token, "X-Test-Id": test_id,
                               "anthropic-version": "2023-06-01"}) as response:
        received = b"".join(response.iter_raw())
    assert received == bytes(upstream.exchange(test_id).sent)


def test_messages_non_streaming(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db,
                                test_id: str):
    message = anthropic_client(proxy, key.token).messages.create(
        model=MODEL, max_tokens=100, messages=MESSAGES, extra_headers={"X-Test-Id": test_id})
    usage = upstream.exchange(test_id).usage
    assert message.usage.input_tokens == usage["input_tokens"]
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["prompt_n"] == expected_prompt(usage)
    assert event["completion_n"] == usage["output_tokens"]
    assert event["stream"] is False
