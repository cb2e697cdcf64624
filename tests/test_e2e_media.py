"""Images through a real mitmdump with the openai SDK: held and billed by kind, not by
their base64 length."""

from __future__ import annotations

import base64
import os

import openai
import pytest

from conftest import ApiKey, Proxy, openai_client, set_plan, wait_for_events

IMAGE_URL = "data:image/png;base64," + base64.b64encode(os.urandom(300 * 1024)).decode()
MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "What is in this picture?"},
    {"type": "image_url", "image_url": {"url": IMAGE_URL}}]}]


def test_starter_user_sends_a_300_kib_image(proxy: Proxy, key: ApiKey, db):
    set_plan(db, key.user_id, "starter")  # 10,000 tokens per minute
    raw = openai_client(proxy, key.token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    assert raw.http_response.status_code == 200
    held = 10_000 - int(raw.headers["x-ratelimit-remaining-tokens"])
    assert 765 < held < 2_000  # one image, the question and max_tokens; not 77,000


def test_cut_stream_with_an_image_bills_a_small_prompt_estimate(proxy: Proxy, key: ApiKey,
                                                                db):
    with pytest.raises(openai.APIError):
        list(openai_client(proxy, key.token).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            extra_headers={"X-Fake-Scenario": "cut"}))
    [event] = wait_for_events(db, key.user_id, 1)
    assert event["usage_estimated"] is True and event["complete"] is False
    assert 765 < event["prompt_n"] < 2_000
