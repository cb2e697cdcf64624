"""What a broken or hostile upstream can send the meter, at any chunking: absurd token
counts, a JSON-array stream cut off mid-array, a multi-member gzip body."""

from __future__ import annotations

import gzip
import itertools
import json
import math

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_upstream import openai_chat_stream, openai_chat_usage
from llm_billing.core.json_stream import JSONSplitter
from llm_billing.core.outcome import settle_usage
from llm_billing.core.sse import SSEEvent
from llm_billing.core.stream_meter import StreamMeter
from llm_billing.core.usage import MAX_TOKENS, Protocol, Usage, UsageTracker


def feed(meter: StreamMeter, data: bytes, cuts: list[int]) -> bytes:
    """Pass ``data`` through the meter in pieces split at ``cuts``; what came out."""
    out: list[bytes] = []
    start = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
        result = meter(data[start:cut])
        out += [result] if isinstance(result, bytes) else result
        start = cut
    return b"".join(out)


# --- 8: token counts must be integers in 0..MAX_TOKENS -----------------------------------

HUGE = 10**30
ANOMALIES = [  # protocol, SSE payload, the anomaly recorded
    (Protocol.OPENAI_CHAT, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens":
                                                     HUGE}},
     "completion_tokens 1e+30 out of range"),
    (Protocol.OPENAI_CHAT, {"choices": [], "usage": {"prompt_tokens": -1}},
     "prompt_tokens -1 out of range"),
    (Protocol.OPENAI_CHAT, {"usage": {"prompt_tokens": 3, "prompt_tokens_details": {
        "cached_tokens": float("nan")}}}, "prompt_tokens_details.cached_tokens nan out of range"),
    (Protocol.OPENAI_CHAT, {"usage": {"completion_tokens": MAX_TOKENS + 1}},
     "completion_tokens 1000000001 out of range"),
    (Protocol.OPENAI_CHAT, {"usage": {"completion_tokens": 1e300}},
     "completion_tokens 1e+300 out of range"),
    (Protocol.OPENAI_CHAT, {"usage": {"completion_tokens": float("inf")}},
     "completion_tokens inf out of range"),
    (Protocol.OPENAI_CHAT, {"usage": {"completion_tokens": 2.5}},
     "completion_tokens 2.5 is not an integer"),
    (Protocol.OPENAI_CHAT, {"usage": {"completion_tokens": "12"}},
     "completion_tokens '12' is not a number"),
    (Protocol.OPENAI_RESPONSES, {"type": "response.completed", "response": {"usage": {
        "input_tokens": 5, "output_tokens": HUGE}}}, "output_tokens 1e+30 out of range"),
    (Protocol.GEMINI, {"usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": -HUGE}},
     "candidatesTokenCount -1e+30 out of range"),
    (Protocol.ANTHROPIC_MESSAGES, {"type": "message_delta", "usage": {"output_tokens": HUGE}},
     "output_tokens 1e+30 out of range"),
]


@pytest.mark.parametrize(("protocol", "payload", "anomaly"), ANOMALIES)
def test_an_absurd_count_is_recorded_and_never_billed(protocol: Protocol, payload: dict,
                                                      anomaly: str):
    tracker = UsageTracker(protocol)
    tracker.observe_event(SSEEvent("", json.dumps(payload), None))
    usage, method = settle_usage(tracker, prompt_tokens=10)
    bson.encode(usage.as_document())  # fits the event and the ledger (int64)
    assert usage == Usage(prompt_tokens=10)  # the prompt estimated; nothing was delivered
    assert method is not None and "not trusted" in method
    assert tracker.usage_anomaly == anomaly


