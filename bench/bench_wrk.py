#!/usr/bin/env python3
"""Proxy cost side by side, measured with wrk: direct, bare mitmdump, and our proxy.

    uv run bench/bench_wrk.py [--seconds 10] [--concurrency 1 16 64] [--long 50 100 200]
                              [--targets NAME ...] [--profile DIR]

One run, every process real and pinned with ``taskset``: the load generator (``wrk``,
a Lua script for the POST body and key) and the upstream (bench/sse_upstream.py: an
OpenAI chat stream of 20 content events + usage + ``[DONE]``) on core 0; the proxy under
test and the embedded database on core 1. Targets:

- direct: wrk against the upstream;
- bare mitmdump: reverse mode, lazy connections, every response streamed
  (``flow.response.stream = True``, bench/stream_all.py);
- ours, include_usage: all features on (key auth, a plan with a blocking monthly quota
  and a TPM limit, both far away, metering, events into the embedded database); the
  client asked for usage;
- ours, hidden usage: the same, the client did not ask (the proxy injects the option
  and hides the usage event — the common case).
- ours, 2 workers: include_usage, ``scripts/serve.py --workers 2`` (SO_REUSEPORT) on both
  cores (the load generator and upstream share core 0 with one of them); CPU is the
  two workers' sum;
- ours + a portal tab: include_usage while a browser-like client, logged in to the portal
  as the admin, loads the usage page (SVG charts and table) once a second.

CPU per request is read from ``/proc/<pid>/stat`` (user + system, all threads) of the
proxy and of the database, before and after each row, divided by the requests wrk
completed. ``--long`` runs the long-stream scenario (50 tokens 20 ms apart, about 1 s per
response) at those concurrencies. ``--profile DIR`` records a py-spy profile of our
proxy during each of its rows (py-spy must be on PATH). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

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
tokens_per_minute = 1000000000
overage = "blocked"
"""
LOAD_CPU, PROXY_CPU = "0", "1"
TICKS = os.sysconf("SC_CLK_TCK")
LONG_STREAM = {"x-bench-chunks": "50", "x-bench-delay-ms": "20"}
TWO_WORKERS = "ours, 2 workers"
PORTAL_TAB = "ours, include_usage + a portal tab polling usage 1/s"
ADMIN = ("admin@llm-gateway.io", "bench-admin-password-1")  # LLM_BILLING_ADMIN_PASSWORD


def body(include_usage: bool) -> str:
    request = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 50,
               "messages": [{"role": "user", "content": "Say hello"}]}
    if include_usage:
        request["stream_options"] = {"include_usage": True}
    return json.dumps(request)


def lua_script(path: Path, payload: str, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(payload)}",
             'wrk.headers["Content-Type"] = "application/json"',
             f'wrk.headers["Authorization"] = "Bearer {TOKEN}"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def spawn(args: list[str], log: Path, cpus: str, env: dict | None = None) -> subprocess.Popen:
    with log.open("wb") as f:
        return subprocess.Popen(["taskset", "-c", cpus, *args], stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def pin(pid: int, cpus: str) -> None:
    """Pin every thread of a running process (taskset -a)."""
    subprocess.run(["taskset", "-a", "-cp", cpus, str(pid)], check=True,
                   stdout=subprocess.DEVNULL)


def cpu_seconds(pid: int | list[int] | None) -> float:
    if pid is None:
        return 0.0
    if isinstance(pid, list):
        return sum(cpu_seconds(p) for p in pid)
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


class Backend(NamedTuple):
    """What every bench run starts before its proxies: the upstream (on the load core),
    the embedded database (pinned to the proxy's core) holding the bench key and user, and
    a config routing to that upstream."""

    processes: list[subprocess.Popen]  # the upstream; the proxies are added by the run
    upstream: str
    upstream_port: int
    mongo_uri: str
    database: subprocess.Popen | None
    config: Path


def start_backend(tmp: Path) -> Backend:
    up_port = free_port()
    upstream = spawn([sys.executable, str(ROOT / "bench/sse_upstream.py"), "--port",
                      str(up_port)], tmp / "upstream.log", LOAD_CPU)
    mongo_uri, database = start_embedded_db(tmp / "db", free_port())
    if database is not None:
        pin(database.pid, PROXY_CPU)
    with MongoClient(mongo_uri) as db:
        db.cgc.api_keys.insert_one({"secret": hashlib.sha256(TOKEN.encode()).hexdigest(),
                                    "access_level": "COMPLETION", "user_id": "bench",
                                    "date_expiry": None})
        db.billing.users.insert_one({"_id": "bench", "plan": "bench"})
    url = f"http://127.0.0.1:{up_port}"
    config = write_config(tmp / "config.toml", url, "http://127.0.0.1:9", BENCH_PLAN)
    return Backend([upstream], url, up_port, mongo_uri, database, config)


def stop_all(processes: list[subprocess.Popen], database: subprocess.Popen | None,
             timeout: float = 10) -> None:
    """Stop the proxies and the upstream, then the database (after their last writes)."""
    for p in processes:
        p.terminate()
    for p in processes:
        p.wait(timeout)
    if database is not None:
        database.terminate()


def wrk(url: str, script: Path, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s",
         "--latency", "--timeout", "30s", "-s", str(script), url],
        check=True, capture_output=True, text=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad or errors:
        print(f"  ! {url}: {bad.group(0) if bad else ''} {errors.group(0) if errors else ''}",
              file=sys.stderr)

    def latency(q: str) -> float:
        value, unit = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"requests": requests, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)",
                                                          out).group(1)),
            "p50": latency("50"), "p99": latency("99")}


