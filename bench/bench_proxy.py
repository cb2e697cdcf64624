#!/usr/bin/env python3
"""Proxy overhead on loopback: direct vs bare mitmdump (reverse) vs our addons, with plan
limits on and off.

    uv run bench/bench_proxy.py [--seconds 8] [--concurrency 1 16]

Every process is real: the fake streaming upstream (OpenAI chat SSE, 11 events), bare
mitmdump, mitmdump with the billing addons on the embedded database (twice: limits on —
the user's plan has a monthly quota that blocks and a TPM limit, both far away — and
``--set limits=false``), and this load generator (httpx, HTTP/1.1 keep-alive). A last row
repeats "limits on" while a browser-like client, logged in to the portal as the admin,
loads the usage page (charts and table) once a second. Prints a Markdown table:
requests/s, p50/p99 latency and p50/p99 time to first byte.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from pymongo import MongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT / "tests")]

from conftest import free_port, wait_for_port, write_config  # noqa: E402
from llm_billing.storage.embedded_db import start_embedded_db  # noqa: E402

TOKEN = "bench-token"
BENCH_PLAN = """
[plans.bench]
monthly_tokens = 1000000000
tokens_per_minute = 100000000
overage = "blocked"
"""
ADMIN = ("admin@llm-gateway.io", "bench-admin-password-1")  # set by LLM_BILLING_ADMIN_PASSWORD
BODY = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 9,
        "messages": [{"role": "user", "content": "Say hello"}]}


def spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("wb") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})


async def one(client: httpx.AsyncClient, url: str) -> tuple[float, float]:
    start = time.perf_counter()
    async with client.stream("POST", url, json=BODY,
                             headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        ttfb = None
        async for _ in response.aiter_raw():
            if ttfb is None:
                ttfb = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}")
    return time.perf_counter() - start, ttfb or 0.0


async def poll_portal(base: str, deadline: float) -> int:
    """A browser tab on the usage page, reloaded once a second: pages served."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as browser:
        login = await browser.get("/portal/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
        assert csrf, login.text
        response = await browser.post("/portal/login", data={
            "csrf": csrf.group(1), "email": ADMIN[0], "password": ADMIN[1]})
        assert response.status_code == 303, response.text
        pages = 0
        while time.perf_counter() < deadline:
            page = await browser.get("/portal/usage")
            assert page.status_code == 200 and "<svg" in page.text, page.status_code
            pages += 1
            await asyncio.sleep(1.0)
        return pages


async def load(url: str, concurrency: int, seconds: float,
               portal: str | None = None) -> dict[str, float]:
    latencies: list[float] = []
    ttfbs: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        for _ in range(3):  # warm up connections and caches
            await one(client, url)
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                latency, ttfb = await one(client, url)
                latencies.append(latency)
                ttfbs.append(ttfb)

        start = time.perf_counter()
        pollers = [poll_portal(portal, deadline)] if portal else []
        results = await asyncio.gather(*(worker() for _ in range(concurrency)), *pollers)
        pages = results[-1] if portal else 0
        elapsed = time.perf_counter() - start

    def pct(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100)[q - 1] * 1000

    return {"rps": len(latencies) / elapsed, "p50": pct(latencies, 50), "pages": pages,
            "p99": pct(latencies, 99), "ttfb50": pct(ttfbs, 50), "ttfb99": pct(ttfbs, 99),
            "n": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    mitmdump = str(Path(sys.executable).with_name("mitmdump"))
    up_port, bare_port, ours_port, off_port = free_port(), free_port(), free_port(), free_port()
    procs = [spawn([sys.executable, str(ROOT / "tests/fake_upstream.py"), "--port",
                    str(up_port)], tmp / "upstream.log")]
    mongo_uri, db_process = start_embedded_db(tmp / "db", free_port())
    with MongoClient(mongo_uri) as db:
        db.cgc.api_keys.insert_one({"secret": hashlib.sha256(TOKEN.encode()).hexdigest(),
                                    "access_level": "COMPLETION", "user_id": "bench",
                                    "date_expiry": None})
        db.billing.users.insert_one({"_id": "bench", "plan": "bench"})
    upstream = f"http://127.0.0.1:{up_port}"
    config = write_config(tmp / "config.toml", upstream, "http://127.0.0.1:9", BENCH_PLAN)
    procs.append(spawn([mitmdump, "-q", "--mode", f"reverse:{upstream}", "-p", str(bare_port),
                        "--set", "connection_strategy=lazy"], tmp / "bare.log"))
    for port, extra in ((ours_port, []), (off_port, ["--set", "limits=false"])):
        procs.append(spawn([mitmdump, "-q", "-s", str(ROOT / "addons/llm_billing_proxy.py"),
                            "-p", str(port), "--set", f"billing_config={config}",
                            "--set", f"billing_data_dir={tmp}", *extra], tmp / f"{port}.log",
                           {"MONGODB_URI": mongo_uri, "FAKE_OPENAI_KEY": "sk-bench",
                            "LLM_BILLING_ADMIN_PASSWORD": ADMIN[1]}))
    try:
        for port in (up_port, bare_port, ours_port, off_port):
            wait_for_port(port)
        time.sleep(2)  # let our addons finish starting (database client, mode switch)
        ours = f"http://127.0.0.1:{ours_port}"
        targets = {"direct": (upstream, None), "bare mitmdump": (
                       f"http://127.0.0.1:{bare_port}", None),
                   "llm-billing-proxy, limits off": (f"http://127.0.0.1:{off_port}", None),
                   "llm-billing-proxy, limits on": (ours, None),
                   "limits on + a portal tab polling usage 1/s": (ours, ours)}
        print("| target | concurrency | req/s | p50 ms | p99 ms | TTFB p50 ms | TTFB p99 ms |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for concurrency in args.concurrency:
            for name, (base, portal) in targets.items():
                r = asyncio.run(load(f"{base}/v1/chat/completions", concurrency, args.seconds,
                                     portal))
                name += f" ({r['pages']} pages)" if portal else ""
                print(f"| {name} | {concurrency} | {r['rps']:.0f} | {r['p50']:.1f} | "
                      f"{r['p99']:.1f} | {r['ttfb50']:.1f} | {r['ttfb99']:.1f} |", flush=True)
        with MongoClient(mongo_uri) as db:
            time.sleep(1)
            events = db.billing.events_completion.count_documents({"user_id": "bench"})
        print(f"\nevents stored for the proxied requests: {events}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        if db_process is not None:
            db_process.terminate()


if __name__ == "__main__":
    main()
