"""Secrets never leak (issue 10, items 7-9): client credentials are stripped from every
request, routed or not; an upstream that quotes its key back has it redacted before the
client, the log, the flow file, the journal or the database see it; a cached key is not
used long after the database last confirmed it. And the grep test: known tokens and keys
through a real mitmdump with ``-w`` and debug logging, then searched for everywhere."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import json
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import anthropic
import httpx
import openai
import pytest
from bson import json_util
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import io as mitmproxy_io
from mitmproxy.test import taddons, tflow, tutils
from pymongo import MongoClient
from pymongo.errors import AutoReconnect, OperationFailure
from test_keyauth import FakeDatabase, settings_with_routes

from conftest import (
    UPSTREAM_KEYS,
    ApiKey,
    Proxy,
    free_port,
    insert_key,
    start_proxy,
    stop_proxy,
    write_config,
)
from fake_upstream import FakeUpstream
from llm_billing import context
from llm_billing.core.decoding import decoder_for
from llm_billing.core.outcome import Outcome
from llm_billing.core.redact import HeldErrorBody, Redactor, redact_outcome
from llm_billing.keyauth import KeyAuth, token_hash
from llm_billing.storage import cache as cache_module
from llm_billing.storage.cache import RefreshingCache
from llm_billing.storage.embedded_db import start_embedded_db
from llm_billing.storage.journal import Journal

MESSAGES = [{"role": "user", "content": "Hello!"}]
OPENAI_KEY = UPSTREAM_KEYS["FAKE_OPENAI_KEY"]


# --- Redaction (pure) ---------------------------------------------------------------------

def test_redactor_removes_whole_escaped_encoded_and_masked_secrets():
    key = 'sk-proj/a"b+c=d' + "x" * 20 + "WXYZ"
    short = "tok1"
    redact = Redactor([key, short, ""])
    lower_hex = re.sub("%..", lambda m: m.group().lower(), quote(key, safe=""))
    for form in (key, json.dumps(key)[1:-1], json.dumps(key)[1:-1].replace("/", "\\/"),
                 quote(key, safe=""), quote_plus(key), lower_hex):
        assert redact(b"key: " + form.encode() + b".") == b"key: <redacted>."
    masked = [f"{key[:8]}{'*' * 20}{key[-4:]}", f"{key[:7]}...{key[-4:]}", f"{key[:3]}***",
              f"{key[:6]}\u2026{key[-2:]}"]
    for form in masked:
        assert redact(f"Incorrect API key provided: {form}. See".encode()) == \
            b"Incorrect API key provided: <redacted>. See", form
    assert redact(b"{'error': 'bad tok1, not tok2'}") == b"{'error': 'bad <redacted>, not tok2'}"
    untouched = b"Loading... 3 *** stars, sk-other***WXYZ, tok***, https://x.y/a?b=c"
    assert redact(untouched) == untouched
    assert redact.text("Incorrect key \ud800 " + key) == "Incorrect key \ud800 <redacted>"
    assert not Redactor([]) and Redactor([]).text("x") == "x"


def test_an_error_body_is_held_decoded_and_redacted_even_across_chunks():
    key = "sk-ant-upstream-" + "a" * 24
    body = json.dumps({"error": {"message": f"invalid x-api-key: {key}"}}).encode()
    seen: list[bytes] = []
    held = HeldErrorBody(seen.append, Redactor([key]), None)
    pieces = [body[i:i + 5] for i in range(0, len(body), 5)]
    assert [held(p) for p in pieces] == [[]] * len(pieces)  # nothing goes on before the end
    [out] = held(b"")
    assert key.encode() not in out and json.loads(out)["error"]["message"] == \
        "invalid x-api-key: <redacted>"
    assert seen == [*pieces, b""]  # the meter saw every chunk as it came
    compressed = gzip.compress(body)
    held = HeldErrorBody(lambda _: None, Redactor([key]), decoder_for("gzip"))
    for i in range(0, len(compressed), 7):
        assert held(compressed[i:i + 7]) == []
    assert held(b"") == [out]  # passed on decoded (the header is dropped)
    held = HeldErrorBody(lambda _: None, Redactor([key]), None, cap=10)
    held(b"0123456789abcdef")
    assert held(b"") == [b"0123456789"]  # capped
    held = HeldErrorBody(lambda _: None, Redactor([key]), decoder_for("gzip"))
    held(b"not gzip")
    assert held(b"") == []  # what does not decode is not passed on


KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/+=-_?&% \"\\"  # none of "<redacted>"


@settings(max_examples=300, deadline=None)
@given(secret=st.text(KEY_CHARS, min_size=1, max_size=40),
       form=st.sampled_from(["raw", "json", "url", "url+"]),
       before=st.binary(max_size=40), after=st.binary(max_size=40),
       cuts=st.lists(st.integers(0, 200), max_size=6))
def test_no_form_of_a_secret_survives_any_chunking(secret: str, form: str, before: bytes,
                                                    after: bytes, cuts: list[int]):
    shown = {"raw": secret, "json": json.dumps(secret)[1:-1], "url": quote(secret, safe=""),
             "url+": quote_plus(secret)}[form].encode()
    body = before + shown + after
    held = HeldErrorBody(lambda _: None, Redactor([secret]), None)
    bounds = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    for start, end in itertools.pairwise(bounds):
        assert held(body[start:end]) == []
    [out] = held(b"")
    assert shown not in out and secret.encode() not in out and b"<redacted>" in out


def test_recorded_error_texts_are_redacted():
    key = "sk-upstream-" + "o" * 24
    outcome = Outcome(status=401, usage=None, error=f"Incorrect API key provided: {key}",
                      metering_error=f"cannot bill {key}")
    redacted = redact_outcome(outcome, ("client-token", key))
    assert redacted.error == "Incorrect API key provided: <redacted>"
    assert redacted.metering_error == "cannot bill <redacted>"
    clean = Outcome(status=200, usage=None)
    assert redact_outcome(clean, (key,)) is clean


# --- Item 7: client credentials leave every request in the first hook -------------------

@pytest.mark.parametrize("path", ["/v1/nope", "/webhook/stripe", "/v1/chat/completions",
                                  "/v1beta/models/m:generateContent"])
def test_client_credentials_are_stripped_from_every_request_routed_or_not(path: str):
    auth = KeyAuth(FakeDatabase("valid"), settings_with_routes())  # type: ignore[arg-type]

    async def go() -> None:
        with taddons.context(auth):
            for header in ("Authorization", "X-API-Key", "x-goog-api-key", None):
                value = "Bearer valid" if header == "Authorization" else "valid"
                headers = ((header.encode(), value.encode()),) if header else ()
                query = "" if header else "?key=valid&alt=sse"
                flow = tflow.tflow(req=tutils.treq(path=f"{path}{query}".encode(),
                                                   headers=headers))
                flow.request.headers["stripe-signature"] = "t=1,v1=abc"
                await auth.requestheaders(flow)
                assert not any(name in flow.request.headers for name in (
                    "authorization", "x-api-key", "x-goog-api-key")), (path, header)
                assert "key" not in flow.request.query and "valid" not in flow.request.url
                assert flow.request.headers["stripe-signature"] == "t=1,v1=abc"  # kept
                if header is None:
                    assert flow.request.query["alt"] == "sse"

    asyncio.run(go())


# --- Item 9: a cached key is not used long after the database last confirmed it --------

class FakeClock:
    """``time`` for the cache module: ``monotonic`` moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class DownDatabase(FakeDatabase):
    """The fake key database, which can go down (every query then fails)."""

    def __init__(self, *tokens: str) -> None:
        super().__init__(*tokens)
        self.down = False
        find_one = self.keys.find_one

        async def find(query: dict[str, Any], projection: Any = None) -> Any:
            if self.down:
                self.keys.queries += 1
                raise AutoReconnect("connection refused")
            return await find_one(query, projection)

        self.keys.find_one = find  # type: ignore[method-assign]