def test_the_anomaly_sticks_and_delivered_text_is_still_counted():
    tracker = UsageTracker(Protocol.OPENAI_CHAT)
    body = {"choices": [{"message": {"content": "x" * 400}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": HUGE}}
    tracker.observe_body(json.dumps(body).encode())
    tracker.observe_event(SSEEvent("", json.dumps(  # a sane usage later does not clear it
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}), None))
    usage, method = settle_usage(tracker, prompt_tokens=2)
    assert usage == Usage(prompt_tokens=2, completion_tokens=100)  # 400 characters / 4
    assert method == ("provider usage not trusted: output: delivered characters/4; "
                      "prompt: text characters/4 plus media by kind")
    assert tracker.usage_anomaly == "completion_tokens 1e+30 out of range"


def test_counts_up_to_the_bound_are_trusted():
    tracker = UsageTracker(Protocol.OPENAI_CHAT)
    tracker.observe_event(SSEEvent("", json.dumps({"choices": [], "usage": {
        "prompt_tokens": MAX_TOKENS, "completion_tokens": 12.0,
        "prompt_tokens_details": None}}), None))
    assert tracker.usage_anomaly is None
    assert tracker.usage == Usage(prompt_tokens=MAX_TOKENS, completion_tokens=12)


@settings(max_examples=100)
@given(st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.booleans()))
def test_any_count_is_either_sane_or_an_anomaly(value):
    tracker = UsageTracker(Protocol.GEMINI)
    tracker.observe_json({"usageMetadata": {"candidatesTokenCount": value}})
    usage, _ = settle_usage(tracker, prompt_tokens=1)
    assert all(0 <= n <= 2 * MAX_TOKENS for n in usage.as_document().values())
    sane = (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value == int(value) and 0 <= value <= MAX_TOKENS)
    assert (tracker.usage_anomaly is None) == sane


# --- 10: a JSON-array stream, element by element ------------------------------------------

SEPARATORS = st.sampled_from([",", ",\r\n", "\n,\r\n", " , "])
TEXT = st.text(alphabet=st.sampled_from(list('ab"\\[]{},: \n\u00e9\u4e2d')), max_size=12)
LEAF = st.none() | st.booleans() | st.integers(-10**6, 10**6) | TEXT
VALUE = st.recursive(LEAF, lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(TEXT, kids, max_size=3), max_leaves=12)


def render(elements: list, separators: list[str], ascii_only: bool) -> tuple[bytes, list[int]]:
    """A JSON array's bytes, and where each element ends in them."""
    body, ends = b"[\r\n", []
    for i, element in enumerate(elements):
        if i:
            body += separators[i % len(separators)].encode()
        body += json.dumps(element, ensure_ascii=ascii_only).encode()
        ends.append(len(body))
    return body + b"\r\n]", ends


def split(splitter: JSONSplitter, data: bytes, cuts: list[int]) -> list:
    values: list = []
    start = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
        values += [json.loads(v) for v in splitter.feed(data[start:cut])]
        start = cut
    return values


@settings(max_examples=300)
@given(st.lists(VALUE, max_size=6), st.lists(SEPARATORS, min_size=1, max_size=3),
       st.booleans(), st.data())
def test_array_elements_come_out_whole_at_any_chunking_and_any_cut(
        elements: list, separators: list[str], ascii_only: bool, data):
    body, ends = render(elements, separators, ascii_only)
    delivered = data.draw(st.integers(0, len(body)), label="cut off after")
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20), label="chunking")
    splitter = JSONSplitter(max_value_bytes=1 << 20)
    values = split(splitter, body[:delivered], cuts)
    # every container element delivered in full, in order; scalars carry no usage
    assert values == [e for e, end in zip(elements, ends, strict=True)
                      if end <= delivered and isinstance(e, dict | list)]
    assert splitter.complete == (delivered == len(body))
    assert splitter.held <= max([len(body) - len(b"[\r\n"), 0])


@settings(max_examples=200)
@given(st.dictionaries(TEXT, VALUE, max_size=4), st.data())
def test_an_object_body_is_one_value(doc: dict, data):
    body = b"\xef\xbb\xbf \r\n" + json.dumps(doc).encode()
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20))
    splitter = JSONSplitter(max_value_bytes=1 << 20)
    assert split(splitter, body + b"\n trailing", cuts) == [doc]
    assert splitter.complete


@settings(max_examples=300)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
def test_garbage_never_raises(data: bytes, cuts: list[int]):
    splitter = JSONSplitter(max_value_bytes=64)
    start = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
        for value in splitter.feed(data[start:cut]):
            assert len(value) <= 64
        start = cut
    assert splitter.held <= 64 + 3


def test_an_oversized_element_is_skipped_and_the_rest_still_read():
    elements = [{"a": "x" * 100}, {"usageMetadata": {"promptTokenCount": 1}}]
    body, _ = render(elements, [","], True)
    splitter = JSONSplitter(max_value_bytes=50)
    assert split(splitter, body, list(range(0, len(body), 7))) == elements[1:]
    assert splitter.skipped == 1


def test_scanning_is_linear_in_the_bytes():
    """One 4 MiB element in 64-byte pieces: rescanning the held bytes on every piece
    would be ~65,000 times the work."""
    import time
    big = json.dumps([{"text": 'a"b\\c{[' * (4 << 17)}]).encode()
    splitter = JSONSplitter(max_value_bytes=64 << 20)
    started = time.perf_counter()
    values = [v for i in range(0, len(big), 64) for v in splitter.feed(big[i:i + 64])]
    assert len(values) == 1 and splitter.complete
    assert time.perf_counter() - started < 20  # ~1 s measured on this machine


