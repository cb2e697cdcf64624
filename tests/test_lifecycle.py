"""Process-level behaviour: SIGHUP reload, cut-off streams, sample keys, saved flows."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from pymongo import MongoClient

from conftest import (
    MITMDUMP,
    ROOT,
    UPSTREAM_KEYS,
    ApiKey,
    Proxy,
    free_port,
    insert_key,
    openai_client,
    set_plan,
    start_proxy,
    stop_proxy,
    usage_doc,
    wait_for_events,
    wait_for_usage,
    write_config,
)
from fake_upstream import FakeUpstream
from llm_billing.storage.embedded_db import start_embedded_db
from llm_billing.storage.journal import Journal

MESSAGES = [{"role": "user", "content": "Hello!"}]


@pytest.fixture
def own_proxy(tmp_path, mongo_uri: str, upstream: FakeUpstream):
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    proxy = start_proxy(tmp_path, mongo_uri, config)
    yield proxy
    stop_proxy(proxy)


def chat(proxy: Proxy, token: str, model: str, **kwargs):
    return openai_client(proxy, token).chat.completions.create(model=model, messages=MESSAGES,
                                                                **kwargs)


def test_sighup_reloads_backends_and_keeps_config_on_error(own_proxy: Proxy, key: ApiKey):
    with pytest.raises(openai.NotFoundError):
        chat(own_proxy, key.token, "hot-model")
    original = own_proxy.config_path.read_text()
    own_proxy.config_path.write_text(original.replace('"o3-mini",', '"o3-mini", "hot-model",'))
    own_proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        try:
            chat(own_proxy, key.token, "hot-model")
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline, "reload did not take effect"
            time.sleep(0.1)
    own_proxy.config_path.write_text("[[backends]\nbroken")
    own_proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "Config reload failed" not in own_proxy.log:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    chat(own_proxy, key.token, "hot-model")  # the previous config still serves


def test_upstream_cut_mid_stream_bills_an_estimate(proxy: Proxy, key: ApiKey, db):
    with pytest.raises(openai.APIError):
        list(chat(proxy, key.token, "gpt-4o-mini", stream=True,
                  extra_headers={"X-Fake-Scenario": "cut"}))
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["usage_estimated"] is True and event["complete"] is False
    assert event["prompt_n"] > 0 and event["completion_n"] > 0


def test_client_disconnect_mid_stream_still_bills(proxy: Proxy, upstream: FakeUpstream,
                                                  key: ApiKey, db, test_id: str):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {key.token}", "X-Test-Id": test_id,
                               "X-Fake-Scenario": "gated"}) as response:
        next(response.iter_raw())  # read the first event, then hang up
    upstream.release(test_id)
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["usage_estimated"] is True and event["complete"] is False
    assert event["model"] == "gpt-4o-mini"


def test_sample_keys_script_matches_sample_js(mongo_uri: str, db, proxy: Proxy):
    env = {**os.environ, "MONGODB_URI": mongo_uri}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/sample_keys.py")], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "token2 -> user2" in out
    sample_js = (ROOT / "sample.js").read_text()
    for token, user in re.findall(r'token: "([^"]+)", user_id: "([^"]+)"', sample_js):
        secret = hashlib.sha256(token.encode()).hexdigest()
        doc = db.cgc.api_keys.find_one({"secret": secret})
        assert doc["user_id"] == user and doc["access_level"] == "COMPLETION"
    # seed 002's curl, with its sample token
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json={
        "messages": MESSAGES, "model": "gpt-4o-mini", "stream": True},
        headers={"Authorization": "Bearer token2"})
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    with pytest.raises(openai.AuthenticationError):
        chat(proxy, "token-expired", "gpt-4o-mini")


def test_saved_flows_replay_offline_without_secrets(tmp_path: Path, mongo_uri: str,
                                                    upstream: FakeUpstream, key: ApiKey, db):
    """Flows saved with -w hold no secrets; with store_streamed_bodies they keep the stream."""
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    flows = tmp_path / "flows.mitm"
    proxy = start_proxy(tmp_path, mongo_uri, config, "-w", str(flows),
                        "--set", "store_streamed_bodies=true")
    try:
        list(chat(proxy, key.token, "gpt-4o-mini", stream=True))
        chat(proxy, key.token, "gemini-2.5-flash")  # upstream key in the query string
        wait_for_events(db, key.user_id, 2)
    finally:
        stop_proxy(proxy)
    saved = flows.read_bytes()
    assert key.token.encode() not in saved
    for upstream_key in UPSTREAM_KEYS.values():
        assert upstream_key.encode() not in saved
    assert b"key=%3Credacted%3E" in saved or b"key=<redacted>" in saved
    assert b"data: [DONE]" in saved
    shown = subprocess.run([str(MITMDUMP), "-n", "-r", str(flows), "--flow-detail", "3"],
                           capture_output=True, text=True, timeout=60).stdout
    assert "<redacted>" in shown and key.token not in shown


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_events_survive_a_database_outage_and_a_crash(tmp_path: Path, upstream: FakeUpstream,
                                                      stop: str):
    """Database down after the key is cached: requests still work; their events wait in the
    journal through a shutdown — or a SIGKILL — and are written at the next start, once."""
    db_dir, port = tmp_path / "db", free_port()
    uri, db_process = start_embedded_db(db_dir, port)
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    args = ("--set", "event_shutdown_timeout=1")
    with MongoClient(uri, tz_aware=True) as db:
        key = insert_key(db)
        proxy = start_proxy(tmp_path, uri, config, *args)
        chat(proxy, key.token, "gpt-4o-mini")  # key now cached
        assert len(wait_for_events(db, key.user_id, 1)) == 1
    journal = tmp_path / "data" / "journal"
    db_process.terminate()
    db_process.wait(10)
    for _ in range(2):
        chat(proxy, key.token, "gpt-4o-mini")  # served from the key cache
    if stop == "sigkill":
        proxy.process.kill()
        proxy.process.wait(10)
    else:
        stop_proxy(proxy)
    journaled = [doc for path in journal.glob("*.jsonl") for _, doc in Journal.read(path)]
    assert sum(doc["user_id"] == key.user_id for doc in journaled) >= 2
    uri, db_process = start_embedded_db(db_dir, port)
    proxy = start_proxy(tmp_path, uri, config, *args)
    try:
        with MongoClient(uri, tz_aware=True) as db:
            events = wait_for_events(db, key.user_id, 3)
            time.sleep(1)  # nothing more may arrive: replays are deduplicated by _id
            assert db.billing.events_completion.count_documents({"user_id": key.user_id}) == 3
        assert len(events) == 3 and len({e["_id"] for e in events}) == 3
        assert not list(journal.glob("*.jsonl"))  # replayed, then deleted
    finally:
        stop_proxy(proxy)
        db_process.terminate()


def test_usage_not_yet_written_survives_a_sigkill(tmp_path: Path, mongo_uri: str,
                                                  upstream: FakeUpstream, db):
    """Settled usage waits in memory for the ledger's next write (here: never, the interval
    is 10 minutes). A SIGKILL then must not lose it: the journal keeps the events' segments
    until their usage is written, and the next start counts it, once, with the overage."""
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    args = ("--set", "usage_flush_interval_ms=600000")
    starter, free = insert_key(db), insert_key(db)
    set_plan(db, starter.user_id, "starter", tokens_used=99_990)  # overage from here
    set_plan(db, free.user_id, "free")
    proxy = start_proxy(tmp_path, mongo_uri, config, *args)
    for key in (starter, free, starter):
        chat(proxy, key.token, "gpt-4o-mini", max_tokens=20)
    billed = {key.user_id: sum(e["tokens_billed"] for e in wait_for_events(db, key.user_id, n))
              for key, n in ((starter, 2), (free, 1))}
    time.sleep(0.5)  # the events are stored; their usage is not
    proxy.process.kill()
    proxy.process.wait(10)
    assert usage_doc(db, starter.user_id)["tokens"] == 99_990
    assert usage_doc(db, free.user_id).get("tokens", 0) == 0
    proxy = start_proxy(tmp_path, mongo_uri, config, *args)
    try:
        doc = wait_for_usage(db, starter.user_id, 99_990 + billed[starter.user_id])
        assert doc["tokens"] == 99_990 + billed[starter.user_id] and doc["requests"] == 2
        assert doc["overage_tokens"] == 99_990 + billed[starter.user_id] - 100_000
        doc = wait_for_usage(db, free.user_id, billed[free.user_id])
        assert doc["tokens"] == billed[free.user_id] and doc["requests"] == 1
        time.sleep(1)  # nothing is counted twice
        assert usage_doc(db, starter.user_id)["tokens"] == 99_990 + billed[starter.user_id]
        assert db.billing.events_completion.count_documents(
            {"user_id": {"$in": [starter.user_id, free.user_id]}}) == 3
    finally:
        stop_proxy(proxy)