def test_cache_serves_stale_values_only_up_to_max_age(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(cache_module, "time", clock)
    down = False

    async def load(key: str) -> tuple[str, float]:
        if down:
            raise AutoReconnect("down")
        return key.upper(), 30.0

    async def go() -> None:
        nonlocal down
        cache = RefreshingCache(load, max_age=300)
        assert await cache.get("k") == "K"
        down = True
        clock.now += 200  # stale: served while a refresh runs (and fails)
        assert await cache.get("k") == "K"
        await asyncio.sleep(0)
        assert not cache.needs_load("k")
        clock.now += 101  # 301 s since the last load
        assert cache.needs_load("k")
        with pytest.raises(AutoReconnect):
            await cache.get("k")
        down = False
        assert await cache.get("k") == "K"  # reloaded: young again
        assert not cache.needs_load("k")

    asyncio.run(go())


def test_a_key_not_rechecked_for_key_cache_max_stale_gets_503_in_the_callers_format(
        monkeypatch):
    """Default options (TTL 30 s, max stale 300 s): through an outage a cached key keeps
    working for 300 s after its last check, then gets 503 — it may have been revoked."""
    clock = FakeClock()
    monkeypatch.setattr(cache_module, "time", clock)
    database = DownDatabase("valid")
    auth = KeyAuth(database, settings_with_routes())  # type: ignore[arg-type]

    async def request() -> Any:
        flow = tflow.tflow(req=tutils.treq(path=b"/v1/messages",
                                           headers=((b"x-api-key", b"valid"),)))
        await auth.requestheaders(flow)
        await asyncio.sleep(0)  # a background refresh, if one started, runs now
        return flow

    async def go() -> None:
        with taddons.context(auth):
            assert context.of(await request()) is not None
            database.down = True
            del database.keys.docs[token_hash("valid")]  # revoked while the database is down
            clock.now += 299  # stale, refresh fails: still served from the cache
            assert context.of(await request()) is not None
            assert database.keys.queries == 2
            clock.now += 2  # 301 s since the database confirmed it
            refused = await request()
            assert context.of(refused) is None and refused.response.status_code == 503
            assert json.loads(refused.response.content)["error"]["type"] == "api_error"
            assert (await request()).response.status_code == 503  # every time, until...
            database.down = False
            assert (await request()).response.status_code == 401  # ...it is re-checked

    asyncio.run(go())


def test_key_cache_max_stale_through_mitmdump_and_a_stopped_database(tmp_path: Path,
                                                                       upstream: FakeUpstream):
    db_dir, port = tmp_path / "db", free_port()
    uri, db_process = start_embedded_db(db_dir, port)
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    proxy = start_proxy(tmp_path, uri, config, "--set", "key_cache_ttl=1",
                        "--set", "key_cache_max_stale=4", "--set", "event_shutdown_timeout=1")
    try:
        with MongoClient(uri, tz_aware=True) as db:
            key = insert_key(db)
        client = anthropic.Anthropic(base_url=proxy.url, api_key=key.token, max_retries=0)

        def ask() -> Any:
            return client.messages.create(model="claude-fake-1", max_tokens=5,
                                          messages=MESSAGES)

        ask()
        checked = time.monotonic()
        db_process.kill()  # at once: a graceful stop can outlast the bound on a busy machine
        db_process.wait(10)
        ask()  # within the bound: served from the cache
        assert time.monotonic() - checked < 4, "the test itself took longer than the bound"
        time.sleep(max(0.0, checked + 4.2 - time.monotonic()))
        with pytest.raises(anthropic.InternalServerError) as refused:
            ask()  # waits for the database's server selection timeout (5 s)
        assert refused.value.status_code == 503
        assert refused.value.body["error"]["type"] == "api_error"
    finally:
        stop_proxy(proxy)
        db_process.terminate()


# --- Item 8: an upstream that quotes its key ----------------------------------------------

def test_an_upstream_quoting_its_key_has_it_redacted_for_client_log_and_events(
        proxy: Proxy, key: ApiKey, db, upstream: FakeUpstream):
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key.token, max_retries=0)
    ids = []
    for scenario in ("echo-key", "echo-key-chunked", "echo-key-gzip"):
        for stream in (False, True):
            ids.append(test_id := uuid.uuid4().hex)
            with pytest.raises(openai.AuthenticationError) as err:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, stream=stream,
                    extra_headers={"X-Fake-Scenario": scenario, "X-Test-Id": test_id})
            sent = bytes(upstream.exchange(test_id).sent)
            assert OPENAI_KEY.encode() in (gzip.decompress(sent) if scenario.endswith("gzip")
                                           else sent)  # the upstream quoted it
            assert err.value.message.startswith("Error code: 401")
            assert err.value.body["message"] == \
                "Incorrect API key provided: <redacted> (<redacted>)."
            assert err.value.body["key"] == "<redacted>"
            assert OPENAI_KEY not in err.value.response.text
    deadline = time.monotonic() + 15
    while db.billing.events_failed.count_documents({"user_id": key.user_id}) < len(ids):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    failed = list(db.billing.events_failed.find({"user_id": key.user_id}))
    assert {e["error"] for e in failed} == {
        "Incorrect API key provided: <redacted> (<redacted>)."}
    assert "Not billed: gpt-4o-mini for user " + key.user_id in proxy.log
    assert OPENAI_KEY not in proxy.log and OPENAI_KEY[:8] + "***" not in proxy.log


