"""UserPlans addon: the caller's plan, from ``billing.users`` (cached).

A user document is ``{_id: <user_id of cgc.api_keys>, plan: "starter", ...}``; a user
without one, or with a plan id the config does not know, gets the default plan. A user
whose payment failed longer ago than the grace period is refused (429). Lookups
go through the refreshing cache, so a plan change reaches every instance within
``user_cache_ttl`` seconds without a database round trip per request.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, http
from pymongo.errors import PyMongoError

from . import context
from .core.stripe_rules import payment_blocked
from .errors import error_response
from .settings import Settings
from .storage.cache import RefreshingCache
from .storage.database import Database

logger = logging.getLogger(__name__)


class UserPlans:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self.cache: RefreshingCache[Any, dict[str, Any]] = RefreshingCache(self._fetch)

    def load(self, loader) -> None:
        loader.add_option("user_cache_ttl", int, 10,
                          "Seconds a user's plan is cached (plan changes apply after it).")

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if rc is None or flow.response or rc.replayed:
            return
        config = self.settings.config
        assert config is not None
        try:
            user = await self.cache.get(rc.caller.user_id)
        except PyMongoError as e:  # plans fail open to the default plan, loudly
            logger.warning(f"User lookup failed ({type(e).__name__}); using the default plan")
            user = {}
        if payment_blocked(user, config.stripe):
            flow.response = error_response(
                rc.protocol.error_format, 429, "Your last payment failed. Update your payment "
                "method in the billing portal to continue.", "insufficient_quota")
            return
        plan_id = user.get("plan")
        if plan_id and plan_id not in config.plans:
            logger.warning(f"User {rc.caller.user_id!r} has unknown plan {plan_id!r}; "
                           f"using {config.default_plan!r}")
        rc.plan = config.plan(plan_id)

    async def _fetch(self, user_id: Any) -> tuple[dict[str, Any], float]:
        client = await self.database.client()
        doc = await client.billing.users.find_one({"_id": user_id})
        return doc or {}, ctx.options.user_cache_ttl
