#!/usr/bin/env python3
"""How long the portal's big answers stall the proxy's streams (they share one event loop).

    uv run bench/bench_portal_stall.py [--root TREE...] [--events 50000] [--rollups 20000]

Starts the real mitmdump (from ``--root``, default this tree: point it at a worktree of an
older commit, or several trees, to compare) on a fresh embedded database holding
``--events`` completion events of one user and ``--rollups`` daily rollups of this month
for many users, then
streams a long completion through the proxy (the fake upstream sends a chunk every
``--chunk-delay`` seconds) and, meanwhile, an admin downloads that user's events CSV and
then loads the all-users usage page. Reports the largest gap between two chunks of the
stream during each download, against the largest gap outside them.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pymongo import MongoClient

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE / "addons"), str(HERE / "tests")]

import conftest  # noqa: E402
from fake_upstream import FakeUpstream  # noqa: E402
from llm_billing.storage.embedded_db import start_embedded_db  # noqa: E402
from llm_billing.web.portal.accounts import (  # noqa: E402
    DEFAULT_ADMIN_EMAIL,
    DEFAULT_ADMIN_PASSWORD,
)

NEW_PASSWORD = "correct horse battery staple"
USER = "bench-csv-user"


def fill(db: MongoClient, events: int, rollups: int) -> None:
    now = datetime.now(UTC)
    batch = []
    for i in range(events):
        batch.append({"date_created": now - timedelta(seconds=i), "user_id": USER,
                      "api_key_id": "k", "model": "gpt-4o-mini", "backend": "fake-openai",
                      "path": "/v1/chat/completions", "status": 200, "stream": True,
                      "prompt_n": 20 + i % 7, "completion_n": 100, "tokens_billed": 120,
                      "usage": {"prompt_tokens": 20, "completion_tokens": 100},
                      "usage_estimated": False})
        if len(batch) == 1000:
            db.billing.events_completion.insert_many(batch)
            batch = []
    if batch:
        db.billing.events_completion.insert_many(batch)
    month, batch = now.strftime("%Y-%m"), []
    for i in range(rollups):
        user, day = divmod(i, 28)
        text = f"{month}-{day + 1:02d}"
        batch.append({"_id": f"u{user}:{text}:gpt-4o-mini", "user_id": f"u{user}", "day": text,
                      "model": "gpt-4o-mini", "requests": 3, "tokens_billed": 360,
                      "tokens": {"prompt_tokens": 60, "completion_tokens": 300}})
        if len(batch) == 1000:
            db.billing.usage_daily.insert_many(batch)
            batch = []
    if batch:
        db.billing.usage_daily.insert_many(batch)


def admin_session(url: str, db: MongoClient) -> httpx.Client:
    deadline = time.monotonic() + 30
    while db.billing.portal_accounts.find_one({"role": "admin"}) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client = httpx.Client(base_url=url, timeout=300)

    def csrf(path: str) -> str:
        match = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
        assert match
        return match.group(1)

    for password in (DEFAULT_ADMIN_PASSWORD, NEW_PASSWORD):  # a second run: changed
        if client.post("/portal/login", data={"csrf": csrf("/portal/login"), "password":
                       password, "email": DEFAULT_ADMIN_EMAIL}).status_code == 303:
            break
    client.post("/portal/password", data={"csrf": csrf("/portal/password"),
                                          "current": DEFAULT_ADMIN_PASSWORD,
                                          "new": NEW_PASSWORD, "confirm": NEW_PASSWORD})
    return client


def stream(url: str, token: str, tokens: int, arrivals: list[float],
           started: threading.Event) -> None:
    body = {"model": "gpt-4o-mini", "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "Go on."}]}
    headers = {"authorization": f"Bearer {token}", "x-fake-scenario": "greedy"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=300) as response:
        for _ in response.iter_raw():
            arrivals.append(time.perf_counter())
            started.set()


def largest_gap(arrivals: list[float], start: float, end: float) -> float:
    inside = [t for t in arrivals if start <= t <= end]
    before = [t for t in arrivals if t < start][-1:]
    after = [t for t in arrivals if t > end][:1]
    times = before + inside + after
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def measure(proxy: conftest.Proxy, db: MongoClient, key: conftest.ApiKey,
            args: argparse.Namespace) -> None:
    print(f"proxy from {conftest.ROOT}", flush=True)
    admin = admin_session(proxy.url, db)
    admin.get("/portal/usage")  # templates compiled, connections open
    arrivals: list[float] = []
    started = threading.Event()
    streaming = threading.Thread(target=stream, args=(proxy.url, key.token, args.tokens,
                                                     arrivals, started))
    streaming.start()
    started.wait(60)
    windows = []
    for name, path in (("events CSV", f"/portal/events?user={USER}&format=csv"),
                       ("all-users usage page", "/portal/usage")):
        time.sleep(1.0)
        start = time.perf_counter()
        response = admin.get(path)
        end = time.perf_counter()
        assert response.status_code == 200, response.status_code
        windows.append((name, start, end, len(response.content)))
    streaming.join()
    assert windows[-1][2] < arrivals[-1], "the stream ended first: raise --tokens"
    outside = [t for t in arrivals if not any(s <= t <= e for _, s, e, _ in windows)]
    baseline = max((b - a for a, b in itertools.pairwise(outside)
                    if not any(a < s and b > e for _, s, e, _ in windows)), default=0)
    print(f"stream: {len(arrivals)} reads; largest gap outside the downloads "
          f"{baseline * 1000:.1f} ms")
    for name, start, end, size in windows:
        print(f"{name}: {(end - start) * 1000:.0f} ms, {size} bytes; largest stream gap "
              f"meanwhile {largest_gap(arrivals, start, end) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, nargs="+", default=[HERE])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rollups", type=int, default=20_000)
    parser.add_argument("--chunk-delay", type=float, default=0.002)
    parser.add_argument("--tokens", type=int, default=8000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stall-"))
    uri, database = start_embedded_db(tmp / "db", conftest.free_port())
    upstream = FakeUpstream(chunk_delay=args.chunk_delay).start()
    try:
        db = MongoClient(uri, tz_aware=True)
        began = time.perf_counter()
        fill(db, args.events, args.rollups)
        print(f"{args.events} events, {args.rollups} rollups in "
              f"{time.perf_counter() - began:.0f}s", flush=True)
        config = conftest.write_config(tmp / "config.toml", upstream.url, "http://127.0.0.1:9")
        key = conftest.insert_key(db)
        for root in args.root:
            conftest.ROOT = root.resolve()  # the tree whose proxy runs
            proxy = conftest.start_proxy(tmp, uri, config)
            try:
                measure(proxy, db, key, args)
            finally:
                conftest.stop_proxy(proxy)
    finally:
        upstream.stop()
        if database is not None:
            database.terminate()


if __name__ == "__main__":
    main()
