"""Monthly token quotas shared by every proxy instance on one database.

One ``billing.usage`` document per user per month (``_id: "<user_id>:<YYYY-MM>"``) holds
the settled tokens by class, the overage, and the *leases*: slices of a blocking plan's
remaining quota that each instance took for itself. An instance admits requests against
its own lease in memory, so the request path never waits on the database except to take
a new slice when its lease runs out; the database never grants more than the quota minus
what is used and leased elsewhere. Settled usage is written in the background with
atomic ``$inc``, moving tokens from the instance's lease into ``tokens``. Overshoot is
therefore limited to requests that use more than they reserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bson import Decimal128
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..core.dates import aware
from ..core.plans import Plan, overage_split
from ..core.usage import Usage
from .database import Database

logger = logging.getLogger(__name__)

LEASE_TTL = timedelta(seconds=60)  # a dead instance's lease stops counting after this
IDLE_RELEASE = 2.0  # seconds without requests before an instance hands its lease back
CAS_ATTEMPTS = 8


def usage_id(user_id: Any, month: str) -> str:
    return f"{user_id}:{month}"


@dataclass(slots=True)
class Account:
    """One user's month, as this instance sees it."""

    user_id: Any
    month: str
    plan: Plan
    lease: int = 0  # granted to this instance (equals its lease in the database)
    reserved: int = 0  # held by requests in flight
    unflushed: int = 0  # settled tokens not yet written
    unflushed_usage: dict[str, int] = field(default_factory=dict)
    unflushed_requests: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> str:
        return usage_id(self.user_id, self.month)


