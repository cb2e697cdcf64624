"""Fixtures: a real mitmdump with our addons, a fake upstream, and MongoDB over the wire.

MongoDB is ``MONGODB_URI`` when set (a real server), else the embedded mongoeco server
started in its own process for the test session.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import types as genai_types
from pymongo import MongoClient
from stripe_double import StripeDouble

from fake_upstream import FakeUpstream
from llm_billing.storage.embedded_db import start_embedded_db

ROOT = Path(__file__).resolve().parent.parent

MITMDUMP = Path(sys.executable).with_name("mitmdump")
UPSTREAM_KEYS = {  # what the fake upstream must receive; never what clients send
    "FAKE_OPENAI_KEY": "sk-upstream-" + "o" * 24,
    "FAKE_ANTHROPIC_KEY": "sk-ant-upstream-" + "a" * 24,
    "FAKE_GOOGLE_KEY": "AIza-upstream-" + "g" * 24,
}


def openai_client(proxy: Proxy, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=token, max_retries=0)


def anthropic_client(proxy: Proxy, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=token, max_retries=0)


def gemini_client(proxy: Proxy, token: str) -> genai.Client:
    """Keep a reference while using it: the SDK closes itself when collected."""
    return genai.Client(api_key=token, http_options=genai_types.HttpOptions(
        base_url=proxy.url, retry_options=genai_types.HttpRetryOptions(attempts=1)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if uri := os.environ.get("MONGODB_URI"):
        yield uri
        return
    uri, process = start_embedded_db(tmp_path_factory.mktemp("mongo"), free_port())
    yield uri
    assert process is not None
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def db(mongo_uri: str) -> Iterator[MongoClient]:
    with MongoClient(mongo_uri, tz_aware=True) as client:
        yield client


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


ONE_BACKEND = """
[[backends]]
name = "b"
url = "http://127.0.0.1:9"
models = ["m"]
auth = { type = "none" }
"""  # the least config: unit tests of addons that need a route and a backend

PRICES = """
[prices]
version = "test-2026-11"
default = { input = "1.00", output = "2.00", unit = "1000" }

[prices.models]
"gpt-4o-mini" = { input = "0.15", cache_read = "0.075", output = "0.60" }
"o*" = { input = "1.10", cache_read = "0.275", output = "4.40" }
"claude-*" = { input = "3", cache_read = "0.30", cache_write = "3.75", output = "15" }
"gemini-*" = { input = "0.30", cache_read = "0.075", output = "2.50" }

[plans.tpm-test]
name = "TPM test"
tokens_per_minute = 600

[plans.quota-test]
name = "Quota test"
monthly_tokens = 5000
overage = "blocked"
"""


def write_config(path: Path, upstream_url: str, down_url: str, extra: str = "") -> Path:
    path.write_text(PRICES + extra + f"""
[proxy]
default_plan = "enterprise"  # unlimited: the limits tests set plans per user

[[backends]]
name = "fake-openai"
url = "{upstream_url}"
models = ["gpt-4o-mini", "o3-mini", "o4-mini", "gpt-4.1-mini", "gpt-4.1",
          "text-embedding-3-small", "gpt-3.5-turbo-instruct", "vllm-*", "llamacpp-*",
          "meta-llama/*"]
auth = {{ type = "bearer", value = "${{FAKE_OPENAI_KEY}}" }}

[[backends]]
name = "fake-anthropic"
url = "{upstream_url}/anthropic"
models = ["claude-*"]
auth = {{ type = "header", name = "x-api-key", value = "${{FAKE_ANTHROPIC_KEY}}" }}

[[backends]]
name = "fake-google"
url = "{upstream_url}/v1beta/openai"
models = ["gemini-*"]
auth = {{ type = "query", name = "key", value = "${{FAKE_GOOGLE_KEY}}" }}

[[backends]]
name = "down"
url = "{down_url}"
models = ["down-model"]
auth = {{ type = "none" }}

