"""Portal sessions that really end, and a sign-up that tells nobody who has an account.

Through two real mitmdump instances sharing the database (and the session secret): a copy
of a cookie taken before logout is refused by both afterwards. Sign-up answers a known
address exactly as a new one and is limited per client address (each test connects from
its own loopback address, so their limits do not meet). Without the proxy: the revoked
sessions' collection and TTL index, 503 when the database is down, one hash either way."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import pytest
from argon2 import PasswordHasher
from pymongo import AsyncMongoClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.testclient import TestClient

from conftest import Proxy, free_port, start_proxy, stop_proxy, write_config
from fake_upstream import FakeUpstream
from llm_billing.storage.embedded_db import start_embedded_db
from llm_billing.web.portal import accounts, auth, session

SECRET_ENV = {"LLM_BILLING_SESSION_SECRET": "shared by both instances " + "x" * 24}
PASSWORD = "the right password 1"


@pytest.fixture(scope="module")
def instances(tmp_path_factory, mongo_uri: str, upstream: FakeUpstream
              ) -> Iterator[tuple[Proxy, Proxy]]:
    """Two proxies on one database, sign-up open."""
    running = []
    try:
        for name in ("a", "b"):
            tmp = tmp_path_factory.mktemp(f"sessions-{name}")
            config = write_config(tmp / "config.toml", upstream.url, "http://127.0.0.1:9")
            running.append(start_proxy(tmp, mongo_uri, config, "--set", "portal_signup=true",
                                       env=SECRET_ENV))
        yield running[0], running[1]
    finally:
        for proxy in running:
            stop_proxy(proxy)


def browser(proxy: Proxy, source: str = "127.0.0.1", cookie: str | None = None
            ) -> httpx.Client:
    """A client connecting from ``source`` (any 127.x address: its own throttle bucket)."""
    return httpx.Client(base_url=proxy.url, follow_redirects=False, timeout=30,
                        transport=httpx.HTTPTransport(local_address=source),
                        headers={"cookie": f"portal_session={cookie}"} if cookie else None)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


def log_in(client: httpx.Client, email: str, password: str) -> httpx.Response:
    token = csrf_of(client.get("/portal/login").text)
    return client.post("/portal/login", data={"csrf": token, "email": email,
                                              "password": password})


def sign_up(client: httpx.Client, email: str, password: str) -> httpx.Response:
    token = csrf_of(client.get("/portal/signup").text)
    return client.post("/portal/signup", data={"csrf": token, "email": email,
                                               "password": password, "confirm": password})


def make_account(db, email: str, password: str = PASSWORD) -> dict:
    """A user's portal account and billing user, straight into the database."""
    doc = {"_id": email, "role": "user", "user_id": email,
           "password_hash": PasswordHasher().hash(password), "must_change_password": False,
           "session_generation": 0, "date_created": datetime.now(UTC)}
    db.billing.portal_accounts.insert_one(doc)
    db.billing.users.insert_one({"_id": email, "plan": "free", "email": email})
    return doc


def test_a_copy_of_the_cookie_is_refused_after_logout(instances, db, test_id: str):
    a, b = instances
    email = f"leaving-{test_id[:8]}@example.com"
    make_account(db, email)
    with browser(a) as client:
        assert log_in(client, email, PASSWORD).headers["location"] == "/portal/me"
        page = client.get("/portal/keys")
        assert page.status_code == 200
        copied, token = client.cookies["portal_session"], csrf_of(page.text)
        with browser(b, cookie=copied) as elsewhere:  # the other instance accepts it too
            assert elsewhere.get("/portal/keys").status_code == 200
        assert client.post("/portal/logout", data={"csrf": token}).status_code == 303
        assert client.get("/portal/keys").headers["location"] == "/portal/login"
    # the instance that logged out remembers it; the other one finds it in the database
    for proxy in (a, b):
        with browser(proxy, cookie=copied) as replay:
            for path in ("/portal/keys", "/portal/me", "/portal/"):
                response = replay.get(path)
                assert (response.status_code, response.headers.get("location")) == (
                    303, "/portal/login"), (proxy.url, path)
            created = replay.post("/portal/keys", data={"csrf": token, "name": "stolen"})
            assert (created.status_code, created.headers["location"]) == (303, "/portal/login")
            changed = replay.post("/portal/password", data={
                "csrf": token, "current": PASSWORD, "new": "stolen password 1",
                "confirm": "stolen password 1"})
            assert changed.headers["location"] == "/portal/login"
    assert db.cgc.api_keys.count_documents({"user_id": email}) == 0
    assert db.billing.portal_accounts.find_one({"_id": email})["session_generation"] == 0
    revoked = list(db.billing.portal_revoked_sessions.find())
    assert revoked and all(r["expires"] > datetime.now(UTC) for r in revoked)
    with browser(b) as client:  # logging in again is a new session
        assert log_in(client, email, PASSWORD).headers["location"] == "/portal/me"
        assert client.get("/portal/keys").status_code == 200


