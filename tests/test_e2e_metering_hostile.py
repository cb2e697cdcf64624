"""A broken or hostile upstream through the real mitmdump: absurd token counts are billed
as flagged estimates without hurting anyone else's events, a Gemini JSON-array stream cut
off mid-array is billed from what it delivered, and a Content-Length stream whose usage
chunk the proxy hides still ends for the client."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from conftest import ApiKey, Proxy, openai_client, usage_doc, wait_for_events, wait_for_usage
from fake_upstream import FakeUpstream, openai_chat_stream
from llm_billing.core.estimate import prompt_tokens

MESSAGES = [{"role": "user", "content": "Hi there"}]
REPLY = "Hello! How can I help you today?"


@pytest.mark.parametrize("stream", [False, True])
def test_absurd_usage_is_estimated_and_other_users_are_unaffected(
        proxy: Proxy, upstream: FakeUpstream, make_key, db, test_id: str, stream: bool):
    broken, other = make_key(), make_key()
    bad = openai_client(proxy, broken.token).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=stream,
        extra_headers={"X-Test-Id": test_id, "X-Fake-Scenario": "usage-huge"})
    text = "".join(c.choices[0].delta.content or "" for c in bad if c.choices) if stream \
        else bad.choices[0].message.content
    assert text == REPLY
    # right behind it, in the same event batch and ledger flush: another user
    fine = openai_client(proxy, other.token).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Test-Id": test_id + "b"})

    [other_event] = wait_for_events(db, other.user_id, 1)
    assert "usage_anomaly" not in other_event and other_event["usage_estimated"] is False
    assert other_event["completion_n"] == fine.usage.completion_tokens
    assert wait_for_usage(db, other.user_id, other_event["tokens_billed"])["tokens"] == \
        other_event["tokens_billed"]
    [event] = wait_for_events(db, broken.user_id, 1)
    assert event["usage_anomaly"] == "completion_tokens 1e+30 out of range"
    assert event["usage_estimated"] is True
    assert event["estimate_method"].startswith("provider usage not trusted")
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    assert event["prompt_n"] == prompt_tokens(body)
    assert event["completion_n"] == math.ceil(len(REPLY) / 4)
    assert event["tokens_billed"] == event["prompt_n"] + event["completion_n"]
    assert wait_for_usage(db, broken.user_id, event["tokens_billed"])["tokens"] == \
        event["tokens_billed"]
    assert usage_doc(db, broken.user_id)["tokens"] < 10**9


def complete_elements(sent: bytes) -> list[dict]:
    """The elements of a JSON array that ``sent`` holds in full (a reference decoder)."""
    decoder, text, pos, found = json.JSONDecoder(), sent.decode(), 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            element, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return found
        found.append(element)


def test_gemini_json_array_cut_mid_array_is_billed_from_what_arrived(
        proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db, test_id: str):
    body = {"contents": [{"role": "user", "parts": [{"text": "Write a lot"}]}]}
    with pytest.raises(httpx.HTTPError):  # the upstream hangs up mid-array
        httpx.post(f"{proxy.url}/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                   json=body, headers={"x-goog-api-key": key.token, "X-Test-Id": test_id,
                                       "X-Fake-Scenario": "cut"}, timeout=10).json()
    exchange = upstream.exchange(test_id)
    assert "alt=sse" not in exchange.path and not exchange.finished
    delivered = complete_elements(bytes(exchange.sent))
    assert len(delivered) >= 2
    last = delivered[-1]["usageMetadata"]
    chars = sum(len(p["text"]) for e in delivered for p in e["candidates"][0]["content"]["parts"])

    [event] = wait_for_events(db, key.user_id, 1)
    assert event["usage_estimated"] is True and event["complete"] is False
    assert event["estimate_method"] == "output: delivered characters/4; input: provider"
    assert event["prompt_n"] == last["promptTokenCount"]  # exact, from the last usage seen
    assert event["completion_n"] == max(last["candidatesTokenCount"], math.ceil(chars / 4))
    assert event["completion_n"] > 0


@pytest.mark.parametrize("client_asks_usage", [False, True])
def test_stream_with_content_length_ends_when_the_usage_chunk_is_hidden(
        proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db, test_id: str,
        client_asks_usage: bool):
    extra = {"stream_options": {"include_usage": True}} if client_asks_usage else {}
    client = openai_client(proxy, key.token).with_options(timeout=5)
    with client.chat.completions.with_streaming_response.create(  # reads the body to its end
            model="gpt-4o-mini", messages=MESSAGES, stream=True, **extra,
            extra_headers={"X-Test-Id": test_id, "X-Fake-Scenario": "content-length"}) as r:
        lines = [line for line in r.iter_lines() if line]
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]"
    assert "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c["choices"]) == REPLY
    assert ("usage" in chunks[-1]) == client_asks_usage
    usage = upstream.exchange(test_id).usage
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["usage_estimated"] is False
    assert event["prompt_n"] == usage["prompt_tokens"]
    assert event["completion_n"] == usage["completion_tokens"]


def test_hidden_usage_chunk_framing_is_exact(proxy: Proxy, key: ApiKey, test_id: str):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=5,
                      headers={"Authorization": f"Bearer {key.token}", "X-Test-Id": test_id,
                               "X-Fake-Scenario": "content-length"}) as response:
        received = b"".join(response.iter_raw())
        assert "content-length" not in response.headers
    assert received == b"".join(openai_chat_stream(body, test_id))
