"""A user's own page: plan, this month's usage against the quota and TPM, and Stripe —
Upgrade (a Checkout Session, stripe_billing.checkout_session) and the Customer Portal.

The stripe library's sync client runs on a small thread pool of its own: a slow Stripe
(retried, up to minutes) never holds the default executor, which also resolves upstream
host names.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import stripe
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ...core.dates import month_of
from ...settings import Settings
from ...storage.database import Database
from ...stripe_billing import checkout_session, client_for, portal_session
from .render import render
from .session import form, requires

logger = logging.getLogger(__name__)

_stripe_calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="portal-stripe")


class SelfService:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings

    @requires("user")
    async def me(self, request: Request, status: int = 200, **context) -> Response:
        return await self._page(request, status, **context)

    async def _page(self, request: Request, status: int = 200, **context) -> Response:
        config = self.settings.config
        assert config is not None
        user_id = request.state.account["user_id"]
        client = await self.database.client()
        user = await client.billing.users.find_one({"_id": user_id}) or {}
        month = month_of(datetime.now(UTC))
        usage = await client.billing.usage.find_one({"_id": f"{user_id}:{month}"}) or {}
        plan = config.plan(user.get("plan"))
        used = int(usage.get("tokens", 0))
        left = max(plan.monthly_tokens - used, 0) if plan.monthly_tokens else None
        upgrades = [p for p in config.plans.values()
                    if p.stripe_price and p.id != plan.id and p.price > plan.price]
        return render(request, "me.html", status, plan=plan, user=user, used=used, left=left,
                      month=month, overage=int(usage.get("overage_tokens", 0)),
                      upgrades=upgrades, stripe_on=config.stripe.enabled,
                      checkout=request.query_params.get("checkout"), **context)

    @requires("user")
    async def upgrade(self, request: Request) -> Response:
        data = await form(request)
        config = self.settings.config
        assert config is not None
        plan = config.plans.get(str(data.get("plan", "")))
        if plan is None or not plan.stripe_price:
            return await self._page(request, 400, error="That plan cannot be bought.")
        if not config.stripe.enabled:
            return await self._page(request, 503, error="Payments are not set up yet.")
        account = request.state.account
        client = await self.database.client()
        user = await client.billing.users.find_one({"_id": account["user_id"]}) or {}
        try:
            session = await asyncio.get_running_loop().run_in_executor(
                _stripe_calls, lambda: checkout_session(
                    client_for(config.stripe), config.stripe, account["user_id"], plan,
                    customer_id=user.get("stripe_customer_id"),
                    email=user.get("email") or account["_id"]))
        except stripe.StripeError as e:
            logger.warning(f"Portal checkout failed: {type(e).__name__}")
            return await self._page(request, 502, error="Stripe could not be reached; "
                                    "try again in a minute.")
        return RedirectResponse(session.url or "/portal/me", 303)

    @requires("user")
    async def billing_portal(self, request: Request) -> Response:
        await form(request)
        config = self.settings.config
        assert config is not None
        client = await self.database.client()
        user = await client.billing.users.find_one(
            {"_id": request.state.account["user_id"]}) or {}
        if not config.stripe.enabled or not user.get("stripe_customer_id"):
            return await self._page(request, 400, error="No subscription to manage yet.")
        try:
            session = await asyncio.get_running_loop().run_in_executor(
                _stripe_calls, lambda: portal_session(
                    client_for(config.stripe), config.stripe, user["stripe_customer_id"]))
        except stripe.StripeError as e:
            logger.warning(f"Portal billing link failed: {type(e).__name__}")
            return await self._page(request, 502, error="Stripe could not be reached; "
                                    "try again in a minute.")
        return RedirectResponse(session.url, 303)
