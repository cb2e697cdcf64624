"""Portal accounts (``billing.portal_accounts``): argon2 password hashes, the seed's default
admin, and the login (and sign-up) throttle.

An account is ``{_id: <email, lower case>, role: "admin" | "user", password_hash,
user_id (role user: the billing.users id its keys and usage belong to),
must_change_password, session_generation, date_created}``. Sessions carry the account's
``session_generation``; a password change bumps it, so older sessions stop working.

Hashing takes tens of milliseconds of CPU on purpose: it runs on one thread of its own,
never on the event loop nor in the default executor (which also resolves upstream host
names), so a flood of logins cannot stall proxied requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pymongo import AsyncMongoClient
from pymongo.errors import DuplicateKeyError

logger = logging.getLogger(__name__)

DEFAULT_ADMIN_EMAIL = "admin@llm-gateway.io"  # seed 000
DEFAULT_ADMIN_PASSWORD = "LLMAdmin123!"  # seed 000; forced to change at first login
ADMIN_PASSWORD_ENV = "LLM_BILLING_ADMIN_PASSWORD"
MIN_PASSWORD_LENGTH = 10

_hasher = PasswordHasher()
_hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="portal-argon2")
_DUMMY_HASH = _hasher.hash("not a password")  # verified when no account matches (timing)


async def hash_password(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(_hashing, _hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    def verify() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
        except (VerificationError, InvalidHashError):
            return False
    return await asyncio.get_running_loop().run_in_executor(_hashing, verify)


def now() -> datetime:
    return datetime.now(UTC)


def normal_email(email: str) -> str:
    return email.strip().lower()


def password_problem(password: str, email: str) -> str | None:
    """Why a new password is refused, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"Use at least {MIN_PASSWORD_LENGTH} characters."
    if password == DEFAULT_ADMIN_PASSWORD:
        return "That is the published default password; choose another."
    if password.strip().lower() == normal_email(email):
        return "The password must not be the email address."
    return None


def collection(client: AsyncMongoClient):
    return client.billing.portal_accounts


async def find(client: AsyncMongoClient, email: str) -> dict[str, Any] | None:
    return await collection(client).find_one({"_id": normal_email(email)})


async def create(client: AsyncMongoClient, email: str, password: str, role: str,
                 user_id: str | None = None, must_change: bool = False) -> bool:
    """False when the account already exists."""
    return await create_hashed(client, email, await hash_password(password), role, user_id,
                               must_change)


async def create_hashed(client: AsyncMongoClient, email: str, password_hash: str, role: str,
                        user_id: str | None = None, must_change: bool = False) -> bool:
    """``create`` with the password hashed already; False when the account exists."""
    doc = {"_id": normal_email(email), "role": role, "user_id": user_id,
           "password_hash": password_hash, "must_change_password": must_change,
           "session_generation": 0, "date_created": now()}
    try:
        await collection(client).insert_one(doc)
    except DuplicateKeyError:
        return False
    return True


async def set_password(client: AsyncMongoClient, email: str, password: str) -> int:
    """The new session generation (older sessions end)."""
    doc = await collection(client).find_one_and_update(
        {"_id": normal_email(email)},
        {"$set": {"password_hash": await hash_password(password),
                  "must_change_password": False, "password_changed_at": now()},
         "$inc": {"session_generation": 1}},
        return_document=True)
    return doc["session_generation"]


async def ensure_admin(client: AsyncMongoClient) -> None:
    """Seed 000's admin on a fresh install (``LLM_BILLING_ADMIN_PASSWORD`` sets its
    password instead of the default); warns while the default password still works."""
    if await collection(client).find_one({"role": "admin"}) is None:
        password = os.environ.get(ADMIN_PASSWORD_ENV) or DEFAULT_ADMIN_PASSWORD
        if await create(client, DEFAULT_ADMIN_EMAIL, password, "admin",
                        must_change=password == DEFAULT_ADMIN_PASSWORD):
            logger.info(f"Portal: created the admin account {DEFAULT_ADMIN_EMAIL}")
    admin = await find(client, DEFAULT_ADMIN_EMAIL)
    if admin and await verify_password(admin.get("password_hash"), DEFAULT_ADMIN_PASSWORD):
        logger.warning(f"Portal: the admin {DEFAULT_ADMIN_EMAIL} still has the default "
                       f"password; log in at /portal to change it (or set "
                       f"{ADMIN_PASSWORD_ENV} before the first start)")


class LoginThrottle:
    """At most ``limit`` failed logins per key (an account, a client address) in
    ``window`` seconds; bounded memory (least recently failed keys are forgotten)."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def wait(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        failures = self._failures.get(key)
        if failures is None:
            return 0.0
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < self.limit:
            return 0.0
        return failures[0] + self.window - now

    def count(self, key: str, now: float | None = None) -> int:
        """Failures of ``key`` in the window."""
        self.wait(key, now)  # drops the expired ones
        return len(self._failures.get(key, ()))

    def failed(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._failures.setdefault(key, deque()).append(now)
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def forgive(self, key: str) -> None:
        """Take back the latest failure (an attempt counted before its outcome was known)."""
        failures = self._failures.get(key)
        if failures:
            failures.pop()
