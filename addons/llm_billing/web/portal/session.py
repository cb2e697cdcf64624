"""Portal sessions: a signed cookie (Starlette's SessionMiddleware, itsdangerous), CSRF
tokens, and who is logged in.

The cookie is ``HttpOnly``, ``SameSite=Lax``, limited to ``/portal`` and ``Secure`` when the
request came over https. It holds the account's email, its session generation, a random
session id and the session's CSRF token — nothing secret from its holder. Every POST must
carry that token (``form()``); a form without it gets 403.

A signed cookie stays valid wherever a copy of it is, so logging out records the session id
in ``billing.portal_revoked_sessions`` (``RevokedSessions``) and every instance sharing the
database refuses it from then on. When the database does not answer, the portal answers 503
(it cannot tell a revoked session from a live one): never a page for a maybe-ended session.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure, PyMongoError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ...storage.database import Database
from . import accounts

logger = logging.getLogger(__name__)

SESSION_SECRET_ENV = "LLM_BILLING_SESSION_SECRET"
SESSION_SECRET_FILE = "portal_session_secret"
MIN_SECRET_LENGTH = 32
COOKIE = "portal_session"
MAX_AGE = 12 * 3600
SECURITY_HEADERS = [
    # form-action: Upgrade and billing forms redirect to Stripe's hosted pages
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
                                 b"frame-ancestors 'none'; form-action 'self' "
                                 b"https://checkout.stripe.com https://billing.stripe.com"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),  # pages show keys and usage: never cached
]
UNAVAILABLE_PAGE = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                    "<title>Portal unavailable</title><link rel=\"stylesheet\" "
                    "href=\"/portal/static/portal.css\"></head><body><main><h1>The portal is "
                    "unavailable</h1><p>Its database does not answer. Try again in a minute."
                    "</p></main></body></html>")
UNAVAILABLE_RETRY = "30"  # seconds, Retry-After of the 503


def session_secret(data_dir: Path) -> str:
    """``LLM_BILLING_SESSION_SECRET``, else one generated once and kept in the data dir.

    The file appears whole (written aside, then linked into place): an empty or short one
    (a crash mid-write by an older version) would sign sessions with a key anyone can
    compute, so it is replaced."""
    if secret := os.environ.get(SESSION_SECRET_ENV):
        return secret
    path = data_dir / SESSION_SECRET_FILE
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = None
    if secret is not None and len(secret) >= MIN_SECRET_LENGTH:
        return secret
    data_dir.mkdir(parents=True, exist_ok=True)
    spare = path.with_name(f"{SESSION_SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48))
        f.flush()
        os.fsync(f.fileno())
    try:
        if secret is None:
            try:
                os.link(spare, path)  # fails if another instance made it first
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                os.replace(spare, path)
        else:
            logger.warning(f"Portal: {path} held no usable secret; replaced")
            os.replace(spare, path)
    finally:
        spare.unlink(missing_ok=True)
    return path.read_text().strip()


class Sessions:
    """ASGI middleware: the session cookie (Secure on https), and the pages' security
    headers. ``secret`` is set once the proxy runs (it needs the data dir)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.secret: str | None = None
        self._by_scheme: dict[bool, SessionMiddleware] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.secret is None:
            await Response("The portal is starting", 503)(scope, receive, send)
            return
        https = str(scope.get("scheme", "")).lower() == "https"  # mitmproxy: "HTTP"/"HTTPS"
        middleware = self._by_scheme.get(https)
        if middleware is None:
            middleware = self._by_scheme[https] = SessionMiddleware(
                self.app, self.secret, session_cookie=COOKIE, max_age=MAX_AGE,
                path="/portal", same_site="lax", https_only=https)

        started = False

        async def with_headers(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in SECURITY_HEADERS if h[0] not in names)]
            await send(message)

        try:
            await middleware(scope, receive, with_headers)
        except PyMongoError as e:
            if started:
                raise
            # the session cookie is left as it was (a logout can be tried again)
            logger.warning(f"Portal: the database did not answer ({type(e).__name__}); 503")
            await HTMLResponse(UNAVAILABLE_PAGE, 503, {"retry-after": UNAVAILABLE_RETRY})(
                scope, receive, with_headers)


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


async def form(request: Request) -> FormData:
    """The POSTed form, once its CSRF token matches the session's; else 403."""
    data = await request.form()
    sent = data.get("csrf")
    expected = request.session.get("csrf")
    if not isinstance(sent, str) or not expected or not hmac.compare_digest(
            sent.encode(), expected.encode()):
        raise HTTPException(403, "Missing or wrong CSRF token: reload the page and try again.")
    return data


