"""The refreshing cache's bounds: least recently used entries go first, one at a time, and
misses never push out hits."""

from __future__ import annotations

import asyncio

from llm_billing.storage import cache as cache_module
from llm_billing.storage.cache import RefreshingCache


class Loader:
    """Counts loads; keys starting with "valid" exist, the rest do not (None)."""

    def __init__(self) -> None:
        self.loads: list[str] = []

    async def __call__(self, key: str) -> tuple[str | None, float]:
        self.loads.append(key)
        return (key.upper() if key.startswith("valid") else None), 3600.0


def test_least_recently_used_entry_goes_first():
    async def go():
        loader = Loader()
        cache = RefreshingCache(loader, max_entries=3)
        for key in ("valid-a", "valid-b", "valid-c"):
            await cache.get(key)
        assert await cache.get("valid-a") == "VALID-A"  # a hit: now the most recent
        await cache.get("valid-d")  # full: evicts b, the least recently used, only
        loader.loads.clear()
        for key in ("valid-a", "valid-c", "valid-d"):
            await cache.get(key)
        assert loader.loads == []  # all still cached
        await cache.get("valid-b")
        assert loader.loads == ["valid-b"]  # it had gone; and its return evicted a
        await cache.get("valid-c")
        await cache.get("valid-a")
        assert loader.loads == ["valid-b", "valid-a"]

    asyncio.run(go())


def test_a_spray_of_more_than_max_entries_keeps_a_key_in_use():
    async def go():
        loader = Loader()
        cache = RefreshingCache(loader, max_entries=100)
        await cache.get("valid-key")
        for i in range(150):
            await cache.get(f"unknown-{i}")
            if i % 50 == 0:
                assert await cache.get("valid-key") == "VALID-KEY"
        assert await cache.get("valid-key") == "VALID-KEY"
        assert loader.loads.count("valid-key") == 1  # every later lookup hit the cache

    asyncio.run(go())


def test_misses_are_bounded_apart_and_never_evict_hits():
    async def go():
        loader = Loader()
        cache = RefreshingCache(loader, max_entries=10, is_miss=lambda v: v is None,
                                max_misses=5)
        await cache.get("valid-key")
        for i in range(10 + 7):  # max_entries + k unknown keys, the valid one untouched
            assert await cache.get(f"unknown-{i}") is None
        assert await cache.get("valid-key") == "VALID-KEY"
        assert loader.loads.count("valid-key") == 1
        await cache.get("unknown-16")  # the most recent misses are still cached
        assert loader.loads.count("unknown-16") == 1
        await cache.get("unknown-0")
        assert loader.loads.count("unknown-0") == 2

    asyncio.run(go())


def test_needs_load_tells_whether_a_get_would_query():
    async def go():
        gate = asyncio.Event()

        async def slow(key: str) -> tuple[str, float]:
            await gate.wait()
            return key, 3600.0

        cache = RefreshingCache(slow)
        assert cache.needs_load("k")
        first = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)  # the first get is now waiting on its query
        assert not cache.needs_load("k")  # a second get would share it
        gate.set()
        assert await first == "k" and not cache.needs_load("k")
        cache.invalidate("k")
        assert cache.needs_load("k")

    asyncio.run(go())


# --- Misses are never served stale; invalidations win over loads under way ---------------

