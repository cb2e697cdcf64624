"""KeyAuth addon: authenticate callers by API key, cached, before anything else sees it.

Accepts ``Authorization: Bearer <token>`` (seed 002) and ``X-API-Key: <token>`` (seed 000,
also what the Anthropic SDK sends). The token's SHA-256 hex is looked up in
``cgc.api_keys`` with seed 002's query. Results are cached (positive and negative); an
expired valid key is served while one background refresh runs, so after the first request
of a key the hot path never waits on the database. Unknown keys are cached apart from
valid ones, so a spray of them never evicts a valid key, and only for
``key_cache_negative_ttl`` (1 s): never served stale, so a key created since works on the
next request after that. A client address may only make ``unknown_key_lookups_per_minute``
database lookups of keys that turn out unknown — past that, a lookup the cache cannot
answer gets 429 with ``Retry-After``, without a query.

Where the database has change streams (the embedded database, replica sets), a watcher
(storage/key_watch.py) drops a key's cached entries as soon as it is created, changed or
deleted anywhere, so key changes made outside the proxy apply at once on every instance;
without them, within the TTLs above. Keys made by the CLI and the portal have random
tokens, never looked up before, so they work on the next request everywhere.

Client credentials, in every accepted form, are removed from every live request in its
first hook, routed or not, so no later hook, log line or saved flow holds them. A cached
key is used at most ``key_cache_max_stale`` seconds after the database last confirmed it:
past that it waits for a new lookup, and gets 503 while the database cannot answer (a
revoked key must not keep working through an outage). Each authenticated request notes
when its key was used, in memory; storage/last_used.py writes that in the background.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mitmproxy import ctx, exceptions, http
from pymongo.errors import PyMongoError

from . import context
from .context import Caller
from .core.api_info import api_route, from_google
from .core.client_limit import ClientRate, client_network
from .core.config import Config
from .core.redact import configured_secrets
from .core.usage import Protocol
from .errors import error_response
from .settings import Settings
from .storage.cache import RefreshingCache
from .storage.database import Database
from .storage.key_watch import KeyWatcher
from .storage.last_used import KeysLastUsed

logger = logging.getLogger(__name__)

CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
CLIENT_KEY_QUERY = "key"  # Gemini clients may send ?key=
UNKNOWN_KEY_LOOKUPS_PER_MINUTE = 60  # per client address; cached unknown keys are free
KEY_CACHE_MAX_STALE = 300  # seconds


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    caller: Caller | None
    expiry: datetime | None  # the key's own date_expiry


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def key_query(secret_hash: str, now: datetime) -> dict[str, Any]:
    """Seed 002's lookup, verbatim."""
    return {
        "access_level": "COMPLETION",
        "secret": secret_hash,
        "$or": [{"date_expiry": {"$gt": now}}, {"date_expiry": None}],
    }