def test_sign_up_of_a_known_address_looks_like_a_new_one(instances, db, test_id: str):
    a, _ = instances
    known = f"known-{test_id[:8]}@example.com"
    original = make_account(db, known)["password_hash"]
    made_by_admin = f"billing-only-{test_id[:8]}@example.com"  # a user with no portal account
    db.billing.users.insert_one({"_id": made_by_admin, "plan": "pro"})
    answers = []
    for email in (f"fresh-{test_id[:8]}@example.com", known, made_by_admin):
        with browser(a, source="127.0.0.3") as client:
            response = sign_up(client, email, "a password of theirs")
            login_page = client.get("/portal/login").text
        answers.append((response.status_code, response.headers.get("location"),
                        response.text, sorted(response.headers.keys()),
                        login_page.replace(email, "EMAIL").replace(csrf_of(login_page),
                                                                   "CSRF")))
        assert f'value="{email}"' in login_page  # filled in, each the same way
    assert answers[0][:2] == (303, "/portal/login")
    assert answers[1] == answers[0] and answers[2] == answers[0]
    assert "log in with your email and password" in answers[0][4]
    # nothing changed for the known addresses
    assert db.billing.portal_accounts.find_one({"_id": known})["password_hash"] == original
    assert db.billing.portal_accounts.find_one({"_id": made_by_admin}) is None
    assert db.billing.users.find_one({"_id": made_by_admin})["plan"] == "pro"
    with browser(a, source="127.0.0.3") as client:
        assert log_in(client, known, "a password of theirs").status_code == 401
        assert log_in(client, known, PASSWORD).headers["location"] == "/portal/me"


def test_sign_ups_are_limited_per_address(instances, db, test_id: str):
    a, _ = instances
    limit = 5  # option portal_signups_per_hour's default
    with browser(a, source="127.0.0.4") as client:
        refused = sign_up(client, "not an address", "a password of theirs")
        assert refused.status_code == 400  # a form's mistake does not count
        for i in range(limit):
            assert sign_up(client, f"many-{i}-{test_id[:8]}@example.com",
                           "a password of theirs").status_code == 303
        limited = sign_up(client, f"one-more-{test_id[:8]}@example.com",
                          "a password of theirs")
        assert limited.status_code == 429
        assert 3000 < int(limited.headers["retry-after"]) <= 3600
        assert "Too many sign-ups" in limited.text
    assert db.billing.portal_accounts.find_one({"_id": f"one-more-{test_id[:8]}@example.com"}
                                               ) is None
    with browser(a, source="127.0.0.5") as other:  # another address is not limited
        assert sign_up(other, f"other-{test_id[:8]}@example.com",
                       "a password of theirs").status_code == 303


# Without the proxy

@pytest.fixture(scope="module")
def fresh_db(tmp_path_factory) -> Iterator[str]:
    uri, process = start_embedded_db(tmp_path_factory.mktemp("fresh"), free_port())
    yield uri
    process.terminate()
    process.wait(10)


class FakeDatabase:
    """Database's one method the pages use; the client is made on the app's event loop."""

    def __init__(self, uri: str, timeout_ms: int = 5000) -> None:
        self.uri, self.timeout_ms = uri, timeout_ms
        self._client: AsyncMongoClient | None = None

    async def client(self) -> AsyncMongoClient:
        if self._client is None:
            self._client = AsyncMongoClient(self.uri, tz_aware=True,
                                            serverSelectionTimeoutMS=self.timeout_ms)
        return self._client


