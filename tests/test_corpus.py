"""The replay corpus through the real mitmdump, then offline through ``mitmdump -nr``:
billed tokens equal the upstream's reported usage in every class, for every case."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from pymongo import MongoClient

from conftest import (
    MITMDUMP,
    ROOT,
    ApiKey,
    Proxy,
    free_port,
    start_proxy,
    stop_proxy,
    wait_for_events,
    write_config,
)
from fake_upstream import FakeUpstream, corpus_names, load_case
from llm_billing.storage.embedded_db import start_embedded_db

CASES = corpus_names()


def send(proxy: Proxy, key: ApiKey, name: str, test_id: str) -> bytes:
    case = load_case(name)
    request = case["request"]
    with httpx.stream("POST", proxy.url + request["path"], json=request["body"], timeout=15,
                      headers={"Authorization": f"Bearer {key.token}", "X-Replay": name,
                               "X-Test-Id": test_id}) as response:
        assert response.status_code == case["response"]["status"]
        return b"".join(response.iter_raw())


def injected(name: str) -> bool:
    body = load_case(name)["request"]["body"]
    return (body.get("stream") is True and "stream_options" not in body
            and load_case(name)["request"]["path"] in ("/v1/chat/completions",
                                                       "/v1/completions"))


@pytest.mark.parametrize("name", CASES)
def test_case_bytes_and_usage(name: str, proxy: Proxy, upstream: FakeUpstream, key: ApiKey,
                              db, test_id: str):
    received = send(proxy, key, name, test_id)
    sent = bytes(upstream.exchange(test_id).sent)
    if injected(name):  # the proxy asked for usage: that chunk, and only it, is hidden
        assert b'"usage":{' in sent and b'"usage":{' not in received
        assert b'"usage":null' not in received
        assert received.count(b"data:") == sent.count(b"data:") - 1
    else:
        assert received == sent  # byte for byte, compressed or not
    [event] = wait_for_events(db, key.user_id, 1)
    expected = load_case(name)["expected"]
    assert event["usage"] == expected
    assert event["prompt_n"] == expected["prompt_tokens"]
    assert event["completion_n"] == expected["completion_tokens"]
    assert event["usage_estimated"] is False and event["complete"] is True


def test_reconciliation_live_and_offline(tmp_path: Path, mongo_uri: str,
                                         upstream: FakeUpstream, make_key):
    """Every case, live with flows saved; then the saved flows replayed offline into an
    empty database. Both must bill exactly the corpus's usage: 100 %, no tolerance."""
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    flows = tmp_path / "corpus.mitm"
    proxy = start_proxy(tmp_path, mongo_uri, config, "-w", str(flows),
                        "--set", "store_streamed_bodies=true")
    keys = {name: make_key() for name in CASES}
    try:
        for name in CASES:
            send(proxy, keys[name], name, f"reconcile-{name}")
        with MongoClient(mongo_uri, tz_aware=True) as db:
            live = {name: wait_for_events(db, keys[name].user_id, 1)[0] for name in CASES}
    finally:
        stop_proxy(proxy)

    offline_dir = tmp_path / "offline"
    uri, db_process = start_embedded_db(offline_dir / "db", free_port())
    try:
        result = subprocess.run(
            [str(MITMDUMP), "-n", "-r", str(flows), "-s",
             str(ROOT / "addons/llm_billing_proxy.py"), "--set", f"mongodb_uri={uri}",
             "--set", f"billing_config={config}", "--set", f"billing_data_dir={offline_dir}"],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        with MongoClient(uri, tz_aware=True) as db:
            offline = {e["_id"]: e for e in db.billing.events_completion.find()}
    finally:
        db_process.terminate()

    report = []
    for name in CASES:
        expected = load_case(name)["expected"]
        replayed = offline.get(live[name]["_id"])  # the same event, by its fixed _id
        assert replayed is not None, f"{name}: not billed offline"
        for source, event in (("live", live[name]), ("offline", replayed)):
            billed = event["usage"]
            assert billed == expected, f"{name} ({source}): {billed} != {expected}"
            assert not event["usage_estimated"], f"{name} ({source}) was estimated"
        assert replayed["user_id"] == live[name]["user_id"]
        assert replayed["api_key_id"] == live[name]["api_key_id"]
        assert replayed["cost"] == live[name]["cost"]
        report.append(f"{name}: {json.dumps(expected)}")
    assert len(offline) == len(CASES)
    print("\n".join(report))
