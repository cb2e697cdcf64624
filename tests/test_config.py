"""Config parsing: the shipped example loads; mistakes are named precisely."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from llm_billing.core.config import Config, ConfigError, Secret, parse_config
from llm_billing.core.prices import unpriced_models
from llm_billing.core.usage import Protocol, Usage

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = """
[[backends]]
name = "b"
url = "http://127.0.0.1:8000/prefix/"
models = ["llama*", "exact"]
auth = { type = "bearer", value = "${KEY}" }
"""


def test_shipped_config_loads():
    config = parse_config((ROOT / "config/config.toml").read_text(),
                          {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k",
                           "GOOGLE_API_KEY": "k"})
    assert set(config.routes) == {"/v1/chat/completions", "/v1/completions",
                                  "/v1/embeddings", "/v1/responses", "/v1/messages",
                                  "/v1beta/models/{model}:generateContent",
                                  "/v1beta/models/{model}:streamGenerateContent"}
    route = config.route_for("/v1beta/models/gemini-2.5-flash:streamGenerateContent")
    assert route.model_from_path("/v1beta/models/gemini-2.5-flash:streamGenerateContent") \
        == "gemini-2.5-flash" and route.streaming_path
    assert config.route_for("/v1beta/models/a/b:generateContent") is None
    assert config.prices.price_for("claude-haiku-4-5").pattern == "claude-haiku-*"
    assert config.backend_for("claude-opus-4-7").name == "anthropic"
    assert config.backend_for("llama31-70b").name == "local-vllm"
    assert config.backend_for("gemini-2.5-pro").auth.type == "query"
    assert config.warnings == ()


def test_backend_matching_prefix_and_env():
    config = parse_config(MINIMAL, {"KEY": "secret-value"})
    backend = config.backend_for("llama-3")
    assert backend.path_prefix == "/prefix" and backend.port == 8000
    assert config.backend_for("exactly") is None
    assert backend.auth.value == "secret-value"
    assert "secret-value" not in repr(backend) and isinstance(backend.auth.value, Secret)
    assert config.routes["/v1/messages"].protocol is Protocol.ANTHROPIC_MESSAGES


def test_missing_env_is_a_warning_not_an_error():
    config = parse_config(MINIMAL, {})
    assert config.backends[0].auth.value is None
    assert "KEY" in config.warnings[0]


@pytest.mark.parametrize(("text", "message"), [
    ("[[backends]\n", "invalid TOML"),
    ("", "at least one"),
    (MINIMAL.replace('type = "bearer"', 'type = "magic"'), "backends[0].auth.type"),
    (MINIMAL.replace('"http://127.0.0.1:8000/prefix/"', '"ftp://x"'), "backends[0].url"),
    (MINIMAL.replace('["llama*", "exact"]', "[]"), "backends[0].models"),
    (MINIMAL + '[[routes]]\npath = "/v1/x"\nprotocol = "soap"\n', "routes[0].protocol"),
    (MINIMAL + MINIMAL, "duplicate name"),
])
def test_errors_name_the_spot(text: str, message: str):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(text, {"KEY": "k"})


def test_metering_expression_errors_point_into_the_config():
    text = MINIMAL + '[[routes]]\npath = "/v1/x"\nprotocol = "openai-chat"\n' \
        'metering = "json(allData).usage +"\n'
    with pytest.raises(ConfigError) as err:
        parse_config(text, {"KEY": "k"})
    assert "routes[0].metering" in str(err.value) and "^" in str(err.value)


SHIPPED_ENV = {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k", "GOOGLE_API_KEY": "k"}


def shipped() -> Config:
    return parse_config((ROOT / "config/config.toml").read_text(), SHIPPED_ENV)


def test_shipped_config_prices_every_routed_model():
    config = shipped()
    routed = [model for backend in config.backends for model in backend.models]
    assert unpriced_models(config.prices, routed) == []
    assert not any("prices" in warning for warning in config.warnings)


def cost(config: Config, model: str, **usage: int) -> Decimal:
    return config.prices.price_for(model).cost(Usage(**usage))


def test_shipped_prices_tell_model_families_apart():
    config = shipped()
    million = {"prompt_tokens": 1_000_000}
    out = {"completion_tokens": 1_000_000}
    assert cost(config, "claude-opus-4-1-20250805", **million) == 15
    assert cost(config, "claude-opus-4-20250514", **out) == 75
    assert cost(config, "claude-opus-4-5-20251101", **million) == 5  # a third of Opus 4.1
    assert cost(config, "claude-opus-4-7", **out) == 25
    assert cost(config, "claude-sonnet-4-5", **million) == 3
    assert cost(config, "claude-haiku-4-5", **million) == 1
    assert cost(config, "claude-3-5-haiku-20241022", **out) == 4
    assert cost(config, "gemini-2.5-pro", **million) == Decimal("1.25")
    assert cost(config, "gemini-2.5-pro", **out) == 10
    assert cost(config, "gemini-2.5-flash", **out) == Decimal("2.50")
    assert cost(config, "gemini-2.5-flash-lite", **out) == Decimal("0.40")
    assert cost(config, "gpt-4", **million) == 30 and cost(config, "gpt-4", **out) == 60
    assert cost(config, "gpt-4.1", **out) == 8 and cost(config, "gpt-4.1-mini", **out) \
        == Decimal("1.60") and cost(config, "gpt-4.1-nano", **out) == Decimal("0.40")
    assert cost(config, "o1", **out) == 60 and cost(config, "o1-pro", **out) == 600
    assert cost(config, "o3", **out) == 8 and cost(config, "o4-mini", **out) == Decimal("4.40")
    assert cost(config, "o4-mini", prompt_tokens=1_000_000, cache_read_tokens=1_000_000) \
        == Decimal("0.275")


def test_shipped_anthropic_cache_prices_follow_the_multipliers():
    """5-minute writes 1.25 x input, one-hour writes 2 x input, reads 0.1 x input (Claude 3
    Haiku's published prices are rounded: 0.30 and 0.03 for an input of 0.25)."""
    prices = shipped().prices
    claude = [p for p in [*prices.exact.values(), *prices.prefixes]
              if p.pattern.startswith("claude-") and p.pattern != "claude-3-haiku*"]
    assert len(claude) >= 8
    for price in claude:
        assert (price.cache_write, price.cache_write_1h, price.cache_read) == (
            price.input * Decimal("1.25"), price.input * 2, price.input / 10), price.pattern


def test_unpriced_routed_model_is_a_warning():
    priced = MINIMAL + '[prices]\ndefault = { input = "0.50", output = "1.50" }\n' \
        '[prices.models]\n"exact" = { input = "1" }\n'
    config = parse_config(priced, {"KEY": "k"})
    assert config.warnings == (
        "model 'llama*' of backend 'b' has no entry in [prices.models]; it is billed at "
        "the default price (input 0.50, output 1.50 per million)",)
    no_default = MINIMAL + '[prices.models]\n"exact" = { input = "1" }\n'
    [warning] = parse_config(no_default, {"KEY": "k"}).warnings
    assert "'llama*'" in warning and "no price (its events carry no cost)" in warning
    assert parse_config(MINIMAL, {"KEY": "k"}).warnings == ()  # no [prices]: nothing billed