# --- The grep test --------------------------------------------------------------------------

GREP_UPSTREAM_KEYS = {  # with characters that JSON and URLs escape
    "FAKE_OPENAI_KEY": "sk-grep/openai+" + secrets.token_hex(12) + "==",
    "FAKE_ANTHROPIC_KEY": 'sk-ant-grep"' + secrets.token_hex(12) + "\\x",
    "FAKE_GOOGLE_KEY": "AIza grep&" + secrets.token_hex(12) + "?",
}


def forms(secret: str) -> set[bytes]:
    """The secret as bytes, JSON-escaped and URL-encoded, and the start of the masked form
    the fake upstream quotes too."""
    escaped = json.dumps(secret)[1:-1]
    texts = {secret, escaped, escaped.replace("/", "\\/"), quote(secret, safe=""),
             quote(secret, safe="").lower(), quote_plus(secret), quote(secret)}
    texts |= {f"{text[:8]}***" for text in (secret, escaped)}
    return {t.encode() for t in texts}


def add_key(db: MongoClient, token: str) -> ApiKey:
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    key_id = db.cgc.api_keys.insert_one({
        "secret": hashlib.sha256(token.encode()).hexdigest(), "access_level": "COMPLETION",
        "date_expiry": None, "user_id": user_id}).inserted_id
    return ApiKey(token, user_id, key_id)


