"""Prices through a real mitmdump: Anthropic's one-hour cache writes are billed at their own
price (official anthropic SDK), and routed models without a price are warned about at load
and on SIGHUP reload."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest

from conftest import (
    ApiKey,
    Proxy,
    anthropic_client,
    free_port,
    start_proxy,
    stop_proxy,
    wait_for_events,
    write_config,
)
from fake_upstream import FakeUpstream

MODEL = "claude-opus-4-7"
OPUS = {"input": "5", "cache_read": "0.50", "cache_write": "6.25", "cache_write_1h": "10",
        "output": "25"}
OPUS_PRICE = f'\n[prices.models."{MODEL}"]\n' + "".join(
    f'{name} = "{value}"\n' for name, value in OPUS.items())
ONE_HOUR_CACHE = [{"role": "user", "content": [
    {"type": "text", "text": "Hello from a long, cached prompt",
     "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]


@pytest.fixture(scope="module")
def priced_proxy(tmp_path_factory: pytest.TempPathFactory, mongo_uri: str,
                 upstream: FakeUpstream) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("prices")
    config = write_config(tmp / "config.toml", upstream.url,
                          f"http://127.0.0.1:{free_port()}", extra=OPUS_PRICE)
    proxy = start_proxy(tmp, mongo_uri, config)
    yield proxy
    stop_proxy(proxy)


@pytest.mark.parametrize("stream", [True, False])
def test_one_hour_cache_writes_billed_at_their_price(priced_proxy: Proxy, upstream: FakeUpstream,
                                                    key: ApiKey, db, test_id: str, stream: bool):
    client = anthropic_client(priced_proxy, key.token)
    kwargs = {"model": MODEL, "max_tokens": 9, "messages": ONE_HOUR_CACHE,
              "extra_headers": {"X-Test-Id": test_id}}
    if stream:
        with client.messages.stream(**kwargs) as events:
            reported = events.get_final_message().usage
    else:
        reported = client.messages.create(**kwargs).usage
    usage = upstream.exchange(test_id).usage
    split = usage["cache_creation"]
    assert reported.cache_creation.ephemeral_1h_input_tokens == split[
        "ephemeral_1h_input_tokens"] == 768
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["usage"]["cache_write_tokens"] == usage["cache_creation_input_tokens"] == 1024
    assert event["usage"]["cache_write_1h_tokens"] == 768
    price = {name: Decimal(value) for name, value in OPUS.items()}
    expected = (usage["input_tokens"] * price["input"]
                + usage["cache_read_input_tokens"] * price["cache_read"]
                + split["ephemeral_5m_input_tokens"] * price["cache_write"]
                + split["ephemeral_1h_input_tokens"] * price["cache_write_1h"]
                + usage["output_tokens"] * price["output"]) / 1_000_000
    assert event["cost"].to_decimal() == expected
    assert event["price"]["cache_write_1h"] == "10"


def wait_for_log(proxy: Proxy, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log:
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{proxy.log}"
        time.sleep(0.05)


def test_unpriced_models_warned_at_load_and_reload(priced_proxy: Proxy):
    warning = "model {!r} of backend {!r} has no entry in [prices.models]; it is billed at " \
        "the default price (input 1.00, output 2.00 per million)"
    wait_for_log(priced_proxy, warning.format("down-model", "down"))
    assert warning.format("claude-*", "fake-anthropic") not in priced_proxy.log
    config = priced_proxy.config_path.read_text()
    priced_proxy.config_path.write_text(config.replace('"o3-mini",', '"o3-mini", "new-model",'))
    priced_proxy.process.send_signal(signal.SIGHUP)
    wait_for_log(priced_proxy, warning.format("new-model", "fake-openai"))
    assert priced_proxy.log.count(warning.format("down-model", "down")) == 2  # once per load
