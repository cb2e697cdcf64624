"""Content-only events of an OpenAI stream are parsed late, if at all: whatever the events,
the tracker ends with the same usage, errors, timings and content size as parsing each
event as it passes; a usage key spelled with escapes is still seen; memory stays bounded."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from llm_billing.core.sse import SSEEvent
from llm_billing.core.usage import MAX_DEFERRED, Protocol, UsageTracker

CONTENT = st.text(max_size=30).map(
    lambda text: json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}))
USAGE = st.integers(0, 10**6).map(lambda n: json.dumps(
    {"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": 7,
                              "total_tokens": n + 7}}))
ESCAPED_USAGE = st.integers(0, 10**6).map(lambda n: (
    '{"choices":[],"\\u0075sage":{"prompt_tokens":' + str(n) + ',"completion_tokens":1,'
    '"total_tokens":' + str(n + 1) + '}}'))
OTHER = st.sampled_from([
    '{"error":{"message":"overloaded"}}', '{"choices":[],"timings":{"predicted_n":3}}',
    '{"choices":[{"delta":{"content":"caf\\u00e9"}}]}', 'not json', '[1,2]', '{}',
    '{"choices":[{"delta":{"content":"a \\"usage\\" word"}}],"usage":null}'])
EVENTS = st.lists(st.one_of(CONTENT, USAGE, ESCAPED_USAGE, OTHER), max_size=40)


def track(events: list[str], defer: bool, protocol=Protocol.OPENAI_CHAT) -> UsageTracker:
    tracker = UsageTracker(protocol)
    tracker._can_defer = defer and tracker._can_defer
    for data in events:
        tracker.observe_event(SSEEvent("", data, None))
    return tracker


def state(tracker: UsageTracker) -> tuple:
    return (tracker.usage, tracker.usage_final, tracker.finished, tracker.error,
            tracker.timings, tracker.usage_anomaly, tracker.output_chars)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.sampled_from([Protocol.OPENAI_CHAT, Protocol.OPENAI_COMPLETIONS]))
def test_deferred_parsing_ends_where_parsing_each_event_does(events, protocol):
    assert state(track(events, True, protocol)) == state(track(events, False, protocol))


def test_a_usage_key_spelled_with_escapes_is_seen():
    tracker = track(['{"choices":[{"delta":{"content":"hi"}}]}',
                     '{"choices":[],"\\u0075sage":{"prompt_tokens":5,"completion_tokens":2,'
                     '"total_tokens":7}}'], True)
    assert tracker.usage is not None and tracker.usage.prompt_tokens == 5
    assert tracker.usage_final and tracker.output_chars == 2


def test_content_events_are_not_parsed_as_they_pass_and_memory_stays_bounded():
    tracker = UsageTracker(Protocol.OPENAI_CHAT)
    chunk = json.dumps({"choices": [{"delta": {"content": "x" * 1000}}]})
    for _ in range(1000):  # ~1 MB of content
        assert tracker.observe_event(SSEEvent("", chunk, None)) is None  # not parsed now
        assert tracker._deferred_size <= MAX_DEFERRED
    assert tracker.output_chars == 1000 * 1000
