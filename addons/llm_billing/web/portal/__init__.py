"""The portal (``/portal``): operators run the business, users manage their keys and see
their usage. Server-rendered pages (Starlette + Jinja2), server-side SVG charts, one CSS
file; no JavaScript, no CDN.

``Portal`` is both a mitmproxy addon (its options; at start: the session secret and seed
000's admin account) and the provider of the portal's routes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from mitmproxy import ctx
from pymongo.errors import PyMongoError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles

from ...keyauth import KeyAuth
from ...settings import Settings
from ...storage.database import Database
from . import accounts
from .admin import AdminPages
from .auth import AuthPages, home_of
from .reconcile import ReconcilePage
from .selfservice import SelfService
from .session import Sessions, current_account, session_secret
from .usage import UsagePages

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class Portal:
    def __init__(self, database: Database, settings: Settings,
                 key_auth: KeyAuth | None = None) -> None:
        self.database = database
        self.settings = settings
        self.auth = AuthPages(database, settings)
        self.admin = AdminPages(database, settings, key_auth)
        self.usage = UsagePages(database, settings)
        self.reconcile = ReconcilePage(database)
        self.self_service = SelfService(database, settings)
        self._sessions: Sessions | None = None
        self._admin_task: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option("portal_signup", bool, False,
                          "Let anyone sign up for a portal account (new users get "
                          "[proxy] default_plan).")
        loader.add_option("portal_signups_per_hour", int, 5,
                          "Sign-ups per client address (an IPv6 /64) per hour; 0: no limit.")
        loader.add_option("public_url", str, os.environ.get("LLM_BILLING_PUBLIC_URL", ""),
                          "The proxy's address as clients reach it, for /docs (reverse mode "
                          "rewrites the Host header); default http://localhost:<listen port>.")

    async def running(self) -> None:
        secret = await asyncio.to_thread(session_secret,
                                         Path(ctx.options.billing_data_dir))
        if self._sessions is not None:
            self._sessions.secret = secret
        self._admin_task = asyncio.create_task(self._ensure_admin())

    async def _ensure_admin(self) -> None:
        try:
            await accounts.ensure_admin(await self.database.client())
        except PyMongoError as e:
            logger.error(f"Portal: cannot check the admin account ({type(e).__name__}); "
                         f"it is created at the next start")

    async def index(self, request: Request) -> Response:
        account = await current_account(request, self.database)
        if account is None:
            return RedirectResponse("/portal/login", 303)
        return RedirectResponse(home_of(account), 303)

    def routes(self) -> list[BaseRoute]:
        self._sessions = Sessions(Router(self.page_routes(), redirect_slashes=False))
        return [Route("/portal", lambda request: RedirectResponse("/portal/login", 303)),
                Mount("/portal", app=self._sessions)]

    def page_routes(self) -> list[BaseRoute]:
        """The pages, relative to /portal."""
        return [
            Route("/", self.index),
            Route("/login", self.auth.login, methods=["GET", "POST"]),
            Route("/logout", self.auth.logout, methods=["POST"]),
            Route("/password", self.auth.password, methods=["GET", "POST"]),
            Route("/signup", self.auth.signup, methods=["GET", "POST"]),
            Route("/keys", self.admin.keys, methods=["GET", "POST"]),
            Route("/keys/revoke", self.admin.revoke_key, methods=["POST"]),
            Route("/users", self.admin.users),
            Route("/users", self.admin.create_user, methods=["POST"]),
            Route("/users/plan", self.admin.set_plan, methods=["POST"]),
            Route("/users/status", self.admin.set_status, methods=["POST"]),
            Route("/plans", self.admin.plans),
            Route("/events", self.admin.events),
            Route("/reconcile", self.reconcile.reconcile),
            Route("/usage", self.usage.usage),
            Route("/me", self.self_service.me),
            Route("/upgrade", self.self_service.upgrade, methods=["POST"]),
            Route("/billing", self.self_service.billing_portal, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC)),
        ]
