"""The web face on the proxy's port: answered inside mitmproxy, never forwarded."""

from __future__ import annotations

import time

import httpx

from conftest import Proxy
from fake_upstream import FakeUpstream


def test_health_is_served_by_the_proxy(proxy: Proxy, upstream: FakeUpstream):
    deadline = time.monotonic() + 10
    while (response := httpx.get(f"{proxy.url}/health")).status_code != 200:
        assert time.monotonic() < deadline, response.text  # the first check runs at start
        time.sleep(0.2)
    assert response.json() == {"status": "ok"}
    assert response.headers["content-type"] == "application/json"
