"""SlowClients addon: close connections that take too long to send request headers.

mitmproxy reads request headers with no deadline: ``Http1Server.read_headers`` waits for
the blank line for as long as bytes keep coming, and ``tcp_timeout`` only closes a
connection that sends nothing at all. A client dribbling one header byte a second
(slowloris) holds a socket forever. So a connection gets ``client_header_timeout``
seconds to complete request headers:

- from the moment it connects (this also bounds a TLS handshake), and
- on keep-alive, from the moment its previous request was answered (``response`` or
  ``error``), so an idle connection that dribbles its *next* request is closed too.

Between complete headers and the answer a connection is busy, never cut: a slow upstream
or a long stream is fine. A reply still being written counts as busy as well (a slow
reader of a large answer); ``tcp_timeout`` bounds that. A connection that leaves HTTP
(WebSocket, raw TCP) is no longer watched. A sweep every ``SWEEP_INTERVAL`` closes late
connections the way mitmproxy's own inactivity timeout does: it cancels the connection's
handler, which closes the socket and fires ``client_disconnected``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from mitmproxy import connection, ctx, exceptions, http, tcp
from mitmproxy.utils import human

from . import background

logger = logging.getLogger(__name__)

OPTION = "client_header_timeout"
SWEEP_INTERVAL = 1.0  # seconds; a late connection is closed at most this much past its time
LOGGED_ADDRESSES = 5


@dataclass(slots=True)
class Watched:
    client: connection.Client
    waiting_since: float | None  # monotonic; None while a request is in flight
    in_flight: set[str] = field(default_factory=set)  # flow ids with complete headers


class SlowClients:
    def __init__(self) -> None:
        self.watched: dict[str, Watched] = {}  # by client connection id
        self._sweeper: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            OPTION, int, 30,
            "Seconds a client connection has to send complete request headers, from "
            "connecting or from its previous answer (keep-alive); later it is closed. "
            "0 = no limit.",
        )

    def configure(self, updated: set[str]) -> None:
        if OPTION in updated and ctx.options.client_header_timeout < 0:
            raise exceptions.OptionsError(f"{OPTION} must be 0 (off) or a number of seconds")

    def running(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._run())

    async def done(self) -> None:
        await background.stop(self._sweeper)

    def client_connected(self, client: connection.Client) -> None:
        if client.transport_protocol == "tcp":
            self.watched[client.id] = Watched(client, time.monotonic())

    def client_disconnected(self, client: connection.Client) -> None:
        self.watched.pop(client.id, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._busy(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:  # CONNECT has no requestheaders
        self._busy(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._answered(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._answered(flow)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._answered(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._answered(flow)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self.watched.pop(flow.client_conn.id, None)  # no more request headers to wait for

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self.watched.pop(flow.client_conn.id, None)

    def _busy(self, flow: http.HTTPFlow) -> None:
        if watched := self.watched.get(flow.client_conn.id):
            watched.in_flight.add(flow.id)
            watched.waiting_since = None

    def _answered(self, flow: http.HTTPFlow) -> None:
        watched = self.watched.get(flow.client_conn.id)
        if watched and flow.id in watched.in_flight:  # only a request we saw restarts the clock
            watched.in_flight.discard(flow.id)
            if not watched.in_flight:
                watched.waiting_since = time.monotonic()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep()
            except Exception:  # a bug must not end the protection for the process's lifetime
                logger.exception("Slow client sweep failed")

    def sweep(self) -> None:
        """Close every connection that has waited too long for request headers."""
        timeout = ctx.options.client_header_timeout
        if timeout <= 0:
            return
        now = time.monotonic()
        connections = ctx.master.addons.get("proxyserver").connections
        closed = []
        for client_id, watched in list(self.watched.items()):
            if watched.waiting_since is None or now - watched.waiting_since < timeout:
                continue
            handler = connections.get(client_id)
            io = handler.transports.get(handler.client) if handler else None
            if io is None or io.handler is None:
                continue
            transport = getattr(io.writer, "transport", None)
            if transport is not None and transport.get_write_buffer_size():
                watched.waiting_since = now  # still writing its answer: not waiting yet
                continue
            del self.watched[client_id]
            io.handler.cancel(OPTION)
            closed.append(watched.client.peername)
        if closed:
            shown = ", ".join(human.format_address(a) for a in closed[:LOGGED_ADDRESSES])
            more = f" and {len(closed) - LOGGED_ADDRESSES} more" \
                if len(closed) > LOGGED_ADDRESSES else ""
            logger.info(f"Closed {len(closed)} connection(s) without complete request "
                        f"headers within {timeout} s: {shown}{more}")
