#!/usr/bin/env python3
"""The usage page's and the events page's queries, before and after the proxy's indexes.

    uv run bench/bench_portal_queries.py [--rollups 50000] [--events 50000] [--uri URI]

Fills ``billing.usage_daily`` with rollups of ``--users`` users over several months and
``billing.events_completion`` with events, then times (median of 5) the usage page's query
for one user's month (``usage_rows``) and the events page's list of one user's newest 200,
first with no index, then after ``indexes.ensure``. Uses a fresh embedded mongoeco server
unless ``--uri`` names another database server (whose billing collections it drops).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT / "tests")]

from conftest import free_port  # noqa: E402
from llm_billing.storage import indexes  # noqa: E402
from llm_billing.storage.embedded_db import start_embedded_db  # noqa: E402
from llm_billing.web.portal.usage import usage_rows  # noqa: E402

MODELS = ("m-a", "m-b", "m-c", "m-d")


async def fill(client: AsyncMongoClient, rollups: int, events: int, users: int) -> None:
    billing = client.billing
    await billing.usage_daily.drop()
    await billing.events_completion.drop()
    start = datetime(2025, 1, 1, tzinfo=UTC)
    batch = []
    for i in range(rollups):  # user, then model, then day: 4 models x days per user
        user, rest = divmod(i, rollups // users)
        model, day = MODELS[rest % len(MODELS)], start + timedelta(days=rest // len(MODELS))
        text = day.strftime("%Y-%m-%d")
        batch.append({"_id": f"u{user}:{text}:{model}", "user_id": f"u{user}", "day": text,
                      "model": model, "requests": 3, "tokens_billed": 30,
                      "tokens": {"prompt_tokens": 20, "completion_tokens": 10}})
        if len(batch) == 1000:
            await billing.usage_daily.insert_many(batch)
            batch = []
            if (i + 1) % 10_000 == 0:
                print(f"  {i + 1} rollups", flush=True)
    if batch:
        await billing.usage_daily.insert_many(batch)
    batch = []
    for i in range(events):
        batch.append({"user_id": f"u{i % users}", "model": MODELS[i % len(MODELS)],
                      "date_created": start + timedelta(minutes=i), "prompt_n": 20,
                      "completion_n": 10, "tokens_billed": 30, "path": "/v1/chat/completions"})
        if len(batch) == 1000:
            await billing.events_completion.insert_many(batch)
            batch = []
    if batch:
        await billing.events_completion.insert_many(batch)


async def median_ms(make, repeat: int = 5) -> tuple[float, int]:
    times, count = [], 0
    for _ in range(repeat):
        began = time.perf_counter()
        count = await make()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), count


async def measure(client: AsyncMongoClient, label: str) -> None:
    async def usage_page() -> int:
        rows, _ = await usage_rows(client, "u7", "2025-02")
        return len(rows)

    async def events_page() -> int:
        cursor = client.billing.events_completion.find({"user_id": "u7"}).sort(
            "date_created", -1).limit(200)
        return len(await cursor.to_list())

    for name, make in (("usage page, one user's month", usage_page),
                       ("events page, one user's newest 200", events_page)):
        ms, count = await median_ms(make)
        print(f"{label:>10}  {name:<36} {ms:8.1f} ms  ({count} rows)", flush=True)


async def main(uri: str, rollups: int, events: int, users: int) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    began = time.perf_counter()
    await fill(client, rollups, events, users)
    print(f"filled {rollups} rollups and {events} events of {users} users in "
          f"{time.perf_counter() - began:.0f}s", flush=True)
    await measure(client, "no index")
    began = time.perf_counter()
    await indexes.ensure(client)
    print(f"indexes.ensure took {(time.perf_counter() - began) * 1000:.0f} ms", flush=True)
    await measure(client, "indexed")
    await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollups", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--uri", default="")
    args = parser.parse_args()
    process = None
    uri = args.uri
    if not uri:
        uri, process = start_embedded_db(Path(tempfile.mkdtemp()), free_port())
    try:
        asyncio.run(main(uri, args.rollups, args.events, args.users))
    finally:
        if process is not None:
            process.terminate()
