"""Portal pieces without the proxy: the cookie's Secure flag on https, the login throttle,
the admin account at first start."""

from __future__ import annotations

import asyncio
import logging

import pytest
from pymongo import AsyncMongoClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from conftest import free_port
from llm_billing.storage.embedded_db import start_embedded_db
from llm_billing.web.portal import accounts
from llm_billing.web.portal.session import Sessions, csrf_token


def session_app() -> Starlette:
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse(csrf_token(request))
    sessions = Sessions(Starlette(routes=[Route("/login", page)]))
    sessions.secret = "s" * 40
    return Starlette(routes=[Mount("/portal", app=sessions)])


@pytest.mark.parametrize(("base", "secure"), [("http://testserver", False),
                                              ("https://testserver", True)])
def test_cookie_is_secure_on_https(base: str, secure: bool):
    with TestClient(session_app(), base_url=base) as client:
        cookie = client.get("/portal/login").headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    assert ("; secure" in cookie) is secure


def test_login_throttle_per_key():
    throttle = accounts.LoginThrottle(limit=3, window=60)
    for t in range(3):
        assert throttle.wait("10.0.0.1", now=t) == 0
        throttle.failed("10.0.0.1", now=t)
    assert throttle.wait("10.0.0.1", now=3) == 57  # until the first failure leaves the window
    assert throttle.wait("10.0.0.2", now=3) == 0
    assert throttle.wait("10.0.0.1", now=60.5) == 0
    throttle.succeeded("10.0.0.1")
    assert throttle.wait("10.0.0.1", now=3) == 0


def test_throttle_memory_is_bounded():
    throttle = accounts.LoginThrottle(limit=1, window=60, max_keys=10)
    for i in range(100):
        throttle.failed(f"client-{i}", now=0)
    assert len(throttle._failures) == 10 and throttle.wait("client-99", now=1) > 0


@pytest.fixture
def fresh_db(tmp_path):
    uri, process = start_embedded_db(tmp_path, free_port())
    yield uri
    process.terminate()
    process.wait(10)


def test_admin_password_from_the_environment(fresh_db: str, monkeypatch, caplog):
    monkeypatch.setenv(accounts.ADMIN_PASSWORD_ENV, "an operator's own password")

    async def run() -> dict:
        client = AsyncMongoClient(fresh_db, tz_aware=True)
        await accounts.ensure_admin(client)
        await accounts.ensure_admin(client)  # a second start changes nothing
        admin = await accounts.find(client, accounts.DEFAULT_ADMIN_EMAIL)
        assert admin is not None
        assert await accounts.verify_password(admin["password_hash"],
                                              "an operator's own password")
        assert not await accounts.verify_password(admin["password_hash"],
                                                  accounts.DEFAULT_ADMIN_PASSWORD)
        assert await client.billing.portal_accounts.count_documents({}) == 1
        await client.close()
        return admin

    with caplog.at_level(logging.WARNING):
        admin = asyncio.run(run())
    assert admin["must_change_password"] is False
    assert "default password" not in caplog.text


def test_default_admin_is_created_with_a_warning(fresh_db: str, monkeypatch, caplog):
    monkeypatch.delenv(accounts.ADMIN_PASSWORD_ENV, raising=False)

    async def run() -> dict:
        client = AsyncMongoClient(fresh_db, tz_aware=True)
        await accounts.ensure_admin(client)
        admin = await accounts.find(client, accounts.DEFAULT_ADMIN_EMAIL)
        await client.close()
        assert admin is not None
        return admin

    with caplog.at_level(logging.WARNING):
        admin = asyncio.run(run())
    assert admin["must_change_password"] is True and admin["role"] == "admin"
    assert "still has the default password" in caplog.text


def test_password_rules():
    assert accounts.password_problem("short", "a@b.c")
    assert accounts.password_problem(accounts.DEFAULT_ADMIN_PASSWORD, "a@b.c")
    assert accounts.password_problem("a@example.com", "A@example.com")
    assert accounts.password_problem("a long enough one", "a@b.c") is None


def test_chart_axis_and_escaping():
    from llm_billing.web.portal.charts import horizontal_bars, nice_max, stacked_bars
    assert [nice_max(v) for v in (0, 1, 3, 7, 11, 999, 1001)] == [1, 1, 5, 10, 20, 1000, 2000]
    svg = stacked_bars("t", ["2026-01-01", "2026-01-02"], {"a<": [1, 0], "b": [2, 5]})
    assert svg.count("<rect") == 3 + 2  # three bars, two legend squares
    assert "a<" not in svg and "a&lt;" in svg
    assert "no usage" in horizontal_bars("t", [])
