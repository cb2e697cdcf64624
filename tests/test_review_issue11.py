"""Adversarial review of the portal (issue 11): each test is an attack that worked on the
code before its fix. Unit level (the Starlette app through httpx's ASGI transport, the
WebApp addon on a test flow); the database is an in-memory stand-in for the one
collection login reads."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from llm_billing.settings import Settings
from llm_billing.web import serve
from llm_billing.web.portal import Portal, accounts, auth
from llm_billing.web.portal.session import SESSION_SECRET_FILE, session_secret

ADMIN = "boss@example.com"
PASSWORD = "the right password"


class Accounts:
    """billing.portal_accounts, as far as login reads it."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = {d["_id"]: d for d in docs}

    async def find_one(self, query: dict[str, Any]) -> dict[str, Any] | None:
        doc = self.docs.get(query.get("_id"))
        return dict(doc) if doc else None


class NoRevokedSessions:
    """billing.portal_revoked_sessions with nobody logged out."""

    async def find_one(self, *args: Any) -> None:
        return None


class Billing:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.portal_accounts = Accounts(docs)
        self.portal_revoked_sessions = NoRevokedSessions()

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


class Client:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.billing = Billing(docs)


class Database:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self._client = Client(docs)

    async def client(self) -> Client:
        return self._client


@pytest.fixture
def portal(monkeypatch):
    """The portal's app with one admin account; hashes are plain text (fast)."""
    async def verify(password_hash: str | None, password: str) -> bool:
        return password_hash == f"plain:{password}"
    monkeypatch.setattr(accounts, "verify_password", verify)
    portal = Portal(Database([{"_id": ADMIN, "role": "admin", "user_id": None,
                               "password_hash": f"plain:{PASSWORD}",
                               "session_generation": 0}]), Settings())  # type: ignore[arg-type]
    app = Starlette(routes=portal.routes())
    assert portal._sessions is not None
    portal._sessions.secret = "s" * 40
    with taddons.context(portal):
        yield portal, app


def browser(app: Starlette, address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, client=(address, 40000)),
                             base_url="http://testserver")


