"""scripts/serve.py: N workers on one port (SO_REUSEPORT) and one embedded database.

Real processes: the command starts 2 mitmdump workers and the embedded database; SDK
clients on many keep-alive connections; then the command is stopped like a Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from pymongo import MongoClient

from conftest import (
    ROOT,
    UPSTREAM_KEYS,
    free_port,
    insert_key,
    set_plan,
    wait_for_events,
    write_config,
)
from fake_upstream import FakeUpstream
from llm_billing.storage.embedded_db import is_listening, uri_for
from llm_billing.storage.journal import Journal

SERVE = ROOT / "scripts/serve.py"
CONNECTIONS = 24  # the kernel hashes each connection: all on one worker has p = 2^-23
REQUESTS_PER_CONNECTION = 2
PLAN = """
[plans.serve-test]
monthly_tokens = 100000000
overage = "blocked"
"""  # a blocking quota: each event records the ledger instance (the worker) that held it


class Served:
    def __init__(self, tmp: Path, upstream: FakeUpstream, workers: int) -> None:
        self.port, self.db_port = free_port(), free_port()
        self.data = tmp / "data"
        self.log_path = tmp / "serve.log"
        config = write_config(tmp / "config.toml", upstream.url,
                              f"http://127.0.0.1:{free_port()}", PLAN)
        env = {**os.environ, **UPSTREAM_KEYS}
        env.pop("MONGODB_URI", None)  # the command starts the embedded database itself
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SERVE), "--workers", str(workers), "-p", str(self.port),
                 "--data-dir", str(self.data), "--embedded-db-port", str(self.db_port),
                 "--set", f"billing_config={config}"],
                env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while self.log.count("reverse proxy to") < workers:  # every worker's defaults applied
            assert self.process.poll() is None, self.log
            assert time.monotonic() < deadline, self.log
            time.sleep(0.1)
        self.pids = [int(p) for p in re.search(r"pids ([\d, ]+)", self.log).group(1)
                     .split(", ")]

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def chat(url: str, token: str) -> int:
    """Requests on one keep-alive connection (its own client); how many succeeded."""
    with httpx.Client() as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0,
                               http_client=http)
        for _ in range(REQUESTS_PER_CONNECTION):
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}],
                stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    return REQUESTS_PER_CONNECTION


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def test_two_workers_share_the_port_and_the_database(tmp_path: Path,
                                                      upstream: FakeUpstream) -> None:
    served = Served(tmp_path, upstream, workers=2)
    try:
        assert len(served.pids) == 2
        with MongoClient(uri_for(served.db_port), tz_aware=True) as db:
            key = insert_key(db)
            set_plan(db, key.user_id, "serve-test")
            with ThreadPoolExecutor(CONNECTIONS) as pool:
                done = sum(pool.map(lambda _: chat(f"http://127.0.0.1:{served.port}",
                                                    key.token), range(CONNECTIONS)))
            assert done == CONNECTIONS * REQUESTS_PER_CONNECTION
            events = wait_for_events(db, key.user_id, done)
            time.sleep(1)  # a duplicate would come in the next batch
            events = list(db.billing.events_completion.find({"user_id": key.user_id}))

            # Every request's event stored exactly once.
            assert len(events) == done
            assert len({e["_id"] for e in events}) == done
            # Both workers served: each event names the ledger instance that counted it,
            # and each worker's own journal directory holds the events it served.
            by_instance = Counter(e["ledger"]["instance"] for e in events)
            assert len(by_instance) == 2, by_instance
            journals = {}
            for index in range(2):
                files = list((served.data / f"worker-{index}" / "journal")
                             .glob("events-*.jsonl"))
                owners = {(int(f.stem.split("-")[1]), Journal.token_of(f)) for f in files}
                assert len(owners) == 1, files  # one process per journal directory
                (pid, token), = owners
                ids = {doc["_id"] for f in files for _, doc in Journal.read(f)
                       if doc.get("user_id") == key.user_id}
                journals[token] = (pid, ids)
            assert set(journals) == set(by_instance)  # journal token = ledger instance
            assert sorted(pid for pid, _ in journals.values()) == sorted(served.pids)
            for token, (_, ids) in journals.items():
                assert ids == {e["_id"] for e in events if e["ledger"]["instance"] == token}
            # One portal session secret (a single proxy's file), not one per worker: a
            # session cookie signed by one worker is valid on the other.
            assert (served.data / "portal_session_secret").exists()
            assert not list(served.data.glob("worker-*/portal_session_secret"))
    finally:
        status = served.stop(signal.SIGINT)  # as a Ctrl-C reaches the command alone
    assert status == 0, served.log
    assert wait_gone(served.pids), "workers still running"
    assert not is_listening(served.db_port), "embedded database still running"
    assert "stopping 2 workers" in served.log


def test_a_worker_that_dies_stops_the_group(tmp_path: Path, upstream: FakeUpstream) -> None:
    served = Served(tmp_path, upstream, workers=2)
    try:
        os.kill(served.pids[0], signal.SIGKILL)
        status = served.process.wait(60)
    finally:
        served.stop(signal.SIGTERM)
    assert status == 1, served.log  # nothing restarted silently
    assert f"pid {served.pids[0]}) exited with status -9; stopping the others" in served.log
    assert wait_gone(served.pids)
    assert not is_listening(served.db_port)


def test_refuses_a_port_in_use(tmp_path: Path) -> None:
    """A second group would share the port with the first (SO_REUSEPORT) unnoticed."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(SERVE), "--workers", "1", "-p", str(port),
             "--data-dir", str(tmp_path / "data"), "--embedded-db-port", str(free_port())],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "already listens" in result.stderr
