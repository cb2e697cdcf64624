#!/usr/bin/env python3
"""Event write rate of the embedded database as the collection grows to 100k events.

    uv run bench/bench_eventlog.py [--events 100000]

Writes completion events through ``EventLog.write`` (the proxy's own batching writer)
into the embedded mongoeco server over the wire, and reports single-event and batched
rates at each size. With ``--stock`` it runs mongoeco's unpatched engine instead, which
rescans the collection on every insert (stop it early: it slows down quadratically).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bson import ObjectId
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT / "tests")]

from conftest import free_port, wait_for_port  # noqa: E402
from llm_billing.eventlog import EventLog  # noqa: E402
from llm_billing.storage.embedded_db import start_embedded_db, uri_for  # noqa: E402

STOCK_SERVER = """
import asyncio, sys
from mongoeco.engines.sqlite import SQLiteEngine
from mongoeco.wire import AsyncMongoEcoProxyServer
async def main():
    async with AsyncMongoEcoProxyServer(engine=SQLiteEngine(sys.argv[1]), port=int(sys.argv[2])):
        await asyncio.Event().wait()
asyncio.run(main())
"""


class Database:
    def __init__(self, uri: str) -> None:
        self._client = AsyncMongoClient(uri)

    async def client(self) -> AsyncMongoClient:
        return self._client


def event() -> dict:
    return {"_id": ObjectId(), "date_created": datetime.now(UTC), "user_id": "bench",
            "api_key_id": ObjectId(), "model": "gpt-4o-mini", "prompt_n": 120,
            "completion_n": 340, "usage": {"prompt_tokens": 120, "completion_tokens": 340}}


async def measure(log: EventLog, checkpoints: list[int]) -> None:
    stored = 0
    print("| events stored | single insert/s | batched (500) docs/s |")
    print("|---:|---:|---:|")
    for target in checkpoints:
        while stored < target:  # fill up to the checkpoint, in big batches
            n = min(2000, target - stored)
            await log.write([event() for _ in range(n)])
            stored += n
        start = time.perf_counter()
        for _ in range(200):
            await log.write([event()])
        single = 200 / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(4):
            await log.write([event() for _ in range(500)])
        batched = 2000 / (time.perf_counter() - start)
        stored += 2200
        print(f"| {target:,} | {single:.0f} | {batched:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--stock", action="store_true", help="mongoeco's unpatched engine")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-db-"))
    port = free_port()
    if args.stock:
        process = subprocess.Popen([sys.executable, "-c", STOCK_SERVER,
                                    str(tmp / "stock.sqlite3"), str(port)])
        wait_for_port(port)
        uri = uri_for(port)
    else:
        uri, process = start_embedded_db(tmp, port)
    checkpoints = sorted({0, 1_000, 10_000, 50_000, args.events} - {x for x in
                         (1_000, 10_000, 50_000) if x > args.events})
    try:
        asyncio.run(measure(EventLog(Database(uri)), checkpoints))
    finally:
        process.terminate()


if __name__ == "__main__":
    main()
