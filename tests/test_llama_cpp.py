"""Real llama.cpp servers behind the real mitmdump (issue 13, item 2): llama.cpp's
``llama-server`` and llama-cpp-python's server (``python -m llama_cpp.server``), both on
the tiny random-weight model of tests/llama_model.py, called with the official openai SDK.

Every event must bill exactly what the server itself counts for the same request asked
directly and not streamed: chat and legacy completions, not streamed, streamed, and
streamed with ``stream_options.include_usage``. llama-server reports usage when asked (the
proxy asks, and hides the extra chunk from a client that did not) and its ``timings`` are
stored; llama-cpp-python's server never sends usage in a stream, so its backend has
``usage_fallback = { type = "tokenize", api = "llama-cpp-python" }`` and the proxy counts
with the server's own tokenizer.

The servers are built once by .ci/llama_cpp.sh (cached; ~6 min fresh), which prints the
LLAMA_SERVER and LLAMA_CPP_PYTHON this module needs; without them it is skipped.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from llama_model import CHAT_TEMPLATE

from conftest import (
    PRICES,
    ApiKey,
    Proxy,
    free_port,
    openai_client,
    start_proxy,
    stop_proxy,
    wait_for_events,
    wait_for_port,
)
from llm_billing.core.backend_tokenizer import UsageFallback, usage_calls
from llm_billing.core.usage import Protocol

LLAMA_SERVER = os.environ.get("LLAMA_SERVER", "")
LLAMA_CPP_PYTHON = os.environ.get("LLAMA_CPP_PYTHON", "")
BUILD_HINT = 'eval "$(bash .ci/llama_cpp.sh | sed s/^/export\\ /)"'


def _missing() -> str | None:
    for name, path in (("LLAMA_SERVER", LLAMA_SERVER), ("LLAMA_CPP_PYTHON", LLAMA_CPP_PYTHON)):
        if not path:
            return f"{name} is not set (build the servers: {BUILD_HINT})"
        if not os.access(path, os.X_OK):
            return f"{name}={path} is not an executable (rebuild: {BUILD_HINT})"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"real llama.cpp: {_missing()}")

MAX_TOKENS = 8
SERVERS = ("llama-server", "llama-cpp-python")  # backend names; each model is "tiny-<name>"
MODES = ("not streamed", "streamed", "streamed with include_usage")


@dataclass
class Server:
    name: str
    url: str
    model: str
    process: subprocess.Popen
    log_path: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)


def _start_server(tmp: Path, name: str, model_path: Path) -> Server:
    port = free_port()
    model = f"tiny-{name}"
    if name == "llama-server":  # one slot, no prompt cache: cached_tokens is always 0
        args = [LLAMA_SERVER, "-m", str(model_path), "--alias", model, "-c", "1024",
                "-np", "1", "-t", "1", "--no-warmup", "--no-cache-prompt", "--seed", "1",
                "--host", "127.0.0.1", "--port", str(port)]
        ready = "/health"
    else:
        args = [LLAMA_CPP_PYTHON, "-m", "llama_cpp.server", "--model", str(model_path),
                "--model_alias", model, "--n_ctx", "1024", "--n_threads", "1",
                "--n_threads_batch", "1", "--seed", "1",
                "--host", "127.0.0.1", "--port", str(port)]
        ready = "/v1/models"
    log_path = tmp / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = Server(name, f"http://127.0.0.1:{port}", model, process, log_path)
    try:
        wait_for_port(port, process=process)
        deadline = time.monotonic() + 30
        while True:  # llama-server answers 503 while it loads the model
            try:
                urllib.request.urlopen(server.url + ready, timeout=5).close()
                return server
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    except Exception:
        process.kill()
        raise RuntimeError(f"{name} did not start:\n{log_path.read_text()}") from None


def llama_config(servers: dict[str, Server], *, tokenize_fallback: bool = True) -> str:
    """The proxy's config for ``servers``; without ``tokenize_fallback``, what main had
    before the backend tokenizer (llama-cpp-python's streams estimated)."""
    template = CHAT_TEMPLATE.replace("\\", "\\\\")  # a TOML basic string
    fallback = (f'usage_fallback = {{ type = "tokenize", api = "llama-cpp-python", '
                f'chat_template = "{template}" }}' if tokenize_fallback else "")
    server, python = servers["llama-server"], servers["llama-cpp-python"]
    return PRICES + f"""
[proxy]
default_plan = "enterprise"

[[backends]]
name = "llama-server"
url = "{server.url}"
models = ["{server.model}"]
auth = {{ type = "none" }}

[[backends]]
name = "llama-cpp-python"
url = "{python.url}"
models = ["{python.model}"]
auth = {{ type = "none" }}
{fallback}
"""


@pytest.fixture(scope="module")
def llama_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama")


@pytest.fixture(scope="module")
def servers(llama_tmp: Path) -> Iterator[dict[str, Server]]:
    model_path = llama_tmp / "tiny.gguf"
    subprocess.run([LLAMA_CPP_PYTHON, str(Path(__file__).with_name("llama_model.py")),
                    str(model_path)], check=True, capture_output=True, timeout=60)
    started: dict[str, Server] = {}
    try:
        for name in SERVERS:
            started[name] = _start_server(llama_tmp, name, model_path)
        yield started
    finally:
        for server in started.values():
            server.process.terminate()
        for server in started.values():
            try:
                server.process.wait(10)
            except subprocess.TimeoutExpired:
                server.process.kill()


@pytest.fixture(scope="module")
def llama_proxy(llama_tmp: Path, mongo_uri: str,
                servers: dict[str, Server]) -> Iterator[Proxy]:
    config = llama_tmp / "config.toml"
    config.write_text(llama_config(servers))
    proxy = start_proxy(llama_tmp, mongo_uri, config)
    yield proxy
    stop_proxy(proxy)


@dataclass
class Answer:
    text: str
    usage: dict[str, Any] | None  # as the client saw it
    timings: dict[str, Any] | None


def ask(client: openai.OpenAI, model: str, endpoint: str, mode: str, text: str) -> Answer:
    """One request; ``mode`` is one of MODES."""
    kwargs: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
                              "seed": 1}
    if mode != "not streamed":
        kwargs["stream"] = True
    if mode == "streamed with include_usage":
        kwargs["stream_options"] = {"include_usage": True}
    if endpoint == "chat":
        response = client.chat.completions.create(
            messages=[{"role": "user", "content": text}], **kwargs)
    else:
        response = client.completions.create(prompt=text, **kwargs)

    def content(choice: Any) -> str:
        if endpoint == "completions":
            return choice.text or ""
        return (choice.message.content if mode == "not streamed" else choice.delta.content) \
            or ""

    if mode == "not streamed":
        return Answer(content(response.choices[0]), response.usage.model_dump(),
                      (response.model_extra or {}).get("timings"))
    chunks = list(response)
    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    timings = [chunk.model_extra["timings"] for chunk in chunks
               if (chunk.model_extra or {}).get("timings")]
    return Answer("".join(content(c) for chunk in chunks for c in chunk.choices),
                  usage[-1].model_dump() if usage else None, timings[-1] if timings else None)