[[backends]]
name = "unconfigured"
url = "{upstream_url}"
models = ["needs-missing-env"]
auth = {{ type = "bearer", value = "${{LLM_BILLING_TEST_UNSET_VARIABLE}}" }}
""")
    return path


@dataclass
class Proxy:
    url: str
    process: subprocess.Popen
    log_path: Path
    config_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_proxy(tmp: Path, mongo_uri: str, config_path: Path, *extra: str,
                tool: str = "mitmdump", env: dict[str, str] | None = None) -> Proxy:
    port = free_port()
    log_path = tmp / f"{tool}-{port}.log"
    env = {**os.environ, **UPSTREAM_KEYS, "MONGODB_URI": mongo_uri, **(env or {})}
    env.pop("LLM_BILLING_TEST_UNSET_VARIABLE", None)
    args = [str(MITMDUMP.with_name(tool)), "-s", str(ROOT / "addons/llm_billing_proxy.py"),
            "-p", str(port), "--set", f"billing_config={config_path}",
            "--set", f"billing_data_dir={tmp / 'data'}", *extra]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=tmp)
    proxy = Proxy(f"http://127.0.0.1:{port}", process, log_path, config_path)
    try:
        wait_for_port(port, process=process)
        deadline = time.monotonic() + 30
        while "reverse proxy to" not in proxy.log:  # our defaults applied
            assert time.monotonic() < deadline, proxy.log
            time.sleep(0.05)
    except Exception:
        process.kill()
        raise RuntimeError(f"proxy did not start:\n{proxy.log}") from None
    return proxy


def stop_proxy(proxy: Proxy) -> None:
    proxy.process.terminate()
    try:
        proxy.process.wait(20)
    except subprocess.TimeoutExpired:
        proxy.process.kill()


@pytest.fixture(scope="module")
def stripe_double() -> Iterator[StripeDouble]:
    """The Stripe API double (stripe_double.py), one per test module that asks for it."""
    double = StripeDouble().start()
    yield double
    double.stop()


@pytest.fixture(scope="session")
def proxy(tmp_path_factory: pytest.TempPathFactory, mongo_uri: str,
          upstream: FakeUpstream) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("proxy")
    config = write_config(tmp / "config.toml", upstream.url, f"http://127.0.0.1:{free_port()}")
    running = start_proxy(tmp, mongo_uri, config)
    yield running
    stop_proxy(running)


@dataclass
class ApiKey:
    token: str
    user_id: str
    key_id: Any


def insert_key(db: MongoClient, expiry: datetime | None = None, **fields: Any) -> ApiKey:
    """A fresh API key for a fresh user, stored as seed 002 describes."""
    token = secrets.token_urlsafe(32)
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    doc = {"secret": hashlib.sha256(token.encode()).hexdigest(),
           "access_level": "COMPLETION", "date_expiry": expiry, "user_id": user_id,
           "date_created": datetime.now(UTC), **fields}
    return ApiKey(token, user_id, db.cgc.api_keys.insert_one(doc).inserted_id)


@pytest.fixture
def make_key(db: MongoClient) -> Callable[..., ApiKey]:
    return lambda expiry=None, **fields: insert_key(db, expiry, **fields)


@pytest.fixture
def key(make_key: Callable[..., ApiKey]) -> ApiKey:
    return make_key()


def set_plan(db: MongoClient, user_id: str, plan: str, tokens_used: int = 0) -> None:
    """Put a user on a plan, with this month's usage so far."""
    db.billing.users.update_one({"_id": user_id}, {"$set": {"plan": plan}}, upsert=True)
    if tokens_used:
        now = datetime.now(UTC)
        month = f"{now.year:04d}-{now.month:02d}"
        db.billing.usage.update_one(
            {"_id": f"{user_id}:{month}"},
            {"$set": {"tokens": tokens_used, "user_id": user_id, "month": month}}, upsert=True)


def usage_doc(db: MongoClient, user_id: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return db.billing.usage.find_one({"_id": f"{user_id}:{now.year:04d}-{now.month:02d}"}) \
        or {}


def wait_for_usage(db: MongoClient, user_id: str, tokens: int, field: str = "tokens",
                   timeout: float = 15.0) -> dict[str, Any]:
    """The user's usage document once its ``field`` (settled tokens) reaches ``tokens``."""
    deadline = time.monotonic() + timeout
    while True:
        doc = usage_doc(db, user_id)
        if doc.get(field, 0) >= tokens or time.monotonic() > deadline:
            return doc
        time.sleep(0.05)


def wait_for_events(db: MongoClient, user_id: str, count: int, timeout: float = 15.0,
                    collection: str = "events_completion") -> list[dict[str, Any]]:
    """The user's events once ``count`` exist (writes are asynchronous by design, and the
    two event collections are written one after the other)."""
    deadline = time.monotonic() + timeout
    while True:
        events = list(db.billing[collection].find({"user_id": user_id})
                      .sort("date_created", 1))
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


@pytest.fixture
def test_id() -> str:
    return uuid.uuid4().hex
