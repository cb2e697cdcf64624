"""Slow clients (slowloris) through a real mitmdump: a connection that does not complete its
request headers within ``client_header_timeout`` is closed; everyone else is served."""

from __future__ import annotations

import contextlib
import http.client
import json
import selectors
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from conftest import (
    ApiKey,
    Proxy,
    free_port,
    openai_client,
    start_proxy,
    stop_proxy,
    write_config,
)
from fake_upstream import FakeUpstream
from llm_billing.slow_clients import SWEEP_INTERVAL, SlowClients, Watched

TIMEOUT = 2  # the proxy's client_header_timeout, seconds
ATTACKERS = 200
MESSAGES = [{"role": "user", "content": "Hello!"}]
HEADER_DRIBBLE = b"X-Slow: 1\r\n"  # never the blank line that ends the headers


@pytest.fixture(scope="module")
def guarded_proxy(tmp_path_factory: pytest.TempPathFactory, mongo_uri: str,
                  upstream: FakeUpstream) -> Iterator[Proxy]:
    tmp: Path = tmp_path_factory.mktemp("slow-clients")
    config = write_config(tmp / "config.toml", upstream.url, f"http://127.0.0.1:{free_port()}")
    proxy = start_proxy(tmp, mongo_uri, config, "--set", f"client_header_timeout={TIMEOUT}")
    yield proxy
    stop_proxy(proxy)


def port_of(proxy: Proxy) -> int:
    return int(proxy.url.rpartition(":")[2])


class ClosedWatch:
    """When each socket was closed by the proxy (EOF or reset), seconds after ``started``."""

    def __init__(self, sockets: list[socket.socket], started: float) -> None:
        self.started = started
        self.closed: dict[socket.socket, float] = {}
        self.selector = selectors.DefaultSelector()
        for sock in sockets:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)

    def open(self) -> list[socket.socket]:
        return [key.fileobj for key in self.selector.get_map().values()]  # type: ignore[misc]

    def wait(self, until: float) -> None:
        """Note closes until ``until`` (monotonic)."""
        while (left := until - time.monotonic()) > 0:
            if not self.selector.get_map():
                time.sleep(left)
                return
            for key, _ in self.selector.select(left):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    self.closed[sock] = time.monotonic() - self.started
                    self.selector.unregister(sock)


def dribble(sockets: list[socket.socket], step: int) -> None:
    byte = HEADER_DRIBBLE[step % len(HEADER_DRIBBLE):][:1]
    for sock in sockets:
        with contextlib.suppress(OSError):  # closed: the watch sees it
            sock.send(byte)


def chat(proxy: Proxy, key: ApiKey, **headers: str) -> str:
    completion = openai_client(proxy, key.token).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers)
    return completion.choices[0].message.content or ""


def test_slowloris_connections_are_closed_while_normal_clients_are_served(
        guarded_proxy: Proxy, upstream: FakeUpstream, key: ApiKey, test_id: str):
    with ThreadPoolExecutor(1) as pool:
        # A request whose answer takes longer than the timeout: its connection is busy, not slow.
        held = pool.submit(chat, guarded_proxy, key, **{"X-Test-Id": test_id,
                                                        "X-Fake-Scenario": "held"})
        deadline = time.monotonic() + 10
        while upstream.calls[test_id] == 0:
            assert time.monotonic() < deadline and not held.done()
            time.sleep(0.01)

        started = time.monotonic()
        attackers = [socket.create_connection(("127.0.0.1", port_of(guarded_proxy)))
                     for _ in range(ATTACKERS)]
        for sock in attackers:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        watch = ClosedWatch(attackers, started)
        served_in = None
        try:
            for step in range(TIMEOUT + 4):  # one header byte a second
                watch.wait(started + step + 1)
                dribble(watch.open(), step)
                if served_in is None:  # the attack is on: every attacker holds its socket
                    assert not watch.closed
                    before = time.monotonic()
                    assert chat(guarded_proxy, key)
                    served_in = time.monotonic() - before
                if not watch.open():
                    break
        finally:
            for sock in attackers:
                sock.close()
            upstream.release(test_id)
        assert held.result(timeout=10)  # busy for longer than the timeout, never cut

    # served at 1 s into the attack, before the attackers' time is up: every one held a socket
    assert served_in is not None and served_in < 1.0, served_in
    assert len(watch.closed) == ATTACKERS, f"{ATTACKERS - len(watch.closed)} still open"
    closed_after = sorted(watch.closed.values())
    assert closed_after[0] >= TIMEOUT - 0.05, closed_after[0]  # never before the timeout
    assert closed_after[-1] <= TIMEOUT + SWEEP_INTERVAL + 2.0, closed_after[-1]
    assert "without complete request headers within 2 s" in guarded_proxy.log


def ask(conn: http.client.HTTPConnection, key: ApiKey) -> None:
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}),
                 headers={"Authorization": f"Bearer {key.token}",
                          "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    assert json.loads(response.read())["choices"]


def test_keep_alive_between_requests_is_timed_like_the_first_request(
        guarded_proxy: Proxy, key: ApiKey):
    conns = {name: http.client.HTTPConnection("127.0.0.1", port_of(guarded_proxy), timeout=10)
             for name in ("steady", "idle", "dribbling")}
    ask(conns["steady"], key)
    started = time.monotonic()  # before the proxy answers the other two: their clocks start
    ask(conns["idle"], key)  # each now waits for its next request on a kept-alive connection
    ask(conns["dribbling"], key)
    steady_socket = conns["steady"].sock
    conns["dribbling"].sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
    watch = ClosedWatch([conns["idle"].sock, conns["dribbling"].sock], started)
    step = 0
    while watch.open() and time.monotonic() < started + TIMEOUT + SWEEP_INTERVAL + 2.0:
        watch.wait(started + (step + 1) / 2)
        dribble(watch.open(), step)
        ask(conns["steady"], key)  # its next request comes quickly: never cut
        assert conns["steady"].sock is steady_socket  # http.client reconnects silently
        served_until = time.monotonic() - started
        step += 1
    for conn in conns.values():
        conn.close()

    assert len(watch.closed) == 2, "a kept-alive connection was never closed"
    assert served_until > max(watch.closed.values())  # one connection, past the others' cut
    assert all(TIMEOUT - 0.05 <= after <= TIMEOUT + SWEEP_INTERVAL + 2.0
               for after in watch.closed.values()), watch.closed


def test_timeout_must_not_be_negative_and_zero_turns_it_off():
    slow = SlowClients()
    with taddons.context(slow) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(slow, client_header_timeout=-1)
        tctx.configure(slow, client_header_timeout=0)
        client = tflow.tclient_conn()
        slow.watched[client.id] = Watched(client, time.monotonic() - 3600)
        slow.sweep()
        assert client.id in slow.watched
