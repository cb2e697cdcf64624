"""A client that leaves before a non-streamed answer: the upstream's answer is still read
and billed (finish_upstream.py), through a real mitmdump with the official SDKs.

The fake upstream holds its answer (``held``) until the test releases it, and the test
releases it only once the proxy has logged that this user's client left (mitmproxy's
``Not billed: … for user …`` before the fix, ``Client left … for user …`` after), so the
answer never reaches the proxy before the proxy knows the client is gone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from pymongo import MongoClient

from conftest import (
    ApiKey,
    Proxy,
    anthropic_client,
    openai_client,
    start_proxy,
    stop_proxy,
    wait_for_events,
)
from fake_upstream import FakeUpstream

MESSAGES = [{"role": "user", "content": "Write a limerick about python exceptions"}]


def wait_for_log(proxy: Proxy, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{proxy.log[-3000:]}"
        time.sleep(0.02)


def wait_for_failure(db: MongoClient, user_id: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while (doc := db.billing.events_failed.find_one({"user_id": user_id})) is None:
        assert time.monotonic() < deadline, "no failed event"
        time.sleep(0.05)
    return doc


def give_up_early(proxy: Proxy, key: ApiKey, test_id: str, protocol: str) -> None:
    """A non-streamed request whose client times out after 0.5 s, long before the answer."""
    # Warm the key and plan caches first (an unknown model is refused, not billed), so the
    # request is upstream well within the client's 0.5 s even on a busy machine.
    with pytest.raises(openai.NotFoundError):
        openai_client(proxy, key.token).chat.completions.create(model="no-such-model",
                                                                messages=MESSAGES)
    headers = {"X-Test-Id": test_id, "X-Fake-Scenario": "held"}
    if protocol == "openai":
        with pytest.raises(openai.APITimeoutError):
            openai_client(proxy, key.token).with_options(timeout=0.5).chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers)
    else:
        with pytest.raises(anthropic.APITimeoutError):
            anthropic_client(proxy, key.token).with_options(timeout=0.5).messages.create(
                model="claude-opus-4-7", max_tokens=40, messages=MESSAGES,
                extra_headers=headers)


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_answer_after_client_timed_out_is_billed(proxy: Proxy, upstream: FakeUpstream,
                                                 key: ApiKey, db: MongoClient, test_id: str,
                                                 protocol: str):
    try:
        give_up_early(proxy, key, test_id, protocol)
        assert upstream.calls[test_id] == 1  # the request was upstream when the client left
        wait_for_log(proxy, f"for user {key.user_id}")  # the proxy saw the client leave
    finally:
        upstream.release(test_id)

    [event] = wait_for_events(db, key.user_id, 1)
    usage = upstream.exchange(test_id).usage
    assert usage is not None
    if protocol == "openai":
        assert (event["prompt_n"], event["completion_n"]) == \
            (usage["prompt_tokens"], usage["completion_tokens"])
    else:
        assert (event["prompt_n"], event["completion_n"]) == \
            (usage["input_tokens"], usage["output_tokens"])
    assert event["usage_estimated"] is False and event["complete"] is True
    assert event["status"] == 200 and event["stream"] is False
    assert db.billing.events_failed.count_documents({"user_id": key.user_id}) == 0
    assert upstream.calls[test_id] == 1


def test_streamed_hang_up_is_billed_as_before(proxy: Proxy, upstream: FakeUpstream,
                                              key: ApiKey, db: MongoClient, test_id: str):
    """A streamed request is still cut off when its client leaves: billed what was seen
    (estimated), the upstream called once."""
    try:
        stream = openai_client(proxy, key.token).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            extra_headers={"X-Test-Id": test_id, "X-Fake-Scenario": "gated"})
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        stream.close()  # hang up while the upstream is parked on its gate
        [event] = wait_for_events(db, key.user_id, 1)  # settled without the rest
    finally:
        upstream.release(test_id)
    assert event["stream"] is True and event["status"] == 200
    assert event["usage_estimated"] is True and event["complete"] is False
    assert upstream.calls[test_id] == 1


@pytest.fixture
def impatient_proxy(tmp_path: Path, mongo_uri: str, proxy: Proxy) -> Iterator[Proxy]:
    """A proxy that waits only 1 s for an answer whose client left."""
    running = start_proxy(tmp_path, mongo_uri, proxy.config_path,
                          "--set", "finish_upstream_timeout=1")
    yield running
    stop_proxy(running)


def test_no_answer_within_timeout_is_settled_as_failed(impatient_proxy: Proxy,
                                                       upstream: FakeUpstream, key: ApiKey,
                                                       db: MongoClient, test_id: str):
    try:
        give_up_early(impatient_proxy, key, test_id, "openai")
        wait_for_log(impatient_proxy, f"Client left before the answer; still reading it to "
                                      f"bill gpt-4o-mini for user {key.user_id}")
        failed = wait_for_failure(db, key.user_id)
    finally:
        upstream.release(test_id)
    assert failed["error"] == "Client disconnected; the upstream did not answer within 1 s."
    assert failed["status"] is None
    assert db.billing.events_completion.count_documents({"user_id": key.user_id}) == 0
    assert upstream.calls[test_id] == 1
