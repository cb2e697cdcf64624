"""Quota alerts through a real mitmdump: signed POSTs at 80 % and 100 % of the monthly
quota, once each, retried when the receiver fails, never resent by a restart."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from conftest import (
    ONE_BACKEND,
    Proxy,
    free_port,
    openai_client,
    set_plan,
    start_proxy,
    stop_proxy,
    wait_for_usage,
    write_config,
)
from fake_upstream import FakeUpstream
from llm_billing.core.config import parse_config
from llm_billing.quota_alerts import QuotaAlerts
from llm_billing.settings import Settings

SECRET = "alert-secret-" + "s" * 20


class Receiver:
    """A local alert endpoint that verifies every signature; it may fail the first POSTs."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[tuple[int, dict]] = []  # (status answered, body)
        self.fail_left = fail_first
        self.watched: str | None = None  # the user whose first POSTs fail
        self.lock = threading.Lock()
        self.held: threading.Event | None = None  # set: answers wait until it is released
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["content-length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
                body = json.loads(raw)
                signed = hmac.compare_digest(self.headers["x-signature"], expected) and \
                    self.headers["x-signature-timestamp"] == str(body["sent_at"])
                with receiver.lock:
                    # other tests' users cross thresholds in the shared database too
                    failing = receiver.fail_left and body["user_id"] == receiver.watched
                    status = 401 if not signed else 500 if failing else 204
                    receiver.fail_left -= status == 500
                    receiver.posts.append((status, body))
                if receiver.held is not None:
                    receiver.held.wait(30)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self, user_id: str) -> list[int]:
        with self.lock:
            return [b["threshold"] for s, b in self.posts if s == 204 and b["user_id"] == user_id]

    def wait_for(self, user_id: str, count: int, timeout: float = 20.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(self.accepted(user_id)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.accepted(user_id)


@pytest.fixture
def receiver():
    fake = Receiver(fail_first=1)
    yield fake
    fake.server.shutdown()


def alerting_proxy(tmp: Path, mongo_uri: str, upstream: FakeUpstream, url: str) -> Proxy:
    config = write_config(tmp / "config.toml", upstream.url,
                          f"http://127.0.0.1:{free_port()}", f'[alerts]\nurl = "{url}"\n')
    return start_proxy(tmp, mongo_uri, config, "--set", "alert_interval_ms=100",
                       env={"LLM_BILLING_ALERT_SECRET": SECRET})


def month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def test_80_then_100_percent_alerts_once_each(tmp_path, mongo_uri: str, upstream: FakeUpstream,
                                              make_key, db, receiver: Receiver):
    key, later = make_key(), make_key()
    receiver.watched = key.user_id
    set_plan(db, key.user_id, "quota-test", tokens_used=3990)  # 5,000 a month: 79.8 %
    proxy = alerting_proxy(tmp_path, mongo_uri, upstream, receiver.url)
    try:
        reply = openai_client(proxy, key.token).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=20)
        wait_for_usage(db, key.user_id, 3990 + reply.usage.total_tokens)  # now past 80 %
        assert receiver.wait_for(key.user_id, 1) == [80]
        # the first POST was answered 500 and retried (backoff: 2 s)
        mine = [(s, b) for s, b in receiver.posts if b["user_id"] == key.user_id]
        assert [(s, b["threshold"]) for s, b in mine] == [(500, 80), (204, 80)]
        first = mine[-1][1]
        assert first["id"] == f"{key.user_id}:{month()}:5000:80" and first["monthly_tokens"] == 5000
        assert first["plan"] == "quota-test" and first["tokens"] >= 4000
        db.billing.usage.update_one({"_id": f"{key.user_id}:{month()}"},
                                    {"$set": {"tokens": 5000}})  # the rest of the month used
        assert receiver.wait_for(key.user_id, 2) == [80, 100]
    finally:
        stop_proxy(proxy)
    proxy = alerting_proxy(tmp_path, mongo_uri, upstream, receiver.url)  # a restart
    try:
        set_plan(db, later.user_id, "quota-test", tokens_used=4000)
        assert receiver.wait_for(later.user_id, 1) == [80]  # a round ran after the restart
        time.sleep(0.3)  # and a few more
        assert receiver.accepted(key.user_id) == [80, 100]  # nothing resent
        ours = [b for _, b in receiver.posts if b["user_id"] in (key.user_id, later.user_id)]
        assert len(ours) == 4  # 80 failed once, 80, 100, and the later user's 80
        outbox = db.billing.alert_outbox.find_one({"_id": f"{key.user_id}:{month()}:5000:100"})
        assert outbox["status"] == "sent" and outbox["attempts"] == 0
    finally:
        stop_proxy(proxy)


def test_an_alert_in_flight_at_shutdown_is_marked_sent_and_never_resent(
        tmp_path, mongo_uri: str, upstream: FakeUpstream, make_key, db):
    """SIGTERM while the receiver has the POST but has not answered yet: the proxy waits
    for the answer and records it, so the restarted proxy does not send the alert again."""
    receiver = Receiver()
    receiver.held = threading.Event()
    key = make_key()
    proxy = alerting_proxy(tmp_path, mongo_uri, upstream, receiver.url)
    try:
        set_plan(db, key.user_id, "quota-test", tokens_used=4000)  # 80 %
        deadline = time.monotonic() + 20
        while not any(b["user_id"] == key.user_id for _, b in receiver.posts):
            assert time.monotonic() < deadline, "no alert POST"
            time.sleep(0.05)
        proxy.process.terminate()
        time.sleep(1.0)  # the proxy is shutting down with the answer still pending
        receiver.held.set()
        assert proxy.process.wait(20) == 0
        outbox = db.billing.alert_outbox.find_one({"_id": f"{key.user_id}:{month()}:5000:80"})
        assert outbox["status"] == "sent"
        receiver.held = None
        proxy = alerting_proxy(tmp_path, mongo_uri, upstream, receiver.url)
        later = make_key()
        set_plan(db, later.user_id, "quota-test", tokens_used=4000)
        assert receiver.wait_for(later.user_id, 1) == [80]  # rounds ran after the restart
        assert receiver.accepted(key.user_id) == [80]
    finally:
        stop_proxy(proxy)
        receiver.server.shutdown()


class OneClient:
    def __init__(self, uri: str) -> None:
        self._client = AsyncMongoClient(uri, tz_aware=True)

    async def client(self) -> AsyncMongoClient:
        return self._client


def test_an_upgrade_mid_month_alerts_again_at_the_new_quotas_thresholds(mongo_uri: str, db,
                                                                         make_key):
    """Free (10,000) crossed at 80 %, then Pro (1,000,000): 80 % of Pro is its own alert;
    a new scanner (a restart) and a move back to Free outbox nothing twice, and an item of
    the id format before the quota was in it counts as outboxed."""
    settings = Settings()
    settings.config = parse_config(ONE_BACKEND + '[alerts]\nurl = "http://127.0.0.1:9/h"\n',
                                   {"LLM_BILLING_ALERT_SECRET": SECRET})
    user, upgraded = make_key().user_id, make_key().user_id

    def outboxed(user_id: str) -> list[tuple[int, int, str]]:
        return sorted((i["monthly_tokens"], i["threshold"], i["_id"]) for i in
                      db.billing.alert_outbox.find({"user_id": user_id}))

    def fill() -> None:  # a fresh addon each time: what a restarted proxy knows
        asyncio.run(QuotaAlerts(OneClient(mongo_uri), settings).fill_outbox())

    set_plan(db, user, "free", tokens_used=8_500)
    fill()
    assert [t[:2] for t in outboxed(user)] == [(10_000, 80)]
    set_plan(db, user, "pro", tokens_used=8_500)  # 0.85 % of Pro: nothing yet
    fill()
    assert len(outboxed(user)) == 1
    set_plan(db, user, "pro", tokens_used=800_000)
    fill()
    assert [t[:2] for t in outboxed(user)] == [(10_000, 80), (1_000_000, 80)]
    assert [t[2] for t in outboxed(user)] == [f"{user}:{month()}:10000:80",
                                              f"{user}:{month()}:1000000:80"]
    set_plan(db, user, "free", tokens_used=800_000)  # back to Free: only its 100 % is new
    fill()
    fill()
    assert [t[:2] for t in outboxed(user)] == [(10_000, 80), (10_000, 100), (1_000_000, 80)]

    # an item a proxy before this id format outboxed is not outboxed again
    db.billing.alert_outbox.insert_one({
        "_id": f"{upgraded}:{month()}:80", "user_id": upgraded, "month": month(),
        "threshold": 80, "monthly_tokens": 10_000, "status": "sent"})
    set_plan(db, upgraded, "free", tokens_used=8_500)
    fill()
    assert [t[:2] for t in outboxed(upgraded)] == [(10_000, 80)]
    set_plan(db, upgraded, "pro", tokens_used=800_000)  # another quota: a new alert
    fill()
    assert [t[:2] for t in outboxed(upgraded)] == [(10_000, 80), (1_000_000, 80)]
