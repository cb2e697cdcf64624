"""Proxy configuration: TOML text in, validated typed config out (sans-I/O).

Errors name the offending key (``backends[2].auth.type``) or, for TOML syntax, the line.
``${NAME}`` in an auth value is replaced from the environment given to ``parse_config``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .alerts import SECRET_ENV, AlertSettings, parse_alerts
from .backend_tokenizer import ESTIMATE, UsageFallback, parse_usage_fallback
from .expression import Expression, ExpressionError, compile_expression
from .plans import Plan, parse_plans
from .prices import EMPTY, PriceTable, parse_prices, unpriced_models
from .stripe_rules import StripeSettings, parse_stripe
from .usage import Protocol
from .validation import ConfigValueError, non_negative_int

AUTH_TYPES = ("bearer", "header", "query", "none")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

_MODEL_IN_PATH = "{model}"
DEFAULT_MAX_BODY_BYTES = 8 << 20

DEFAULT_ROUTES = {
    "/v1/chat/completions": Protocol.OPENAI_CHAT,
    "/v1/completions": Protocol.OPENAI_COMPLETIONS,
    "/v1/embeddings": Protocol.OPENAI_EMBEDDINGS,
    "/v1/responses": Protocol.OPENAI_RESPONSES,
    "/v1/messages": Protocol.ANTHROPIC_MESSAGES,
    "/v1/messages/count_tokens": Protocol.ANTHROPIC_COUNT_TOKENS,
    "/v1beta/models/{model}:generateContent": Protocol.GEMINI,
    "/v1beta/models/{model}:streamGenerateContent": Protocol.GEMINI,
    "/v1/models/{model}:generateContent": Protocol.GEMINI,
    "/v1/models/{model}:streamGenerateContent": Protocol.GEMINI,
}


class ConfigError(ValueError):
    pass


class Secret(str):
    """A credential: a str that never shows itself in repr or logs."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass(frozen=True, slots=True)
class UpstreamAuth:
    type: str  # one of AUTH_TYPES
    name: str  # header or query parameter name ("" for bearer/none)
    value: Secret | None  # None when the environment lacks the variable
    missing_env: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    scheme: str
    host: str
    port: int
    path_prefix: str
    models: tuple[str, ...]
    auth: UpstreamAuth
    usage_fallback: UsageFallback = ESTIMATE  # how to bill a response without usage

    def serves(self, model: str) -> bool:
        return any(
            model.startswith(pattern[:-1]) if pattern.endswith("*") else model == pattern
            for pattern in self.models
        )


@dataclass(frozen=True, slots=True)
class Route:
    path: str  # exact, or with one {model} segment (Gemini puts the model in the path)
    protocol: Protocol
    metering: Expression | None = None  # bill this value instead of the provider's usage
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # cap on what an expression may keep
    pattern: re.Pattern[str] | None = None

    def model_from_path(self, path: str) -> str | None:
        match = self.pattern.fullmatch(path) if self.pattern else None
        return match.group("model") if match else None

    @property
    def streaming_path(self) -> bool:
        return self.path.endswith(":streamGenerateContent")


@dataclass(frozen=True, slots=True)
class Config:
    backends: tuple[Backend, ...]
    routes: Mapping[str, Route]
    default_plan: str = "free"
    warnings: tuple[str, ...] = field(default=())
    prices: PriceTable = EMPTY
    plans: Mapping[str, Plan] = field(default_factory=lambda: parse_plans(None))
    reserve_output_tokens: int = 256  # held for a request that sets no output limit
    stripe: StripeSettings = field(default_factory=lambda: parse_stripe(None, {}))
    alerts: AlertSettings = field(default_factory=AlertSettings)

    def plan(self, plan_id: str | None) -> Plan:
        """The plan of that id, else the default plan."""
        return self.plans.get(plan_id or "") or self.plans[self.default_plan]

    def backend_for(self, model: str) -> Backend | None:
        """First backend, in file order, whose model list matches."""
        return next((b for b in self.backends if b.serves(model)), None)

    def backend_named(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def route_for(self, path: str) -> Route | None:
        """The route of a request path (without query): exact first, then templates."""
        if (route := self.routes.get(path)) is not None and route.pattern is None:
            return route
        return next((r for r in self.routes.values()
                     if r.pattern is not None and r.pattern.fullmatch(path)), None)


def parse_config(text: str, env: Mapping[str, str]) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}") from None
    warnings: list[str] = []
    proxy = _table(data, "proxy", "proxy")
    default_plan = _str(proxy.get("default_plan", "free"), "proxy.default_plan")
    backends = tuple(
        _backend(item, f"backends[{i}]", env, warnings)
        for i, item in enumerate(_list(data, "backends"))
    )
    if not backends:
        raise ConfigError("backends: at least one [[backends]] entry is required")
    names = [b.name for b in backends]
    if dup := {n for n in names if names.count(n) > 1}:
        raise ConfigError(f"backends: duplicate name {sorted(dup)[0]!r}")
    routes = _routes(data)
    try:
        prices = parse_prices(data.get("prices"))
        plans = parse_plans(data.get("plans"))
        stripe = parse_stripe(data.get("stripe"), env)
        alerts = parse_alerts(data.get("alerts"), env)
    except ConfigValueError as e:
        raise ConfigError(str(e)) from None
    if stripe.fallback_plan not in plans:
        raise ConfigError(f"stripe.fallback_plan: no plan {stripe.fallback_plan!r}")
    warnings += _price_warnings(backends, prices)
    if default_plan not in plans:
        raise ConfigError(f"proxy.default_plan: no plan {default_plan!r} "
                          f"(plans: {', '.join(plans)})")
    try:
        reserve = non_negative_int(proxy.get("reserve_output_tokens", 256),
                                   "proxy.reserve_output_tokens")
    except ConfigValueError as e:
        raise ConfigError(str(e)) from None
    if alerts.url and not alerts.secret:
        warnings.append(f"alerts.url is set but {SECRET_ENV} is not: quota alerts are off")
    return Config(backends, routes, default_plan, tuple(warnings), prices, plans, reserve,
                  stripe, alerts)


