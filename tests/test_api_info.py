"""The proxy's own API for key holders, through a real mitmdump with the official SDKs:
``/v1/models``, ``/v1/usage``, Anthropic's ``count_tokens`` (forwarded, never billed) and
the quota headers on completions."""

from __future__ import annotations

import math
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from conftest import (
    UPSTREAM_KEYS,
    ApiKey,
    Proxy,
    anthropic_client,
    gemini_client,
    openai_client,
    set_plan,
    usage_doc,
    wait_for_events,
    wait_for_usage,
)
from fake_upstream import FakeUpstream, prompt_tokens_for

MESSAGES = [{"role": "user", "content": "Hello!"}]
# What conftest's write_config lists, in file order; "needs-missing-env" has no credential.
MODELS = ["gpt-4o-mini", "o3-mini", "o4-mini", "gpt-4.1-mini", "gpt-4.1",
          "text-embedding-3-small", "gpt-3.5-turbo-instruct", "vllm-*", "llamacpp-*",
          "meta-llama/*", "claude-*", "gemini-*", "down-model"]


def nothing_billed(db, user_id: str) -> bool:
    return (db.billing.events_completion.count_documents({"user_id": user_id}) == 0
            and db.billing.events_failed.count_documents({"user_id": user_id}) == 0
            and usage_doc(db, user_id) == {})


def test_openai_models_list(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db,
                            test_id: str):
    client = openai_client(proxy, key.token)
    models = list(client.models.list(extra_headers={"X-Test-Id": test_id}))
    assert [m.id for m in models] == MODELS
    assert {m.object for m in models} == {"model"}
    assert models[0].owned_by == "fake-openai" and models[10].owned_by == "fake-anthropic"
    assert client.models.retrieve("meta-llama/*").owned_by == "fake-openai"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert test_id not in upstream.calls  # answered by the proxy, never forwarded
    assert nothing_billed(db, key.user_id)


def test_anthropic_models_list_pages(proxy: Proxy, key: ApiKey, db):
    client = anthropic_client(proxy, key.token)
    page = client.models.list(limit=5)
    assert [m.id for m in page.data] == MODELS[:5] and page.has_more
    assert page.first_id == MODELS[0] and page.last_id == MODELS[4]
    models = list(client.models.list(limit=5))  # the SDK follows after_id to the end
    assert [m.id for m in models] == MODELS
    assert {(m.type, m.lifecycle) for m in models} == {("model", "active")}
    assert models[10].display_name == "claude-*" and models[10].created_at.year == 1970
    assert [m.id for m in client.models.list(before_id=MODELS[5], limit=2).data] == \
        MODELS[3:5]
    assert client.models.retrieve("claude-*").id == "claude-*"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-model")
    assert nothing_billed(db, key.user_id)