def test_revoked_sessions_are_shared_through_the_database(fresh_db: str):
    async def run() -> None:
        client = AsyncMongoClient(fresh_db, tz_aware=True)
        here, elsewhere = session.RevokedSessions(), session.RevokedSessions()
        assert not await elsewhere.is_revoked(client, "sid-1")
        await here.revoke(client, "sid-1")
        await here.revoke(client, "sid-1")  # twice: one record
        assert here.cached("sid-1") and not elsewhere.cached("sid-1")
        assert await elsewhere.is_revoked(client, "sid-1")
        assert elsewhere.cached("sid-1")  # no round trip next time
        assert not await elsewhere.is_revoked(client, "sid-2")
        records = await client.billing.portal_revoked_sessions.find().to_list()
        assert [r["_id"] for r in records] == ["sid-1"]
        expected = datetime.now(UTC) + timedelta(seconds=12 * 3600)
        assert abs(records[0]["expires"] - expected) < timedelta(minutes=10)
        indexes = await client.billing.portal_revoked_sessions.index_information()
        ttl = [i for i in indexes.values() if i["key"] == [("expires", 1)]]
        assert ttl and ttl[0]["expireAfterSeconds"] == 0
        await client.close()
    asyncio.run(run())


def test_revoked_cache_is_bounded():
    revoked = session.RevokedSessions(max_cached=10)
    for i in range(100):
        revoked._remember(f"sid-{i}")
    assert len(revoked._cached) == 10 and revoked.cached("sid-99")
    assert not revoked.cached("sid-0")


def portal_app(database: FakeDatabase) -> Starlette:
    async def login(request: Request) -> Response:
        session.start_session(request, {"_id": "someone@example.com", "session_generation": 0})
        return PlainTextResponse("in")

    async def page(request: Request) -> Response:
        account = await session.current_account(request, database)  # type: ignore[arg-type]
        return PlainTextResponse("page" if account else "login", 200 if account else 401)

    async def logout(request: Request) -> Response:
        await session.end_session(request, database)  # type: ignore[arg-type]
        return PlainTextResponse("out")

    sessions = session.Sessions(Router([Route("/login", login), Route("/page", page),  # as Portal's
                                Route("/logout", logout)]))
    sessions.secret = "s" * 40
    return Starlette(routes=[Mount("/portal", app=sessions)])


def test_a_database_that_does_not_answer_gets_503_not_500():
    nobody = FakeDatabase(f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
                          timeout_ms=100)
    with TestClient(portal_app(nobody)) as client:  # server exceptions would raise here
        assert client.get("/portal/login").text == "in"
        cookie = client.cookies["portal_session"]
        page = client.get("/portal/page")
        assert page.status_code == 503 and "database does not answer" in page.text
        assert int(page.headers["retry-after"]) > 0 and "x-frame-options" in page.headers
        out = client.get("/portal/logout")
        assert out.status_code == 503 and "set-cookie" not in out.headers  # can be retried
        assert client.cookies["portal_session"] == cookie
        # this process refuses the session already, without the database
        assert client.get("/portal/page").status_code == 401


def test_sign_up_hashes_a_password_either_way(fresh_db: str, monkeypatch):
    """As long for a known address as for a new one: one password hash each."""
    hashed = []
    real_hash = accounts.hash_password

    async def counting_hash(password: str) -> str:
        hashed.append(password)
        return await real_hash(password)

    monkeypatch.setattr(accounts, "hash_password", counting_hash)
    monkeypatch.setattr(auth, "ctx", SimpleNamespace(options=SimpleNamespace(
        portal_signup=True, portal_signups_per_hour=0)))
    database = FakeDatabase(fresh_db)
    pages = auth.AuthPages(database,  # type: ignore[arg-type]
                           SimpleNamespace(config=SimpleNamespace(default_plan="free")))
    sessions = session.Sessions(Router([Route("/signup", pages.signup, methods=["GET", "POST"])]))
    sessions.secret = "s" * 40
    app = Starlette(routes=[Mount("/portal", app=sessions)])
    with TestClient(app) as client:
        for email in ("new@example.com", "new@example.com", "NEW@example.com"):
            token = csrf_of(client.get("/portal/signup").text)
            response = client.post("/portal/signup", follow_redirects=False, data={
                "csrf": token, "email": email, "password": f"password of {email}",
                "confirm": f"password of {email}"})
            assert response.headers["location"] == "/portal/login"
    assert len(hashed) == 3
