"""The stream callable: bytes pass unchanged (or minus the injected usage chunk), usage is
read whatever the chunking, garbage never raises."""

from __future__ import annotations

import gzip
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from fake_upstream import anthropic_stream, openai_chat_stream, openai_chat_usage
from llm_billing.core.stream_meter import (
    StreamMeter,
    strip_null_usage,
    strip_trailing_null_usage,
)
from llm_billing.core.usage import Protocol, Usage

BODY = {"model": "o3-mini", "messages": [{"role": "user", "content": "cache it"}],
        "stream": True}
WITH_USAGE = {**BODY, "stream_options": {"include_usage": True}}
INJECTED_STREAM = b"".join(openai_chat_stream(WITH_USAGE, "t"))
CLIENT_STREAM = b"".join(openai_chat_stream(BODY, "t"))
USAGE = openai_chat_usage(WITH_USAGE)


def run(meter: StreamMeter, stream: bytes, cuts: list[int]) -> bytes:
    out = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut > start:
            piece = meter(stream[start:cut])
            # mitmproxy sends b"" as the chunk that ends the response; a list is one write
            # per item: what an upstream read brings goes out in at most one write
            assert piece != b"" and (isinstance(piece, bytes) or piece == []), piece
            out.append(piece)
        start = cut
    out.append(meter(b""))
    meter.close()
    flat = []
    for item in out:
        flat += [item] if isinstance(item, bytes) else item
    return b"".join(flat)


def chat_meter(hide: bool, encoding: str = "") -> StreamMeter:
    return StreamMeter(Protocol.OPENAI_CHAT, sse=True, content_encoding=encoding,
                       hide_usage_chunk=hide)


@settings(max_examples=200)
@given(st.lists(st.integers(0, len(INJECTED_STREAM)), max_size=30))
def test_injected_usage_chunk_is_hidden_at_any_chunking(cuts: list[int]):
    meter = chat_meter(hide=True)
    assert run(meter, INJECTED_STREAM, cuts) == CLIENT_STREAM
    assert meter.tracker.usage == Usage(
        prompt_tokens=USAGE["prompt_tokens"], completion_tokens=USAGE["completion_tokens"],
        cache_read_tokens=USAGE["prompt_tokens"] // 2, reasoning_tokens=12)
    assert meter.tracker.finished


@settings(max_examples=100)
@given(st.lists(st.integers(0, len(INJECTED_STREAM)), max_size=30))
def test_passthrough_returns_each_chunk_unchanged(cuts: list[int]):
    meter = chat_meter(hide=False)
    start = 0
    for cut in [*sorted(set(cuts)), len(INJECTED_STREAM)]:
        chunk = INJECTED_STREAM[start:cut]
        assert meter(chunk) is chunk
        start = cut
    assert meter.tracker.usage is not None and meter.tracker.usage.prompt_tokens > 0


def test_crlf_stream_hides_usage_chunk_exactly():
    crlf = INJECTED_STREAM.replace(b"\n", b"\r\n")
    expected = CLIENT_STREAM.replace(b"\n", b"\r\n")
    for cut in range(len(crlf)):
        assert run(chat_meter(hide=True), crlf, [cut]) == expected


def test_gzip_stream_is_metered_and_passed_compressed():
    compressed = gzip.compress(INJECTED_STREAM)
    meter = chat_meter(hide=False, encoding="gzip")
    assert run(meter, compressed, list(range(0, len(compressed), 7))) == compressed
    assert meter.tracker.usage.completion_tokens == USAGE["completion_tokens"]


def test_anthropic_takes_last_cumulative_usage():
    body = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    meter = StreamMeter(Protocol.ANTHROPIC_MESSAGES, sse=True, content_encoding="",
                        hide_usage_chunk=False)
    stream = b"".join(anthropic_stream(body, "t"))
    run(meter, stream, [])
    assert meter.tracker.usage.completion_tokens == 5  # message_delta's, not 1 + 5


def test_json_body_usage():
    doc = {"usage": {"prompt_tokens": 11, "completion_tokens": 3}}
    meter = StreamMeter(Protocol.OPENAI_CHAT, sse=False, content_encoding="",
                        hide_usage_chunk=False)
    data = json.dumps(doc).encode()
    assert run(meter, data, [5]) == data
    assert meter.tracker.usage == Usage(prompt_tokens=11, completion_tokens=3)


@settings(max_examples=300)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=10),
       st.booleans(), st.sampled_from(list(Protocol)))
def test_garbage_never_raises(stream: bytes, cuts: list[int], hide: bool, protocol: Protocol):
    meter = StreamMeter(protocol, sse=True, content_encoding="", hide_usage_chunk=hide)
    out = run(meter, stream, [c for c in cuts if c <= len(stream)])
    if not hide:
        assert out == stream


def test_a_meter_that_fails_passes_the_rest_on_and_never_sends_an_empty_piece():
    # mitmproxy sends b"" as the chunk that ends the response, in a list too
    def fail(data: bytes) -> list:
        raise RuntimeError("a bug")

    meter = chat_meter(hide=True)
    meter._parser.feed = fail
    assert meter(b"data: x\n\n") == b"data: x\n\n"  # nothing held: not [b"", ...]
    assert meter(b"") in (b"", [])  # the end
    meter = chat_meter(hide=True)
    assert meter(b"data: {") == []  # held back: unfinished
    meter._parser.feed = fail
    assert meter(b'"a":1}\n\n') == b'data: {"a":1}\n\n'


