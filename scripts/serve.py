#!/usr/bin/env python3
"""Run the proxy as N worker processes on one port, plus the embedded database they share.

    uv run scripts/serve.py [--workers N] [-p 8080] [--data-dir data] [mitmdump options...]

Each worker is ``mitmdump -s addons/llm_billing_proxy.py --set reuse_port=true``: they
all listen on the port and the kernel spreads connections across them (SO_REUSEPORT,
reuse_port.py). The default is one worker per core this process may run on.

- Database: ``MONGODB_URI`` when set; else the embedded one, started here once (or the one
  already listening on ``--embedded-db-port``), its SQLite file in ``--data-dir``.
- Each worker's own directory, ``<data-dir>/worker-<i>``, holds its event journal and
  rejected events: no two workers share a journal. (Journal files are named by process
  and the ledger's instance id is random per process, so these never collide either.)
- One portal session secret for all workers (a session signed by one is valid on all):
  ``LLM_BILLING_SESSION_SECRET``, else the one a single proxy keeps in
  ``<data-dir>/portal_session_secret`` (made once), handed to the workers.
- Signals: SIGTERM / SIGINT go to every worker; once they have exited (after flushing
  their events), the embedded database is stopped and this exits. SIGHUP (reload the
  config) goes to every worker. A worker or the database that exits by itself stops the
  whole group, with a non-zero exit status: nothing is restarted here, so a supervisor
  (systemd, Kubernetes…) sees the failure.

Other arguments go to every worker unchanged (``--set billing_config=…``, ``-q``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _cli import ROOT
from llm_billing.storage.embedded_db import (
    DEFAULT_PORT,
    _die_with_parent,
    is_listening,
    start_embedded_db,
)
from llm_billing.web.portal.session import SESSION_SECRET_ENV, session_secret

MITMDUMP = Path(sys.executable).with_name("mitmdump")
ADDONS = ROOT / "addons/llm_billing_proxy.py"
POLL_SECONDS = 0.2


def say(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)


def worker_dir(data_dir: Path, index: int) -> Path:
    return data_dir / f"worker-{index}"


def leftover_journals(data_dir: Path, workers: int) -> list[Path]:
    """Journal directories with events no worker of this run will replay: a single proxy's
    (``<data-dir>/journal``) and those of workers beyond ``workers``."""
    found = []
    for journal in [*sorted(data_dir.glob("worker-*/journal")), data_dir / "journal"]:
        index = journal.parent.name.removeprefix("worker-")
        if index.isdigit() and int(index) < workers:
            continue
        if any(journal.glob("events-*.jsonl")):
            found.append(journal)
    return found


def start_worker(index: int, port: int, data_dir: Path, env: dict[str, str],
                 extra: list[str]) -> subprocess.Popen:
    args = [str(MITMDUMP), "-s", str(ADDONS), "-p", str(port),
            "--set", "reuse_port=true", "--set", "server=false",  # see reuse_port.py
            "--set", f"billing_data_dir={worker_dir(data_dir, index)}", *extra]
    # Own session: a Ctrl-C reaches only us, and we stop workers before the database.
    return subprocess.Popen(args, env={**os.environ, **env},
                            start_new_session=True, preexec_fn=_die_with_parent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="worker processes (default: one per core)")
    parser.add_argument("-p", "--port", type=int, default=8080, help="port they all listen on")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("LLM_BILLING_DATA_DIR", "data")),
                        help="embedded database and the workers' directories")
    parser.add_argument("--embedded-db-port", type=int, default=DEFAULT_PORT)
    args, extra = parser.parse_known_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if is_listening(args.port):  # a group already running would silently share the port
        say(f"something already listens on port {args.port}; not starting")
        return 1
    for journal in leftover_journals(args.data_dir, args.workers):
        say(f"{journal} holds events of an earlier run that this run will not store; "
            f"start a proxy with billing_data_dir={journal.parent} once to store them")

    database = None
    if uri := os.environ.get("MONGODB_URI", ""):
        say("database: MONGODB_URI")
    else:
        uri, database = start_embedded_db(args.data_dir, args.embedded_db_port,
                                          own_session=True)
        say(f"embedded database on {uri}, data in {args.data_dir}/"
            + ("" if database else " (already running, not ours to stop)"))

    env = {"MONGODB_URI": uri, SESSION_SECRET_ENV: session_secret(args.data_dir)}
    stop_signal: int | None = None
    workers: list[subprocess.Popen] = []

    def forward(sig: int, _frame: object = None) -> None:
        nonlocal stop_signal
        if sig != signal.SIGHUP and stop_signal is None:
            stop_signal = sig
            say(f"{signal.Signals(sig).name}: stopping {len(workers)} workers")
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    failed = False
    try:
        for index in range(args.workers):
            workers.append(start_worker(index, args.port, args.data_dir, env, extra))
        say(f"{args.workers} workers on port {args.port}: pids "
            + ", ".join(str(w.pid) for w in workers))
        while any(w.poll() is None for w in workers):
            if stop_signal is None:
                gone = [(i, w) for i, w in enumerate(workers) if w.poll() is not None]
                if gone:
                    index, worker = gone[0]
                    say(f"worker {index} (pid {worker.pid}) exited with status "
                        f"{worker.returncode}; stopping the others")
                elif database is not None and database.poll() is not None:
                    say(f"embedded database exited with status {database.returncode}; "
                        "stopping the workers")
                if gone or (database is not None and database.poll() is not None):
                    failed = True
                    forward(signal.SIGTERM)
            time.sleep(POLL_SECONDS)
    finally:
        for worker in workers:  # only if we got here by an exception
            if worker.poll() is None:
                worker.terminate()
                worker.wait()
        if database is not None and database.poll() is None:
            database.terminate()
            database.wait(10)
    failed = failed or any(w.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)
                           for w in workers)
    say("stopped" + (" after a failure" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