async def log_in(client: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    page = await client.get("/portal/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf
    return await client.post("/portal/login", data={"csrf": csrf.group(1), "email": email,
                                                     "password": password})


def test_concurrent_guesses_cannot_pass_the_login_throttle(portal, monkeypatch):
    """12 wrong passwords sent at once, all held at the hash check: only the throttle's 5
    may get there. Before: each checked the throttle before any had failed, so all 12
    were tried (any burst size: the limit did not hold)."""
    _, app = portal
    gate, reached = asyncio.Event(), 0
    verify = accounts.verify_password

    async def held(password_hash: str | None, password: str) -> bool:
        nonlocal reached
        reached += 1
        await gate.wait()
        return await verify(password_hash, password)
    monkeypatch.setattr(accounts, "verify_password", held)

    async def run() -> list[int]:
        async with browser(app, "198.51.100.7") as client:
            guesses = [asyncio.create_task(log_in(client, ADMIN, f"guess {i}"))
                       for i in range(12)]
            for _ in range(10_000):  # until each guess is refused or held at the check
                if reached + sum(t.done() for t in guesses) == len(guesses):
                    break
                await asyncio.sleep(0.001)
            gate.set()
            return [r.status_code for r in await asyncio.gather(*guesses)]

    statuses = asyncio.run(run())
    assert sorted(statuses) == [401] * 5 + [429] * 7
    assert reached == 5


def test_failures_from_elsewhere_do_not_lock_the_admin_out(portal):
    """Anyone could lock the admin out for 15 minutes with 5 wrong passwords. Now an
    address is limited for that account (and overall); failures from everywhere only
    slow the account's logins down."""
    portal_addon, app = portal
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)
    portal_addon.auth.pause = pause

    async def run() -> tuple[list[int], int, int]:
        statuses = []
        for attacker in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
            async with browser(app, attacker) as client:
                for _ in range(5):
                    statuses.append((await log_in(client, ADMIN, "guess")).status_code)
        async with browser(app, "203.0.113.1") as client:
            locked = (await log_in(client, ADMIN, PASSWORD)).status_code
        async with browser(app, "192.0.2.10") as client:
            admin = await log_in(client, ADMIN, PASSWORD)
            assert (await client.get("/portal/")).headers["location"] == "/portal/users"
        return statuses, locked, admin.status_code

    statuses, locked, admin = asyncio.run(run())
    assert statuses == [401] * 15
    assert locked == 429  # that address, for that account: locked, even with the password
    assert admin == 303  # the admin, from their own address: in (before: 429 for 15 min)
    assert pauses and all(p == auth.ACCOUNT_DELAY for p in pauses)  # 15 > ACCOUNT_SLOWDOWN
    assert len(pauses) == 15 - auth.ACCOUNT_SLOWDOWN + 1  # every attempt past the ceiling


def test_a_success_does_not_reset_the_address_limit(portal):
    """Guards the new scheme (failures counted before the check, a success takes its own
    back): an attacker cannot log into their own account between guesses to clear their
    address's failures."""
    _, app = portal
    throttle = portal[0].auth.by_address

    async def run() -> None:
        async with browser(app, "198.51.100.9") as client:
            for _ in range(3):
                assert (await log_in(client, "victim@example.com", "guess")).status_code == 401
            assert (await log_in(client, ADMIN, PASSWORD)).status_code == 303
    asyncio.run(run())
    assert throttle.count("198.51.100.9") == 3


def test_empty_session_secret_file_is_replaced(tmp_path):
    """A secret file left empty (an instance stopped between creating and writing it; or
    a concurrent start reading it then) signed every session with the empty key: anyone
    could forge an admin session. Before: session_secret returned ''."""
    (tmp_path / SESSION_SECRET_FILE).write_text("")
    secret = session_secret(tmp_path)
    assert len(secret) >= 32
    assert session_secret(tmp_path) == secret  # kept
    assert [p.name for p in tmp_path.iterdir()] == [SESSION_SECRET_FILE]
    fresh = tmp_path / "fresh"
    assert session_secret(fresh) == session_secret(fresh) != secret


def flow_to(path: str, body: bytes, cookie: str = "") -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method, flow.request.path = "POST", path
    flow.request.headers["content-type"] = "application/x-www-form-urlencoded"
    if cookie:
        flow.request.headers["cookie"] = cookie
    flow.request.content = body
    return flow


def recording_app() -> tuple[Starlette, list[bytes]]:
    bodies: list[bytes] = []

    async def page(request: Request) -> PlainTextResponse:
        bodies.append(await request.body())
        return PlainTextResponse("ok")
    return Starlette(routes=[Route("/portal/login", page, methods=["POST"])]), bodies


def test_huge_form_body_is_refused_before_parsing():
    """Starlette parses a form on the event loop: 120 MB of '&' posted to /portal/login
    (no login, no CSRF token needed: the form is parsed first) held the loop for 43 s,
    stalling every stream. Now bodies over MAX_BODY get 413 and never reach the app."""
    app, bodies = recording_app()
    web = serve.WebApp(app)
    flow = flow_to("/portal/login", b"&" * 1_000_000)  # 1 MB: 0.4 s of the loop
    with taddons.context(web):
        asyncio.run(web.request(flow))
    assert flow.response is not None and flow.response.status_code == 413
    assert bodies == []


def test_passwords_and_session_cookie_are_not_kept_in_the_flow():
    """mitmweb shows, and flow files keep, each flow's request: a login's or sign-up's
    form held the password in clear and the Cookie header the session. Dropped once the
    app has answered."""
    app, bodies = recording_app()
    web = serve.WebApp(app)
    form = b"csrf=x&email=a%40b.c&password=hunter2hunter2"
    flow = flow_to("/portal/login", form, cookie="portal_session=signed-session")
    with taddons.context(web):
        asyncio.run(web.request(flow))
    assert bodies == [form] and flow.response is not None and flow.response.text == "ok"
    assert b"hunter2" not in (flow.request.raw_content or b"")
    assert "cookie" not in flow.request.headers
