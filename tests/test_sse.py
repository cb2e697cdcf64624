"""The incremental SSE parser against every way a stream can be cut into chunks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fake_upstream import anthropic_stream, openai_chat_stream
from llm_billing.core.sse import SSEEvent, SSEParser

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
        "stream": True, "stream_options": {"include_usage": True}}
OPENAI = b"".join(openai_chat_stream(BODY, "t"))
ANTHROPIC = b"".join(anthropic_stream({**BODY, "max_tokens": 3}, "t"))
TRICKY = (
    b"\xef\xbb\xbf: keep-alive comment\r\n\r\n"
    b"event: a\r\ndata: line one\r\ndata:line two\r\nid: 7\r\n\r\n"
    b"data\n\n"  # a field with no colon: empty data
    b"retry: 100\rdata: cr only\r\r"
    b"data: {\"usage\": 1}\n\n"
)


def parse(stream: bytes, cuts: list[int], keep_raw: bool = False):
    parser = SSEParser(keep_raw=keep_raw)
    blocks = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        blocks += parser.feed(stream[start:cut])
        start = cut
    blocks += parser.finish()
    return blocks


def events(stream: bytes, cuts: list[int]) -> list[SSEEvent]:
    return [b.event for b in parse(stream, cuts) if b.event]


def test_tricky_stream_fields():
    assert events(TRICKY, []) == [
        SSEEvent("a", "line one\nline two", "7"),
        SSEEvent("", "", "7"),
        SSEEvent("", "cr only", "7"),
        SSEEvent("", '{"usage": 1}', "7"),
    ]


def test_openai_stream_events():
    parsed = events(OPENAI, [])
    assert parsed[-1].data == "[DONE]"
    assert '"usage":{"prompt_tokens"' in parsed[-2].data


def test_unterminated_last_event_is_still_returned():
    assert events(b"data: [DONE]\n", []) == [SSEEvent("", "[DONE]", None)]


@settings(max_examples=300)
@given(st.sampled_from([OPENAI, ANTHROPIC, TRICKY]), st.data())
def test_any_chunking_gives_the_same_events_and_bytes(stream: bytes, data):
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    assert events(stream, cuts) == events(stream, [])
    raw_blocks = parse(stream, cuts, keep_raw=True)
    assert b"".join(b.raw for b in raw_blocks) == stream  # no byte lost or added


@settings(max_examples=300)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=20))
def test_garbage_never_raises_and_keeps_bytes(stream: bytes, cuts: list[int]):
    cuts = [c for c in cuts if c <= len(stream)]
    assert b"".join(b.raw for b in parse(stream, cuts, keep_raw=True)) == stream
    assert events(stream, cuts) == events(stream, [])


def test_every_single_byte_split_of_openai_stream():
    whole = events(OPENAI, [])
    for cut in range(len(OPENAI)):
        assert events(OPENAI, [cut]) == whole


class LineParser(SSEParser):
    """The line parser alone: the whole-block fast path turned off."""

    def _whole_blocks(self, chunk: bytes, blocks: list) -> bytes:
        return chunk


def both(stream: bytes, cuts: list[int], keep_raw: bool) -> tuple[list, list]:
    results = []
    for parser in (SSEParser(keep_raw=keep_raw), LineParser(keep_raw=keep_raw)):
        blocks, start = [], 0
        for cut in [*sorted(set(cuts)), len(stream)]:
            blocks += parser.feed(stream[start:cut])
            start = cut
        results.append(blocks + parser.finish())
    return results[0], results[1]


LINES = st.sampled_from([
    b"data: {\"a\":1}", b"data:x", b"data:", b"data", b"event: delta", b"event:e", b"id: 9",
    b": comment", b"retry: 5", b"data: caf\xc3\xa9", b"data: \xff", b"", b"\xef\xbb\xbfdata: b"])
ENDINGS = st.sampled_from([b"\n", b"\n\n", b"\r\n", b"\r", b"\n\n\n"])
STREAMS = st.lists(st.tuples(LINES, ENDINGS), max_size=12).map(
    lambda parts: b"".join(line + end for line, end in parts))


@settings(max_examples=500, deadline=None)
@given(STREAMS, st.data(), st.booleans())
def test_the_whole_block_fast_path_parses_as_the_line_parser(stream: bytes, data, keep_raw):
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    fast, lines = both(stream, cuts, keep_raw)
    assert fast == lines


def test_provider_streams_parse_as_the_line_parser_whole_and_cut():
    for stream in (OPENAI, ANTHROPIC):
        for keep_raw in (False, True):
            for cut in range(0, len(stream), 7):
                fast, lines = both(stream, [cut], keep_raw)
                assert fast == lines


def test_a_data_line_after_an_oversized_one_stays_in_its_event():
    # Without keep_raw an oversized event's lines are dropped as they come, so nothing is
    # held: a read starting at its next data line must still not be split off as an event
    # (it billed a fragment), nor leave the oversized state to swallow the event after it.
    reads = [b"data: " + b"x" * 40 + b"\n", b'data: {"a":1}\n\ndata: {"b":2}', b"\n\n"]
    results = []
    for parser in (SSEParser(max_event_bytes=30), LineParser(max_event_bytes=30)):
        blocks = [block for read in reads for block in parser.feed(read)] + parser.finish()
        results.append([block.event for block in blocks])
    assert results[0] == results[1] == [None, SSEEvent("", '{"b":2}', None)]
