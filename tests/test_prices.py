"""Prices: exact decimal costs per token class, matching by exact name, prefix, default."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from llm_billing.core.config import ConfigError, parse_config
from llm_billing.core.outcome import settle_usage
from llm_billing.core.prices import parse_prices, unpriced_models
from llm_billing.core.sse import SSEEvent
from llm_billing.core.usage import Protocol, Usage, UsageTracker, anthropic_usage
from llm_billing.core.validation import ConfigValueError

TABLE = parse_prices({
    "version": "2026-11-01",
    "default": {"input": "1", "output": "2"},
    "models": {
        "gpt-4o-mini": {"input": "0.15", "cache_read": "0.075", "output": "0.60"},
        "claude-*": {"input": "3", "cache_read": "0.30", "cache_write": "3.75", "output": 15},
        "claude-haiku-*": {"input": "1", "output": "5"},
        "o*": {"input": 1.1, "output": "4.4", "reasoning": "8.8"},
    },
})


def test_matching_exact_then_longest_prefix_then_default():
    assert TABLE.price_for("gpt-4o-mini").pattern == "gpt-4o-mini"
    assert TABLE.price_for("claude-haiku-4-5").pattern == "claude-haiku-*"
    assert TABLE.price_for("claude-opus-4-7").pattern == "claude-*"
    assert TABLE.price_for("llama31-70b").pattern == "*"


def test_every_class_at_its_own_price_exactly():
    usage = Usage(prompt_tokens=1_000_003, cache_read_tokens=400_000, cache_write_tokens=7,
                  completion_tokens=33, reasoning_tokens=0)
    cost = TABLE.price_for("claude-opus-4-7").cost(usage)
    assert cost == (Decimal(599_996) * 3 + Decimal(400_000) * Decimal("0.30")
                    + Decimal(7) * Decimal("3.75") + Decimal(33) * 15) / 1_000_000
    assert cost == Decimal("1.92050925")  # no float drift


def test_fallbacks_of_unpriced_classes():
    usage = Usage(prompt_tokens=10, cache_read_tokens=4, completion_tokens=20,
                  reasoning_tokens=5)
    # cache reads at input price, reasoning at its own price
    assert TABLE.price_for("o3").cost(usage) == \
        (Decimal(10) * Decimal("1.1") + 15 * Decimal("4.4") + 5 * Decimal("8.8")) / 1_000_000
    assert TABLE.price_for("llama").cost(usage) == Decimal(10 + 40) / 1_000_000


def test_float_prices_are_read_as_written():
    assert TABLE.price_for("o1").input == Decimal("1.1")


@pytest.mark.parametrize(("table", "message"), [
    ({"default": {"input": "-1"}}, "non-negative"),
    ({"default": {"input": "abc"}}, "not a number"),
    ({"default": {"inputs": "1"}}, "unknown class 'inputs'"),
    ({"models": {"x": "1"}}, "must be a table"),
    ({"default": {"input": True}}, "must be a number"),
])
def test_bad_prices(table: dict, message: str):
    with pytest.raises(ConfigValueError, match=message):
        parse_prices(table)


def test_price_errors_surface_as_config_errors():
    text = '[[backends]]\nname="b"\nurl="http://x"\nmodels=["m"]\n[prices.default]\ninput="x"\n'
    with pytest.raises(ConfigError, match=r"prices\.default\.input"):
        parse_config(text, {})


# --- Anthropic's cache lifetimes: one-hour writes have their own price ----------------

SONNET = parse_prices({"models": {"claude-*": {
    "input": "3", "cache_read": "0.30", "cache_write": "3.75", "cache_write_1h": "6",
    "output": "15"}}}).price_for("claude-sonnet-4-5")


def test_one_hour_cache_writes_at_their_own_price():
    million = 1_000_000
    one_hour = Usage(prompt_tokens=million, cache_write_tokens=million,
                     cache_write_1h_tokens=million)
    assert SONNET.cost(one_hour) == Decimal("6.00")  # was 3.75, the five-minute rate
    five_minutes = Usage(prompt_tokens=million, cache_write_tokens=million)
    assert SONNET.cost(five_minutes) == Decimal("3.75")
    mixed = Usage(prompt_tokens=1_500, cache_write_tokens=1_024, cache_write_1h_tokens=768,
                  cache_read_tokens=100, completion_tokens=9)
    assert SONNET.cost(mixed) == (376 * 3 + Decimal("0.30") * 100 + Decimal("3.75") * 256
                                  + 6 * 768 + 15 * 9) / million
    assert SONNET.as_document()["cache_write_1h"] == "6"


def test_one_hour_writes_fall_back_to_cache_write_then_input():
    usage = Usage(prompt_tokens=10, cache_write_tokens=10, cache_write_1h_tokens=4)
    table = parse_prices({"models": {"w": {"input": "1", "cache_write": "2"}, "i": {"input": "1"}}})
    assert table.price_for("w").cost(usage) == Decimal(10 * 2) / 1_000_000
    assert table.price_for("i").cost(usage) == Decimal(10) / 1_000_000
    # more one-hour writes than writes (a provider's inconsistency) never bills extra tokens
    odd = Usage(prompt_tokens=10, cache_write_tokens=2, cache_write_1h_tokens=5)
    assert SONNET.cost(odd) == (8 * 3 + 2 * 6) / Decimal(1_000_000)


def anthropic_events(*payloads: dict) -> UsageTracker:
    tracker = UsageTracker(Protocol.ANTHROPIC_MESSAGES)
    for payload in payloads:
        tracker.observe_event(SSEEvent(payload["type"], json.dumps(payload), None))
    return tracker


CACHE_USAGE = {"input_tokens": 50, "cache_creation_input_tokens": 1024,
               "cache_read_input_tokens": 2048, "output_tokens": 1,
               "cache_creation": {"ephemeral_5m_input_tokens": 256,
                                  "ephemeral_1h_input_tokens": 768}}


def test_anthropic_stream_reads_cache_lifetimes_from_message_start():
    usage = anthropic_events(
        {"type": "message_start", "message": {"usage": CACHE_USAGE}},
        {"type": "message_delta", "usage": {"output_tokens": 9}}).usage  # keeps the split
    assert usage == Usage(prompt_tokens=50 + 2048 + 1024, completion_tokens=9,
                          cache_read_tokens=2048, cache_write_tokens=1024,
                          cache_write_1h_tokens=768)
    assert usage.as_document()["cache_write_1h_tokens"] == 768
    assert list(usage.as_document())[:5] == ["prompt_tokens", "completion_tokens",
                                             "cache_read_tokens", "cache_write_tokens",
                                             "reasoning_tokens"]  # existing keys unchanged


def test_anthropic_cumulative_delta_may_restate_the_split():
    later = {**CACHE_USAGE, "output_tokens": 9,
             "cache_creation": {"ephemeral_5m_input_tokens": 24,
                                "ephemeral_1h_input_tokens": 1000}}
    usage = anthropic_events({"type": "message_start", "message": {"usage": CACHE_USAGE}},
                             {"type": "message_delta", "usage": later}).usage
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (1024, 1000)


def test_anthropic_non_streamed_and_split_without_total():
    tracker = UsageTracker(Protocol.ANTHROPIC_MESSAGES)
    tracker.observe_body(json.dumps({"type": "message", "content": [],
                                     "usage": CACHE_USAGE}).encode())
    assert tracker.usage.cache_write_1h_tokens == 768
    no_total = {"input_tokens": 5, "output_tokens": 1,
                "cache_creation": {"ephemeral_5m_input_tokens": 3,
                                   "ephemeral_1h_input_tokens": 4}}
    assert anthropic_usage(no_total) == Usage(prompt_tokens=12, completion_tokens=1,
                                              cache_write_tokens=7, cache_write_1h_tokens=4)
    too_many = {**CACHE_USAGE, "cache_creation": {"ephemeral_1h_input_tokens": 5000}}
    assert anthropic_usage(too_many).cache_write_1h_tokens == 1024  # a part, never more


def test_cut_stream_estimate_keeps_the_one_hour_writes():
    tracker = anthropic_events({"type": "message_start", "message": {"usage": CACHE_USAGE}})
    usage, method = settle_usage(tracker, prompt_tokens=100)
    assert method is not None and usage.cache_write_1h_tokens == 768


# --- Routed models without a price of their own -------------------------------------------

def test_unpriced_models_are_those_only_the_default_covers():
    table = parse_prices({"default": {"input": "1"}, "models": {
        "gpt-4o": {"input": "2.5"}, "gpt-4.1*": {"input": "2"}, "claude-*": {"input": "3"}}})
    routed = ["gpt-4o", "gpt-4", "gpt-4.1*", "gpt-4.1-mini*", "gpt-4*", "claude-opus-*",
              "o1*", "gpt-4o", "claude-x"]
    assert unpriced_models(table, routed) == ["gpt-4", "gpt-4*", "o1*"]
    # an exact entry prices one name, not every name a pattern matches
    assert unpriced_models(parse_prices({"models": {"o3": {"input": "2"}}}), ["o3*"]) == ["o3*"]
    # without a default, an unmatched model has no price at all: also reported
    assert unpriced_models(parse_prices({"models": {"a": {"input": "1"}}}), ["a", "b"]) == ["b"]