def gemini_element(text: str, candidates: int, finish: bool = False) -> dict:
    candidate: dict = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate], "usageMetadata": {
        "promptTokenCount": 30, "candidatesTokenCount": candidates,
        "totalTokenCount": 30 + candidates}, "modelVersion": "gemini-2.5-flash"}


# 40 elements of 200 characters, cumulative usage 50 tokens each, then a last element
# that never arrives in full: 8,000 characters delivered and usage said 2,000 tokens.
GEMINI_ELEMENTS = [gemini_element("y" * 200, 50 * (i + 1)) for i in range(40)]
GEMINI_ELEMENTS.append(gemini_element("z" * 200, 2050, finish=True))
GEMINI_ARRAY, GEMINI_ENDS = render(GEMINI_ELEMENTS, [",\r\n"], True)


def gemini_meter() -> StreamMeter:
    return StreamMeter(Protocol.GEMINI, sse=False, content_encoding="",
                       hide_usage_chunk=False)


@settings(max_examples=60)
@given(st.data())
def test_a_cut_gemini_array_is_billed_from_what_it_delivered(data):
    cut = GEMINI_ENDS[-1] - data.draw(st.integers(1, 300))  # inside the last element
    cuts = data.draw(st.lists(st.integers(0, cut), max_size=30))
    meter = gemini_meter()
    assert feed(meter, GEMINI_ARRAY[:cut], cuts) == GEMINI_ARRAY[:cut]
    meter.close()
    assert meter.tracker.usage == Usage(prompt_tokens=30, completion_tokens=2000)
    assert meter.tracker.output_chars == 8000
    usage, method = settle_usage(meter.tracker, prompt_tokens=0)
    assert usage == Usage(prompt_tokens=30, completion_tokens=2000)
    assert method == "output: delivered characters/4; input: provider"


@settings(max_examples=60)
@given(st.lists(st.integers(0, len(GEMINI_ARRAY)), max_size=30))
def test_a_whole_gemini_array_is_final(cuts: list[int]):
    meter = gemini_meter()
    feed(meter, GEMINI_ARRAY, cuts)
    meter(b"")
    meter.close()
    assert meter.tracker.usage == Usage(prompt_tokens=30, completion_tokens=2050)
    assert settle_usage(meter.tracker, prompt_tokens=0)[1] is None


def test_each_element_is_metered_as_it_arrives_and_the_body_is_not_kept():
    meter = gemini_meter()
    meter(GEMINI_ARRAY[:GEMINI_ENDS[0]])
    assert meter.tracker.usage == Usage(prompt_tokens=30, completion_tokens=50)
    meter(GEMINI_ARRAY[GEMINI_ENDS[0]:])
    assert meter.tracker.usage.completion_tokens == 2050
    assert meter.body == b""  # nothing kept to parse at the end


# --- 12: every member of a multi-member gzip body ----------------------------------------

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
        "stream": True, "stream_options": {"include_usage": True}}
CHAT_SSE = b"".join(openai_chat_stream(CHAT, "gz"))
CHAT_USAGE = openai_chat_usage(CHAT)


@settings(max_examples=150)
@given(st.lists(st.integers(1, len(CHAT_SSE) - 1), min_size=1, max_size=6),
       st.sampled_from(["gzip", "x-gzip", "GZIP"]), st.booleans(), st.data())
def test_every_gzip_member_is_metered_at_any_chunking(members: list[int], encoding: str,
                                                      garbage_tail: bool, data):
    bounds = [0, *sorted(set(members)), len(CHAT_SSE)]
    body = b"".join(gzip.compress(CHAT_SSE[a:b]) for a, b in itertools.pairwise(bounds))
    if garbage_tail:  # ignored after a complete member, as urllib3 does
        body += b"\x00\x00not gzip"
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=25))
    meter = StreamMeter(Protocol.OPENAI_CHAT, sse=True, content_encoding=encoding,
                        hide_usage_chunk=False)
    assert feed(meter, body, cuts) == body  # passed on compressed, untouched
    meter(b"")
    meter.close()
    assert meter.tracker.usage == Usage(
        prompt_tokens=CHAT_USAGE["prompt_tokens"],
        completion_tokens=CHAT_USAGE["completion_tokens"])
    assert meter.tracker.finished