def key_matches(doc: Mapping[str, Any], secret_hash: str, now: datetime) -> bool:
    """Whether ``key_query(secret_hash, now)`` finds ``doc``."""
    expiry = doc.get("date_expiry")
    return doc.get("access_level") == "COMPLETION" and doc.get("secret") == secret_hash \
        and (expiry is None or (isinstance(expiry, datetime) and expiry > now))


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
    def __init__(self, database: Database, settings: Settings, max_keys: int = 100_000,
                 max_unknown_keys: int = 10_000) -> None:
        self.database = database
        self.settings = settings
        self._cache: RefreshingCache[str, _KeyRecord] = RefreshingCache(
            self._fetch, max_keys, is_miss=lambda record: record.caller is None,
            max_misses=max_unknown_keys, max_age=KEY_CACHE_MAX_STALE)
        self._max_keys = max_keys
        self._secrets_by_id: dict[Any, str] = {}  # cached valid keys: what a deletion names
        # Keys forgotten lately, numbered: a lookup under way may have read one before.
        self._forgotten: deque[tuple[int, Any]] = deque(maxlen=1024)
        self._forgets = 0
        self._unknown_lookups = ClientRate(UNKNOWN_KEY_LOOKUPS_PER_MINUTE)
        self.last_used = KeysLastUsed(database)
        self.watcher = KeyWatcher(database, self.key_changed, self._cache.expire_all)

    def load(self, loader) -> None:
        loader.add_option("key_cache_ttl", int, 30, "Seconds a key lookup stays fresh.")
        loader.add_option(
            "key_cache_negative_ttl", int, 1,
            "Seconds an unknown key stays cached (then it is looked up again before an "
            "answer): how long a key created outside the proxy may still be refused where "
            "the database has no change streams.")
        loader.add_option(
            "key_change_stream", bool, True,
            "Watch cgc.api_keys where the database has change streams (the embedded one, "
            "replica sets): keys created, changed or deleted outside the proxy apply at "
            "once, not within the key cache TTLs.")
        loader.add_option(
            "unknown_key_lookups_per_minute", int, UNKNOWN_KEY_LOOKUPS_PER_MINUTE,
            "Database lookups of unknown keys a client address (IPv6: /64) may make per "
            "minute, in bursts of as many; past that, uncached keys get 429. 0: no limit. "
            "Behind a load balancer every client shares its address.")
        loader.add_option(
            "key_cache_max_stale", int, KEY_CACHE_MAX_STALE,
            "Seconds a cached key may be used since the database last confirmed it; an older "
            "one is looked up again first, and refused (503) while the database cannot answer.")

    def configure(self, updated: set[str]) -> None:
        if "key_cache_max_stale" in updated:
            if ctx.options.key_cache_max_stale < 0:
                raise exceptions.OptionsError("key_cache_max_stale must be at least 0")
            self._cache.max_age = ctx.options.key_cache_max_stale
        if "unknown_key_lookups_per_minute" in updated:
            self._unknown_lookups.per_minute = ctx.options.unknown_key_lookups_per_minute

    def running(self) -> None:
        self.last_used.start()
        if ctx.options.key_change_stream:
            self.watcher.start()

    async def done(self) -> None:
        await self.watcher.stop()
        await self.last_used.stop()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        config = self.settings.config
        assert config is not None
        path = flow.request.path.partition("?")[0]
        route = config.route_for(path) or api_route(  # the proxy's own API (api_info.py)
            path, anthropic="anthropic-version" in flow.request.headers,
            google=from_google(flow.request.headers, flow.request.query))
        token = None
        if flow.live:  # the first hook of every request, routed or not: nothing later sees it
            token = extract_token(flow.request, query_key=route is not None
                                  and route.protocol is Protocol.GEMINI)
            strip_client_key(flow.request)
        if context.of(flow):
            return
        if not flow.live and context.METADATA_KEY in flow.metadata:
            self._restore(flow, config)  # a saved flow, replayed offline
            return
        if flow.response or route is None:
            return  # the router answers unknown paths
        fmt = route.protocol.error_format
        if token is None:
            flow.response = error_response(
                fmt, 401, "Missing API key: send 'Authorization: Bearer <key>' or "
                "'X-API-Key: <key>'.", "missing_api_key")
            return
        secret = token_hash(token)
        client = client_network(flow.client_conn.peername[0]) \
            if flow.client_conn.peername else ""
        counted = self._cache.needs_load(secret)  # only lookups that query cost anything
        if counted and (wait := self._unknown_lookups.take(client, time.monotonic())) > 0:
            flow.response = error_response(
                fmt, 429, "Too many requests with unknown API keys from this address; "
                "retry later.", "rate_limit_exceeded")
            flow.response.headers["retry-after"] = str(max(1, math.ceil(wait)))
            return
        try:
            caller = await self.lookup(secret)
        except PyMongoError as e:
            if counted:  # not an unknown key
                self._unknown_lookups.give_back(client, time.monotonic())
            logger.warning(f"API key lookup failed: {type(e).__name__}")
            flow.response = error_response(
                fmt, 503, "Authentication is temporarily unavailable; retry shortly.")
            return
        if counted and caller is not None:  # a valid key's lookup does not count
            self._unknown_lookups.give_back(client, time.monotonic())
        if caller is None:
            flow.response = error_response(
                fmt, 401, "Invalid or expired API key.", "invalid_api_key")
            return
        self.last_used.note(caller.key_id, datetime.now(UTC))  # no database wait
        context.attach(flow, context.RequestContext(
            caller=caller, route=route, path=path, secrets=(token, *configured_secrets(config))))

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

    def cache_counts(self) -> tuple[int, int]:
        """Key lookups served from the cache, and those that waited for the database."""
        return self._cache.hits, self._cache.misses

    def forget(self, secret_hash: str) -> None:
        """The key with this hash was created or changed here: look it up on its next use."""
        self._cache.invalidate(secret_hash)

    def forget_key(self, key_id: Any) -> None:
        """Key ``key_id`` was changed or deleted here: look it up on its next use."""
        self._forgets += 1
        self._forgotten.append((self._forgets, key_id))
        if (secret := self._secrets_by_id.pop(key_id, None)) is not None:
            self._cache.invalidate(secret)

    def key_changed(self, key_id: Any, doc: Mapping[str, Any] | None) -> None:
        """Key ``key_id`` was inserted or changed (``doc``: as it is now; None: deleted),
        here or elsewhere: its cached entries go, unless they already say what it says
        (our own ``date_last_used`` writes change nothing that matters)."""
        secret = doc.get("secret") if doc is not None else None
        if doc is None or self._secrets_by_id.get(key_id) != secret:  # deleted, new secret
            self.forget_key(key_id)
        if not isinstance(secret, str):
            return
        assert doc is not None
        current = _record({"_id": key_id, **doc}, secret) \
            if key_matches(doc, secret, datetime.now(UTC)) else _KeyRecord(None, None)
        if self._cache.peek(secret) != current:
            self._cache.invalidate(secret)

    async def lookup(self, secret_hash: str) -> Caller | None:
        """The key's caller, or None when unknown or expired."""
        record = await self._cache.get(secret_hash)
        if record.expiry is not None and record.expiry <= datetime.now(UTC):
            return None
        return record.caller

    async def _fetch(self, secret_hash: str) -> tuple[_KeyRecord, float]:
        forgets = self._forgets
        client = await self.database.client()
        doc = await client.cgc.api_keys.find_one(
            key_query(secret_hash, datetime.now(UTC)),
            projection={"_id": 1, "user_id": 1, "secret": 1, "date_expiry": 1},
        )
        if doc is not None and "user_id" not in doc:
            logger.warning(f"API key {doc.get('_id')!r} has no user_id; refusing it")
        record = _record(doc, secret_hash)
        if record.caller is not None and self._forgets != forgets and any(
                n > forgets and k == record.caller.key_id for n, k in self._forgotten):
            self._cache.invalidate(secret_hash)  # it changed after we read it: not kept
        if record.caller is None:
            return record, ctx.options.key_cache_negative_ttl
        if len(self._secrets_by_id) >= 2 * self._max_keys:  # keys evicted from the cache
            self._secrets_by_id = {r.caller.key_id: s for s, r in self._cache.items()
                                   if r.caller is not None}
        self._secrets_by_id[record.caller.key_id] = secret_hash
        return record, ctx.options.key_cache_ttl


def _record(doc: Mapping[str, Any] | None, secret_hash: str) -> _KeyRecord:
    """What the cache keeps for the document ``key_query`` found (None: no such key)."""
    if doc is None or "user_id" not in doc or \
            not hmac.compare_digest(str(doc.get("secret", "")), secret_hash):
        return _KeyRecord(caller=None, expiry=None)
    expiry = doc.get("date_expiry")
    return _KeyRecord(caller=Caller(key_id=doc["_id"], user_id=doc["user_id"]),
                      expiry=expiry if isinstance(expiry, datetime) else None)
