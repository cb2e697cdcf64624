"""Config parsing: the shipped example loads; mistakes are named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_billing.core.config import ConfigError, Secret, parse_config
from llm_billing.core.usage import Protocol

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
