"""ApiInfo addon: the proxy's own API for key holders, answered here, never forwarded.

- ``GET /v1/models``: the models the configured backends serve (patterns as configured),
  in OpenAI's format, or in Anthropic's (paged) when the request carries
  ``anthropic-version``; ``GET /v1/models/{id}`` one of them. In Gemini's format (and
  errors in Google's) for google-genai's ``models.list()`` and ``models.get()``: under
  ``/v1beta``, and under ``/v1`` (the SDK's default version) for a request from Google's
  SDK (core/api_info.py ``from_google``).
- ``GET /v1/usage``: the caller's month — tokens by class, requests, cost, plan, quota
  left and the tokens-per-minute bucket — from ``billing.usage`` plus what this instance
  settled but has not written yet (the Limits addon's ledger); TPM left from the bucket
  shared by every instance (``billing.tpm``) plus this instance's lease.

KeyAuth authenticates these paths like every API route (core/api_info.py gives them a
route); nothing here is billed or counted against a limit.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from bson import Decimal128
from mitmproxy import http
from pymongo.errors import PyMongoError

from . import context
from .core.api_info import (
    GEMINI_MODELS_PATH,
    MODELS_PATH,
    USAGE_PATH,
    anthropic_model,
    anthropic_models,
    api_route,
    gemini_model,
    gemini_models,
    listed_models,
    model_in_path,
    openai_model,
    openai_models,
    usage_body,
)
from .core.dates import month_of, next_month_start, openai_duration
from .core.request import RequestContext
from .errors import error_response
from .limits import Limits
from .settings import Settings
from .storage.database import Database
from .storage.ledger import Account, usage_id

logger = logging.getLogger(__name__)

SNAPSHOT_ATTEMPTS = 3


def _json(doc: dict[str, Any]) -> http.Response:
    return http.Response.make(200, json.dumps(doc), {"content-type": "application/json"})


class ApiInfo:
    def __init__(self, database: Database, settings: Settings, limits: Limits) -> None:
        self.database = database
        self.settings = settings
        self.limits = limits

    async def request(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        config = self.settings.config
        if flow.response or rc is None or rc.replayed or rc.backend is not None \
                or config is None or config.route_for(rc.path) is not None \
                or api_route(rc.path, False) is None:
            return
        fmt = rc.protocol.error_format
        if flow.request.method not in ("GET", "HEAD"):
            flow.response = error_response(fmt, 405, f"{rc.path} only answers GET.",
                                           "method_not_allowed")
            flow.response.headers["allow"] = "GET, HEAD"
            return
        anthropic, gemini = fmt == "anthropic", fmt == "google"
        if rc.path == USAGE_PATH:
            try:
                flow.response = _json(await self.usage(rc))
            except PyMongoError as e:
                logger.warning(f"Usage lookup failed: {type(e).__name__}")
                flow.response = error_response(fmt, 503, "Usage is temporarily unavailable; "
                                               "retry shortly.")
            except Exception:  # answered whatever happens: never forwarded upstream
                logger.exception("Usage lookup failed")
                flow.response = error_response(fmt, 500, "Usage lookup failed.")
            return
        models = listed_models(config)
        if gemini and rc.path in (MODELS_PATH, GEMINI_MODELS_PATH):
            try:
                flow.response = _json(gemini_models(models, flow.request.query))
            except ValueError as e:
                flow.response = error_response(fmt, 400, str(e))
            return
        if rc.path == MODELS_PATH:
            flow.response = _json(anthropic_models(models, flow.request.query) if anthropic
                                  else openai_models(models))
            return
        model = model_in_path(rc.path, gemini)
        if model not in models:
            version = rc.path.split("/")[1]
            message = (f"models/{model} is not found for API version {version}." if gemini else
                       f"The model '{model}' does not exist or you do not have access to it.")
            flow.response = error_response(fmt, 404, message, "model_not_found")
            return
        flow.response = _json(gemini_model(model, models[model]) if gemini
                              else anthropic_model(model) if anthropic
                              else openai_model(model, models[model]))

    async def usage(self, rc: RequestContext) -> dict[str, Any]:
        config = self.settings.config
        assert config is not None
        user_id, now = rc.caller.user_id, datetime.now(UTC)
        month, plan = month_of(now), rc.plan or config.plan(None)
        billing = (await self.database.client()).billing
        accounts = self.limits.ledger.accounts
        for _ in range(SNAPSHOT_ATTEMPTS):  # a write landing meanwhile: read both again
            account = accounts.get((user_id, month))
            before = _state(account)
            doc = await billing.usage.find_one({"_id": usage_id(user_id, month)}) or {}
            if accounts.get((user_id, month)) is account and _state(account) == before:
                break
        unwritten = self._unwritten(account, doc)
        start = datetime(now.year, now.month, 1, tzinfo=UTC)
        costs = await (await billing.events_completion.aggregate([
            {"$match": {"user_id": user_id,
                        "date_created": {"$gte": start, "$lt": next_month_start(now)}}},
            {"$group": {"_id": None, "cost": {"$sum": "$cost"}}}])).to_list()
        cost = costs[0]["cost"] if costs else 0
        cost = cost.to_decimal() if isinstance(cost, Decimal128) else Decimal(str(cost or 0))
        return usage_body(user_id, month, doc, unwritten, plan, cost,
                          config.prices.currency or None, await self._tpm(user_id, plan))

    def _unwritten(self, account: Account | None, doc: dict[str, Any]) -> dict[str, Any]:
        """What this instance settled for the account but ``doc`` does not hold yet."""
        if account is None:
            return {}
        tokens, requests = account.unflushed, account.unflushed_requests
        classes = dict(account.unflushed_usage)
        pending = account.pending
        if pending is not None and \
                doc.get("writes", {}).get(self.limits.ledger.instance, 0) >= pending.sequence:
            tokens, requests = tokens - pending.tokens, requests - pending.requests
            for name, value in pending.classes.items():  # applied; its reply not yet seen
                classes[name] -= value
        return {"tokens": tokens, "requests": requests, "reserved": account.reserved,
                "usage": {name: value for name, value in classes.items() if value}}

    async def _tpm(self, user_id: Any, plan) -> dict[str, Any] | None:
        if not plan.tokens_per_minute:
            return None
        capacity = plan.tokens_per_minute
        level = await self.limits.tpm.remaining(user_id, capacity)  # shared by all instances
        bucket = self.limits.buckets.get(user_id)
        if bucket is not None and bucket.capacity == capacity:  # this instance's own applies too
            level = min(level, bucket.level(time.monotonic()))
        return {"limit": capacity, "remaining": max(0, math.floor(level)),
                "reset": openai_duration(max(0.0, (capacity - level) * 60 / capacity))}


def _state(account: Account | None) -> tuple[Any, ...]:
    if account is None:
        return ()
    return account.unflushed, account.unflushed_requests, account.pending, account.used
