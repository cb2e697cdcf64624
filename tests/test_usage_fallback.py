"""Responses without usage are billed at the backend's own token counts (``usage_fallback``).

Through the real mitmdump, with the openai SDK, against servers that stream without usage
and expose their tokenizer in llama-cpp-python's, vLLM's and llama-server's exact wire
formats (tokenizer_upstream.py). A streamed request must be billed exactly what the
server itself counts for the same request non-streamed.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient
from tokenizer_upstream import CHAT_TEMPLATE, TokenizerUpstream, server_usage

from conftest import (
    PRICES,
    ApiKey,
    Proxy,
    openai_client,
    start_proxy,
    stop_proxy,
    wait_for_events,
)

TOKENIZER_KEY = "tok-key-Zq8/+&?"
FLAVOURS = ("llama-cpp-python", "vllm", "llama-server")
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello, llama!"}]  # 15 characters, as in the issue
PROMPT = "Once upon a time, héllo"
NO_USAGE = "sends responses without usage"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, TokenizerUpstream]]:
    running = {flavour: TokenizerUpstream(flavour) for flavour in FLAVOURS}
    running["authed"] = TokenizerUpstream("vllm", api_key=TOKENIZER_KEY)
    running["estimate"] = TokenizerUpstream("llama-cpp-python")
    yield running
    for server in running.values():
        server.stop()


def backend(name: str, url: str, fallback: str, auth: str = '{ type = "none" }') -> str:
    return f"""