def traffic(proxy: Proxy, token: str, unknown: str) -> list[httpx.Response]:
    """Every way in: each key form, routed and not, successes and upstream 401s quoting
    the upstream key (whole, in chunks, gzipped), the webhook, an unknown key."""
    chat = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5}
    claude = {"model": "claude-fake-1", "messages": MESSAGES, "max_tokens": 5}
    gemini = {"contents": [{"role": "user", "parts": [{"text": "Hello!"}]}]}
    gen = "/v1beta/models/gemini-2.5-flash:generateContent"
    bearer = {"Authorization": f"Bearer {token}"}
    calls: list[tuple[str, dict[str, Any], dict[str, str], dict[str, str]]] = [
        ("/v1/chat/completions", chat, bearer, {}),
        ("/v1/chat/completions", {**chat, "stream": True}, bearer, {}),
        ("/v1/messages", {**claude, "stream": True}, {"X-API-Key": token}, {}),
        (gen, gemini, {}, {"key": token}),
        ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", gemini,
         {"x-goog-api-key": token}, {"alt": "sse"}),
        ("/v1/chat/completions", chat, {"Authorization": f"Bearer {unknown}"}, {}),
        ("/webhook/stripe", {"id": "evt_1"}, bearer, {}),
    ]
    for headers in (bearer, {"X-API-Key": token}, {"x-goog-api-key": token}, {}):
        calls.append(("/v1/nope", chat, headers, {} if headers else {"key": token}))
    for scenario in ("echo-key", "echo-key-chunked", "echo-key-gzip"):
        echo = {"X-Fake-Scenario": scenario}
        calls += [("/v1/chat/completions", chat, {**bearer, **echo}, {}),
                  ("/v1/chat/completions", {**chat, "stream": True}, {**bearer, **echo}, {}),
                  ("/v1/messages", claude, {"X-API-Key": token, **echo}, {}),
                  (gen, gemini, {"x-goog-api-key": token, **echo}, {})]
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        return [client.post(path, json=body, headers=headers, params=params)
                for path, body, headers, params in calls]


