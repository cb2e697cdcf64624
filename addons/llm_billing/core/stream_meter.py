"""The stream callable of one response (sans-I/O): bytes in, the same bytes out at once,
a copy parsed for usage on the way: SSE event by event, a JSON body value by value (each
element of a JSON array as it completes, see json_stream.py).

When the router injected ``include_usage``, the meter passes the stream on event by event
instead and drops the usage-only chunk (and the ``"usage":null`` it adds to every other
chunk), so the client receives exactly the stream it asked for.
"""

from __future__ import annotations

import logging
import re

from .decoding import decoder_for
from .json_stream import JSONSplitter
from .sse import SSEBlock, SSEEvent, SSEParser
from .usage import Protocol, UsageTracker, is_usage_only_chunk, parse_json

logger = logging.getLogger(__name__)

MAX_JSON_BODY = 32 << 20  # a JSON value (body, array element) larger than this is not parsed
MAX_HELD = 256 << 10  # an unfinished event held back longer than this is let through

_NULL_USAGE = (
    re.compile(rb',\s*"usage"\s*:\s*null(?=\s*})'),
    re.compile(rb'"usage"\s*:\s*null\s*,\s*'),
)


_TRAILING_NULL_USAGE = ',"usage":null}'


def strip_trailing_null_usage(raw: bytes, data: str) -> tuple[bytes, str] | None:
    """OpenAI's own form, ``{…,"usage":null}``, in one parse: when the rest parses as a
    non-empty object without ``usage``, the removed text was certainly that top-level
    member (the rest's last ``}`` closes the object). The block's bytes and data without
    it; None when not that form (``strip_null_usage`` then decides)."""
    if not data.endswith(_TRAILING_NULL_USAGE) or "\n" in data:
        return None
    rest = data[: -len(_TRAILING_NULL_USAGE)] + "}"
    payload = parse_json(rest)
    if not (isinstance(payload, dict) and payload and "usage" not in payload):
        return None
    data_bytes = data.encode()
    offset = raw.find(data_bytes)
    if offset < 0:
        return None
    cut = offset + len(data_bytes) - len(_TRAILING_NULL_USAGE)
    return raw[:cut] + b"}" + raw[offset + len(data_bytes):], rest


def strip_null_usage(raw: bytes, data: str, payload: object) -> bytes:
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


class StreamMeter:
    """The stream callable of one response. Never raises: on a bug it stops metering and
    passes the rest through.

    Keeps only what it needs: the SSE parser's unfinished line or event, the unfinished
    value of a JSON body (capped), and — only for a metering expression that reads them —
    the whole text (``allData`` capped at ``keep_cap``, ``respBody`` at ``MAX_JSON_BODY``)
    or the last chunk.
    """

    def __init__(self, protocol: Protocol, *, sse: bool, content_encoding: str,
                 hide_usage_chunk: bool, keep_all: bool = False, keep_body: bool = False,
                 keep_last: bool = False, keep_cap: int = MAX_JSON_BODY,
                 keep_text: bool = False) -> None:
        self.tracker = UsageTracker(protocol, keep_text)
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
        self._values = None if sse else JSONSplitter(MAX_JSON_BODY)
        self._keep_body = keep_all or keep_body
        self._keep_last = keep_last
        self._cap = keep_cap if keep_all else MAX_JSON_BODY
        self._body = bytearray()
        self._dropped_last = False
        self._broken = False

    @property
    def edits_stream(self) -> bool:
        """The client may get fewer bytes than the upstream sent (see hide_usage_chunk)."""
        return self._hide

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
            if not self._hide:
                return chunk
            held = b"".join(b.raw for b in self._parser.finish())
            return held + chunk if held + chunk else []  # never b"": it ends the response

    def _pass(self, chunk: bytes) -> bytes | list[bytes]:
        self.response_bytes += len(chunk)
        if not self._decodable:
            return chunk
        data = self._decode(chunk) if self._decode and chunk else chunk
        if data and self._keep_last:
            self.last_chunk = data
        if self._keep_body:
            self._keep(data)
        if self._values is not None:
            for value in self._values.feed(data):
                self.tracker.observe_json(parse_json(value))
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
        # One piece per upstream read, as it came: mitmproxy sends each piece of a list as
        # its own write (and chunk). Never b"": as a chunk, it would end the response.
        joined = b"".join(out)
        return joined if joined else []

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
        if stripped := strip_trailing_null_usage(block.raw, block.event.data):
            raw, data = stripped
            self.tracker.observe_event(SSEEvent(block.event.event, data, block.event.id))
            return raw
        payload = self.tracker.observe_event(block.event)
        if payload is None and '"usage"' in block.event.data:  # deferred, yet usage to strip
            payload = parse_json(block.event.data)
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
        """The response is over (or cut off): the SSE parser's unterminated rest; a JSON
        body that arrived whole."""
        if self._broken or not self._decodable:
            return
        if self._values is None:
            for block in self._parser.finish():
                if block.event:
                    self.tracker.observe_event(block.event)
        elif self._values.complete:
            self.tracker.body_complete()


