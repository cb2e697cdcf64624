#!/usr/bin/env python3
"""Two proxy workers behind SO_REUSEPORT (scripts/serve.py) vs behind HAProxy, long streams.

    uv run bench/bench_balancer.py [--seconds 10] [--long 100 200] [--rounds 2]

Same setup as bench_wrk.py (wrk and the SSE upstream on core 0, 50 events 20 ms apart,
the plan with a blocking quota, one embedded database), two of our workers on both
cores, reached either through one port shared with SO_REUSEPORT, or through HAProxy
(``mode tcp``, ``balance roundrobin``, one thread; Debian's package) in front of two
workers on private ports. Per row: req/s, how the requests split across the two workers
(from each event's ``ledger.instance``: wrk's keep-alive connections stay on the worker
they reached), and CPU per request of the workers and of HAProxy. Rounds alternate the
two setups, since the machine's other load changes over time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from pymongo import MongoClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_wrk as bw

HAPROXY_CFG = """global
    nbthread 1
    maxconn 5000
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend proxy
    bind 127.0.0.1:{port}
    default_backend workers
backend workers
    balance roundrobin
{servers}
"""


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def split(db: MongoClient, since: datetime) -> str:
    """Requests per worker finished since ``since`` (events carry their instance)."""
    counts = Counter(e["ledger"]["instance"] for e in db.billing.events_completion.find(
        {"user_id": "bench", "date_created": {"$gte": since}}, {"ledger.instance": 1}))
    shares = sorted(counts.values(), reverse=True)
    total = sum(shares) or 1
    return " / ".join(f"{n * 100 / total:.0f} %" for n in shares) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--long", type=int, nargs="*", default=[100, 200])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install {tool})")
    tmp = Path(tempfile.mkdtemp(prefix="bench-lb-"))
    mitmdump = str(Path(sys.executable).with_name("mitmdump"))
    backend = bw.start_backend(tmp)
    procs, up_port = backend.processes, backend.upstream_port
    mongo_uri, db_process, config = backend.mongo_uri, backend.database, backend.config
    db_pid = db_process.pid if db_process is not None else None
    env = {"MONGODB_URI": mongo_uri, "FAKE_OPENAI_KEY": "sk-bench"}

    reuse_port = bw.free_port()
    serve = bw.spawn([sys.executable, str(bw.ROOT / "scripts/serve.py"), "--workers", "2",
                      "-p", str(reuse_port), "--data-dir", str(tmp / "serve"), "-q",
                      "--set", f"billing_config={config}"], tmp / "serve.log", "0,1", env)
    private = [bw.free_port(), bw.free_port()]
    behind = [bw.spawn([mitmdump, "-q", "-s", str(bw.ROOT / "addons/llm_billing_proxy.py"),
                        "-p", str(port), "--set", f"billing_config={config}",
                        "--set", f"billing_data_dir={tmp / f'behind-{i}'}"],
                       tmp / f"behind-{i}.log", "0,1", env) for i, port in enumerate(private)]
    ha_port = bw.free_port()
    servers = "\n".join(f"    server w{i} 127.0.0.1:{p}" for i, p in enumerate(private))
    (tmp / "haproxy.cfg").write_text(HAPROXY_CFG.format(port=ha_port, servers=servers))
    haproxy = bw.spawn(["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")], tmp / "haproxy.log",
                       "0,1")
    procs += [serve, *behind, haproxy]
    try:
        for port in (up_port, reuse_port, *private, ha_port):
            bw.wait_for_port(port, 60)
        time.sleep(3)
        path = "/v1/chat/completions"
        script = bw.lua_script(tmp / "long.lua", bw.body(True), bw.LONG_STREAM)
        setups = [("SO_REUSEPORT", reuse_port, children(serve.pid), None),
                  ("HAProxy (tcp, roundrobin)", ha_port, [p.pid for p in behind], haproxy.pid)]
        for _, port, _, _ in setups:  # warm up
            bw.wrk(f"http://127.0.0.1:{port}{path}", script, 4, 2)
        print("| setup | connections | req/s | p99 ms | requests per worker | workers CPU ms/req "
              "| HAProxy CPU ms/req | database CPU ms/req |\n"
              "|---|---:|---:|---:|---|---:|---:|---:|", flush=True)
        with MongoClient(mongo_uri) as db:
            for _ in range(args.rounds):
                for connections in args.long:
                    for name, port, workers, balancer in setups:
                        since = datetime.now(UTC)
                        before = [bw.cpu_seconds(workers), bw.cpu_seconds(balancer),
                                  bw.cpu_seconds(db_pid)]
                        r = bw.wrk(f"http://127.0.0.1:{port}{path}", script, connections,
                                   args.seconds)
                        after = [bw.cpu_seconds(workers), bw.cpu_seconds(balancer),
                                 bw.cpu_seconds(db_pid)]
                        time.sleep(2)  # the last events reach the database
                        per = [(a - b) * 1000 / max(r["requests"], 1)
                               for a, b in zip(after, before, strict=True)]
                        print(f"| {name} | {connections} | {r['rps']:.0f} | {r['p99']:.0f} | "
                              f"{split(db, since)} | {per[0]:.2f} | "
                              f"{f'{per[1]:.2f}' if balancer else '-'} | {per[2]:.2f} |",
                              flush=True)
    finally:
        bw.stop_all(procs, db_process, timeout=20)


if __name__ == "__main__":
    main()
