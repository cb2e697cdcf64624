"""Every provider and endpoint through a real mitmdump, with each provider's own SDK:
the event's token classes equal the upstream's usage, and its cost is exact."""

from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import httpx
import pytest
from bson import Decimal128
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from conftest import ApiKey, Proxy, anthropic_client, gemini_client, openai_client, wait_for_events
from fake_upstream import (
    FakeUpstream,
    gemini_usage,
    llamacpp_timings,
    vllm_chat_stream,
)

MESSAGES = [{"role": "user", "content": "Hello!"}]
def classes(event: dict) -> dict:
    return {k: v for k, v in event["usage"].items()}


# --- OpenAI Responses API ---------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
def test_responses_api(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db, test_id: str,
                       stream: bool):
    client = openai_client(proxy, key.token)
    kwargs = dict(model="o4-mini", input="please cache this", extra_headers={
        "X-Test-Id": test_id})
    if stream:
        events = list(client.responses.create(stream=True, **kwargs))
        assert events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        reported = events[-1].response.usage
    else:
        response = client.responses.create(**kwargs)
        text, reported = response.output_text, response.usage
    assert text == "Hello! How can I help you today?"
    usage = upstream.exchange(test_id).usage
    assert reported.input_tokens == usage["input_tokens"]
    assert "stream_options" not in json.loads(upstream.exchange(test_id).body)
    [event] = wait_for_events(db, key.user_id, 1)
    assert classes(event) == {
        "prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
        "cache_read_tokens": usage["input_tokens_details"]["cached_tokens"],
        "cache_write_tokens": 0, "cache_write_1h_tokens": 0,
        "reasoning_tokens": usage["output_tokens_details"]["reasoning_tokens"]}
    assert event["usage"]["reasoning_tokens"] > 0 and event["usage"]["cache_read_tokens"] > 0
    assert event["prompt_n"] == usage["input_tokens"]
    assert event["completion_n"] == usage["output_tokens"]
    # "o*" prices: uncached input 1.10, cached 0.275, output and reasoning 4.40 per million
    cached = usage["input_tokens_details"]["cached_tokens"]
    expected = (Decimal(usage["input_tokens"] - cached) * Decimal("1.10")
                + Decimal(cached) * Decimal("0.275")
                + Decimal(usage["output_tokens"]) * Decimal("4.40")) / 1_000_000
    assert event["cost"] == Decimal128(expected)
    assert event["price_version"] == "test-2026-11"


# --- Google Gemini ----------------------------------------------------------------------

def test_gemini_generate_content(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db,
                                 test_id: str):
    client = gemini_client(proxy, key.token)
    response = client.models.generate_content(
        model="gemini-2.5-flash", contents="Hello, use the cache",
        config=genai_types.GenerateContentConfig(http_options=genai_types.HttpOptions(
            headers={"X-Test-Id": test_id})))
    assert response.text == "Hello! How can I help you today?"
    exchange = upstream.exchange(test_id)
    assert exchange.path.endswith(":generateContent?key=AIza-upstream-" + "g" * 24)
    assert "x-goog-api-key" not in exchange.headers  # the client's key stayed here
    meta = exchange.usage
    assert response.usage_metadata.total_token_count == meta["totalTokenCount"]
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["model"] == "gemini-2.5-flash"
    assert classes(event) == {
        "prompt_tokens": meta["promptTokenCount"],
        "completion_tokens": meta["candidatesTokenCount"] + meta["thoughtsTokenCount"],
        "cache_read_tokens": meta["cachedContentTokenCount"], "cache_write_tokens": 0,
        "cache_write_1h_tokens": 0, "reasoning_tokens": meta["thoughtsTokenCount"]}


def test_gemini_stream_takes_the_last_usage(proxy: Proxy, upstream: FakeUpstream,
                                            key: ApiKey, db, test_id: str):
    client = gemini_client(proxy, key.token)
    chunks = list(client.models.generate_content_stream(
        model="gemini-2.5-pro", contents="Hello",
        config=genai_types.GenerateContentConfig(http_options=genai_types.HttpOptions(
            headers={"X-Test-Id": test_id}))))
    assert "".join(c.text for c in chunks) == "Hello! How can I help you today?"
    meta = upstream.exchange(test_id).usage
    assert "alt=sse" in upstream.exchange(test_id).path
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["stream"] is True and event["usage_estimated"] is False
    assert event["prompt_n"] == meta["promptTokenCount"]
    assert event["completion_n"] == meta["candidatesTokenCount"] + meta["thoughtsTokenCount"]


