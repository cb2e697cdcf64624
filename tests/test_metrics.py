"""``/metrics`` (Prometheus text, parsed with prometheus_client's own parser) and ``/health``
through the real mitmdump: counters move by exactly what was billed, the bearer token
option, and health following the database down and back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient

from conftest import (
    ApiKey,
    Proxy,
    free_port,
    insert_key,
    openai_client,
    start_proxy,
    stop_proxy,
    wait_for_events,
    write_config,
)
from fake_upstream import FakeUpstream
from llm_billing.storage.embedded_db import start_embedded_db

MESSAGES = [{"role": "user", "content": "Count the tokens of this, please."}]
Samples = dict[tuple[str, frozenset], float]


def scrape(proxy: Proxy, token: str | None = None) -> Samples:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{proxy.url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def health(proxy: Proxy) -> httpx.Response:
    return httpx.get(f"{proxy.url}/health")


def wait_for_health(proxy: Proxy, status: int, *reasons: str,
                    timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = health(proxy)
        problems = " ".join(response.json().get("problems", []))
        if response.status_code == status and all(r in problems for r in reasons):
            return response
        assert time.monotonic() < deadline, (response.status_code, response.text)
        time.sleep(0.2)


def test_counters_move_by_exactly_what_was_billed(proxy: Proxy, make_key: Callable[..., ApiKey],
                                                  db: MongoClient):
    key = make_key()
    model, route = "gpt-4o-mini", "/v1/chat/completions"
    before = scrape(proxy)
    client = openai_client(proxy, key.token)
    client.chat.completions.create(model=model, messages=MESSAGES)
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=7)
    list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True))
    with pytest.raises(openai.AuthenticationError):
        # unique: other tests' unknown keys may still be cached
        openai_client(proxy, f"not-a-key-{uuid.uuid4().hex}").chat.completions.create(
            model=model, messages=MESSAGES)
    assert httpx.post(f"{proxy.url}{route}", json={"model": model}).status_code == 401
    events = wait_for_events(db, key.user_id, 3)  # stored after every consumer settled
    after = scrape(proxy)

    assert len(events) == 3
    for name in ("prompt", "completion", "cache_read", "reasoning"):
        billed = sum(e["usage"][f"{name}_tokens"] for e in events)
        assert delta(before, after, "llm_proxy_tokens_total", **{"class": name},
                     model=model) == billed, name
    assert sum(e["usage"]["prompt_tokens"] for e in events) > 0
    assert delta(before, after, "llm_proxy_billed_tokens_total", model=model) == \
        sum(e["tokens_billed"] for e in events)
    cost = sum(e["cost"].to_decimal() for e in events)
    assert cost > 0
    assert delta(before, after, "llm_proxy_cost_total", model=model,
                 currency=events[0]["currency"]) == pytest.approx(float(cost), rel=1e-9)
    assert delta(before, after, "llm_proxy_requests_total", route=route, model=model,
                 status="200") == 3
    for histogram in ("llm_proxy_upstream_ttfb_seconds", "llm_proxy_upstream_duration_seconds"):
        assert delta(before, after, f"{histogram}_count", backend="fake-openai") == 3
    for direction in ("request", "response"):
        assert delta(before, after, "llm_proxy_added_latency_seconds_count",
                     direction=direction) == 3
    # the new key and 'not-a-key' were looked up in the database, the key's next two cached
    assert delta(before, after, "llm_proxy_key_cache_lookups_total", result="miss") == 2
    assert delta(before, after, "llm_proxy_key_cache_lookups_total", result="hit") == 2
    assert delta(before, after, "llm_proxy_refusals_total", status="401",
                 reason="invalid_api_key") == 1
    assert delta(before, after, "llm_proxy_refusals_total", status="401",
                 reason="missing_api_key") == 1
    for gauge in ("llm_proxy_event_queue_depth", "llm_proxy_journal_files"):
        assert (gauge, frozenset()) in after
    assert ("llm_proxy_database_errors_total", frozenset({("kind", "heartbeat")})) in after


def test_metrics_token_refuses_without_the_bearer(tmp_path: Path, mongo_uri: str,
                                                  upstream: FakeUpstream, key: ApiKey):
    token = "metrics-" + "t" * 24
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    proxy = start_proxy(tmp_path, mongo_uri, config, "--set", f"metrics_token={token}")
    try:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token},
                        {"x-api-key": token}):
            refused = httpx.get(f"{proxy.url}/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "llm_proxy" not in refused.text
        assert ("llm_proxy_journal_files", frozenset()) in scrape(proxy, token)
        # the API's own keys still work, and the page needs nothing else
        openai_client(proxy, key.token).chat.completions.create(model="gpt-4o-mini",
                                                                messages=MESSAGES)
        assert health(proxy).status_code in (200, 503)  # not behind the token
    finally:
        stop_proxy(proxy)
    assert token not in proxy.log


def test_health_follows_the_database_and_the_journal(tmp_path: Path, upstream: FakeUpstream):
    """503 while the database is down (and the journal's files pile up past the threshold),
    200 again once it is back and the journal drained."""
    db_dir, port = tmp_path / "db", free_port()
    uri, db_process = start_embedded_db(db_dir, port)
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    proxy = start_proxy(tmp_path, uri, config, "--set", "health_max_journal_files=2",
                        "--set", "event_journal_segment_events=1",
                        "--set", "event_shutdown_timeout=1")
    try:
        with MongoClient(uri, tz_aware=True) as db:
            key = insert_key(db)
            client = openai_client(proxy, key.token)
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # cached
            assert len(wait_for_events(db, key.user_id, 1)) == 1
        wait_for_health(proxy, 200)
        errors_before = value(scrape(proxy), "llm_proxy_database_errors_total",
                              kind="heartbeat")
        db_process.terminate()
        db_process.wait(10)
        for _ in range(3):  # each: two journal files (its provisional and its real event)
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        down = wait_for_health(proxy, 503, "database unreachable", "journal backlog")
        assert down.json()["status"] == "unavailable"
        assert value(scrape(proxy), "llm_proxy_journal_files") > 2
        assert value(scrape(proxy), "llm_proxy_database_errors_total",
                     kind="heartbeat") > errors_before

        uri, db_process = start_embedded_db(db_dir, port)
        assert wait_for_health(proxy, 200).json() == {"status": "ok"}
        with MongoClient(uri, tz_aware=True) as db:
            assert len(wait_for_events(db, key.user_id, 4)) == 4
    finally:
        stop_proxy(proxy)
        db_process.terminate()
