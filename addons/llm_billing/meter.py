"""Meter addon: reads token usage out of responses as they stream past.

In ``responseheaders`` the flow's stream becomes a ``StreamMeter`` (core/stream_meter.py):
every chunk goes on at once, a copy feeds the SSE parser and the usage tracker. The flow
is settled by the ``Settle`` addon (settle.py), which reads what the meter saw.

When the meter edits the stream (it hides the usage chunk the router asked for), the
upstream's ``Content-Length`` no longer holds: it is dropped, so mitmproxy frames the
response chunked (HTTP/1.1 client) or by closing the connection, and the client never
waits for bytes that will not come.
"""

from __future__ import annotations

from mitmproxy import http

from . import context
from .core.stream_meter import StreamMeter


class Meter:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = context.of(flow)
        if ctx is None or ctx.backend is None or flow.response is None or ctx.replayed:
            return  # a replayed flow's body is already stored: metered in response
        ctx.meter = self.meter_for(flow, ctx)
        flow.response.stream = ctx.meter
        headers = flow.response.headers
        if ctx.meter.edits_stream and "content-length" in headers:
            del headers["content-length"]
            if flow.request.http_version == "HTTP/1.1" and "transfer-encoding" not in headers:
                headers["transfer-encoding"] = "chunked"  # keeps the connection reusable

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
            keep_body="respBody" in needs,
            keep_last="lastChunk" in needs,
            keep_cap=ctx.route.max_body_bytes,
            keep_text=ctx.tokenizer_input is not None,  # counted by the backend if no usage
        )