class RevokedSessions:
    """Session ids ended by a logout: ``billing.portal_revoked_sessions`` ``{_id: session id,
    expires}``, the database being the truth for every instance; this process also keeps the
    ones it has seen (bounded), so a replayed cookie costs it no round trip.

    A cookie is re-signed on every answer, but none is given to a revoked session, so a copy
    is too old for the cookie's ``max_age`` at most ``MAX_AGE`` after the logout: a TTL index
    then deletes the record (created at the first logout; idempotent)."""

    COLLECTION = "portal_revoked_sessions"
    KEEP = timedelta(seconds=MAX_AGE + 300)  # + clocks of instances that differ a little
    INDEX_CONFLICTS = (85, 86)  # an index on ``expires`` made by hand: kept as it is

    def __init__(self, max_cached: int = 10_000) -> None:
        self.max_cached = max_cached
        self._cached: OrderedDict[str, float] = OrderedDict()  # id -> monotonic forget time
        self._indexed: set[int] = set()  # id() of clients whose TTL index is made

    def cached(self, session_id: str) -> bool:
        forget = self._cached.get(session_id)
        if forget is None:
            return False
        if forget <= time.monotonic():
            del self._cached[session_id]
            return False
        return True

    def _remember(self, session_id: str) -> None:
        self._cached[session_id] = time.monotonic() + self.KEEP.total_seconds()
        self._cached.move_to_end(session_id)
        while len(self._cached) > self.max_cached:
            self._cached.popitem(last=False)

    async def is_revoked(self, client: AsyncMongoClient, session_id: str) -> bool:
        if self.cached(session_id):
            return True
        found = await client.billing[self.COLLECTION].find_one({"_id": session_id},
                                                               {"_id": 1})
        if found is not None:
            self._remember(session_id)
        return found is not None

    async def revoke(self, client: AsyncMongoClient, session_id: str) -> None:
        self._remember(session_id)  # first: refused here even if the database fails now
        collection = client.billing[self.COLLECTION]
        if id(client) not in self._indexed:
            try:
                await collection.create_index("expires", expireAfterSeconds=0)
            except OperationFailure as e:
                if e.code not in self.INDEX_CONFLICTS:
                    raise
                logger.warning(f"Portal: an index on {self.COLLECTION}.expires exists with "
                               f"other options ({e.code}); revoked sessions may not expire")
            self._indexed.add(id(client))
        await collection.update_one({"_id": session_id},
                                    {"$set": {"expires": accounts.now() + self.KEEP}},
                                    upsert=True)


revoked_sessions = RevokedSessions()


def start_session(request: Request, account: dict[str, Any]) -> None:
    """A new session for a login (never the one the browser had: no fixation)."""
    request.session.clear()
    request.session.update({"account": account["_id"],
                            "generation": account.get("session_generation", 0),
                            "sid": secrets.token_urlsafe(24),
                            "csrf": secrets.token_urlsafe(32)})


async def end_session(request: Request, database: Database) -> None:
    """Log out: the session id is revoked for every copy of the cookie, then forgotten."""
    session_id = request.session.get("sid")
    if isinstance(session_id, str):
        await revoked_sessions.revoke(await database.client(), session_id)
    request.session.clear()


async def current_account(request: Request, database: Database) -> dict[str, Any] | None:
    """The logged-in account; None (and the session cleared) when the session ended: logged
    out, the password changed, or issued before sessions had ids (those cannot be revoked)."""
    email = request.session.get("account")
    if not isinstance(email, str):
        return None
    session_id = request.session.get("sid")
    if not isinstance(session_id, str) or revoked_sessions.cached(session_id):
        request.session.clear()
        return None
    client = await database.client()
    revoked, account = await asyncio.gather(revoked_sessions.is_revoked(client, session_id),
                                            accounts.find(client, email))
    if revoked or account is None or account.get("session_generation", 0) != \
            request.session.get("generation"):
        request.session.clear()
        return None
    return account


Endpoint = Callable[[Any, Request], Awaitable[Response]]


def requires(role: str | None = None) -> Callable[[Endpoint], Endpoint]:
    """Page methods (of an object with ``database``) for logged-in accounts (``role``: only
    that role). Sets ``request.state.account``; a forced password change comes first."""
    def decorate(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def guarded(self: Any, request: Request) -> Response:
            account = await current_account(request, self.database)
            if account is None:
                return RedirectResponse("/portal/login", 303)
            if account.get("must_change_password") and request.url.path != "/portal/password":
                return RedirectResponse("/portal/password", 303)
            if role is not None and account.get("role") != role:
                raise HTTPException(403, "Not allowed")
            request.state.account = account
            return await endpoint(self, request)
        return guarded
    return decorate
