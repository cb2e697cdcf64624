"""Unknown-key lookups are limited per client address, through a real mitmdump; valid keys
from other addresses keep working."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ApiKey, Proxy, free_port, start_proxy, stop_proxy, write_config
from fake_upstream import FakeUpstream

MESSAGES = [{"role": "user", "content": "Hello!"}]


@pytest.fixture
def limited_proxy(tmp_path: Path, mongo_uri: str, upstream: FakeUpstream) -> Iterator[Proxy]:
    config = write_config(tmp_path / "config.toml", upstream.url,
                          f"http://127.0.0.1:{free_port()}")
    proxy = start_proxy(tmp_path, mongo_uri, config,
                        "--set", "unknown_key_lookups_per_minute=3")
    yield proxy
    stop_proxy(proxy)


def client_from(proxy: Proxy, address: str, token: str) -> openai.OpenAI:
    """An SDK client whose connections come from ``address`` (any of 127.0.0.0/8)."""
    transport = httpx.HTTPTransport(local_address=address)
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=token, max_retries=0,
                         http_client=httpx.Client(transport=transport))


def chat(client: openai.OpenAI) -> object:
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                          max_tokens=5)


def test_unknown_key_spray_is_refused_without_hurting_valid_keys(limited_proxy: Proxy,
                                                                make_key):
    valid: ApiKey = make_key()
    other: ApiKey = make_key()
    chat(client_from(limited_proxy, "127.0.0.2", valid.token))  # cached before the spray
    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            chat(client_from(limited_proxy, "127.0.0.2", secrets.token_urlsafe(16)))
    with pytest.raises(openai.RateLimitError) as err:
        chat(client_from(limited_proxy, "127.0.0.2", secrets.token_urlsafe(16)))
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert "unknown API keys" in err.value.message
    chat(client_from(limited_proxy, "127.0.0.2", valid.token))  # cached: still served
    chat(client_from(limited_proxy, "127.0.0.1", other.token))  # other addresses: unaffected
    with pytest.raises(openai.AuthenticationError):
        chat(client_from(limited_proxy, "127.0.0.3", secrets.token_urlsafe(16)))