class QuotaLedger:
    def __init__(self, database: Database, instance_id: str) -> None:
        self.database = database
        self.instance = instance_id
        self.accounts: dict[tuple[Any, str], Account] = {}

    def account(self, user_id: Any, month: str, plan: Plan) -> Account:
        account = self.accounts.get((user_id, month))
        if account is None:
            account = self.accounts[(user_id, month)] = Account(user_id, month, plan)
        account.plan = plan  # a plan change applies from the next request
        account.last_used = time.monotonic()
        return account

    async def reserve(self, account: Account, tokens: int) -> bool:
        """Hold ``tokens`` for a request; False when a blocking plan's quota can't."""
        if not account.plan.blocks_at_quota:
            account.reserved += tokens
            return True
        if account.reserved + account.unflushed + tokens <= account.lease:
            account.reserved += tokens  # the hot path: inside this instance's lease
            return True
        async with account.lock:
            while True:
                shortfall = account.reserved + account.unflushed + tokens - account.lease
                if shortfall <= 0:
                    account.reserved += tokens
                    return True
                if not await self._extend_lease(account, shortfall):
                    return False

    def settle(self, account: Account, reserved: int, used: int, usage: Usage | None) -> None:
        """A request finished: release its hold, count what it really used."""
        account.reserved -= reserved
        account.unflushed += used
        account.unflushed_requests += 1
        if usage is not None:
            for name, value in usage.as_document().items():
                account.unflushed_usage[name] = account.unflushed_usage.get(name, 0) + value
        account.last_used = time.monotonic()

    async def _collection(self):
        return (await self.database.client()).billing.usage

    async def _extend_lease(self, account: Account, shortfall: int) -> bool:
        """Take a slice of the remaining quota for this instance (compare-and-set)."""
        quota = account.plan.monthly_tokens
        usage = await self._collection()
        for _ in range(CAS_ATTEMPTS):
            doc = await usage.find_one({"_id": account.key}) or {}
            now = datetime.now(UTC)
            leased_elsewhere = sum(
                max(0, lease.get("amount", 0))
                for instance, lease in doc.get("leases", {}).items()
                if instance != self.instance and aware(lease.get("expires")) > now)
            mine = max(0, doc.get("leases", {}).get(self.instance, {}).get("amount", 0))
            available = quota - doc.get("tokens", 0) - leased_elsewhere - mine
            if available < shortfall:
                return False
            grant = min(available, max(shortfall, quota // 20))
            # compare-and-set on "version" ($exists, not null: an upsert copies equalities)
            version = doc.get("version", {"$exists": False})
            try:
                result = await usage.update_one(
                    {"_id": account.key, "version": version},
                    {"$inc": {f"leases.{self.instance}.amount": grant, "version": 1},
                     "$set": {f"leases.{self.instance}.expires": now + LEASE_TTL},
                     "$setOnInsert": {"user_id": account.user_id, "month": account.month}},
                    upsert=not doc)
            except DuplicateKeyError:
                continue  # another instance created the document first
            if result.matched_count or result.upserted_id is not None:
                account.lease += grant
                return True
        logger.warning(f"Quota lease for {account.key}: too much contention; refusing")
        return False

    async def flush(self) -> None:
        """Write settled usage; hand idle leases back. Runs in the background."""
        usage = await self._collection()
        now = time.monotonic()
        for key, account in list(self.accounts.items()):
            idle = account.reserved == 0 and now - account.last_used > IDLE_RELEASE
            if account.unflushed or account.unflushed_requests:
                await self._write(usage, account)
            elif idle and account.lease:  # a negative lease is an overshoot, now in tokens
                await usage.update_one({"_id": account.key},
                                       {"$inc": {f"leases.{self.instance}.amount":
                                                 -account.lease}})
                account.lease = 0
            if idle and not account.lease and not account.unflushed:
                del self.accounts[key]

    async def _write(self, usage, account: Account) -> None:
        tokens, classes = account.unflushed, dict(account.unflushed_usage)
        requests = account.unflushed_requests
        inc: dict[str, Any] = {"tokens": tokens, "requests": requests,
                               **{f"usage.{k}": v for k, v in classes.items()}}
        update: dict[str, Any] = {"$inc": inc, "$setOnInsert": {"user_id": account.user_id,
                                                                 "month": account.month}}
        if account.plan.blocks_at_quota:  # the used tokens leave this instance's lease
            inc[f"leases.{self.instance}.amount"] = -tokens
            update["$set"] = {f"leases.{self.instance}.expires": datetime.now(UTC) + LEASE_TTL}
        after = await usage.find_one_and_update({"_id": account.key}, update, upsert=True,
                                                return_document=ReturnDocument.AFTER)
        account.unflushed -= tokens
        account.unflushed_requests -= requests
        for name, value in classes.items():
            account.unflushed_usage[name] -= value
        if account.plan.blocks_at_quota:
            account.lease -= tokens
        await self._count_overage(usage, account, after["tokens"] - tokens, tokens)

    async def _count_overage(self, usage, account: Account, before: int, added: int) -> None:
        """Tokens of this write past the quota: exact however writes interleave, because
        each write's before/after comes from its own atomic $inc."""
        plan = account.plan
        price = plan.overage_price
        over = overage_split(before, added, plan.monthly_tokens)
        if not over or price is None:
            return
        cost = Decimal128(Decimal(over) * price)
        await usage.update_one({"_id": account.key}, {"$inc": {
            "overage_tokens": over, "overage_cost": cost,
            f"overage_by_plan.{plan.id}.tokens": over,
            f"overage_by_plan.{plan.id}.cost": cost}})

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
            except PyMongoError as e:  # counts stay in memory until the next try
                logger.warning(f"Usage flush failed ({type(e).__name__}); retrying")
            except Exception:  # a bug must not stop usage writes for good
                logger.exception("Usage flush failed")

    async def close(self, timeout: float) -> None:
        """Last flush at shutdown, leases released."""
        for account in self.accounts.values():
            account.last_used = 0.0
        with contextlib.suppress(PyMongoError, TimeoutError):
            await asyncio.wait_for(self._final_flush(), timeout)

    async def _final_flush(self) -> None:
        await self.flush()
        await self.flush()  # the second pass hands back leases emptied by the first

