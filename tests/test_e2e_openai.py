"""OpenAI-protocol requests through a real mitmdump, with the official openai SDK."""

from __future__ import annotations

import json

import httpx
import pytest
from bson import ObjectId

from conftest import UPSTREAM_KEYS, ApiKey, Proxy, openai_client, wait_for_events
from fake_upstream import FakeUpstream, openai_chat_stream

MESSAGES = [{"role": "system", "content": "You are an assistant."},
            {"role": "user", "content": "Write a limerick about python exceptions"}]

def assert_event_matches(event: dict, key: ApiKey, model: str, usage: dict) -> None:
    assert isinstance(event["_id"], ObjectId)
    assert event["user_id"] == key.user_id
    assert event["api_key_id"] == key.key_id
    assert event["model"] == model
    assert event["prompt_n"] == usage["prompt_tokens"]
    assert event["completion_n"] == usage["completion_tokens"]
    assert event["date_created"].tzinfo is not None
    assert event["usage_estimated"] is False


def test_chat_stream_without_usage_is_billed_and_client_sees_no_usage(
        proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db, test_id: str):
    stream = openai_client(proxy, key.token).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        extra_headers={"X-Test-Id": test_id})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Hello! How can I help you today?"
    assert all(c.usage is None and c.choices for c in chunks)

    exchange = upstream.exchange(test_id)
    sent_body = json.loads(exchange.body)
    assert sent_body["stream_options"] == {"include_usage": True}
    assert exchange.headers["authorization"] == f"Bearer {UPSTREAM_KEYS['FAKE_OPENAI_KEY']}"
    assert exchange.headers["x-user-id"] == key.user_id
    assert exchange.headers["x-plan-id"] == "enterprise"
    assert key.token not in json.dumps(exchange.headers)

    [event] = wait_for_events(db, key.user_id, 1)
    assert_event_matches(event, key, "gpt-4o-mini", exchange.usage)
    assert event["stream"] is True and event["complete"] is True


def test_chat_stream_with_client_usage_passes_usage_chunk(
        proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db, test_id: str):
    chunks = list(openai_client(proxy, key.token).chat.completions.create(
        model="o3-mini", messages=[*MESSAGES, {"role": "user", "content": "cache me"}],
        stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Test-Id": test_id}))
    usage = upstream.exchange(test_id).usage
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump(exclude_none=True) == usage
    [event] = wait_for_events(db, key.user_id, 1)
    assert_event_matches(event, key, "o3-mini", usage)
    assert event["usage"]["cache_read_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert event["usage"]["reasoning_tokens"] == \
        usage["completion_tokens_details"]["reasoning_tokens"] > 0


@pytest.mark.parametrize("client_asks_usage", [False, True])
def test_stream_bytes_are_identical(proxy: Proxy, upstream: FakeUpstream, key: ApiKey,
                                    test_id: str, client_asks_usage: bool):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    if client_asks_usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key.token}", "X-Test-Id": test_id},
                      timeout=10) as response:
        assert response.status_code == 200
        received = b"".join(response.iter_raw())
    if client_asks_usage:
        assert received == bytes(upstream.exchange(test_id).sent)
    else:  # exactly what the upstream sends when usage is not requested
        assert received == b"".join(openai_chat_stream(body, test_id))
        assert received != bytes(upstream.exchange(test_id).sent)


def test_first_chunk_arrives_before_upstream_finishes(
        proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db, test_id: str):
    stream = openai_client(proxy, key.token).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        extra_headers={"X-Test-Id": test_id, "X-Fake-Scenario": "gated"})
    first = next(iter(stream))
    # The upstream is parked on the gate: it has not sent its last chunk yet.
    assert first.choices[0].delta.role == "assistant"
    assert not upstream.exchange(test_id).finished
    upstream.release(test_id)
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "stop"
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["completion_n"] == upstream.exchange(test_id).usage["completion_tokens"]


def test_chat_non_streaming(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db,
                            test_id: str):
    completion = openai_client(proxy, key.token).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Test-Id": test_id})
    exchange = upstream.exchange(test_id)
    assert "stream_options" not in json.loads(exchange.body)  # vLLM would reject it
    assert completion.usage.prompt_tokens == exchange.usage["prompt_tokens"]
    [event] = wait_for_events(db, key.user_id, 1)
    assert_event_matches(event, key, "gpt-4o-mini", exchange.usage)
    assert event["stream"] is False


def test_legacy_completions_stream(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db,
                                   test_id: str):
    chunks = list(openai_client(proxy, key.token).completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hello", stream=True, max_tokens=5,
        extra_headers={"X-Test-Id": test_id}))
    assert "".join(c.choices[0].text for c in chunks) == "Hello! How can I"
    assert all(c.usage is None for c in chunks)
    usage = json.loads(bytes(upstream.exchange(test_id).sent).split(b"\n\n")[-3][6:])["usage"]
    [event] = wait_for_events(db, key.user_id, 1)
    assert_event_matches(event, key, "gpt-3.5-turbo-instruct", usage)


def test_embeddings(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db, test_id: str):
    result = openai_client(proxy, key.token).embeddings.create(
        model="text-embedding-3-small", input=["one", "two"],
        extra_headers={"X-Test-Id": test_id})
    assert len(result.data) == 2
    usage = upstream.exchange(test_id).usage
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["prompt_n"] == usage["prompt_tokens"] and event["completion_n"] == 0


def test_query_parameter_upstream_auth(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db,
                                       test_id: str):
    """Seed 000's Google-style auth: the key travels as ?key= (test_lifecycle checks that
    saved flows do not keep it)."""
    openai_client(proxy, key.token).chat.completions.create(
        model="gemini-2.5-flash", messages=MESSAGES, extra_headers={"X-Test-Id": test_id})
    exchange = upstream.exchange(test_id)
    assert exchange.path == \
        f"/v1beta/openai/v1/chat/completions?key={UPSTREAM_KEYS['FAKE_GOOGLE_KEY']}"
    assert "authorization" not in exchange.headers
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["backend"] == "fake-google"
