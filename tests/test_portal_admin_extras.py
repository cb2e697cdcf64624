"""The portal's Stripe reconciliation page and keys' "last used", through the real
mitmdump (httpx for the pages, the openai SDK for requests)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from mitmproxy.test import taddons
from pymongo import AsyncMongoClient, monitoring
from test_keyauth import chat_flow, insert_key, settings_with_routes
from test_portal import (
    NEW_ADMIN_PASSWORD,
    browser,
    create_key,
    csrf_of,
    log_in,
    user_session,
    wait_for_admin,
)

from conftest import Proxy, openai_client, start_proxy, stop_proxy, write_config
from fake_upstream import FakeUpstream
from llm_billing import context
from llm_billing.core.reconcile import reconcile
from llm_billing.keyauth import KeyAuth
from llm_billing.web.portal.accounts import DEFAULT_ADMIN_EMAIL, DEFAULT_ADMIN_PASSWORD

MONTH = "2020-03"  # no live usage lands there


@pytest.fixture(scope="module")
def portal(tmp_path_factory, mongo_uri: str, db, upstream: FakeUpstream) -> Iterator[Proxy]:
    """A fresh install, Stripe off: nothing reports the outbox items a test sets up."""
    db.billing.portal_accounts.delete_many({})
    tmp = tmp_path_factory.mktemp("portal-extras")
    config = write_config(tmp / "config.toml", upstream.url, "http://127.0.0.1:9")
    proxy = start_proxy(tmp, mongo_uri, config)
    yield proxy
    stop_proxy(proxy)


@pytest.fixture(scope="module")
def admin(portal: Proxy, db) -> Iterator[httpx.Client]:
    wait_for_admin(portal, db)
    with browser(portal) as client:
        assert log_in(client, DEFAULT_ADMIN_EMAIL, DEFAULT_ADMIN_PASSWORD).status_code == 303
        token = csrf_of(client.get("/portal/password").text)
        response = client.post("/portal/password", data={
            "csrf": token, "current": DEFAULT_ADMIN_PASSWORD, "new": NEW_ADMIN_PASSWORD,
            "confirm": NEW_ADMIN_PASSWORD})
        assert response.status_code == 303, response.text
        yield client


def overage(db, user: str, recorded: int, outboxed: int, *items: dict) -> None:
    db.billing.usage.insert_one({"_id": f"{user}:{MONTH}", "user_id": user, "month": MONTH,
                                 "tokens": 10_000 + recorded, "overage_tokens": recorded,
                                 "outboxed_tokens": outboxed})
    later = datetime.now(UTC) + timedelta(days=1)
    for n, item in enumerate(items):
        db.billing.stripe_outbox.insert_one({
            "_id": f"overage:{user}:{MONTH}:{n}", "user_id": user, "month": MONTH,
            "attempts": 0, "next_attempt": later, **item})


def test_reconciliation_page_and_csv(portal: Proxy, admin: httpx.Client, db, test_id: str):
    ok, pending, failing = (f"{name}-{test_id[:8]}" for name in ("ok", "pending", "failing"))
    overage(db, ok, 500, 500, {"value": 300, "status": "sent"},
            {"value": 200, "status": "sent"})
    overage(db, pending, 800, 800, {"value": 300, "status": "sent"},
            {"value": 500, "status": "pending"})
    overage(db, failing, 400, 400, {"value": 400, "status": "retry", "attempts": 3,
                                    "error": "No such customer: 'cus_gone'"})
    assert 'href="/portal/reconcile"' in admin.get("/portal/users").text  # the navigation
    page = admin.get(f"/portal/reconcile?month={MONTH}")
    assert page.status_code == 200
    cells = {user: re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
             for row in re.findall(r"<tr>(.*?)</tr>", page.text, re.S)
             for user in (ok, pending, failing) if f">{user}</a>" in row}
    assert [c.strip() for c in cells[ok][2:7]] == ["500", "500", "500", "0", "ok"]
    assert [c.strip() for c in cells[pending][2:7]] == ["800", "800", "300", "500", "pending"]
    assert [c.strip() for c in cells[failing][2:8]] == [
        "400", "400", "0", "400", "failing", "No such customer: &#39;cus_gone&#39;"]
    exported = admin.get(f"/portal/reconcile?month={MONTH}&format=csv")
    assert exported.headers["content-type"].startswith("text/csv")
    rows = {r["user"]: r for r in csv.DictReader(io.StringIO(exported.text))}
    assert [rows[u]["state"] for u in (ok, pending, failing)] == ["ok", "pending", "failing"]
    assert (rows[pending]["overage_recorded"], rows[pending]["in_outbox"],
            rows[pending]["reported_to_stripe"], rows[pending]["not_yet_reported"]) == \
        ("800", "800", "300", "500")
    assert ok not in admin.get("/portal/reconcile?month=2020-04").text


def test_reconciliation_is_for_admins_only(portal: Proxy):
    with browser(portal) as anonymous:
        assert anonymous.get("/portal/reconcile").headers["location"] == "/portal/login"


def test_more_reported_than_recorded_is_failing():
    usage = [{"_id": "u:2020-03", "user_id": "u", "month": "2020-03", "overage_tokens": 5,
              "outboxed_tokens": 5}]
    items = [{"user_id": "u", "month": "2020-03", "value": 9, "status": "sent"},
             {"user_id": "u", "month": "2020-02", "value": 5, "status": "sent"}]
    [row] = reconcile(usage, items)
    assert (row.reported, row.not_reported, row.state, row.detail) == \
        (9, -4, "failing", "over-reported")


def test_key_last_used_shows_after_a_request(portal: Proxy, admin: httpx.Client, db,
                                             test_id: str):
    user = f"lastused-{test_id[:8]}"
    with contextlib.closing(user_session(portal, admin, user)) as as_user:
        token = create_key(as_user, name="laptop")
        stored = db.cgc.api_keys.find_one({"user_id": user})
        assert "never" in as_user.get("/portal/keys").text
        before = datetime.now(UTC).replace(microsecond=0)
        openai_client(portal, token).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        deadline = time.monotonic() + 10  # written within the flush interval (2 s)
        while "date_last_used" not in (doc := db.cgc.api_keys.find_one({"_id": stored["_id"]})):
            assert time.monotonic() < deadline, portal.log
            time.sleep(0.1)
        used = doc.pop("date_last_used")
        assert before <= used <= datetime.now(UTC)
        assert doc == stored  # seed 002's fields untouched
        shown = f'<td class="last-used">{used.strftime("%Y-%m-%d %H:%M:%S")}</td>'
        assert shown in as_user.get("/portal/keys").text
        assert shown in admin.get(f"/portal/keys?user={user}").text


class ApiKeyWrites(monitoring.CommandListener):
    def __init__(self) -> None:
        self.commands: list[dict] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("update", "findAndModify", "insert", "delete") and \
                event.command.get(event.command_name) == "api_keys":
            self.commands.append(event.command)

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


class ListenedDatabase:
    def __init__(self, uri: str) -> None:
        self.writes = ApiKeyWrites()
        self._client = AsyncMongoClient(uri, tz_aware=True, event_listeners=[self.writes])

    async def client(self) -> AsyncMongoClient:
        return self._client


def test_request_path_does_not_write_last_used(mongo_uri: str, db):
    """KeyAuth notes the use in memory; only the background flush writes, with $max."""
    token = insert_key(db)
    key_id = db.cgc.api_keys.find_one({"user_id": f"u-{token[:8]}"})["_id"]
    database = ListenedDatabase(mongo_uri)
    auth = KeyAuth(database, settings_with_routes())  # type: ignore[arg-type]

    async def go():
        with taddons.context(auth):
            for _ in range(3):
                flow = chat_flow(token, "10.0.0.1")
                await auth.requestheaders(flow)
                assert context.of(flow) is not None
            assert database.writes.commands == []  # nothing written on the request path
            await auth.last_used.flush()
            [command] = database.writes.commands
            [update] = command["updates"]
            assert update["q"] == {"_id": key_id}
            assert list(update["u"]) == ["$max"]
            await auth.last_used.flush()  # nothing new: no write
            assert len(database.writes.commands) == 1
            return update["u"]["$max"]["date_last_used"]

    noted = asyncio.run(go())
    stored = db.cgc.api_keys.find_one({"_id": key_id})["date_last_used"]
    assert abs(stored - noted.replace(tzinfo=UTC)) < timedelta(milliseconds=1)
