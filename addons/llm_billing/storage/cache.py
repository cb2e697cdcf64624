"""A small read-through cache for database lookups on the hot path.

Each key is fetched once (concurrent callers share the query), kept for a TTL, and once
stale it is still served while a single background refresh runs — so after the first
request for a key, callers never wait on the database. A failed refresh keeps serving the
stale value. Size is bounded: stale entries go first, then everything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pymongo.errors import PyMongoError

logger = logging.getLogger(__name__)



@dataclass(slots=True)
class _Entry[V]:
    value: V
    fresh_until: float
    refreshing: bool = False


class RefreshingCache[K, V]:
    def __init__(self, load: Callable[[K], Awaitable[tuple[V, float]]],
                 max_entries: int = 100_000) -> None:
        """``load(key)`` returns the value and how many seconds it stays fresh."""
        self._load = load
        self._max = max_entries
        self._entries: dict[K, _Entry[V]] = {}
        self._inflight: dict[K, asyncio.Future[_Entry[V]]] = {}
        self._tasks: set[asyncio.Task] = set()

    async def get(self, key: K) -> V:
        entry = self._entries.get(key)
        if entry is None:
            entry = await self._fetch_once(key)
        elif entry.fresh_until < time.monotonic() and not entry.refreshing:
            entry.refreshing = True
            task = asyncio.create_task(self._refresh(key, entry))
            self._tasks.add(task)  # held until done, or it may be collected mid-run
            task.add_done_callback(self._tasks.discard)
        return entry.value

    def invalidate(self, key: K) -> None:
        self._entries.pop(key, None)

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
            entry = _Entry(value, time.monotonic() + ttl)
            if len(self._entries) >= self._max:
                self._evict()
            self._entries[key] = entry
            future.set_result(entry)
            return entry
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # consumed: no "never retrieved" warning
            raise
        finally:
            del self._inflight[key]

    def _evict(self) -> None:
        now = time.monotonic()
        self._entries = {k: e for k, e in self._entries.items() if e.fresh_until >= now}
        if len(self._entries) >= self._max:
            self._entries.clear()