def test_gemini_stream_as_json_array(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db,
                                     test_id: str):
    body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
    response = httpx.post(f"{proxy.url}/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                          json=body, headers={"x-goog-api-key": key.token,
                                              "X-Test-Id": test_id}, timeout=10)
    assert response.status_code == 200 and isinstance(response.json(), list)
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["prompt_n"] == gemini_usage(body)["promptTokenCount"]
    assert event["completion_n"] == gemini_usage(body)["candidatesTokenCount"] + 31


def test_gemini_errors_in_googles_format(proxy: Proxy, key: ApiKey):
    stranger = gemini_client(proxy, "wrong-key")  # held: the SDK closes itself when collected
    with pytest.raises(genai_errors.ClientError) as err:
        stranger.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert err.value.code == 401 and err.value.status == "UNAUTHENTICATED"
    client = gemini_client(proxy, key.token)
    with pytest.raises(genai_errors.ClientError) as err:
        client.models.generate_content(model="gemma-9", contents="x")
    assert err.value.code == 404 and err.value.status == "NOT_FOUND"
    response = httpx.post(f"{proxy.url}/v1beta/models/gemini-2.5-flash:generateContent",
                          params={"key": key.token}, content=b"{", timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"


# --- vLLM and llama.cpp -----------------------------------------------------------------

def test_vllm_stream_injected_usage_is_hidden(proxy: Proxy, upstream: FakeUpstream,
                                              key: ApiKey, db, test_id: str):
    body = {"model": "vllm-llama31-70b", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {key.token}",
                               "X-Test-Id": test_id}) as response:
        received = b"".join(response.iter_raw())
    assert received == b"".join(vllm_chat_stream(body, test_id))
    usage = upstream.exchange(test_id).usage
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["prompt_n"] == usage["prompt_tokens"]
    assert event["completion_n"] == usage["completion_tokens"]


def test_vllm_non_streaming_gets_no_stream_options(proxy: Proxy, key: ApiKey, db):
    completion = openai_client(proxy, key.token).chat.completions.create(
        model="vllm-llama31-70b", messages=MESSAGES)  # vLLM answers 400 to stream_options
    assert completion.usage.completion_tokens > 0
    assert len(wait_for_events(db, key.user_id, 1)) == 1


@pytest.mark.parametrize("client_asks_usage", [False, True])
def test_llamacpp_usage_and_timings(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db,
                                    test_id: str, client_asks_usage: bool):
    extra = {"stream_options": {"include_usage": True}} if client_asks_usage else {}
    chunks = list(openai_client(proxy, key.token).chat.completions.create(
        model="llamacpp-qwen3-8b", messages=MESSAGES, stream=True,
        extra_headers={"X-Test-Id": test_id}, **extra))
    assert (chunks[-1].usage is not None) == client_asks_usage
    usage = upstream.exchange(test_id).usage
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["prompt_n"] == usage["prompt_tokens"]
    assert event["completion_n"] == usage["completion_tokens"]
    body = {"model": "llamacpp-qwen3-8b", "messages": MESSAGES}
    assert event["timings"] == llamacpp_timings(body)


# --- Anthropic in-stream error ----------------------------------------------------------

def test_anthropic_error_event_mid_stream(proxy: Proxy, upstream: FakeUpstream, key: ApiKey,
                                          db, test_id: str):
    client = anthropic_client(proxy, key.token)
    with pytest.raises(anthropic.APIStatusError), client.messages.stream(
            model="claude-opus-4-7", max_tokens=9, messages=MESSAGES,
            extra_headers={"X-Test-Id": test_id,
                           "X-Fake-Scenario": "error-mid-stream"}) as stream:
        stream.until_done()
    usage = upstream.exchange(test_id).usage
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["error"] == "Overloaded"
    assert event["usage_estimated"] is True
    assert event["prompt_n"] == usage["input_tokens"]  # exact, from message_start
    assert event["completion_n"] == 2  # "Hello" + "!" delivered: ceil(6 / 4)
    assert event["estimate_method"].startswith("output: delivered characters")