def test_unauthenticated_gets_401_in_the_callers_format(proxy: Proxy):
    with pytest.raises(openai.AuthenticationError) as openai_error:
        openai_client(proxy, "not-a-key").models.list()
    assert openai_error.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError) as anthropic_error:
        anthropic_client(proxy, "not-a-key").models.list()
    assert anthropic_error.value.body["error"]["type"] == "authentication_error"
    for path in ("/v1/usage", "/v1/models", "/v1/models/gpt-4o-mini"):
        response = httpx.get(f"{proxy.url}{path}")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "missing_api_key"
    response = httpx.get(f"{proxy.url}/v1/usage", headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 401 and response.json()["type"] == "error"


def test_count_tokens_is_forwarded_and_never_billed(proxy: Proxy, upstream: FakeUpstream,
                                                    key: ApiKey, db, test_id: str):
    set_plan(db, key.user_id, "quota-test")  # a blocking quota: nothing may be held either
    client = anthropic_client(proxy, key.token)
    counted = client.messages.count_tokens(model="claude-opus-4-7", messages=MESSAGES,
                                           extra_headers={"X-Test-Id": test_id})
    exchange = upstream.exchange(test_id)
    assert counted.input_tokens == prompt_tokens_for({"messages": MESSAGES}) > 0
    assert exchange.path == "/anthropic/v1/messages/count_tokens"
    assert exchange.headers["x-api-key"] == UPSTREAM_KEYS["FAKE_ANTHROPIC_KEY"]
    # a billed request afterwards is written; the count before it never is
    client.messages.create(model="claude-opus-4-7", max_tokens=9, messages=MESSAGES)
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["path"] == "/v1/messages"
    doc = wait_for_usage(db, key.user_id, 1, field="requests")
    assert doc["requests"] == 1 and doc["tokens"] == math.ceil(event["tokens_billed"])
    assert db.billing.events_failed.count_documents({"user_id": key.user_id}) == 0


def get_usage(proxy: Proxy, token: str) -> dict:
    response = httpx.get(f"{proxy.url}/v1/usage", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_usage_equals_the_sum_of_the_users_events(proxy: Proxy, make_key, db):
    key, other = make_key(), make_key()
    set_plan(db, key.user_id, "starter")
    assert get_usage(proxy, key.token)["tokens"] == 0
    chat = openai_client(proxy, key.token)
    chat.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    for _ in chat.chat.completions.create(model="o3-mini", messages=MESSAGES, stream=True):
        pass
    anthropic_client(proxy, key.token).messages.create(
        model="claude-opus-4-7", max_tokens=9, messages=MESSAGES)
    openai_client(proxy, other.token).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES)  # another user's: not in this key's usage
    events = wait_for_events(db, key.user_id, 3)
    assert len(events) == 3
    usage = get_usage(proxy, key.token)  # settled usage, written or not yet
    tokens = sum(math.ceil(e["tokens_billed"]) for e in events)
    assert usage["tokens"] == tokens and usage["requests"] == 3
    for name in ("prompt_tokens", "completion_tokens", "cache_read_tokens"):
        assert usage["usage"].get(name, 0) == sum(e["usage"][name] for e in events)
    assert Decimal(usage["cost"]) == sum(e["cost"].to_decimal() for e in events) > 0
    assert usage["plan"] == {"id": "starter", "name": "Starter", "monthly_tokens": 100_000,
                             "tokens_per_minute": 10_000, "overage": "0.002"}
    assert usage["quota_left"] == 100_000 - tokens
    assert usage["tpm"]["limit"] == 10_000 and 0 < usage["tpm"]["remaining"] <= 10_000
    doc = wait_for_usage(db, key.user_id, tokens)
    assert get_usage(proxy, key.token)["tokens"] == doc["tokens"] == tokens  # once written


def test_completions_carry_the_monthly_allowance_left(proxy: Proxy, make_key, db):
    blocking, overage, unlimited = make_key(), make_key(), make_key()
    set_plan(db, blocking.user_id, "quota-test", tokens_used=1000)  # 5,000 a month, blocks
    raw = openai_client(proxy, blocking.token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
    billed = raw.parse().usage.total_tokens
    assert raw.headers["x-ratelimit-limit-quota-tokens"] == "5000"
    left = int(raw.headers["x-ratelimit-remaining-quota-tokens"])
    # what this request holds while it runs (prompt bound + its 20) is not left
    assert 4000 - 20 - 200 < left <= 4000 - billed
    wait_for_usage(db, blocking.user_id, 1000 + billed)
    assert get_usage(proxy, blocking.token)["quota_left"] == 4000 - billed

    set_plan(db, overage.user_id, "starter", tokens_used=60_000)  # overage: never leases
    client = openai_client(proxy, overage.token)
    first = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
    assert raw.headers["x-ratelimit-limit-quota-tokens"] == "100000"
    left = int(raw.headers["x-ratelimit-remaining-quota-tokens"])
    assert 40_000 - first.usage.total_tokens - 20 - 200 < left \
        <= 40_000 - first.usage.total_tokens - raw.parse().usage.total_tokens
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"  # beside the TPM headers

    raw = openai_client(proxy, unlimited.token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES)  # the default plan here: enterprise
    assert "x-ratelimit-remaining-quota-tokens" not in raw.headers


def test_gemini_models_list_and_get(proxy: Proxy, upstream: FakeUpstream, key: ApiKey, db):
    """google-genai's models.list() / models.get() — ``GET /v1/models[/{id}]`` (its default
    API version) and ``/v1beta/models[/{id}]``, its key in ``x-goog-api-key`` — answered by
    the proxy in Gemini's format, paged, unknown models 404 in Google's error format."""
    default = gemini_client(proxy, key.token)
    beta = genai.Client(api_key=key.token, http_options=genai_types.HttpOptions(
        base_url=proxy.url, api_version="v1beta",
        retry_options=genai_types.HttpRetryOptions(attempts=1)))
    names = [f"models/{m}" for m in MODELS]
    for client in (default, beta):
        models = list(client.models.list())
        assert [m.name for m in models] == names
        assert {tuple(m.supported_actions) for m in models} == {("generateContent",)}
        assert models[11].display_name == "gemini-*"
        pager = client.models.list(config={"page_size": 5})
        assert [m.name for m in pager.page] == names[:5]
        assert [m.name for m in pager] == names  # follows nextPageToken to the end
        assert client.models.get(model="gemini-*").name == "models/gemini-*"
        assert client.models.get(model="models/meta-llama/*").display_name == "meta-llama/*"
        with pytest.raises(genai_errors.ClientError) as missing:
            client.models.get(model="no-such-model")
        assert missing.value.code == 404 and missing.value.status == "NOT_FOUND"
        assert "models/no-such-model" in missing.value.message
    stranger = gemini_client(proxy, "not-a-key")
    with pytest.raises(genai_errors.ClientError) as unauthenticated:
        stranger.models.list()
    assert unauthenticated.value.code == 401
    assert unauthenticated.value.status == "UNAUTHENTICATED"
    # Gemini's ?key= too; a page token that is not ours: 400 in Google's format
    response = httpx.get(f"{proxy.url}/v1beta/models", params={"key": key.token,
                                                               "pageToken": "bm90LW91cnM"})
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    # OpenAI's SDK still gets OpenAI's format at /v1/models
    assert openai_client(proxy, key.token).models.list().data[0].id == MODELS[0]
    assert not any(e.path.startswith(("/v1beta/models", "/v1/models"))
                   for e in upstream.exchanges.values())
    assert nothing_billed(db, key.user_id)