def flow_texts(path: Path) -> list[str]:
    """What a saved flow shows once read back: URLs, headers, decoded bodies, errors."""
    texts = []
    with path.open("rb") as f:
        for flow in mitmproxy_io.FlowReader(f).stream():
            parts: list[Any] = [flow.request.url, flow.request.headers.fields, flow.metadata,
                                flow.request.get_content(strict=False)]
            if flow.response is not None:
                parts += [flow.response.reason, flow.response.headers.fields,
                          flow.response.get_content(strict=False)]
            if flow.error is not None:
                parts.append(flow.error.msg)
            texts.append(repr(parts))
    return texts


def database_dump(db: MongoClient) -> bytes:
    """Every document of every collection (mongoeco's listDatabases fails on a Decimal128:
    then the databases the proxy writes)."""
    try:
        names = db.list_database_names()
    except OperationFailure:
        names = ["cgc", "billing"]
    dump = []
    for name in names:
        for collection in db[name].list_collection_names():
            dump += [json_util.dumps(doc) for doc in db[name][collection].find()]
    return "\n".join(dump).encode()


def test_grep_no_token_or_key_anywhere(tmp_path: Path, upstream: FakeUpstream):
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    flows, data, db_port = tmp_path / "flows.mitm", tmp_path / "data", free_port()
    proxy = start_proxy(
        tmp_path, "", config, "-w", str(flows), "-v", "--set", "termlog_verbosity=debug",
        "--set", "flow_detail=4", "--set", "store_streamed_bodies=true",
        "--set", f"embedded_db_port={db_port}",  # its own embedded database, in data/
        "--set", "usage_flush_interval_ms=600000",  # journal files stay while it runs
        env={"MONGODB_URI": "", **GREP_UPSTREAM_KEYS})
    token = "tok/" + secrets.token_urlsafe(16) + '+"='
    unknown = "unknown-" + secrets.token_urlsafe(16)
    needles = {name: forms(secret) for name, secret in
               {"client token": token, "unknown token": unknown, **GREP_UPSTREAM_KEYS}.items()}
    found: list[tuple[str, str, bytes]] = []

    def grep(where: str, haystack: bytes) -> None:
        found.extend((where, name, form) for name, variants in needles.items()
                     for form in variants if form in haystack)

    try:
        with MongoClient(f"mongodb://127.0.0.1:{db_port}/?directConnection=true",
                         tz_aware=True) as db:
            key = add_key(db, token)
            responses = traffic(proxy, token, unknown)
            statuses = [r.status_code for r in responses]
            assert statuses[:5] == [200] * 5 and statuses[5] == 401 and statuses[7:11] == [404] * 4
            assert statuses[11:] == [401] * 12, statuses
            assert all(b"<redacted>" in r.content for r in responses[11:])
            deadline = time.monotonic() + 20
            while db.billing.events_failed.count_documents({"user_id": key.user_id}) < 12 \
                    or db.billing.events_completion.count_documents(
                        {"user_id": key.user_id}) < 5:
                assert time.monotonic() < deadline, "events were not stored"
                time.sleep(0.1)
            journal = list((data / "journal").glob("*.jsonl"))
            assert journal, "the journal must hold this run's events while checked"
            for path in journal:
                grep(f"journal {path.name} (decoded)", repr(Journal.read(path)).encode())
            grep("database", database_dump(db))
        for number, response in enumerate(responses):
            grep(f"response {number}", repr([response.headers.raw, response.content]).encode())
    finally:
        stop_proxy(proxy)
    grep("log", proxy.log_path.read_bytes())
    grep("flow file", flows.read_bytes())
    for text in flow_texts(flows):
        grep("flow file (read back)", text.encode())
    for path in data.rglob("*"):
        if path.is_file():
            grep(f"data dir {path.relative_to(data)}", path.read_bytes())
    assert found == []
    assert len(flow_texts(flows)) == len(responses)
    assert "Incorrect API key provided: <redacted>" in proxy.log  # the bodies were logged
