"""FinishUpstream addon: a non-streamed answer is read and billed even if its client left.

A client that gives up (timeout, crash) before a non-streamed answer arrives closes its
connection, but the provider has accepted the request and finishes — and charges for —
the completion. So once the request is upstream we keep reading the answer, bill what it
reports, and drop it (nobody is left to receive it).

What mitmproxy 12 does when an HTTP/1 client closes while its request waits for the answer:

1. ``Http1Server.wait`` gets ``ConnectionClosed``: it closes the client connection and
   hands the stream ``RequestProtocolError("Client disconnected.")``.
2. ``HttpStream.handle_protocol_error`` forwards that to the upstream connection
   (``Http1Client`` closes it, ``Http2Client`` resets the stream), then fires ``error``.
3. The closed client ends the connection handler (``proxy/server.py``), which cancels every
   upstream connection that client had.

No hook runs before step 1, ``error`` comes after the upstream was closed, and an addon
cannot reach the upstream socket (the connection handler owns it and cancels it in step
3), so an addon cannot keep reading by itself. Making the upstream call ourselves instead
would either duplicate mitmproxy's connection handling for every non-streamed request
(TLS, HTTP/2, pooling, upstream proxies) or, done only after the client left, call the
upstream twice. So this patches the one decision in step 1, as ``proxy_errors`` swaps
the error page builder: for a flow flagged ``finish_upstream`` whose request mitmproxy
has already handed to the upstream connection, ``Http1Server`` keeps the client
connection open and tells the stream nothing. Steps 2 and 3 then never happen: the
stream reads the answer, ``responseheaders`` and ``response`` fire, and Settle settles the
flow once, with the usage the upstream reported. ``Http1Server.send`` drops the answer and
closes the client connection once it is complete (or the upstream failed).

Bounds:

- Only flows flagged in ``request``: non-streamed requests to a backend. A streamed
  request whose client hangs up is cut off as before (billed what was seen, or estimated).
- Only once the whole request went to the upstream connection. A client that leaves
  while the request hooks run or the connection opens is dropped as before.
- ``finish_upstream_timeout`` seconds after the client left (0 turns this off), the
  stream gets the client's disconnect that step 1 had held back: the upstream connection
  is closed, ``error`` fires and the flow is settled as failed.
- HTTP/1 clients (the proxy's plain listener, every SDK). An HTTP/2 client (TLS listener)
  that resets its stream or closes its connection is handled as before.

Exactly once: a held-back client disconnect fires no ``error``, so Settle has nothing to
settle early; the flow ends with ``response`` or ``error`` like any other.
"""

from __future__ import annotations

import weakref
from logging import INFO, WARNING

from mitmproxy import ctx, http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import HttpLayer, HttpStream
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    HttpEvent,
    RequestProtocolError,
    ResponseEndOfMessage,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook
from mitmproxy.proxy.layers.http._http1 import Http1Server

from . import context

OPTION = "finish_upstream_timeout"

# Client connections whose client left while we read their stream's answer (the stream id).
_orphans: weakref.WeakKeyDictionary[Http1Server, int] = weakref.WeakKeyDictionary()
_original_wait = Http1Server.wait
_original_send = Http1Server.send


class FinishUpstream:
    def load(self, loader) -> None:
        loader.add_option(
            OPTION, int, 600,
            "Seconds to keep reading a non-streamed answer after its client left, to bill "
            "it; 0 drops the request when the client leaves.",
        )
        install()

    def request(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if rc is not None and rc.backend is not None and not rc.stream and not rc.replayed \
                and flow.response is None:
            rc.finish_upstream = ctx.options.finish_upstream_timeout > 0


def install() -> None:
    Http1Server.wait = _wait  # type: ignore[method-assign]
    Http1Server.send = _send  # type: ignore[method-assign]


def _wait(self: Http1Server, event: events.Event) -> layer.CommandGenerator[None]:
    """``Http1Server.wait`` (request read, answer pending), holding back the client's leaving."""
    if isinstance(event, events.Wakeup):
        if _orphans.get(self) == self.stream_id:
            yield from _give_up(self)
        return
    if isinstance(event, events.ConnectionClosed) \
            and event.connection.state is ConnectionState.CAN_WRITE:  # else we are closing it
        timeout = self.context.options.finish_upstream_timeout
        stream = _answer_pending(self)
        if stream is not None and timeout > 0:
            _orphans[self] = self.stream_id
            rc = context.of(stream.flow)
            assert rc is not None
            context.summarize(stream.flow, client_left=True)
            yield commands.Log(f"Client left before the answer; still reading it to bill "
                               f"{rc.model} for user {rc.caller.user_id}", INFO)
            yield commands.RequestWakeup(timeout)
            return
    yield from _original_wait(self, event)


def _send(self: Http1Server, event: HttpEvent) -> layer.CommandGenerator[None]:
    """``Http1Server.send``: an orphan's answer goes nowhere; its end closes the connection."""
    if self not in _orphans:
        yield from _original_send(self, event)
    elif isinstance(event, ResponseEndOfMessage | ResponseProtocolError):
        self.state = self.done
        yield commands.CloseConnection(self.conn)


def _give_up(self: Http1Server) -> layer.CommandGenerator[None]:
    """The timeout: what ``Http1Server.wait`` would have done when the client left."""
    timeout = self.context.options.finish_upstream_timeout
    self.state = self.done
    yield commands.Log(f"No complete answer {timeout} s after the client left; dropping it",
                       WARNING)
    yield commands.CloseConnection(self.conn)
    yield ReceiveHttp(RequestProtocolError(
        self.stream_id, f"Client disconnected; the upstream did not answer within {timeout} s.",
        code=ErrorCode.CLIENT_DISCONNECTED))


def _answer_pending(server: Http1Server) -> HttpStream | None:
    """The stream of this connection's current request, if it is flagged ``finish_upstream``
    and mitmproxy has handed the whole request to an upstream connection that can still
    answer."""
    http_layer = next((x for x in reversed(server.context.layers) if isinstance(x, HttpLayer)),
                      None)
    stream = http_layer.streams.get(server.stream_id) if http_layer else None
    if stream is None or (rc := context.of(stream.flow)) is None or not rc.finish_upstream:
        return None
    paused = stream._paused  # held in a hook, or waiting for the upstream connection
    sent = (
        stream.client_state == stream.state_done
        and stream.server_state in (stream.state_wait_for_response_headers,
                                    stream.state_stream_response_body,
                                    stream.state_consume_response_body)
        and (paused is None or isinstance(paused.command, HttpResponseHeadersHook))
        and bool(stream.flow.server_conn.state & ConnectionState.CAN_READ)
    )
    return stream if sent else None
