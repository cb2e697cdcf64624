#!/usr/bin/env python3
"""Our proxy's memory (RSS) across many requests and across one very long stream.

    uv run bench/bench_memory.py [--requests 100000] [--every 5000] [--connections 16]
                                 [--stream-bytes 1000000000] [--skip-requests] [--skip-stream]

Processes as in bench/bench_wrk.py (its helpers are imported): the fast upstream
(bench/sse_upstream.py) and the load generator on core 0, our proxy with all features on
(key auth, a plan with a blocking quota and TPM, metering, events into the embedded
database) and the database on core 1.

- Requests: ``--requests`` short streams (20 content events + usage + ``[DONE]``) by
  ``wrk`` in runs of ``--every`` requests (a Lua counter stops each run), alternately
  include_usage and hidden usage; the proxy's and the database's ``VmRSS``
  (``/proc/<pid>/status``) after each run. The first run is the warm-up: the change is
  measured from its sample.
- Stream: one response of ``--stream-bytes`` through the proxy (the upstream's
  ``x-bench-bytes``), read by ``curl -N`` as fast as it can, once with include_usage
  (the meter only parses) and once with hidden usage (the meter edits the stream); the
  proxy's RSS every 0.5 s. Checks that the stored event bills the upstream's completion
  tokens (its ``x-bench-completion-tokens`` header).

Prints Markdown tables. Flat means within ±10 % of the starting value.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pymongo import MongoClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wrk import (
    LOAD_CPU,
    PROXY_CPU,
    ROOT,
    TOKEN,
    body,
    free_port,
    lua_script,
    spawn,
    start_backend,
    stop_all,
    wait_for_port,
)

PATH = "/v1/chat/completions"
FLAT = 0.10


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def change(first: float, last: float) -> str:
    return f"{(last - first) * 100 / first:+.1f} %"


class Sampler(threading.Thread):
    """The RSS of ``pid`` every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(rss_kib(self.pid))
            self._stop_event.wait(self.interval)

    def stop(self) -> list[int]:
        self._stop_event.set()
        self.join()
        self.samples.append(rss_kib(self.pid))
        return self.samples


STOPPED = "bench: stopped"


def counting_script(path: Path, payload: str, stop_after: int) -> Path:
    """bench_wrk's request script, plus a counter that stops wrk's thread after that many
    responses (run with one thread) and says so: wrk itself sleeps its whole duration
    unless interrupted (SIGINT ends it early, with its summary)."""
    lua_script(path, payload, {})
    with path.open("a") as f:
        f.write(f"done = 0\nfunction response(status, headers, body)\n  done = done + 1\n"
                f"  if done == {stop_after} then\n    wrk.thread:stop()\n"
                f'    io.write("{STOPPED}\\n")\n    io.flush()\n  end\nend\n')
    return path


