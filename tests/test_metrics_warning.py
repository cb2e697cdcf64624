"""Without ``metrics_token`` the proxy says once, at startup, that /metrics is open."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from mitmproxy.test import taddons

from conftest import Proxy
from llm_billing.web.metrics import Metrics

WARNING = "/metrics is open: anyone who can reach the proxy's port can read it"


def metrics() -> Metrics:
    event_log = SimpleNamespace(backlog=lambda: 0, journal=None)
    key_auth = SimpleNamespace(cache_counts=lambda: (0, 0))
    database = SimpleNamespace(monitor=SimpleNamespace(command_failures=0,
                                                       heartbeat_failures=0))
    return Metrics(SimpleNamespace(config=None), database, event_log,  # type: ignore[arg-type]
                   key_auth)  # type: ignore[arg-type]


def test_the_proxy_warns_once_at_startup_that_metrics_are_open(proxy: Proxy):
    assert proxy.log.count(WARNING) == 1
    assert "--set metrics_token=<token>" in proxy.log


def test_no_warning_with_a_token_and_only_one_without(caplog):
    caplog.set_level(logging.WARNING)
    addon = metrics()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, metrics_token="metrics-" + "t" * 24)
        assert WARNING not in caplog.text
        tctx.configure(addon, metrics_token="")
        tctx.configure(addon, metrics_token="other")
        tctx.configure(addon, metrics_token="")
    assert caplog.text.count(WARNING) == 1
