"""A request that can never fit the plan is answered once and never retried by the SDKs
with their default retry settings (issue 13, item 5): on the Free plan (1,000 tokens a
minute), ``max_tokens=5000`` — or Anthropic's usual 4096 — used to get a 429 with
``retry-after: 60``, and the Python and Node openai SDKs retried for two minutes.

Counted, not timed: each SDK's HTTP requests are counted (an httpx event hook; a
``fetch`` wrapper in Node), and the call must end after exactly one — successful (the
proxy clamped the output) or refused for good. The elapsed time is printed on failure.
The Node SDKs run when ``node`` and the npm packages are installed (``.ci/run`` installs
them into ``$NODE_SDKS``); otherwise that test is skipped, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from conftest import ApiKey, Proxy, set_plan

MESSAGES = [{"role": "user", "content": "Write a long story"}]
NODE_SCRIPT = r"""
import OpenAI from "openai";
import Anthropic from "@anthropic-ai/sdk";
const [base, openaiToken, anthropicToken] = process.argv.slice(2);
let requests = 0;
const counting = (...args) => { requests += 1; return fetch(...args); };
const messages = [{ role: "user", content: "Write a long story" }];
async function outcome(call) {
  requests = 0;
  const started = Date.now();
  try { await call(); return { ok: true, requests, ms: Date.now() - started }; }
  catch (e) { return { ok: false, status: e.status ?? null, requests, ms: Date.now() - started }; }
}
const openai = new OpenAI({ baseURL: `${base}/v1`, apiKey: openaiToken, fetch: counting });
const claude = new Anthropic({ baseURL: base, apiKey: anthropicToken, fetch: counting });
console.log(JSON.stringify({
  openai: await outcome(() => openai.chat.completions.create(
    { model: "gpt-4o-mini", messages, max_tokens: 5000 })),
  anthropic: await outcome(() => claude.messages.create(
    { model: "claude-fake-1", messages, max_tokens: 4096 })),
}));
"""


class Counter:
    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, request: httpx.Request) -> None:
        self.requests += 1


def free_user(db, make_key) -> ApiKey:
    """A new user on the Free plan (1,000 tokens a minute: 5,000 never fit), its bucket
    full: one per call, so no call waits on another's tokens (a wait is retryable)."""
    key = make_key()
    set_plan(db, key.user_id, "free")
    return key


def test_python_sdks_with_default_retries_ask_once(proxy: Proxy, make_key, db):
    calls = {
        "openai": lambda token, hook: openai.OpenAI(
            base_url=f"{proxy.url}/v1", api_key=token,
            http_client=openai.DefaultHttpxClient(event_hooks={"request": [hook]}),
        ).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5000),
        "anthropic": lambda token, hook: anthropic.Anthropic(
            base_url=proxy.url, api_key=token,
            http_client=anthropic.DefaultHttpxClient(event_hooks={"request": [hook]}),
        ).messages.create(model="claude-fake-1", messages=MESSAGES, max_tokens=4096),
    }
    for name, call in calls.items():  # the SDKs' default retry settings
        counter = Counter()
        started = time.monotonic()
        try:
            call(free_user(db, make_key).token, counter)
        except (openai.APIStatusError, anthropic.APIStatusError) as e:
            assert e.status_code == 429, (name, e)
        elapsed = time.monotonic() - started
        assert counter.requests == 1, f"{name}: {counter.requests} requests in {elapsed:.1f} s"


def node_sdks() -> Path | None:
    folder = os.environ.get("NODE_SDKS")
    if shutil.which("node") is None or not folder:
        return None
    modules = Path(folder) / "node_modules"
    return modules if (modules / "openai").is_dir() and \
        (modules / "@anthropic-ai" / "sdk").is_dir() else None


def test_node_sdks_with_default_retries_ask_once(proxy: Proxy, make_key, db):
    modules = node_sdks()
    if modules is None:
        pytest.skip("node or the npm packages openai and @anthropic-ai/sdk are not installed "
                    "(set NODE_SDKS to a folder holding their node_modules; .ci/run does)")
    script = modules.parent / "retries.mjs"  # beside node_modules: its imports resolve there
    script.write_text(NODE_SCRIPT)
    done = subprocess.run(["node", str(script), proxy.url, free_user(db, make_key).token,
                           free_user(db, make_key).token], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["requests"] == 1, f"{name}: {result}"
        assert result["ok"] or result["status"] == 429, f"{name}: {result}"
