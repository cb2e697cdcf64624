"""OpenAI's duration format for x-ratelimit-reset-* and retry messages."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_billing.core.dates import openai_duration

DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?|(\d+)ms")


@pytest.mark.parametrize(("seconds", "text"), [
    (0.12, "120ms"), (6, "6s"), (90, "1m30s"), (360, "6m"), (1.5, "1.5s"),
    (119.99, "1m59.99s"), (119.996, "2m"), (59.999, "1m"), (0.9996, "1s"),
    (3661.25, "1h1m1.25s"), (0, "0ms"), (-3, "0ms")])
def test_openai_duration(seconds: float, text: str):
    assert openai_duration(seconds) == text


@given(st.floats(0, 10**6))
def test_parsed_duration_is_the_input_rounded_and_no_part_reaches_60(seconds: float):
    text = openai_duration(seconds)
    match = DURATION.fullmatch(text)
    assert match and text, text
    hours, minutes, secs, millis = match.groups()
    if millis is not None:
        assert int(millis) < 1000
        parsed = int(millis) / 1000
    else:
        assert int(minutes or 0) < 60 and float(secs or 0) < 60, text
        parsed = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs or 0)
    assert abs(parsed - seconds) <= 0.005 + 1e-6, text