def test_strip_null_usage_only_touches_the_top_level_key():
    data = '{"a":{"usage":null},"b":"\\"usage\\":null","usage":null}'
    payload = {"a": {"usage": None}, "b": '"usage":null', "usage": None}
    assert strip_null_usage(f"data: {data}\n\n".encode(), data, payload) == \
        b'data: {"a":{"usage":null},"b":"\\"usage\\":null"}\n\n'
    first = '{"usage": null, "x": 1}'
    assert strip_null_usage(f"data:{first}\r\n\r\n".encode(), first,
                            {"usage": None, "x": 1}) == b'data:{"x": 1}\r\n\r\n'


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3), max_leaves=8)


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=6).filter(lambda key: key != "usage"), JSON_VALUES,
                      max_size=4), st.booleans())
def test_the_trailing_null_usage_fast_path_strips_what_the_general_one_does(obj, ascii_only):
    # "usage" is the last key, as OpenAI sends it (a generated "usage" key would put it first)
    data = json.dumps({**obj, "usage": None}, separators=(",", ":"), ensure_ascii=ascii_only)
    raw = f"data: {data}\n\n".encode()
    fast = strip_trailing_null_usage(raw, data)
    slow = strip_null_usage(raw, data, json.loads(data))
    if fast is None:  # not its form (an object whose only key was usage): untouched
        assert slow == raw or list(json.loads(data)) == ["usage"]
    else:
        assert fast[0] == slow and json.loads(fast[1]) == json.loads(data[:-14] + "}")


def test_the_fast_path_leaves_anything_uncertain_alone():
    for data in ['{"usage":null}', '{"a":"x,\\"usage\\":null}', '{"usage":1,"usage":null}',
                 'not json,"usage":null}', '{"a":{"b":1,"usage":null}']:
        assert strip_trailing_null_usage(f"data: {data}\n\n".encode(), data) is None, data


# --- every provider's usage, whatever the chunking -------------------------------------

def _stream(protocol: Protocol, sse: bool, data: bytes, usage: Usage):
    return protocol, sse, data, usage


def _cases():
    import json as _json

    from fake_upstream import (
        anthropic_usage,
        gemini_sse,
        gemini_usage,
        responses_stream,
        responses_usage,
        vllm_chat_stream,
    )
    from llm_billing.core.usage import anthropic_usage as a_usage
    from llm_billing.core.usage import gemini_usage as g_usage
    from llm_billing.core.usage import responses_usage as r_usage

    body = {"model": "o3", "messages": [{"role": "user", "content": "cache"}],
            "input": "cache me", "contents": [{"parts": [{"text": "cache"}]}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 6}
    vllm_usage = openai_chat_usage(body)
    return [
        _stream(Protocol.OPENAI_CHAT, True, INJECTED_STREAM, Usage(
            prompt_tokens=USAGE["prompt_tokens"], completion_tokens=USAGE["completion_tokens"],
            cache_read_tokens=USAGE["prompt_tokens"] // 2, reasoning_tokens=12)),
        _stream(Protocol.OPENAI_CHAT, True, b"".join(vllm_chat_stream(body, "t")), Usage(
            prompt_tokens=vllm_usage["prompt_tokens"],
            completion_tokens=vllm_usage["completion_tokens"])),
        _stream(Protocol.ANTHROPIC_MESSAGES, True, b"".join(anthropic_stream(body, "t")),
                a_usage(anthropic_usage(body))),
        _stream(Protocol.OPENAI_RESPONSES, True, b"".join(responses_stream(body, "t")),
                r_usage(responses_usage(body))),
        _stream(Protocol.GEMINI, True, b"".join(gemini_sse(body, "g")),
                g_usage(gemini_usage(body))),
        _stream(Protocol.GEMINI, False, _json.dumps([{"usageMetadata": gemini_usage(
            body, upto=1)}, {"usageMetadata": gemini_usage(body)}]).encode(),
                g_usage(gemini_usage(body))),
    ]


CASES = _cases()


@settings(max_examples=60)
@given(st.sampled_from(range(len(CASES))), st.data())
def test_every_provider_at_any_chunking(index: int, data):
    protocol, sse, stream, expected = CASES[index]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=25))
    meter = StreamMeter(protocol, sse=sse, content_encoding="", hide_usage_chunk=False)
    assert run(meter, stream, cuts) == stream
    assert meter.tracker.usage == expected
    assert meter.tracker.usage_final


@settings(max_examples=200)
@given(st.sampled_from(list(Protocol)), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["usage", "type", "choices", "delta", "message", "usageMetadata",
                         "response", "candidates", "error", "input_tokens", "output_tokens",
                         "prompt_tokens", "content", "parts", "text", "timings"]),
        children, max_size=4), max_leaves=20))
def test_usage_extractors_never_raise_on_any_json(protocol: Protocol, payload):
    import json as _json

    from llm_billing.core.sse import SSEEvent
    from llm_billing.core.usage import UsageTracker
    tracker = UsageTracker(protocol)
    text = _json.dumps(payload)
    tracker.observe_event(SSEEvent("message_delta", text, None))
    tracker.observe_body(text.encode())
    assert tracker.usage is None or tracker.usage.prompt_tokens >= 0


def test_hiding_never_holds_back_more_than_a_bounded_amount():
    """A 'stream' that never ends an event is let through, not buffered."""
    from llm_billing.core.stream_meter import MAX_HELD
    meter = chat_meter(hide=True)
    sent = received = 0
    for _ in range(64):
        chunk = b"data: " + b"x" * 16_384
        out = meter(chunk)
        sent += len(chunk)
        received += sum(map(len, out)) if isinstance(out, list) else len(out)
        assert sent - received <= MAX_HELD + len(chunk)
    assert received == sent
