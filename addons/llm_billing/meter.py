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
from .expression import EvaluationError, billable
from .sse import SSEBlock, SSEParser
from .usage import Protocol, Usage, UsageTracker, is_usage_only_chunk, parse_json

logger = logging.getLogger(__name__)

MAX_JSON_BODY = 32 << 20  # a non-streamed body larger than this is estimated, not parsed
MAX_HELD = 256 << 10  # an unfinished event held back longer than this is let through
CHARS_PER_TOKEN = 4  # the usual rough ratio for English text, used only for estimates

_NULL_USAGE = (
    re.compile(rb',\s*"usage"\s*:\s*null(?=\s*})'),
    re.compile(rb'"usage"\s*:\s*null\s*,\s*'),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the meter concluded about one response."""

    status: int | None  # None when no response came
    usage: Usage | None  # None: nothing to bill (upstream failed)
    estimated: bool = False
    estimate_method: str | None = None
    complete: bool = False  # the response said it was finished
    error: str | None = None
    response_bytes: int = 0
    timings: dict[str, Any] | None = None  # llama.cpp's, when it sent them
    metered: int | float | None = None  # the route's metering expression's value
    metering_error: str | None = None


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


def settle_usage(tracker: UsageTracker, prompt_chars: int) -> tuple[Usage, str | None]:
    """The usage to bill and, when it is estimated, how."""
    usage = tracker.usage
    if usage is not None and tracker.usage_final:
        return usage, None
    delivered = estimate_tokens(tracker.output_chars)
    if usage is not None:  # e.g. Anthropic's message_start: input exact, output so far
        partial = Usage(
            prompt_tokens=usage.prompt_tokens, cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens, reasoning_tokens=usage.reasoning_tokens,
            completion_tokens=max(usage.completion_tokens, delivered))
        return partial, f"output: delivered characters/{CHARS_PER_TOKEN}; input: provider"
    estimate = Usage(prompt_tokens=estimate_tokens(prompt_chars), completion_tokens=delivered)
    return estimate, f"prompt and delivered characters/{CHARS_PER_TOKEN}"


class StreamMeter:
    """The stream callable of one response. Never raises: on a bug it stops metering and
    passes the rest through.

    Keeps only what it needs: the SSE parser's unfinished line or event, a non-streamed
    JSON body (capped), and — only for a metering expression that reads them — the whole
    text (``allData``, capped at ``keep_cap``) or the last chunk.
    """

    def __init__(self, protocol: Protocol, *, sse: bool, content_encoding: str,
                 hide_usage_chunk: bool, keep_all: bool = False, keep_last: bool = False,
                 keep_cap: int = MAX_JSON_BODY) -> None:
        self.tracker = UsageTracker(protocol)
        self.response_bytes = 0
        self.hidden = bytearray()  # what we kept from the client (the usage-only chunk)
        self.last_chunk = b""
        self.body_overflow = False
        self.sse = sse
        try:
            self._decode = decoder_for(content_encoding)
            self._decodable = True
        except KeyError:
            self._decode, self._decodable = None, False
        # Editing the stream needs its plain bytes; the router asked for identity.
        self._hide = hide_usage_chunk and sse and self._decode is None and self._decodable
        self._parser = SSEParser(keep_raw=self._hide)
        self._keep_body = keep_all or not sse
        self._keep_last = keep_last
        self._cap = keep_cap if keep_all else MAX_JSON_BODY
        self._body = bytearray()
        self._dropped_last = False
        self._broken = False

    @property
    def body(self) -> bytes:
        """The decoded body kept so far (empty unless kept, or past the cap)."""
        return bytes(self._body)

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
        if data and self._keep_last:
            self.last_chunk = data
        if self._keep_body:
            self._keep(data)
        if not self.sse:
            return chunk
        blocks = self._parser.feed(data) if data else []
        if not chunk:
            blocks += self._parser.finish()
        if not self._hide:
            for block in blocks:
                if block.event:
                    self.tracker.observe_event(block.event)
            return chunk
        out = [raw for block in blocks if (raw := self._forward(block))]
        if self._parser.pending_raw_size > MAX_HELD:
            # Not an SSE stream we can edit event by event: never hold it back.
            logger.warning("Unterminated SSE event over %d bytes; passing the stream "
                           "through unedited", MAX_HELD)
            self._hide = False
            out.append(self._parser.release_pending())
        return out

    def _forward(self, block: SSEBlock) -> bytes:
        """The bytes of ``block`` the client gets (empty when hidden)."""
        if block.continues_previous:
            if self._dropped_last:
                self.hidden += block.raw
                return b""
            return block.raw
        self._dropped_last = False
        if block.event is None:
            return block.raw
        payload = self.tracker.observe_event(block.event)
        if is_usage_only_chunk(payload):
            self._dropped_last = True
            self.hidden += block.raw
            return b""
        return strip_null_usage(block.raw, block.event.data, payload)

    def _keep(self, data: bytes) -> None:
        if self.body_overflow:
            return
        if len(self._body) + len(data) > self._cap:
            self.body_overflow = True
            self._body.clear()
        else:
            self._body += data

    def close(self) -> None:
        """The response is over (or cut off): parse what a non-streamed body left."""
        if self._broken or not self._decodable:
            return
        if self.sse:
            for block in self._parser.finish():
                if block.event:
                    self.tracker.observe_event(block.event)
        elif self._body:
            self.tracker.observe_body(bytes(self._body))


class Meter:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = context.of(flow)
        if ctx is None or ctx.backend is None or flow.response is None or ctx.replayed:
            return  # a replayed flow's body is already stored: metered in response
        ctx.meter = self.meter_for(flow, ctx)
        flow.response.stream = ctx.meter

    @staticmethod
    def meter_for(flow: http.HTTPFlow, ctx: context.RequestContext) -> StreamMeter:
        assert flow.response is not None
        headers = flow.response.headers
        needs = ctx.route.metering.variables if ctx.route.metering else frozenset()
        return StreamMeter(
            ctx.protocol,
            sse=headers.get("content-type", "").startswith("text/event-stream"),
            content_encoding=headers.get("content-encoding", ""),
            hide_usage_chunk=ctx.usage_injected,
            keep_all="allData" in needs,
            keep_last="lastChunk" in needs,
            keep_cap=ctx.route.max_body_bytes,
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
        if ctx.meter is None and response is not None:
            # Not streamed through us (a saved flow replayed offline): meter the stored
            # body, plus the usage chunk we had kept from the client.
            ctx.meter = self.meter_for(flow, ctx)
            hidden = flow.metadata.get(context.METADATA_KEY, {}).get("hidden", "")
            ctx.meter(response.raw_content or b"")
            ctx.meter(hidden.encode())
            ctx.meter(b"")
        ctx.outcome = outcome(flow, ctx)
        context.summarize(flow, **_summary(ctx))


def outcome(flow: http.HTTPFlow, ctx: context.RequestContext) -> Outcome:
    status = flow.response.status_code if flow.response else None
    error = flow.error.msg if flow.error else None
    meter = ctx.meter
    if meter is None:
        return Outcome(status=status, usage=None, error=error or "no response")
    meter.close()
    tracker = meter.tracker
    common: dict[str, Any] = dict(
        status=status, complete=tracker.finished, error=tracker.error or error,
        response_bytes=meter.response_bytes, timings=tracker.timings)
    if status is None or status >= 400:
        return Outcome(usage=None, **common)
    usage, method = settle_usage(tracker, ctx.prompt_chars)
    if ctx.route.metering is not None:
        common["metered"], common["metering_error"] = _evaluate(flow, ctx, meter, status)
    return Outcome(usage=usage, estimated=method is not None, estimate_method=method, **common)


def _evaluate(flow: http.HTTPFlow, ctx: context.RequestContext, meter: StreamMeter,
              status: int) -> tuple[int | float | None, str | None]:
    """The route's metering expression over this response."""
    expression = ctx.route.metering
    assert expression is not None
    if meter.body_overflow and "allData" in expression.variables:
        return None, f"response larger than max_body_bytes ({ctx.route.max_body_bytes})"
    body = meter.body
    env = {
        "allData": body.decode("utf-8", "replace"),
        "lastChunk": meter.last_chunk.decode("utf-8", "replace"),
        "respBody": None if meter.sse else parse_json(body),
        "status": status, "responseBytes": meter.response_bytes,
        "requestBytes": ctx.request_bytes, "path": ctx.path, "method": flow.request.method,
        "userID": ctx.caller.user_id, "planID": ctx.plan_id, "keyID": str(ctx.caller.key_id),
    }
    try:
        return billable(expression.evaluate(env)), None
    except EvaluationError as e:
        return None, str(e)


def _summary(ctx: context.RequestContext) -> dict[str, Any]:
    result = ctx.outcome
    assert result is not None
    summary: dict[str, Any] = {
        "status": result.status,
        "usage": result.usage.as_document() if result.usage else None,
        "usage_estimated": result.estimated,
    }
    if ctx.meter is not None and ctx.meter.hidden:
        summary["hidden"] = ctx.meter.hidden.decode("utf-8", "replace")
    if result.metered is not None or result.metering_error:
        summary["metered"] = result.metered
    return summary