def billed(event: dict[str, Any]) -> dict[str, int]:
    usage = event["usage"]
    return {"prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "cache_read_tokens": usage.get("cache_read_tokens", 0),
            "reasoning_tokens": usage.get("reasoning_tokens", 0)}


def own_count(usage: dict[str, Any]) -> dict[str, int]:
    """The server's usage in the event's terms (both servers report neither reasoning nor,
    with llama-server's prompt cache off, cached tokens)."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "cache_read_tokens": cached, "reasoning_tokens": 0}


CASES = [pytest.param(name, endpoint, mode, id=f"{name}-{endpoint}-{mode}")
         for name in SERVERS for endpoint in ("chat", "completions") for mode in MODES]


@pytest.mark.parametrize(("name", "endpoint", "mode"), CASES)
def test_event_bills_the_servers_own_count(llama_proxy: Proxy, servers: dict[str, Server],
                                           key: ApiKey, db, test_id: str, name: str,
                                           endpoint: str, mode: str):
    server = servers[name]
    text = f"Say hi {test_id[:8]}"  # 15 characters, new to the server each time
    direct = ask(server.client(), server.model, endpoint, "not streamed", text)
    assert direct.usage is not None
    assert direct.usage["completion_tokens"] == MAX_TOKENS  # the model never ends early

    proxied = ask(openai_client(llama_proxy, key.token), server.model, endpoint, mode, text)
    [event] = wait_for_events(db, key.user_id, 1)

    assert proxied.text == direct.text  # deterministic, and passed through intact
    own = own_count(direct.usage)
    assert billed(event) == own
    assert event["prompt_n"] == own["prompt_tokens"]
    assert event["completion_n"] == own["completion_tokens"]
    assert event["usage_estimated"] is False
    assert event["backend"] == name
    if mode == "streamed" and endpoint == "chat":  # asked for by the proxy, hidden again
        assert proxied.usage is None
    if proxied.usage is not None:  # the server's count for this very request
        assert own_count(proxied.usage) == own_count(direct.usage)
    if name == "llama-server":
        assert event.get("estimate_method") is None
        timings = event["timings"]
        assert timings["predicted_n"] == MAX_TOKENS
        assert timings["prompt_n"] == direct.usage["prompt_tokens"]
        if proxied.timings is not None:  # the ones the client saw
            assert timings == proxied.timings
    elif mode == "not streamed":  # llama-cpp-python reports usage outside streams
        assert event.get("estimate_method") is None
    else:  # ... and never in one: counted by its own tokenizer
        assert proxied.usage is None
        assert event["estimate_method"] == "backend tokenizer"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("name", SERVERS)
def test_the_backend_tokenizer_counts_what_the_server_counts(
        servers: dict[str, Server], name: str, endpoint: str, test_id: str):
    """core/backend_tokenizer.py's calls, made to the real server, give the server's own
    count for a request and the output it generated — for both servers' tokenizer APIs
    (the proxy tier above only needs llama-cpp-python's: llama-server reports usage)."""
    server = servers[name]
    text = f"Hi {test_id[:12]}"
    direct = ask(server.client(), server.model, endpoint, "not streamed", text)
    request: dict[str, Any] = {"model": server.model}
    if endpoint == "chat":
        request["messages"] = [{"role": "user", "content": text}]
    else:
        request["prompt"] = text
    fallback = UsageFallback(name, CHAT_TEMPLATE if name == "llama-cpp-python" else None)
    protocol = Protocol.OPENAI_CHAT if endpoint == "chat" else Protocol.OPENAI_COMPLETIONS
    calls, answer = usage_calls(fallback, protocol, request, direct.text), None
    try:
        while True:
            call = calls.send(answer)
            answer = httpx.post(server.url + call.path, json=call.body, timeout=10).json()
    except StopIteration as end:
        counted = end.value
    assert direct.usage is not None
    assert (counted.prompt_tokens, counted.completion_tokens) == (
        direct.usage["prompt_tokens"], direct.usage["completion_tokens"])
    assert counted.exact