[[backends]]
name = "{name}"
url = "{url}"
models = ["{name}-model"]
auth = {auth}
usage_fallback = {fallback}
"""


def config_text(*backends: str) -> str:
    return PRICES + "[proxy]\ndefault_plan = \"enterprise\"\n" + "".join(backends)


def start_vllm_proxy(tmp_path: Path, mongo_uri: str, server: TokenizerUpstream) -> Proxy:
    """A proxy whose one backend is ``server``, counted as vLLM."""
    config = tmp_path / "config.toml"
    config.write_text(config_text(backend("vllm", server.url,
                                          '{ type = "tokenize", api = "vllm" }')))
    return start_proxy(tmp_path, mongo_uri, config)


def write_config(path: Path, servers: dict[str, TokenizerUpstream]) -> Path:
    template = CHAT_TEMPLATE.replace("\n", "\\n")
    path.write_text(config_text(*[
        backend("llama-cpp-python", servers["llama-cpp-python"].url,
                f'{{ type = "tokenize", api = "llama-cpp-python", chat_template = "{template}" }}'),
        backend("no-template", servers["llama-cpp-python"].url,
                '{ type = "tokenize", api = "llama-cpp-python" }'),
        backend("vllm", servers["vllm"].url, '{ type = "tokenize", api = "vllm" }'),
        backend("llama-server", servers["llama-server"].url,
                '{ type = "tokenize", api = "llama-server" }'),
        backend("authed", servers["authed"].url, '{ type = "tokenize", api = "vllm" }',
                '{ type = "bearer", value = "${TOKENIZER_KEY}" }'),
        backend("estimate", servers["estimate"].url, '"estimate"'),
    ]))
    return path


@pytest.fixture(scope="module")
def fallback_proxy(tmp_path_factory: pytest.TempPathFactory, mongo_uri: str,
                   servers: dict[str, TokenizerUpstream]) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("usage-fallback")
    running = start_proxy(tmp, mongo_uri, write_config(tmp / "config.toml", servers),
                          env={"TOKENIZER_KEY": TOKENIZER_KEY})
    yield running
    stop_proxy(running)


def chat(proxy: Proxy, key: ApiKey, model: str, **extra) -> None:
    client = openai_client(proxy, key.token)
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                            max_tokens=30, **extra)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def billed(db: MongoClient, key: ApiKey) -> tuple[dict, dict]:
    [event] = wait_for_events(db, key.user_id, 1)
    return event, {k: event["usage"][k] for k in ("prompt_tokens", "completion_tokens")}


def expected(path: str, body: dict) -> dict[str, int]:
    usage = server_usage(path, body)
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens")}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_chat_is_billed_the_servers_own_count(
        fallback_proxy: Proxy, db: MongoClient, make_key, flavour: str, include_usage: bool):
    key = make_key()
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chat(fallback_proxy, key, f"{flavour}-model", **extra)
    event, usage = billed(db, key)
    assert usage == expected("/v1/chat/completions", {"messages": MESSAGES})
    assert event["usage_estimated"] is False
    assert event["estimate_method"] == "backend tokenizer"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_streamed_completion_is_billed_the_servers_own_count(
        fallback_proxy: Proxy, db: MongoClient, make_key, flavour: str):
    key = make_key()
    stream = openai_client(fallback_proxy, key.token).completions.create(
        model=f"{flavour}-model", prompt=PROMPT, stream=True, max_tokens=30)
    assert "".join(c.choices[0].text for c in stream if c.choices)
    event, usage = billed(db, key)
    assert usage == expected("/v1/completions", {"prompt": PROMPT})
    assert event["estimate_method"] == "backend tokenizer"


def test_non_streamed_answers_keep_the_usage_they_report(
        fallback_proxy: Proxy, db: MongoClient, make_key,
        servers: dict[str, TokenizerUpstream]):
    key = make_key()
    before = len(servers["llama-cpp-python"].tokenizer_calls)
    openai_client(fallback_proxy, key.token).chat.completions.create(
        model="llama-cpp-python-model", messages=MESSAGES, max_tokens=30)
    event, usage = billed(db, key)
    assert usage == expected("/v1/chat/completions", {"messages": MESSAGES})
    assert event["usage_estimated"] is False and "estimate_method" not in event
    assert len(servers["llama-cpp-python"].tokenizer_calls) == before  # nothing to count


def test_without_a_chat_template_llama_cpp_python_chats_are_flagged_estimated(
        fallback_proxy: Proxy, db: MongoClient, make_key):
    key = make_key()
    chat(fallback_proxy, key, "no-template-model")
    event, usage = billed(db, key)
    exact = expected("/v1/chat/completions", {"messages": MESSAGES})
    assert usage["completion_tokens"] == exact["completion_tokens"]
    assert 0 < usage["prompt_tokens"] < exact["prompt_tokens"]  # the template's tokens missing
    assert event["usage_estimated"] is True
    assert "without the chat template" in event["estimate_method"]


def test_the_tokenizer_gets_the_backends_credential_and_no_log_shows_it(
        fallback_proxy: Proxy, db: MongoClient, make_key):
    key = make_key()
    chat(fallback_proxy, key, "authed-model")
    _event, usage = billed(db, key)
    assert usage == expected("/v1/chat/completions", {"messages": MESSAGES})
    assert TOKENIZER_KEY not in fallback_proxy.log


def test_a_backend_without_usage_is_named_once_in_the_log(
        fallback_proxy: Proxy, db: MongoClient, make_key):
    for _ in range(2):
        key = make_key()
        chat(fallback_proxy, key, "estimate-model")
        event, _usage = billed(db, key)
        assert event["usage_estimated"] is True
        assert event["estimate_method"].startswith("output: delivered characters/4")
    lines = [line for line in fallback_proxy.log.splitlines()
             if NO_USAGE in line and "'estimate'" in line]
    assert len(lines) == 1 and 'usage_fallback = { type = "tokenize"' in lines[0]
    assert f"'llama-cpp-python' {NO_USAGE}: they are counted with its tokenizer" \
        in fallback_proxy.log


def test_a_tokenizer_that_fails_leaves_the_estimate_and_loses_nothing(
        tmp_path: Path, mongo_uri: str, db: MongoClient, make_key):
    dead = TokenizerUpstream("vllm")
    dead.flavour = "none"  # streams, but its tokenizer endpoints answer 404
    try:
        running = start_vllm_proxy(tmp_path, mongo_uri, dead)
        try:
            key = make_key()
            chat(running, key, "vllm-model")
            event, usage = billed(db, key)
            assert event["usage_estimated"] is True
            assert event["estimate_method"].endswith(
                "backend tokenizer failed: /tokenize answered 404")
            assert usage["completion_tokens"] > 0
        finally:
            stop_proxy(running)
    finally:
        dead.stop()


def test_counts_in_flight_at_shutdown_are_finished_and_stored(
        tmp_path: Path, mongo_uri: str, db: MongoClient, make_key):
    slow = TokenizerUpstream("vllm")
    try:
        running = start_vllm_proxy(tmp_path, mongo_uri, slow)
        try:
            key = make_key()
            slow.hold_tokenizer()
            chat(running, key, "vllm-model")
            deadline = time.monotonic() + 10
            while not slow.tokenizer_calls:  # the count has started and waits on the backend
                assert time.monotonic() < deadline
                time.sleep(0.01)
            running.process.send_signal(signal.SIGTERM)
            with pytest.raises(subprocess.TimeoutExpired):  # it waits for the count in flight
                running.process.wait(1.5)
            slow.release_tokenizer()
            assert running.process.wait(30) == 0
        finally:
            if running.process.poll() is None:
                running.process.kill()
        event, usage = billed(db, key)
        assert usage == expected("/v1/chat/completions", {"messages": MESSAGES})
        assert event["estimate_method"] == "backend tokenizer"
    finally:
        slow.stop()
