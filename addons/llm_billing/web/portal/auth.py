"""Log in, log out, change the password, sign up.

Failed logins are throttled per account and client address (``PAIR_FAILURES``) and per
address (``ADDRESS_FAILURES``), so a stranger cannot lock an account out by failing on
purpose from elsewhere. Failures of one account from everywhere only slow it down: past
``ACCOUNT_SLOWDOWN`` of them every attempt on it (right or wrong: a delay only on wrong
ones would tell the guesser early) waits ``ACCOUNT_DELAY`` first. An attempt counts as a
failure as soon as it is checked, before the password hash is verified (an await), so a
burst of concurrent guesses cannot all pass the check; a success takes it back.

Sign-up never tells whether an address has an account: a new one and a known one get the
same answer (to the login page, "log in with your email and password"), after the same work
(a password hashed either way); a known address's account is left as it was. Sign-ups are
limited per client address (option ``portal_signups_per_hour``), every one counting, so
the limit does not tell either.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from mitmproxy import ctx
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ...core.client_limit import client_network
from ...settings import Settings
from ...storage.database import Database
from . import accounts
from .render import render
from .session import current_account, end_session, form, requires, start_session

PAIR_FAILURES = 5  # failed logins per account and client address per window
ADDRESS_FAILURES = 20  # failed logins per client address per window
ACCOUNT_SLOWDOWN = 10  # failed logins per account per window before attempts wait
ACCOUNT_DELAY = 2.0  # seconds
FAILURE_WINDOW = 15 * 60.0
SIGNUP_WINDOW = 3600.0
SIGNED_UP = "Your sign-up is done: log in with your email and password."


def home_of(account: dict[str, Any]) -> str:
    return "/portal/users" if account.get("role") == "admin" else "/portal/me"


class AuthPages:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self.by_pair = accounts.LoginThrottle(PAIR_FAILURES, FAILURE_WINDOW)
        self.by_address = accounts.LoginThrottle(ADDRESS_FAILURES, FAILURE_WINDOW)
        self.by_account = accounts.LoginThrottle(ACCOUNT_SLOWDOWN, FAILURE_WINDOW)
        self.signups = accounts.LoginThrottle(0, SIGNUP_WINDOW)  # limit: the option's
        self.pause = asyncio.sleep

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            if account := await current_account(request, self.database):
                return RedirectResponse(home_of(account), 303)
            signed_up = request.session.pop("signed_up", None)
            return render(request, "login.html", signup=signup_open(),
                          email=signed_up if isinstance(signed_up, str) else None,
                          notice=SIGNED_UP if signed_up else None)
        data = await form(request)
        email = accounts.normal_email(str(data.get("email", "")))[:254]
        password = str(data.get("password", ""))[:1024]
        address = client_network(request.client.host if request.client else "")
        pair = f"{email} {address}"
        wait = max(self.by_pair.wait(pair), self.by_address.wait(address))
        if wait > 0:
            response = render(request, "login.html", 429, email=email, signup=signup_open(),
                              error="Too many failed logins. Try again later.")
            response.headers["retry-after"] = str(math.ceil(wait))
            return response
        for throttle, key in ((self.by_pair, pair), (self.by_address, address),
                              (self.by_account, email)):
            throttle.failed(key)  # until proven otherwise, before the first await
        if self.by_account.count(email) > ACCOUNT_SLOWDOWN:
            await self.pause(ACCOUNT_DELAY)
        account = await accounts.find(await self.database.client(), email)
        if not await accounts.verify_password(account and account.get("password_hash"),
                                              password):
            return render(request, "login.html", 401, email=email, signup=signup_open(),
                          error="Wrong email or password.")
        self.by_pair.succeeded(pair)
        self.by_address.forgive(address)
        self.by_account.forgive(email)
        assert account is not None
        start_session(request, account)
        if account.get("must_change_password"):
            return RedirectResponse("/portal/password", 303)
        return RedirectResponse(home_of(account), 303)

    async def logout(self, request: Request) -> Response:
        await form(request)
        await end_session(request, self.database)
        return RedirectResponse("/portal/login", 303)

    @requires()
    async def password(self, request: Request) -> Response:
        account = request.state.account
        forced = bool(account.get("must_change_password"))
        if request.method == "GET":
            return render(request, "password.html", forced=forced)
        data = await form(request)
        current, new = str(data.get("current", "")), str(data.get("new", ""))
        error = None
        if not await accounts.verify_password(account.get("password_hash"), current):
            error = "The current password is wrong."
        elif new != data.get("confirm"):
            error = "The new passwords differ."
        elif new == current:
            error = "Choose a password different from the current one."
        else:
            error = accounts.password_problem(new, account["_id"])
        if error:
            return render(request, "password.html", 400, forced=forced, error=error)
        generation = await accounts.set_password(await self.database.client(), account["_id"],
                                                 new)
        start_session(request, {**account, "session_generation": generation})
        return RedirectResponse(home_of(account), 303)

    async def signup(self, request: Request) -> Response:
        if not signup_open():
            return render(request, "message.html", 404, title="Sign-up is closed",
                          message="Ask an administrator for an account.")
        if request.method == "GET":
            return render(request, "signup.html")
        data = await form(request)
        email = accounts.normal_email(str(data.get("email", "")))[:254]
        password = str(data.get("password", ""))[:1024]
        address = client_network(request.client.host if request.client else "")
        self.signups.limit = ctx.options.portal_signups_per_hour
        if self.signups.limit > 0 and (wait := self.signups.wait(address)) > 0:
            response = render(request, "signup.html", 429, email=email,
                              error="Too many sign-ups from your address. Try again later.")
            response.headers["retry-after"] = str(math.ceil(wait))
            return response
        error = None
        if "@" not in email or any(c.isspace() for c in email):
            error = "Enter a valid email address."
        elif password != data.get("confirm"):
            error = "The passwords differ."
        else:
            error = accounts.password_problem(password, email)
        if error:
            return render(request, "signup.html", 400, email=email, error=error)
        if self.signups.limit > 0:
            self.signups.failed(address)  # counted before the first await (a burst)
        await self._create_user(email, password)
        request.session["signed_up"] = email
        return RedirectResponse("/portal/login", 303)

    async def _create_user(self, email: str, password: str) -> None:
        """A portal account and billing user for a new address; nothing for a known one
        (a billing user an admin made, or an account), after the same hashing."""
        client = await self.database.client()
        password_hash, user = await asyncio.gather(
            accounts.hash_password(password),
            client.billing.users.find_one({"_id": email}, {"_id": 1}))
        if user is not None or not await accounts.create_hashed(client, email, password_hash,
                                                                "user", user_id=email):
            return
        config = self.settings.config
        assert config is not None
        await client.billing.users.update_one(
            {"_id": email}, {"$setOnInsert": {"plan": config.default_plan, "email": email,
                                              "date_created": accounts.now()}}, upsert=True)


def signup_open() -> bool:
    return bool(ctx.options.portal_signup)
