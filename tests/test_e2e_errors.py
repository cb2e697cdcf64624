"""Bad input gets the caller's own error format and status, and nothing is billed."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

import anthropic
import httpx
import openai
import pytest

from conftest import ApiKey, Proxy, anthropic_client, openai_client, wait_for_events
from fake_upstream import FakeUpstream

MESSAGES = [{"role": "user", "content": "Hello!"}]
def assert_nothing_billed(proxy: Proxy, db, key: ApiKey) -> None:
    """Events are written in order, so once a later good request's event is stored, any
    event of the failed request would be stored too."""
    openai_client(proxy, key.token).chat.completions.create(model="gpt-4o-mini",
                                                        messages=MESSAGES)
    events = wait_for_events(db, key.user_id, 1)
    assert len(events) == 1 and events[0]["status"] == 200


def test_unknown_key_openai(proxy: Proxy):
    with pytest.raises(openai.AuthenticationError) as err:
        openai_client(proxy, "not-a-key").chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    assert "not-a-key" not in err.value.response.text


def test_missing_key_anthropic(proxy: Proxy):
    response = httpx.post(f"{proxy.url}/v1/messages", json={"model": "claude-x"})
    assert response.status_code == 401
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "authentication_error"


def test_unknown_key_anthropic(proxy: Proxy):
    with pytest.raises(anthropic.AuthenticationError) as err:
        anthropic_client(proxy, "sk-ant-wrong").messages.create(
            model="claude-opus-4-7", max_tokens=5, messages=MESSAGES)
    assert err.value.status_code == 401
    assert err.value.body["error"]["type"] == "authentication_error"


def test_expired_key(proxy: Proxy, make_key, db, upstream: FakeUpstream):
    expired = make_key(expiry=datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(openai.AuthenticationError):
        openai_client(proxy, expired.token).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES)
    valid_until_later = make_key(expiry=datetime.now(UTC) + timedelta(days=1))
    openai_client(proxy, valid_until_later.token).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES)
    assert len(wait_for_events(db, valid_until_later.user_id, 1)) == 1
    assert db.billing.events_completion.count_documents({"user_id": expired.user_id}) == 0


def test_key_without_completion_access(proxy: Proxy, make_key):
    other = make_key(access_level="READ")
    with pytest.raises(openai.AuthenticationError):
        openai_client(proxy, other.token).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES)


def test_unknown_model(proxy: Proxy, key: ApiKey, db):
    with pytest.raises(openai.NotFoundError) as err:
        openai_client(proxy, key.token).chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError) as aerr:
        anthropic_client(proxy, key.token).messages.create(
            model="nope", max_tokens=5, messages=MESSAGES)
    assert aerr.value.body["error"]["type"] == "not_found_error"
    assert_nothing_billed(proxy, db, key)


@pytest.mark.parametrize(("path", "headers_key"), [("/v1/chat/completions", "Authorization"),
                                                   ("/v1/messages", "X-API-Key")])
def test_bad_json(proxy: Proxy, key: ApiKey, db, path: str, headers_key: str):
    token = f"Bearer {key.token}" if headers_key == "Authorization" else key.token
    response = httpx.post(f"{proxy.url}{path}", content=b'{"model": "gpt-4o-mini", ',
                          headers={headers_key: token, "content-type": "application/json"})
    assert response.status_code == 400
    body = response.json()
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == "invalid_json"
    assert_nothing_billed(proxy, db, key)


@pytest.mark.parametrize("model", ["meta-llama/x\\udcff", "vllm-\\u0000", "vllm-" + "x" * 300])
def test_unstorable_model_name_is_refused(proxy: Proxy, key: ApiKey, db, model: str):
    """A name no event could be stored under (lone surrogate, control character, huge):
    400 in the caller's format, never sent upstream, nothing billed."""
    content = b'{"model": "%s", "stream": true, "messages": []}' % model.encode()
    response = httpx.post(f"{proxy.url}/v1/chat/completions", content=content,
                          headers={"Authorization": f"Bearer {key.token}",
                                   "content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_model"
    assert_nothing_billed(proxy, db, key)


def test_lone_surrogate_in_a_streamed_prompt_is_forwarded_and_billed(proxy: Proxy,
                                                                    key: ApiKey, db):
    """Valid JSON that is no UTF-8 once decoded: re-encoding it for include_usage must not
    fail (it used to: 502)."""
    content = (b'{"model": "gpt-4o-mini", "stream": true, '
               b'"messages": [{"role": "user", "content": "hi \\ud800"}]}')
    response = httpx.post(f"{proxy.url}/v1/chat/completions", content=content,
                          headers={"Authorization": f"Bearer {key.token}",
                                   "content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert "data: [DONE]" in response.text
    [event] = wait_for_events(db, key.user_id, 1)
    assert not event["usage_estimated"]


def test_upstream_down(proxy: Proxy, key: ApiKey, db):
    with pytest.raises(openai.InternalServerError) as err:
        openai_client(proxy, key.token).chat.completions.create(
            model="down-model", messages=MESSAGES, stream=True)
    assert err.value.status_code == 502
    assert err.value.body["type"] == "api_error"  # the SDK parsed our JSON error
    assert "127.0.0.1" not in err.value.response.text
    with pytest.raises(anthropic.InternalServerError):
        anthropic_client(proxy, key.token).messages.create(
            model="down-model", max_tokens=5, messages=MESSAGES)
    assert_nothing_billed(proxy, db, key)


def test_backend_without_credentials(proxy: Proxy, key: ApiKey):
    with pytest.raises(openai.InternalServerError) as err:
        openai_client(proxy, key.token).chat.completions.create(
            model="needs-missing-env", messages=MESSAGES)
    assert err.value.status_code == 503
    assert "LLM_BILLING_TEST_UNSET_VARIABLE" not in err.value.response.text


@pytest.mark.parametrize("status", [429, 500])
def test_upstream_error_is_passed_on_and_not_billed(proxy: Proxy, key: ApiKey, db,
                                                    status: int):
    with pytest.raises(openai.APIStatusError) as err:
        openai_client(proxy, key.token).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            extra_headers={"X-Fake-Scenario": f"status-{status}"})
    assert err.value.status_code == status
    assert_nothing_billed(proxy, db, key)


def test_unknown_path(proxy: Proxy, key: ApiKey):
    response = httpx.get(f"{proxy.url}/v1/nothing",
                         headers={"Authorization": f"Bearer {key.token}"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_path"


def test_client_cannot_spoof_user_headers(proxy: Proxy, key: ApiKey, upstream: FakeUpstream,
                                          test_id: str):
    openai_client(proxy, key.token).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES,
        extra_headers={"X-Test-Id": test_id, "X-User-ID": "someone-else",
                       "X-Plan-ID": "enterprise"})
    headers = upstream.exchange(test_id).headers
    assert headers["x-user-id"] == key.user_id and headers["x-plan-id"] == "enterprise"


@pytest.mark.parametrize("path", ["/webhook/stripe", "/v1/chat/completions", "/v1/nope"])
def test_an_announced_huge_body_is_refused_before_it_is_read(proxy: Proxy, path: str):
    """mitmproxy reads a body before any hook may answer: without a limit a client could
    announce (and send) gigabytes to any path. 413 at once, nothing read."""
    with socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])), 5) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {10 << 30}\r\n\r\n".encode())
        s.settimeout(5)
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
