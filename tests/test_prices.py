"""Prices: exact decimal costs per token class, matching by exact name, prefix, default."""

from __future__ import annotations

from decimal import Decimal

import pytest

from llm_billing.core.config import ConfigError, parse_config
from llm_billing.core.prices import parse_prices
from llm_billing.core.usage import Usage
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
