"""The proxy's own API for key holders (sans-I/O): the paths it answers itself, and the
bodies of ``/v1/models`` (OpenAI's and Anthropic's formats), ``/v1beta/models`` (Gemini's)
and ``/v1/usage``."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from .config import Config, Route
from .plans import Plan
from .usage import Protocol

MODELS_PATH = "/v1/models"
GEMINI_MODELS_PATH = "/v1beta/models"  # google-genai's models.list() and models.get()
USAGE_PATH = "/v1/usage"
EPOCH = "1970-01-01T00:00:00Z"  # Anthropic's "release date unknown"
ANTHROPIC_PAGE = 20  # Anthropic's default ``limit``
ANTHROPIC_MAX_PAGE = 1000
GEMINI_PAGE = 50  # Gemini's default ``pageSize``
GEMINI_MAX_PAGE = 1000
GEMINI_METHODS = ["generateContent"]  # what Gemini lists; its streaming variant is implied


def api_route(path: str, anthropic: bool, google: bool = False) -> Route | None:
    """A route for a path the proxy answers itself (api_info.py), so that KeyAuth
    authenticates it like any other. Its protocol picks the response and error format:
    Anthropic's for a request from Anthropic's SDK (it sends ``anthropic-version``),
    Google's for one from Google's (``from_google``; its key may come as ``?key=`` then)
    and under ``/v1beta``, else OpenAI's."""
    google = google or path == GEMINI_MODELS_PATH or path.startswith(GEMINI_MODELS_PATH + "/")
    if path in (MODELS_PATH, USAGE_PATH, GEMINI_MODELS_PATH) or model_in_path(path, google):
        return Route(path, Protocol.GEMINI if google else Protocol.ANTHROPIC_MESSAGES
                     if anthropic else Protocol.OPENAI_CHAT)
    return None


def from_google(headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
    """A request from Google's SDK (or one keyed as Google's API is): google-genai calls
    ``/v1/models`` too (its default API version is ``v1``), where OpenAI's SDK does."""
    return "x-goog-api-key" in headers or "x-goog-api-client" in headers or "key" in query


def model_in_path(path: str, google: bool = False) -> str | None:
    """The id of ``/v1/models/{id}`` (a configured name may hold ``/`` or ``*``), and of
    ``/v1beta/models/{id}`` for Google's API — where ``{id}:countTokens`` and the like are
    method calls, not ids (the router answers them)."""
    for prefix in (MODELS_PATH, GEMINI_MODELS_PATH) if google else (MODELS_PATH,):
        if path.startswith(prefix + "/") and len(path) > len(prefix) + 1:
            model = unquote(path[len(prefix) + 1:])
            return None if google and ":" in model else model
    return None


def listed_models(config: Config) -> dict[str, str]:
    """Model name (or pattern, as configured) → the backend that serves it, in file order;
    backends whose credentials are missing serve nothing (their requests get 503)."""
    models: dict[str, str] = {}
    for backend in config.backends:
        if not backend.auth.missing_env:
            for model in backend.models:
                models.setdefault(model, backend.name)
    return models


def openai_model(model: str, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}


def anthropic_model(model: str) -> dict[str, Any]:
    return {"type": "model", "id": model, "display_name": model, "created_at": EPOCH,
            "lifecycle": "active"}


def openai_models(models: Mapping[str, str]) -> dict[str, Any]:
    return {"object": "list", "data": [openai_model(m, o) for m, o in models.items()]}


def anthropic_models(models: Mapping[str, str], query: Mapping[str, str]) -> dict[str, Any]:
    """One page, as Anthropic pages it: ``limit``, ``after_id``, ``before_id``."""
    names = list(models)
    try:
        limit = min(max(int(query.get("limit", ANTHROPIC_PAGE)), 1), ANTHROPIC_MAX_PAGE)
    except ValueError:
        limit = ANTHROPIC_PAGE
    if (before := query.get("before_id")) in models:
        end = names.index(before)
        page, more = names[max(0, end - limit):end], end > limit
    else:
        start = names.index(after) + 1 if (after := query.get("after_id")) in models else 0
        page, more = names[start:start + limit], start + limit < len(names)
    return {"data": [anthropic_model(m) for m in page], "has_more": more,
            "first_id": page[0] if page else None, "last_id": page[-1] if page else None}


def gemini_model(model: str, owner: str) -> dict[str, Any]:
    """A model as Gemini's API describes one (``models/{id}``); limits and sampling
    defaults are the backend's, unknown here, so left out (all optional)."""
    return {"name": f"models/{model}", "baseModelId": model, "displayName": model,
            "description": f"{model}, served by {owner}.",
            "supportedGenerationMethods": GEMINI_METHODS}


def gemini_models(models: Mapping[str, str], query: Mapping[str, str]) -> dict[str, Any]:
    """One page, as Gemini pages it: ``pageSize`` and the opaque ``pageToken`` of the
    previous page's ``nextPageToken`` (absent on the last page). ValueError for a token
    that is not one of ours (Gemini answers 400)."""
    names = list(models)
    try:
        size = int(query.get("pageSize", GEMINI_PAGE))
    except ValueError:
        size = GEMINI_PAGE
    size = min(size, GEMINI_MAX_PAGE) if size > 0 else GEMINI_PAGE
    start = 0
    if token := query.get("pageToken"):
        try:
            start = names.index(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
                                .decode())
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ValueError("Invalid page token.") from None
    page = names[start:start + size]
    body: dict[str, Any] = {"models": [gemini_model(m, models[m]) for m in page]}
    if start + size < len(names):
        body["nextPageToken"] = base64.urlsafe_b64encode(
            names[start + size].encode()).decode().rstrip("=")
    return body


def quota_left(plan: Plan, used: int, in_flight: int = 0) -> int | None:
    """Tokens left of the month's quota once ``used`` (settled) and ``in_flight`` (held by
    requests running) are counted; None for a plan without a monthly quota."""
    if not plan.monthly_tokens:
        return None
    return max(0, plan.monthly_tokens - used - in_flight)


def usage_body(user_id: Any, month: str, doc: Mapping[str, Any], unwritten: Mapping[str, Any],
               plan: Plan, cost: Decimal, currency: str | None,
               tpm: Mapping[str, Any] | None) -> dict[str, Any]:
    """``/v1/usage``: the month's usage document plus what this instance settled but has not
    written yet (``unwritten``: tokens, requests, usage, reserved)."""
    classes = dict(doc.get("usage") or {})
    for name, value in (unwritten.get("usage") or {}).items():
        classes[name] = classes.get(name, 0) + value
    tokens = doc.get("tokens", 0) + unwritten.get("tokens", 0)
    overage = doc.get("overage_cost")
    return {
        "object": "usage", "user_id": str(user_id), "month": month,
        "requests": doc.get("requests", 0) + unwritten.get("requests", 0),
        "tokens": tokens, "usage": classes,
        "cost": str(cost), "currency": currency,
        "overage_tokens": doc.get("overage_tokens", 0),
        "overage_cost": str(overage.to_decimal() if hasattr(overage, "to_decimal")
                            else overage or 0),
        "plan": {"id": plan.id, "name": plan.name, "monthly_tokens": plan.monthly_tokens or None,
                 "tokens_per_minute": plan.tokens_per_minute or None,
                 "overage": plan.overage},
        "quota_left": quota_left(plan, tokens, unwritten.get("reserved", 0)),
        "tpm": tpm,
    }
