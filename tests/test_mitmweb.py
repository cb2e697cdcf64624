"""The same addons under mitmweb: flows are inspectable, secrets are not."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import websockets

from conftest import (
    UPSTREAM_KEYS,
    ApiKey,
    free_port,
    start_proxy,
    stop_proxy,
    wait_for_events,
    write_config,
)
from fake_upstream import FakeUpstream

PASSWORD = "test-web-password"


@pytest.fixture
def mitmweb(tmp_path, mongo_uri: str, upstream: FakeUpstream):
    web_port = free_port()
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    proxy = start_proxy(tmp_path, mongo_uri, config, "--set", f"web_port={web_port}",
                        "--set", f"web_password={PASSWORD}", "--set", "web_open_browser=false",
                        tool="mitmweb")
    yield proxy, f"127.0.0.1:{web_port}"
    stop_proxy(proxy)


def test_mitmweb_never_shows_client_or_upstream_keys(mitmweb, key: ApiKey, db,
                                                     upstream: FakeUpstream, test_id: str):
    proxy, web = mitmweb
    pushed: list[str] = []

    async def run() -> None:
        async with websockets.connect(f"ws://{web}/updates?token={PASSWORD}") as ws:
            client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=key.token)
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                stream=True, extra_headers={"X-Test-Id": test_id})
            async for _ in stream:
                pass
            while True:  # every update the UI got, until the flow is over
                try:
                    pushed.append(str(await asyncio.wait_for(ws.recv(), 2)))
                except TimeoutError:
                    return

    asyncio.run(run())
    wait_for_events(db, key.user_id, 1)
    upstream_key = UPSTREAM_KEYS["FAKE_OPENAI_KEY"]
    assert upstream.exchange(test_id).headers["authorization"] == f"Bearer {upstream_key}"
    flows = httpx.get(f"http://{web}/flows", params={"token": PASSWORD}).text
    dump = httpx.get(f"http://{web}/flows/dump", params={"token": PASSWORD}).content
    assert key.user_id in flows and any(key.user_id in m for m in pushed)
    for shown in [flows, dump.decode("latin-1"), *pushed]:
        assert key.token not in shown
        assert upstream_key not in shown
    ours = [f for f in json.loads(flows) if key.user_id in json.dumps(f)]
    headers = dict(ours[0]["request"]["headers"])
    assert headers["authorization"] == "Bearer <redacted>"
