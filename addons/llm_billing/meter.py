"""Meter addon: reads token usage out of responses as they stream past.

In ``responseheaders`` the flow's stream becomes a ``StreamMeter``: every chunk goes on at
once and unchanged, while a copy feeds the SSE parser and the usage tracker. When the
router injected ``include_usage``, the meter passes the stream on event by event instead
and drops the usage-only chunk (and the ``"usage":null`` it adds to every other chunk),
so the client receives exactly the stream it asked for. The flow is settled in
``response`` or ``error``, whichever comes: the OpenAI SDK hangs up right after
``[DONE]``, before the upstream's end of body, and mitmproxy then fires ``error`` only.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from . import context
from .decoding import decoder_for
from .sse import SSEBlock, SSEParser
from .usage import Protocol, Usage, UsageTracker, is_usage_only_chunk, parse_json

logger = logging.getLogger(__name__)

MAX_JSON_BODY = 32 << 20  # a non-streamed body larger than this is estimated, not parsed
CHARS_PER_TOKEN = 4  # the usual rough ratio for English text, used only for estimates

_NULL_USAGE = (
    re.compile(rb',\s*"usage"\s*:\s*null(?=\s*})'),
    re.compile(rb'"usage"\s*:\s*null\s*,\s*'),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the meter concluded about one response."""

    status: int | None  # None when no response came
    usage: Usage | None
    estimated: bool = False
    estimate_method: str | None = None
    complete: bool = False  # the response said it was finished
    error: str | None = None
    response_bytes: int = 0


def strip_null_usage(raw: bytes, data: str, payload: Any) -> bytes:
    """Remove a top-level ``"usage":null`` from one SSE block (``raw``, whose one-line data
    is ``data``), byte-exactly, if it is certainly that key (checked by re-parsing);
    otherwise return the block unchanged."""
    if not (isinstance(payload, dict) and "usage" in payload and payload["usage"] is None):
        return raw
    data_bytes = data.encode()
    offset = raw.find(data_bytes)
    if offset < 0 or "\n" in data:
        return raw
    expected = {k: v for k, v in payload.items() if k != "usage"}
    for pattern in _NULL_USAGE:
        for match in reversed(list(pattern.finditer(data_bytes))):
            if parse_json(data_bytes[: match.start()] + data_bytes[match.end() :]) == expected:
                return raw[: offset + match.start()] + raw[offset + match.end() :]
    return raw


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


class StreamMeter:
    """The stream callable of one response. Never raises: on a bug it stops metering and
    passes the rest through."""

    def __init__(self, protocol: Protocol, *, sse: bool, content_encoding: str,
                 hide_usage_chunk: bool) -> None:
        self.tracker = UsageTracker(protocol)
        self.response_bytes = 0
        self._sse = sse
        try:
            self._decode = decoder_for(content_encoding)
            self._decodable = True
        except KeyError:
            self._decode, self._decodable = None, False
        # Editing the stream needs its plain bytes; the router asked for identity.
        self._hide = hide_usage_chunk and sse and self._decode is None and self._decodable
        self._parser = SSEParser(keep_raw=self._hide)
        self._body = bytearray()
        self._body_overflow = False
        self._dropped_last = False
        self._broken = False

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if self._broken:
            return chunk
        try:
            return self._pass(chunk)
        except Exception:
            logger.exception("Meter failed; the rest of this stream passes unmetered")
            self._broken = True
            held = b"".join(b.raw for b in self._parser.finish()) if self._hide else b""
            return [held, chunk] if self._hide else chunk

    def _pass(self, chunk: bytes) -> bytes | list[bytes]:
        self.response_bytes += len(chunk)
        if not self._decodable:
            return chunk
        data = self._decode(chunk) if self._decode and chunk else chunk
        if not self._sse:
            self._keep_body(data)
            return chunk
        blocks = self._parser.feed(data) if data else []
        if not chunk:
            blocks += self._parser.finish()
        if not self._hide:
            for block in blocks:
                if block.event:
                    self.tracker.observe_event(block.event)
            return chunk
        return [raw for block in blocks if (raw := self._forward(block))]

    def _forward(self, block: SSEBlock) -> bytes:
        """The bytes of ``block`` the client gets (empty when hidden)."""
        if block.continues_previous:
            return b"" if self._dropped_last else block.raw
        self._dropped_last = False
        if block.event is None:
            return block.raw
        payload = self.tracker.observe_event(block.event)
        if is_usage_only_chunk(payload):
            self._dropped_last = True
            return b""
        return strip_null_usage(block.raw, block.event.data, payload)

    def _keep_body(self, data: bytes) -> None:
        if self._body_overflow:
            return
        if len(self._body) + len(data) > MAX_JSON_BODY:
            self._body_overflow = True
            self._body.clear()
        else:
            self._body += data

    def close(self) -> None:
        """The response is over (or cut off): parse what a non-streamed body left."""
        if self._broken or not self._decodable:
            return
        if self._sse:
            for block in self._parser.finish():
                if block.event:
                    self.tracker.observe_event(block.event)
        elif self._body:
            self.tracker.observe_body(bytes(self._body))


class Meter:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = context.of(flow)
        if ctx is None or ctx.backend is None or flow.response is None:
            return
        ctx.meter = self.meter_for(flow, ctx)
        flow.response.stream = ctx.meter

    @staticmethod
    def meter_for(flow: http.HTTPFlow, ctx: context.RequestContext) -> StreamMeter:
        assert flow.response is not None
        headers = flow.response.headers
        return StreamMeter(
            ctx.protocol,
            sse=headers.get("content-type", "").startswith("text/event-stream"),
            content_encoding=headers.get("content-encoding", ""),
            hide_usage_chunk=ctx.usage_injected,
        )

    def response(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def _settle(self, flow: http.HTTPFlow) -> None:
        ctx = context.of(flow)
        if ctx is None or ctx.backend is None or ctx.outcome is not None:
            return
        response = flow.response
        if ctx.meter is None and response is not None and response.raw_content:
            # Not streamed through us (e.g. a saved flow replayed): meter the stored body.
            ctx.meter = self.meter_for(flow, ctx)
            ctx.meter(response.raw_content)
            ctx.meter(b"")
        ctx.outcome = outcome(ctx, response.status_code if response else None,
                              flow.error.msg if flow.error else None)
        context.summarize(flow, **_summary(ctx.outcome))


def outcome(ctx: context.RequestContext, status: int | None, error: str | None) -> Outcome:
    meter = ctx.meter
    if meter is None:
        return Outcome(status=status, usage=None, error=error or "no response")
    meter.close()
    tracker = meter.tracker
    common = dict(status=status, complete=tracker.finished,
                  error=tracker.error or error, response_bytes=meter.response_bytes)
    if status is None or status >= 400 or tracker.usage is not None:
        return Outcome(usage=tracker.usage, **common)
    usage = Usage(prompt_tokens=estimate_tokens(ctx.prompt_chars),
                  completion_tokens=estimate_tokens(tracker.output_chars))
    return Outcome(usage=usage, estimated=True,
                   estimate_method=f"characters/{CHARS_PER_TOKEN}", **common)


def _summary(result: Outcome) -> dict[str, Any]:
    return {
        "status": result.status,
        "usage": result.usage.as_document() if result.usage else None,
        "usage_estimated": result.estimated,
    }
