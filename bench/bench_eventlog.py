#!/usr/bin/env python3
"""CPU the embedded database spends per billed event, as the collection grows to 100k.

    uv run bench/bench_eventlog.py [--events 100000] [--rate 150] [--seconds 5]

Drives the embedded mongoeco server over the wire with the proxy's own background writers
at ``--rate`` billed requests per second: ``EventLog.write`` every 250 ms (the events of
that window: insert + daily rollup; event_flush_interval_ms), the usage ledger's flush
every 500 ms, the keys' last use every 2 s and a health ping every 2 s. CPU is read from
``/proc`` of the database process (user + system), so other load on the machine barely matters; each
collection size is filled in big batches first. Also reports the database's CPU per
document for lone inserts and for batches of 500. With ``--stock`` it runs mongoeco's
unpatched engine instead (it rescans the collection on every insert: stop it early).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from bson import Decimal128, ObjectId
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT / "tests")]

from conftest import free_port, wait_for_port  # noqa: E402
from llm_billing.core.plans import Plan  # noqa: E402
from llm_billing.core.usage import Usage  # noqa: E402
from llm_billing.eventlog import EventLog  # noqa: E402
from llm_billing.storage.embedded_db import start_embedded_db, uri_for  # noqa: E402
from llm_billing.storage.last_used import KeysLastUsed  # noqa: E402
from llm_billing.storage.ledger import QuotaLedger  # noqa: E402

STOCK_SERVER = """
import asyncio, sys
from mongoeco.engines.sqlite import SQLiteEngine
from mongoeco.wire import AsyncMongoEcoProxyServer
async def main():
    async with AsyncMongoEcoProxyServer(engine=SQLiteEngine(sys.argv[1]), port=int(sys.argv[2])):
        await asyncio.Event().wait()
asyncio.run(main())
"""
TICKS = os.sysconf("SC_CLK_TCK")
PLAN = Plan("bench", "Bench", Decimal(0), 10**12, 0, "blocked")
KEY_ID = ObjectId()
USAGE = Usage(prompt_tokens=9, completion_tokens=20)


class Database:
    def __init__(self, uri: str) -> None:
        self._client = AsyncMongoClient(uri, tz_aware=True)

    async def client(self) -> AsyncMongoClient:
        return self._client


def event(user_id: str = "bench") -> dict:
    """A completion event as the proxy stores it (the shape of a real one)."""
    return {"_id": ObjectId(), "date_created": datetime.now(UTC), "user_id": user_id,
            "api_key_id": KEY_ID, "backend": "fake-openai", "path": "/v1/chat/completions",
            "model": "gpt-4o-mini", "plan_id": "bench", "status": 200, "stream": True,
            "duration_ms": 40, "prompt_n": 9, "completion_n": 20,
            "usage": USAGE.as_document(), "usage_estimated": False, "complete": True,
            "tokens_billed": 29, "cost": Decimal128("0.00001335"), "currency": "USD",
            "price": {"input": "0.15", "output": "0.60", "cache_read": "0.075"},
            "price_version": "bench", "ledger": {"instance": "bench", "usage": "bench:m",
                                                 "write": 1}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


async def proxy_traffic(database: Database, log: EventLog, rate: int, seconds: float,
                        window: float = 0.25) -> int:
    """The proxy's database writes for ``rate`` billed requests a second, events written
    every ``window`` seconds (event_flush_interval_ms); events sent."""
    ledger = QuotaLedger(database, "bench")  # type: ignore[arg-type]
    last_used = KeysLastUsed(database, 2.0)  # type: ignore[arg-type]
    client = await database.client()
    month = datetime.now(UTC).strftime("%Y-%m")
    sent, tick = 0, 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        batch = [event() for _ in range(round(rate * (elapsed + window)) - sent)]
        for _ in batch:
            account = ledger.account("bench", month, PLAN)
            held = await ledger.reserve(account, 29)
            ledger.settle(account, held, 29, USAGE)
            last_used.note(KEY_ID, datetime.now(UTC))
        await log.write(batch)
        sent += len(batch)
        tick += 1
        if tick % round(0.5 / window) == 0:
            await ledger.flush()
        if tick % round(2 / window) == 0:
            await last_used.flush()
            await client.admin.command("ping")
        await asyncio.sleep(max(0.0, start + tick * window - time.monotonic()))
    await ledger.flush()
    return sent


async def cpu_per_doc(log: EventLog, pid: int, batch: int, docs: int) -> float:
    before = cpu_seconds(pid)
    for _ in range(docs // batch):
        await log.write([event("other") for _ in range(batch)])
    return (cpu_seconds(pid) - before) * 1000 / docs


async def measure(uri: str, pid: int, checkpoints: list[int], rate: int,
                  seconds: float) -> None:
    database = Database(uri)
    log = EventLog(database)  # type: ignore[arg-type]
    try:  # the proxy's indexes, which each insert maintains
        from llm_billing.storage import indexes
        await indexes.ensure(await database.client())
    except ImportError:
        pass
    stored = 0
    print(f"| events stored | database CPU ms/event at {rate} req/s | lone insert ms/doc | "
          "batch of 500 ms/doc |\n|---:|---:|---:|---:|")
    for target in checkpoints:
        while stored < target:  # fill up to the checkpoint, in big batches
            n = min(2000, target - stored)
            await log.write([event("other") for _ in range(n)])
            stored += n
        before = cpu_seconds(pid)
        sent = await proxy_traffic(database, log, rate, seconds)
        traffic = (cpu_seconds(pid) - before) * 1000 / sent
        lone = await cpu_per_doc(log, pid, 1, 200)
        batched = await cpu_per_doc(log, pid, 500, 2000)
        stored += sent + 2200
        print(f"| {target:,} | {traffic:.2f} | {lone:.2f} | {batched:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=150, help="billed requests per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="of traffic per size")
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
    checkpoints = sorted({0, 10_000, args.events} - {x for x in (10_000,)
                                                      if x > args.events})
    try:
        asyncio.run(measure(uri, process.pid, checkpoints, args.rate, args.seconds))
    finally:
        process.terminate()


if __name__ == "__main__":
    main()