def _price_warnings(backends: tuple[Backend, ...], prices: PriceTable) -> list[str]:
    """One line per routed model (or pattern) without a price of its own: a model added to
    a backend but not to [prices.models] would otherwise be billed at the default silently.
    """
    if not prices.prices_anything:
        return []  # no [prices] at all: events carry no cost, by choice
    default = prices.default
    fallback = (f"the default price (input {default.input}, output {default.output} "
                f"per million)" if default else "no price (its events carry no cost)")
    return [f"model {model!r} of backend {backend.name!r} has no entry in [prices.models]; "
            f"it is billed at {fallback}"
            for backend in backends for model in unpriced_models(prices, backend.models)]


def _routes(data: dict[str, Any]) -> dict[str, Route]:
    if "routes" not in data:
        return {path: _route(path, proto, None, DEFAULT_MAX_BODY_BYTES)
                for path, proto in DEFAULT_ROUTES.items()}
    routes: dict[str, Route] = {}
    for i, item in enumerate(_list(data, "routes")):
        where = f"routes[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be a table")
        path = _str(item.get("path"), f"{where}.path")
        if not path.startswith("/"):
            raise ConfigError(f"{where}.path: must start with '/', got {path!r}")
        proto = _str(item.get("protocol", DEFAULT_ROUTES.get(path, "")), f"{where}.protocol")
        try:
            protocol = Protocol(proto)
        except ValueError:
            choices = ", ".join(p.value for p in Protocol)
            raise ConfigError(f"{where}.protocol: {proto!r} is not one of {choices}") from None
        if path in routes:
            raise ConfigError(f"{where}.path: duplicate route {path!r}")
        metering = None
        if "metering" in item:
            source = _str(item["metering"], f"{where}.metering")
            try:
                metering = compile_expression(source)
            except ExpressionError as e:
                raise ConfigError(f"{where}.metering: {e}") from None
        cap = item.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
            raise ConfigError(f"{where}.max_body_bytes: must be a positive integer")
        routes[path] = _route(path, protocol, metering, cap)
    return routes


def _route(path: str, protocol: Protocol, metering: Expression | None, cap: int) -> Route:
    pattern = None
    if _MODEL_IN_PATH in path:
        before, _, after = path.partition(_MODEL_IN_PATH)
        pattern = re.compile(re.escape(before) + r"(?P<model>[^/:]+)" + re.escape(after))
    return Route(path, protocol, metering, cap, pattern)


def _backend(item: Any, where: str, env: Mapping[str, str], warnings: list[str]) -> Backend:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    name = _str(item.get("name"), f"{where}.name")
    url = _str(item.get("url"), f"{where}.url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.url: expected http(s)://host[:port][/prefix], got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{where}.url: bad port in {url!r}") from None
    models = item.get("models")
    if not isinstance(models, list) or not models or not all(
        isinstance(m, str) and m for m in models
    ):
        raise ConfigError(f"{where}.models: must be a non-empty list of model names")
    auth = _auth(item.get("auth", {"type": "none"}), f"{where}.auth", env)
    if auth.missing_env:
        warnings.append(
            f"backend {name!r}: environment variable {', '.join(auth.missing_env)} is not set;"
            " its requests are refused until it is"
        )
    try:
        fallback = parse_usage_fallback(item.get("usage_fallback", "estimate"),
                                        f"{where}.usage_fallback")
    except ConfigValueError as e:
        raise ConfigError(str(e)) from None
    return Backend(
        name=name,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        path_prefix=parts.path.rstrip("/"),
        models=tuple(models),
        auth=auth,
        usage_fallback=fallback,
    )


def _auth(item: Any, where: str, env: Mapping[str, str]) -> UpstreamAuth:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table like {{ type = \"bearer\", value = ... }}")
    kind = _str(item.get("type"), f"{where}.type")
    if kind not in AUTH_TYPES:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {', '.join(AUTH_TYPES)}")
    if kind == "none":
        return UpstreamAuth("none", "", None)
    name = ""
    if kind in ("header", "query"):
        name = _str(item.get("name"), f"{where}.name")
    template = _str(item.get("value"), f"{where}.value")
    missing = tuple(m for m in _ENV_REF.findall(template) if m not in env)
    if missing:
        return UpstreamAuth(kind, name, None, missing)
    value = _ENV_REF.sub(lambda m: env[m.group(1)], template)
    return UpstreamAuth(kind, name, Secret(value))


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table")
    return value


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a non-empty string")
    return value
