"""KeyAuth addon: authenticate callers by API key, cached, before anything else sees it.

Accepts ``Authorization: Bearer <token>`` (seed 002) and ``X-API-Key: <token>`` (seed 000,
also what the Anthropic SDK sends). The token's SHA-256 hex is looked up in
``cgc.api_keys`` with seed 002's query. Results are cached (positive and negative); an
expired entry is served while one background refresh runs, so after the first request of
a key the hot path never waits on the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mitmproxy import ctx, http
from pymongo.errors import PyMongoError

from . import context
from .config import Config
from .context import Caller
from .database import Database
from .errors import error_response
from .settings import Settings
from .usage import Protocol

logger = logging.getLogger(__name__)

CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
CLIENT_KEY_QUERY = "key"  # Gemini clients may send ?key=
MAX_CACHED_KEYS = 100_000  # bounds memory when clients send many distinct unknown keys


@dataclass(slots=True)
class _Entry:
    caller: Caller | None
    expiry: datetime | None  # the key's own date_expiry
    fresh_until: float
    refreshing: bool = False


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def key_query(secret_hash: str, now: datetime) -> dict[str, Any]:
    """Seed 002's lookup, verbatim."""
    return {
        "access_level": "COMPLETION",
        "secret": secret_hash,
        "$or": [{"date_expiry": {"$gt": now}}, {"date_expiry": None}],
    }


def extract_token(request: http.Request, query_key: bool = False) -> str | None:
    """The caller's key: Bearer (seed 002), X-API-Key (seed 000, Anthropic SDK),
    x-goog-api-key (Google SDK) or, where allowed, the ``key`` query parameter."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for name in CLIENT_KEY_HEADERS[1:]:
        if value := request.headers.get(name, "").strip():
            return value
    if query_key:
        return request.query.get(CLIENT_KEY_QUERY, "").strip() or None
    return None


def strip_client_key(request: http.Request) -> None:
    """The client's key never goes further, nor shows in flows or logs."""
    for name in CLIENT_KEY_HEADERS:
        request.headers.pop(name, None)
    if CLIENT_KEY_QUERY in request.query:
        request.query.pop(CLIENT_KEY_QUERY)


class KeyAuth:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[_Entry]] = {}
        self._refreshes: set[asyncio.Task] = set()

    def load(self, loader) -> None:
        loader.add_option("key_cache_ttl", int, 30, "Seconds a key lookup stays fresh.")
        loader.add_option(
            "key_cache_negative_ttl", int, 5, "Seconds an unknown key stays cached."
        )

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if context.of(flow):
            return
        config = self.settings.config
        assert config is not None
        if not flow.live and context.METADATA_KEY in flow.metadata:
            self._restore(flow, config)  # a saved flow, replayed offline
            return
        if flow.response:
            return
        path = flow.request.path.partition("?")[0]
        route = config.route_for(path)
        if route is None:
            return  # the router answers unknown paths
        token = extract_token(flow.request, query_key=route.protocol is Protocol.GEMINI)
        strip_client_key(flow.request)
        fmt = route.protocol.error_format
        if token is None:
            flow.response = error_response(
                fmt, 401, "Missing API key: send 'Authorization: Bearer <key>' or "
                "'X-API-Key: <key>'.", "missing_api_key")
            return
        try:
            caller = await self.lookup(token_hash(token))
        except PyMongoError as e:
            logger.warning(f"API key lookup failed: {type(e).__name__}")
            flow.response = error_response(
                fmt, 503, "Authentication is temporarily unavailable; retry shortly.")
            return
        if caller is None:
            flow.response = error_response(
                fmt, 401, "Invalid or expired API key.", "invalid_api_key")
            return
        context.attach(flow, context.RequestContext(caller=caller, route=route, path=path))

    @staticmethod
    def _restore(flow: http.HTTPFlow, config: Config) -> None:
        """Its context as saved: the request went upstream already, rewritten."""
        summary = flow.metadata[context.METADATA_KEY]
        route = config.route_for(summary.get("path") or "")
        backend = config.backend_named(summary.get("backend") or "") or \
            config.backend_for(summary.get("model") or "")
        if route is None or backend is None:
            logger.warning(f"Replayed flow {flow.id}: {summary.get('path')!r} or "
                           f"{summary.get('model')!r} is no longer configured; not billed")
            return
        context.restore(flow, route, backend)

    async def lookup(self, secret_hash: str) -> Caller | None:
        """The key's caller, or None when unknown or expired."""
        now = time.monotonic()
        entry = self._cache.get(secret_hash)
        if entry is None:
            entry = await self._fetch_once(secret_hash)
        elif entry.fresh_until < now and not entry.refreshing:
            entry.refreshing = True
            task = asyncio.create_task(self._refresh(secret_hash, entry))
            self._refreshes.add(task)  # held until done, or it may be collected mid-run
            task.add_done_callback(self._refreshes.discard)
        if entry.expiry is not None and entry.expiry <= datetime.now(UTC):
            return None
        return entry.caller

    async def _refresh(self, secret_hash: str, stale: _Entry) -> None:
        try:
            await self._fetch_once(secret_hash)
        except PyMongoError as e:  # keep serving the stale entry; try again next request
            logger.warning(f"API key refresh failed: {type(e).__name__}")
            stale.refreshing = False

    async def _fetch_once(self, secret_hash: str) -> _Entry:
        """One database query per key at a time; concurrent callers share it."""
        if (pending := self._inflight.get(secret_hash)) is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._inflight[secret_hash] = future
        try:
            entry = await self._fetch(secret_hash)
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._evict()
            self._cache[secret_hash] = entry
            future.set_result(entry)
            return entry
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # consumed: no "never retrieved" warning
            raise
        finally:
            del self._inflight[secret_hash]

    def _evict(self) -> None:
        """Drop stale entries; if that is not enough, unknown keys; then everything."""
        now = time.monotonic()
        for keep in (lambda e: e.fresh_until >= now, lambda e: e.caller is not None):
            self._cache = {h: e for h, e in self._cache.items() if keep(e)}
            if len(self._cache) < MAX_CACHED_KEYS:
                return
        self._cache.clear()

    async def _fetch(self, secret_hash: str) -> _Entry:
        client = await self.database.client()
        doc = await client.cgc.api_keys.find_one(
            key_query(secret_hash, datetime.now(UTC)),
            projection={"_id": 1, "user_id": 1, "secret": 1, "date_expiry": 1},
        )
        valid = (
            doc is not None
            and "user_id" in doc
            and hmac.compare_digest(str(doc.get("secret", "")), secret_hash)
        )
        ttl = ctx.options.key_cache_ttl if valid else ctx.options.key_cache_negative_ttl
        if doc is not None and not valid:
            logger.warning(f"API key {doc.get('_id')!r} has no user_id; refusing it")
        expiry = doc.get("date_expiry") if valid else None
        return _Entry(
            caller=Caller(key_id=doc["_id"], user_id=doc["user_id"]) if valid else None,
            expiry=expiry if isinstance(expiry, datetime) else None,
            fresh_until=time.monotonic() + ttl,
        )
