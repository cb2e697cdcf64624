"""The refreshing cache's bounds: least recently used entries go first, one at a time, and
misses never push out hits."""

from __future__ import annotations

import asyncio

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