class Target:
    def __init__(self, name: str, url: str, script: Path, proxy: int | list[int] | None,
                 database: int | None, portal: str | None = None) -> None:
        self.name, self.url, self.script = name, url, script
        self.proxy, self.database = proxy, database
        self.portal = portal  # a base URL: a browser tab polls its usage page meanwhile


def portal_tab(base: str) -> httpx.Client:
    """A browser tab logged in as the admin (the login's argon2 hash before the clock)."""
    browser = httpx.Client(base_url=base, timeout=30)
    login = browser.get("/portal/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
    assert csrf, login.text
    response = browser.post("/portal/login", data={
        "csrf": csrf.group(1), "email": ADMIN[0], "password": ADMIN[1]})
    assert response.status_code == 303, response.text
    return browser


def poll_usage(browser: httpx.Client, stop: threading.Event, pages: list[int]) -> None:
    """Reload the usage page (charts and table) once a second until stopped."""
    try:
        while not stop.is_set():
            page = browser.get("/portal/usage")
            assert page.status_code == 200 and "<svg" in page.text, page.status_code
            pages.append(1)
            stop.wait(1.0)
    finally:
        browser.close()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def measure(target: Target, connections: int, seconds: float, profile: Path | None,
            label: str) -> str:
    spy = None
    if profile is not None and isinstance(target.proxy, int):
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(target.proxy), "--rate", "200",
                                "--format", "raw", "--output", str(profile / f"{label}.txt"),
                                "--duration", str(int(seconds))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pages: list[int] = []
    stop = threading.Event()
    tab = threading.Thread(target=poll_usage, args=(portal_tab(target.portal), stop, pages)) \
        if target.portal else None
    if tab is not None:
        tab.start()
    before = cpu_seconds(target.proxy), cpu_seconds(target.database)
    r = wrk(target.url, target.script, connections, seconds)
    after = cpu_seconds(target.proxy), cpu_seconds(target.database)
    stop.set()
    if tab is not None:
        tab.join()
    if spy is not None:
        spy.wait()
    proxy_ms = (after[0] - before[0]) * 1000 / max(r["requests"], 1)
    db_ms = (after[1] - before[1]) * 1000 / max(r["requests"], 1)
    cpu = f"{proxy_ms:.2f}" if target.proxy else "-"
    cpu_db = f"{db_ms:.2f}" if target.database else "-"
    busy = (after[0] - before[0]) / seconds * 100
    if spy is not None:
        (profile / f"{label}.requests").write_text(str(r["requests"]))
    name = f"{target.name} ({len(pages)} pages)" if target.portal else target.name
    return (f"| {name} | {connections} | {r['rps']:.0f} | {r['p50']:.1f} | "
            f"{r['p99']:.1f} | {cpu} | {cpu_db} | {busy:.0f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--long", type=int, nargs="*", default=[50, 100, 200])
    parser.add_argument("--targets", nargs="*", help="only these targets (names as printed)")
    parser.add_argument("--profile", type=Path, help="write py-spy profiles of our proxy here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    mitmdump = str(Path(sys.executable).with_name("mitmdump"))
    bare_port, ours_port = free_port(), free_port()
    backend = start_backend(tmp)
    procs, upstream, up_port = backend.processes, backend.upstream, backend.upstream_port
    mongo_uri, db_process, config = backend.mongo_uri, backend.database, backend.config
    db_pid = db_process.pid if db_process is not None else None
    with MongoClient(mongo_uri) as db:
        events_before = db.billing.events_completion.count_documents({"user_id": "bench"})
    bare = spawn([mitmdump, "-q", "--mode", f"reverse:{upstream}", "-p", str(bare_port),
                  "--set", "connection_strategy=lazy", "-s", str(ROOT / "bench/stream_all.py")],
                 tmp / "bare.log", PROXY_CPU)
    ours = spawn([mitmdump, "-q", "-s", str(ROOT / "addons/llm_billing_proxy.py"),
                  "-p", str(ours_port), "--set", f"billing_config={config}",
                  "--set", f"billing_data_dir={tmp}"], tmp / "ours.log", PROXY_CPU,
                 {"MONGODB_URI": mongo_uri, "FAKE_OPENAI_KEY": "sk-bench",
                  "LLM_BILLING_ADMIN_PASSWORD": ADMIN[1]})
    procs += [bare, ours]
    two_workers = None
    if not args.targets or TWO_WORKERS in args.targets:
        two_port = free_port()
        two_workers = spawn([sys.executable, str(ROOT / "scripts/serve.py"), "--workers", "2",
                             "-p", str(two_port), "--data-dir", str(tmp / "serve"), "-q",
                             "--set", f"billing_config={config}"], tmp / "serve.log", "0,1",
                            {"MONGODB_URI": mongo_uri, "FAKE_OPENAI_KEY": "sk-bench",
                             "LLM_BILLING_ADMIN_PASSWORD": ADMIN[1]})  # whichever is first
        procs.append(two_workers)
    try:
        for port in (up_port, bare_port, ours_port):
            wait_for_port(port)
        if two_workers is not None:
            wait_for_port(two_port, 60)  # the listener opens once a worker is running
        time.sleep(2)  # let our addons finish starting (database client, mode switch)
        # serve.py's children: the workers (the database is the bench's own)
        workers = [int(p) for p in Path(f"/proc/{two_workers.pid}/task/{two_workers.pid}"
                                        "/children").read_text().split()] \
            if two_workers is not None else []
        path = "/v1/chat/completions"

        def targets(headers: dict[str, str]) -> list[Target]:
            asked = lua_script(tmp / f"asked{len(headers)}.lua", body(True), headers)
            hidden = lua_script(tmp / f"hidden{len(headers)}.lua", body(False), headers)
            every = [Target("direct", upstream + path, asked, None, None),
                     Target("bare mitmdump (stream)", f"http://127.0.0.1:{bare_port}{path}",
                            asked, bare.pid, None),
                     Target("ours, include_usage", f"http://127.0.0.1:{ours_port}{path}",
                            asked, ours.pid, db_pid),
                     Target("ours, hidden usage", f"http://127.0.0.1:{ours_port}{path}",
                            hidden, ours.pid, db_pid),
                     Target(PORTAL_TAB, f"http://127.0.0.1:{ours_port}{path}", asked,
                            ours.pid, db_pid, portal=f"http://127.0.0.1:{ours_port}")]
            if two_workers is not None:
                every.append(Target(TWO_WORKERS, f"http://127.0.0.1:{two_port}{path}", asked,
                                    workers, db_pid))
            return [t for t in every if not args.targets or t.name in args.targets]

        header = ("| target | connections | req/s | p50 ms | p99 ms | proxy CPU ms/req | "
                  "database CPU ms/req | proxy CPU busy |\n"
                  "|---|---:|---:|---:|---:|---:|---:|---:|")
        for target in targets({}):  # warm up: connections, caches, JIT-free but lazy imports
            wrk(target.url, target.script, 4, 2)
        if args.concurrency:
            print("Short streams (20 content events + usage + [DONE]):\n\n" + header)
            for connections in args.concurrency:
                for target in targets({}):
                    print(measure(target, connections, args.seconds, args.profile,
                                  f"short-{connections}-{slug(target.name)}"),
                          flush=True)
        if args.long:
            print("\nLong streams (50 events 20 ms apart, ~1 s per response):\n\n" + header)
            for connections in args.long:
                for target in targets(LONG_STREAM):
                    print(measure(target, connections, args.seconds, args.profile,
                                  f"long-{connections}-{slug(target.name)}"),
                          flush=True)
        time.sleep(2)
        with MongoClient(mongo_uri) as db:
            events = db.billing.events_completion.count_documents({"user_id": "bench"})
        print(f"\nevents stored for our proxy's requests: {events - events_before}")
    finally:
        stop_all(procs, db_process)


if __name__ == "__main__":
    main()