def wrk_run(url: str, script: Path, connections: int) -> tuple[int, str]:
    wrk = subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", "-d3600s",
         "--timeout", "30s", "-s", str(script), url], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in wrk.stdout:
        lines.append(line)
        if line.startswith(STOPPED):
            wrk.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + wrk.stdout.read()
    if wrk.wait() != 0:
        raise RuntimeError(f"wrk failed: {out}")
    problems = " ".join(m.group(0) for m in re.finditer(
        r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)", out))
    return int(re.search(r"(\d+) requests in", out).group(1)), problems


def events_stored(mongo_uri: str) -> int:
    """Every event is the bench user's. (count_documents fails on the embedded database
    past ~100k documents: its aggregation's materialization budget.)"""
    with MongoClient(mongo_uri) as db:
        return db.billing.events_completion.estimated_document_count()


def requests_scenario(url: str, tmp: Path, proxy: int, database: int | None, mongo_uri: str,
                      total: int, every: int, connections: int) -> None:
    scripts = [counting_script(tmp / "asked.lua", body(True), every),
               counting_script(tmp / "hidden.lua", body(False), every)]
    before = events_stored(mongo_uri)
    print(f"Requests: {total:,} short streams, {connections} connections, runs of {every:,} "
          "alternating include_usage / hidden usage\n\n"
          "| requests | proxy RSS MiB | database RSS MiB | seconds |\n|---:|---:|---:|---:|",
          flush=True)
    print(f"| 0 | {mib(rss_kib(proxy))} | {mib(rss_kib(database)) if database else '-'} | 0 |",
          flush=True)
    done, run, proxy_rss, db_rss, start = 0, 0, [], [], time.monotonic()
    sampler = Sampler(proxy, 0.5)
    sampler.start()
    while done < total:
        count, problems = wrk_run(url, scripts[run % 2], connections)
        done, run = done + count, run + 1
        proxy_rss.append(rss_kib(proxy))
        db_rss.append(rss_kib(database) if database else 0)
        print(f"| {done:,} | {mib(proxy_rss[-1])} | {mib(db_rss[-1]) if database else '-'} | "
              f"{time.monotonic() - start:.0f} |" + (f" {problems}" if problems else ""),
              flush=True)
    peak = max(sampler.stop())
    time.sleep(3)  # the event writer's last batch
    stored = events_stored(mongo_uri) - before
    warm, after = proxy_rss[0], proxy_rss[1:] or proxy_rss
    print(f"\nproxy RSS after the warm-up {mib(warm)} MiB, at the end {mib(after[-1])} MiB "
          f"({change(warm, after[-1])}), highest sample after the warm-up "
          f"{mib(max(after))} MiB ({change(warm, max(after))}), highest every 0.5 s "
          f"{mib(peak)} MiB; flat (±{FLAT:.0%}): "
          f"{'yes' if max(abs(r - warm) for r in after) <= FLAT * warm else 'NO'}")
    if database:
        print(f"database RSS after the warm-up {mib(db_rss[0])} MiB, at the end "
              f"{mib(db_rss[-1])} MiB ({change(db_rss[0], db_rss[-1])})")
    print(f"events stored: {stored:,} of {done:,} requests\n", flush=True)


def long_event(mongo_uri: str, seen: set, timeout: float = 30) -> dict | None:
    """The event of the stream just read: the one long request not seen before (a scan
    with a filter, no sort: the embedded database would materialize a sort)."""
    deadline = time.monotonic() + timeout
    with MongoClient(mongo_uri) as db:
        while time.monotonic() < deadline:
            for event in db.billing.events_completion.find({"duration_ms": {"$gt": 1000}}):
                if event["_id"] not in seen:
                    seen.add(event["_id"])
                    return event
            time.sleep(0.5)
    return None


def stream_scenario(url: str, tmp: Path, proxy: int, mongo_uri: str, size: int) -> None:
    print(f"Stream: one response of {size:,} bytes of events, curl -N reading\n\n"
          "| client asked | bytes to client | seconds | MB/s | proxy RSS MiB: start | max | "
          "end | max change | billed completion tokens | upstream's | correct |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    seen: set = set()
    for asked in (True, False):
        headers = tmp / "stream-headers.txt"
        start_rss = rss_kib(proxy)
        sampler = Sampler(proxy, 0.5)
        sampler.start()
        started = time.monotonic()
        out = subprocess.run(
            ["taskset", "-c", LOAD_CPU, "curl", "-sSN", "-o", "/dev/null", "-D", str(headers),
             "-w", "%{size_download}", "-H", f"Authorization: Bearer {TOKEN}",
             "-H", "Content-Type: application/json", "-H", f"x-bench-bytes: {size}",
             "--data-binary", body(asked), url],
            check=True, capture_output=True, text=True).stdout
        seconds = time.monotonic() - started
        samples = sampler.stop()
        received = int(out)
        upstream = int(re.search(r"x-bench-completion-tokens: (\d+)",
                                 headers.read_text(), re.I).group(1))
        event = long_event(mongo_uri, seen)
        billed = (event or {}).get("usage", {}).get("completion_tokens")
        estimated = (event or {}).get("usage_estimated")
        ok = billed == upstream and not estimated
        top = max(samples)
        print(f"| {'include_usage' if asked else 'no (hidden usage)'} | {received:,} | "
              f"{seconds:.1f} | {received / seconds / 1e6:.0f} | {mib(start_rss)} | "
              f"{mib(top)} | {mib(samples[-1])} | {change(start_rss, top)} | "
              f"{billed if billed is not None else 'no event'} | {upstream} | "
              f"{'yes' if ok else 'NO'}{' (estimated)' if estimated else ''} |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=5_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--stream-bytes", type=int, default=1_000_000_000)
    parser.add_argument("--skip-requests", action="store_true")
    parser.add_argument("--skip-stream", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("curl") is None:
        sys.exit("needs wrk and curl (Debian: apt-get install wrk curl)")

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    mitmdump = str(Path(sys.executable).with_name("mitmdump"))
    ours_port = free_port()
    backend = start_backend(tmp)
    procs, up_port = backend.processes, backend.upstream_port
    mongo_uri, db_process, config = backend.mongo_uri, backend.database, backend.config
    db_pid = db_process.pid if db_process is not None else None
    ours = spawn([mitmdump, "-q", "-s", str(ROOT / "addons/llm_billing_proxy.py"),
                  "-p", str(ours_port), "--set", f"billing_config={config}",
                  "--set", f"billing_data_dir={tmp}"], tmp / "ours.log", PROXY_CPU,
                 {"MONGODB_URI": mongo_uri, "FAKE_OPENAI_KEY": "sk-bench"})
    procs.append(ours)
    url = f"http://127.0.0.1:{ours_port}{PATH}"
    try:
        for port in (up_port, ours_port):
            wait_for_port(port)
        time.sleep(2)  # let our addons finish starting (database client, mode switch)
        if not args.skip_requests:
            requests_scenario(url, tmp, ours.pid, db_pid, mongo_uri, args.requests,
                              args.every, args.connections)
        if not args.skip_stream:
            stream_scenario(url, tmp, ours.pid, mongo_uri, args.stream_bytes)
    finally:
        stop_all(procs, db_process)


if __name__ == "__main__":
    main()