class Clock:
    """The cache's ``time.monotonic``, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Keys:
    """A database of keys, its answers held at ``gate`` while ``held``."""

    def __init__(self) -> None:
        self.existing: set[str] = set()
        self.loads = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()  # a load is held at the gate

    async def __call__(self, key: str) -> tuple[str | None, float]:
        self.loads += 1
        found = key.upper() if key in self.existing else None  # read before the gate
        self.waiting.set()
        await self.gate.wait()
        return found, 1.0


def miss_cache(monkeypatch) -> tuple[RefreshingCache, Keys, Clock]:
    clock = Clock()
    monkeypatch.setattr(cache_module, "time", clock)
    keys = Keys()
    return RefreshingCache(keys, is_miss=lambda v: v is None), keys, clock


def test_an_expired_miss_waits_for_a_lookup(monkeypatch):
    """A key created after it was tried works on the first request after the miss's TTL
    (it was served stale once more while a refresh ran in the background)."""
    async def go():
        cache, keys, clock = miss_cache(monkeypatch)
        assert await cache.get("new-key") is None
        keys.existing.add("new-key")  # created behind our back
        clock.now += 0.5
        assert await cache.get("new-key") is None  # still fresh: cached
        assert not cache.needs_load("new-key")
        clock.now += 0.6  # the miss's 1 s is over
        assert cache.needs_load("new-key")  # it counts as a lookup (per-address limit)
        assert await cache.get("new-key") == "NEW-KEY"
        assert keys.loads == 2

    asyncio.run(go())


def test_a_stale_hit_is_still_served_while_it_refreshes(monkeypatch):
    async def go():
        cache, keys, clock = miss_cache(monkeypatch)
        keys.existing.add("valid")
        assert await cache.get("valid") == "VALID"
        clock.now += 2
        keys.gate.clear()
        keys.waiting.clear()
        assert not cache.needs_load("valid")
        assert await cache.get("valid") == "VALID"  # served at once, refreshing behind
        await keys.waiting.wait()
        assert keys.loads == 2
        keys.gate.set()

    asyncio.run(go())


def test_a_load_under_way_when_its_key_is_invalidated_is_not_kept(monkeypatch):
    """The lookup read the database before the key was created; the change's invalidation
    came while it was under way: its answer goes to its callers but is not cached."""
    async def go():
        cache, keys, _ = miss_cache(monkeypatch)
        keys.gate.clear()
        first = asyncio.create_task(cache.get("key"))
        await keys.waiting.wait()  # the query has read: no such key
        keys.existing.add("key")
        cache.invalidate("key")  # the change stream says it was created
        keys.gate.set()
        assert await first is None
        assert cache.needs_load("key")
        assert await cache.get("key") == "KEY"
        assert keys.loads == 2

    asyncio.run(go())


def test_expire_all_refreshes_values_and_reloads_misses(monkeypatch):
    """After changes may have been missed: a miss waits for a new lookup; a value is
    served once more while it refreshes; a load under way is not kept."""
    async def go():
        cache, keys, _ = miss_cache(monkeypatch)
        keys.existing.add("valid")
        assert await cache.get("valid") == "VALID"
        assert await cache.get("unknown") is None
        keys.gate.clear()
        keys.waiting.clear()
        pending = asyncio.create_task(cache.get("other"))
        await keys.waiting.wait()
        keys.existing.update({"unknown", "other"})
        cache.expire_all()
        keys.gate.set()
        assert await pending is None
        assert cache.needs_load("unknown") and cache.needs_load("other")
        assert not cache.needs_load("valid")
        assert await cache.get("unknown") == "UNKNOWN"
        assert await cache.get("other") == "OTHER"
        assert await cache.get("valid") == "VALID"  # stale, its refresh started
        loads = keys.loads
        await asyncio.sleep(0)  # the refresh runs (nothing held)
        assert keys.loads == loads + 1

    asyncio.run(go())


def test_a_valid_key_loading_during_expire_all_is_kept_stale(monkeypatch):
    """The watcher opens its stream (expire_all) while a request's lookup is under way:
    the key must still be cached — served while it refreshes, and through a database
    outage — not dropped (it then needed a lookup: 503 with the database down, 429 past
    the address's unknown-key budget)."""
    async def go():
        cache, keys, _ = miss_cache(monkeypatch)
        keys.existing.add("valid")
        keys.gate.clear()
        keys.waiting.clear()
        pending = asyncio.create_task(cache.get("valid"))
        await keys.waiting.wait()
        cache.expire_all()
        keys.gate.set()
        assert await pending == "VALID"
        assert not cache.needs_load("valid")  # kept, stale
        loads = keys.loads
        assert await cache.get("valid") == "VALID"  # served; its refresh started
        await asyncio.sleep(0)
        assert keys.loads == loads + 1

    asyncio.run(go())


def test_a_get_after_an_invalidation_does_not_share_the_load_it_made_outdated(monkeypatch):
    """A key revoked while its lookup is under way: a request that comes after the change
    stream said so must not get that lookup's answer (read before the revocation), nor
    may the outdated load's end forget the new one."""
    async def go():
        cache, keys, _ = miss_cache(monkeypatch)
        keys.existing.add("key")
        keys.gate.clear()
        first = asyncio.create_task(cache.get("key"))
        await keys.waiting.wait()  # the query has read: the key exists
        keys.existing.discard("key")  # revoked
        cache.invalidate("key")  # the change stream says so
        assert cache.needs_load("key")
        keys.waiting.clear()
        later = asyncio.create_task(cache.get("key"))
        await keys.waiting.wait()  # a query of its own, after the revocation
        keys.gate.set()
        assert await first == "KEY"  # came before the revocation
        assert await later is None
        assert keys.loads == 2
        assert await cache.get("key") is None and keys.loads == 2  # the new answer is kept

    asyncio.run(go())
