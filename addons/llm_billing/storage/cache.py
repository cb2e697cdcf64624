"""A small read-through cache for database lookups on the hot path.

Each key is fetched once (concurrent callers share the query), kept for a TTL, and once
stale it is still served while a single background refresh runs — so after the first
request for a key, callers never wait on the database. A failed refresh keeps serving the
stale value, but only up to ``max_age`` seconds after its last successful load: an older
entry (a key unused that long, or the database down that long) is served only once
reloaded, and a failed reload raises — a revoked key must not keep working for as long as
the database is down. Size is bounded: the least recently used entry goes (O(1)). Values
that ``is_miss`` (e.g. "no such key") live in their own smaller LRU, so a spray of unknown
keys only ever evicts other misses, never a valid key; a miss is never served stale (a key
created since must work once the miss's TTL is over, not one refresh later).

``invalidate`` drops a key, and a load of it already under way is not stored (it may have
read the database before the change that invalidated it) nor shared with later callers
(they load anew); ``expire_all`` makes every entry
stale at once, loads under way included (changes may have been missed): a value is then
still served while it refreshes — during a database outage too — and a miss is reloaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pymongo.errors import PyMongoError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry[V]:
    value: V
    fresh_until: float
    loaded: float  # when the value was loaded
    miss: bool = False  # never served once stale
    refreshing: bool = False


class RefreshingCache[K, V]:
    def __init__(self, load: Callable[[K], Awaitable[tuple[V, float]]],
                 max_entries: int = 100_000, *, is_miss: Callable[[V], bool] | None = None,
                 max_misses: int = 10_000, max_age: float | None = None) -> None:
        """``load(key)`` returns the value and how many seconds it stays fresh; values that
        ``is_miss`` count against ``max_misses`` instead of ``max_entries``; a value older
        than ``max_age`` seconds (None: no bound) is never served before it is reloaded."""
        self._load = load
        self.max_age = max_age
        self._is_miss = is_miss
        self._hits: OrderedDict[K, _Entry[V]] = OrderedDict()  # least recently used first
        self._misses: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._max_hits, self._max_misses = max_entries, max_misses
        self._inflight: dict[K, asyncio.Future[_Entry[V]]] = {}
        self._expired: set[asyncio.Future[_Entry[V]]] = set()  # loads under way during
        # expire_all: stored stale
        self._tasks: set[asyncio.Task] = set()
        self.hits = self.misses = 0  # gets served from the cache / that waited for a load

    async def get(self, key: K) -> V:
        entry = self._touch(key)
        if entry is None or not self._servable(entry):
            self.misses += 1
            return (await self._fetch_once(key)).value
        self.hits += 1
        if entry.fresh_until < time.monotonic() and not entry.refreshing:
            entry.refreshing = True
            task = asyncio.create_task(self._refresh(key, entry))
            self._tasks.add(task)  # held until done, or it may be collected mid-run
            task.add_done_callback(self._tasks.discard)
        return entry.value

    def needs_load(self, key: K) -> bool:
        """Whether ``get(key)`` would wait for a new query: no entry young enough to serve,
        none in flight."""
        if key in self._inflight:
            return False
        entry = self._hits.get(key) or self._misses.get(key)
        return entry is None or not self._servable(entry)

    def _servable(self, entry: _Entry[V]) -> bool:
        """Fresh, or a stale value (not a miss) young enough to serve while it refreshes."""
        now = time.monotonic()
        if self.max_age is not None and now - entry.loaded > self.max_age:
            return False
        return not entry.miss or entry.fresh_until > now

    def invalidate(self, key: K) -> None:
        self._hits.pop(key, None)
        self._misses.pop(key, None)
        self._inflight.pop(key, None)  # not stored, not shared: later gets load anew

    def expire_all(self) -> None:
        """Every entry stale now, and loads under way stored stale: values are refreshed
        on their next use (and served meanwhile), misses reloaded."""
        for segment in (self._hits, self._misses):
            for entry in segment.values():
                entry.fresh_until = float("-inf")
        self._expired.update(self._inflight.values())

    def peek(self, key: K) -> V | None:
        """The cached value, fresh or not, without using it (None: not cached)."""
        entry = self._hits.get(key) or self._misses.get(key)
        return None if entry is None else entry.value

    def items(self) -> list[tuple[K, V]]:
        return [(key, entry.value) for segment in (self._hits, self._misses)
                for key, entry in segment.items()]

    def _touch(self, key: K) -> _Entry[V] | None:
        for segment in (self._hits, self._misses):
            if (entry := segment.get(key)) is not None:
                segment.move_to_end(key)
                return entry
        return None

    def _store(self, key: K, entry: _Entry[V]) -> None:
        miss = entry.miss = self._is_miss is not None and self._is_miss(entry.value)
        segment, other = (self._misses, self._hits) if miss else (self._hits, self._misses)
        limit = self._max_misses if miss else self._max_hits
        other.pop(key, None)  # e.g. a key created since it was looked up
        segment[key] = entry
        segment.move_to_end(key)
        while len(segment) > limit:
            segment.popitem(last=False)

    async def _refresh(self, key: K, stale: _Entry[V]) -> None:
        try:
            await self._fetch_once(key)
        except PyMongoError as e:  # keep serving the stale value; retry on next use
            logger.warning(f"Cache refresh failed: {type(e).__name__}")
            stale.refreshing = False

    async def _fetch_once(self, key: K) -> _Entry[V]:
        if (pending := self._inflight.get(key)) is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Entry[V]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value, ttl = await self._load(key)
            now = time.monotonic()
            entry = _Entry(value, now + ttl, now)
            if future in self._expired:  # it may predate a missed change: refreshed on use
                entry.fresh_until = float("-inf")
            if self._inflight.get(key) is future:  # not invalidated meanwhile
                self._store(key, entry)
            future.set_result(entry)
            return entry
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # consumed: no "never retrieved" warning
            raise
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]
            self._expired.discard(future)
