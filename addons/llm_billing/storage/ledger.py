"""Monthly token quotas shared by every proxy instance on one database.

One ``billing.usage`` document per user per month (``_id: "<user_id>:<YYYY-MM>"``) holds
the settled tokens by class, the overage, and the *leases*: slices of a blocking plan's
remaining quota that each instance took for itself. An instance admits requests against
its own lease in memory, so the request path never waits on the database except to take
a new slice when its lease runs out; the database never grants more than the quota minus
what is used and leased elsewhere.

Settled usage is written in the background, one ``UsageWrite`` at a time per account: its
tokens, classes, request count, overage split and the lease it consumes go to the
database in **one** compare-and-set update (on the document's ``version``), which also
records the write's sequence number under ``writes.<instance>``. A write whose reply was
lost is retried as it was, and recognised as applied by that number: nothing is counted
twice, and no part of a write (the overage, say) can be lost on its own. Sequence numbers
grow across all accounts of an instance, and a request learns its write's number when it
settles (its event records it), so after a crash the journal's events tell exactly which
usage never reached the database (``recover``).

An account stays in memory while any request holds it (``holds``) or anything of it is
unwritten; it is dropped only when all of that is zero, checked right before the drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bson import Decimal128
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..core.dates import aware, within_month
from ..core.plans import Plan, overage_split
from ..core.usage import Usage
from .database import Database

logger = logging.getLogger(__name__)

LEASE_TTL = timedelta(seconds=60)  # a dead instance's lease stops counting after this
IDLE_RELEASE = 2.0  # seconds without requests before an instance hands its lease back
CAS_ATTEMPTS = 8


def usage_id(user_id: Any, month: str) -> str:
    return f"{user_id}:{month}"


@dataclass(frozen=True, slots=True)
class UsageWrite:
    """Settled usage on its way to ``billing.usage``, retried unchanged until applied."""

    sequence: int  # this instance's write number (grows across all its accounts)
    tokens: int
    requests: int
    classes: dict[str, int]
    settled_at: datetime | None = None  # when its newest request settled


@dataclass(slots=True)
class Account:
    """One user's month, as this instance sees it."""

    user_id: Any
    month: str
    plan: Plan
    lease: int = 0  # granted to this instance (equals its lease in the database)
    reserved: int = 0  # held by requests in flight
    used: int = 0  # the month's tokens in the database, as last read
    used_read: bool = False  # ``used`` was read (or written) at least once, not a default
    holds: int = 0  # requests between ``account()`` and ``settle``/``release``
    unflushed: int = 0  # settled tokens not yet written (pending write included)
    unflushed_usage: dict[str, int] = field(default_factory=dict)
    unflushed_requests: int = 0
    pending: UsageWrite | None = None  # taken from unflushed, not yet known applied
    open_sequence: int | None = None  # the write that will carry what settles now
    settled_at: datetime | None = None  # when the newest request settled (wall clock)
    releasing: tuple[int, int] | None = None  # (number, amount) of a lease hand-back in flight
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> str:
        return usage_id(self.user_id, self.month)

    def droppable(self, now: float) -> bool:
        """Nothing of this account lives only here, and no request holds it."""
        return (self.holds == 0 and self.reserved == 0 and self.lease == 0
                and self.unflushed == 0 and self.unflushed_requests == 0
                and self.pending is None and self.open_sequence is None
                and self.releasing is None and now - self.last_used > IDLE_RELEASE)


class QuotaLedger:
    def __init__(self, database: Database, instance_id: str) -> None:
        self.database = database
        self.instance = instance_id
        self.accounts: dict[tuple[Any, str], Account] = {}
        self._last_sequence = 0  # numbers this instance's usage writes
        self._last_release = 0  # numbers its lease hand-backs

    def account(self, user_id: Any, month: str, plan: Plan) -> Account:
        """The account a request will reserve against; held until ``settle``/``release``."""
        account = self.accounts.get((user_id, month))
        if account is None:
            account = self.accounts[(user_id, month)] = Account(user_id, month, plan)
        account.plan = plan  # a plan change applies from the next request
        account.last_used = time.monotonic()
        account.holds += 1
        return account

    def release(self, account: Account) -> None:
        """A request refused before it reserved anything lets go of its account."""
        account.holds -= 1

    async def reserve(self, account: Account, tokens: int, minimum: int | None = None) -> int:
        """Hold up to ``tokens`` (at least ``minimum``, default all) for a request; the
        amount held, or 0 when a blocking plan's quota can't cover the minimum."""
        minimum = tokens if minimum is None else min(minimum, tokens)
        if not account.plan.blocks_at_quota:
            account.reserved += tokens
            return tokens
        if account.reserved + account.unflushed + tokens <= account.lease:
            account.reserved += tokens  # the hot path: inside this instance's lease
            return tokens
        async with account.lock:
            while True:
                room = account.lease - account.reserved - account.unflushed
                if room >= tokens:
                    account.reserved += tokens
                    return tokens
                if not await self._extend_lease(account, tokens - room, minimum - room):
                    room = account.lease - account.reserved - account.unflushed
                    if room >= minimum:  # what is left of the quota: the request is clamped
                        account.reserved += room
                        return room
                    return 0

    def settle(self, account: Account, reserved: int, used: int, usage: Usage | None) -> int:
        """A request finished: release its hold, count what it really used. Returns the
        sequence number of the write that will carry it."""
        if account.open_sequence is None:
            self._last_sequence += 1
            account.open_sequence = self._last_sequence
        account.reserved -= reserved
        account.holds -= 1
        account.unflushed += used
        account.unflushed_requests += 1
        account.settled_at = datetime.now(UTC)
        if usage is not None:
            for name, value in usage.as_document().items():
                account.unflushed_usage[name] = account.unflushed_usage.get(name, 0) + value
        account.last_used = time.monotonic()
        return account.open_sequence

    def exhausted(self, account: Account, tokens: int) -> bool:
        """``tokens`` will not fit even once every request in flight and every lease has
        let go: the month's quota is used up (a write in flight counted as not applied)."""
        unwritten = account.unflushed - (account.pending.tokens if account.pending else 0)
        return account.plan.monthly_tokens - account.used - unwritten < tokens

    async def read_used(self, account: Account) -> None:
        """Read the month's tokens for an account nothing has read yet (a plan that never
        takes a lease): the quota left that responses show. A lease or write that read
        them meanwhile is as new, and wins."""
        doc = await (await self._collection()).find_one(
            {"_id": account.key}, {"tokens": 1, "writes": 1}) or {}
        if account.used_read:
            return
        used, pending = doc.get("tokens", 0), account.pending
        if pending is not None and doc.get("writes", {}).get(self.instance, 0) >= \
                pending.sequence:
            used -= pending.tokens  # applied, its reply not seen yet: still in unflushed
        account.used, account.used_read = used, True

    async def _collection(self):
        return (await self.database.client()).billing.usage

    async def _extend_lease(self, account: Account, shortfall: int, least: int) -> bool:
        """Take a slice of the remaining quota for this instance (compare-and-set): at
        least ``shortfall`` tokens, or — when less is left — all that is left if that is
        at least ``least``. False when nothing was granted."""
        quota = account.plan.monthly_tokens
        usage = await self._collection()
        for _ in range(CAS_ATTEMPTS):
            doc = await usage.find_one({"_id": account.key}) or {}
            account.used, account.used_read = doc.get("tokens", 0), True
            now = datetime.now(UTC)
            leased_elsewhere = sum(
                max(0, lease.get("amount", 0))
                for instance, lease in doc.get("leases", {}).items()
                if instance != self.instance and aware(lease.get("expires")) > now)
            mine = max(0, doc.get("leases", {}).get(self.instance, {}).get("amount", 0))
            available = quota - doc.get("tokens", 0) - leased_elsewhere - mine
            if available < shortfall and (available < max(least, 1)):
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
                return grant >= shortfall
        # Not an exhausted quota: the request is refused as retryable (503), not for good.
        raise UsageContention(f"quota lease for {account.key}: too much contention")

    async def flush(self) -> None:
        """Write settled usage; hand idle leases back; drop accounts with nothing left.
        Runs in the background. One account's failure never stops the others'."""
        usage = await self._collection()
        failed: Exception | None = None
        for key, account in list(self.accounts.items()):
            try:
                await self._flush_account(usage, account)
            except PyMongoError as e:
                failed = e
            except Exception:  # e.g. a value BSON cannot encode: this account only
                logger.exception(f"Usage write for {account.key} failed")
            # Checked after every await above: a request may have taken it meanwhile.
            if account.droppable(time.monotonic()) and self.accounts.get(key) is account:
                del self.accounts[key]
        if failed is not None:
            raise failed

    async def _flush_account(self, usage, account: Account) -> None:
        if account.pending is None and account.open_sequence is not None:
            account.pending = UsageWrite(
                account.open_sequence, account.unflushed, account.unflushed_requests,
                {k: v for k, v in account.unflushed_usage.items() if v}, account.settled_at)
            account.open_sequence = None
        if account.pending is not None:
            await self._write(usage, account, account.pending)
            return
        idle = account.reserved == 0 and account.holds == 0 and \
            time.monotonic() - account.last_used > IDLE_RELEASE
        if idle and account.lease and account.releasing is None:
            # Out of memory at once: a request arriving during the write takes a new slice
            # instead of this one. A negative lease is an overshoot, now in tokens.
            self._last_release += 1
            account.releasing, account.lease = (self._last_release, account.lease), 0
        if account.releasing is not None:
            await self._release(usage, account, *account.releasing)

    async def _release(self, usage, account: Account, number: int, amount: int) -> None:
        """Hand ``amount`` of the lease back, once however often retried (a lost reply):
        the update applies only where this hand-back's number is not recorded yet."""
        lease = f"leases.{self.instance}"
        await usage.update_one({"_id": account.key, f"{lease}.release": {"$ne": number}},
                               {"$inc": {f"{lease}.amount": -amount},
                                "$set": {f"{lease}.release": number}})
        account.releasing = None

    async def _write(self, usage, account: Account, write: UsageWrite) -> None:
        """Apply ``write`` in one compare-and-set update, or find it was applied."""
        plan = account.plan
        for _ in range(CAS_ATTEMPTS):
            doc = await usage.find_one({"_id": account.key}) or {}
            if doc.get("writes", {}).get(self.instance, 0) >= write.sequence:
                used = doc.get("tokens", 0)
                break  # applied already: the reply of an earlier attempt was lost
            update = self._update(account, plan, write, before=doc.get("tokens", 0))
            version = doc.get("version", {"$exists": False})
            try:
                result = await usage.update_one({"_id": account.key, "version": version},
                                                update, upsert=not doc)
            except DuplicateKeyError:
                continue
            if result.matched_count or result.upserted_id is not None:
                used = doc.get("tokens", 0) + write.tokens
                break
        else:
            raise UsageContention(f"usage write for {account.key}: too much contention")
        account.used, account.used_read = used, True  # what the quota headers show
        account.pending = None
        account.unflushed -= write.tokens
        account.unflushed_requests -= write.requests
        for name, value in write.classes.items():
            account.unflushed_usage[name] -= value
        if plan.blocks_at_quota:
            account.lease -= write.tokens

    def _update(self, account: Account, plan: Plan, write: UsageWrite,
                before: int) -> dict[str, Any]:
        inc: dict[str, Any] = {"tokens": write.tokens, "requests": write.requests, "version": 1,
                               **{f"usage.{k}": v for k, v in write.classes.items()}}
        now = datetime.now(UTC)
        fields: dict[str, Any] = {f"writes.{self.instance}": write.sequence, "updated": now}
        if plan.blocks_at_quota:  # the used tokens leave this instance's lease
            inc[f"leases.{self.instance}.amount"] = -write.tokens
            fields[f"leases.{self.instance}.expires"] = now + LEASE_TTL
        inc |= (over := _overage(plan, before, write.tokens))
        update = {"$inc": inc, "$set": fields,
                  "$setOnInsert": {"user_id": account.user_id, "month": account.month}}
        if over:  # when it happened: the time of its Stripe meter event (stripe_reporter)
            update["$max"] = {"overage_at": within_month(write.settled_at or now,
                                                         account.month)}
        return update

    async def recover(self, instance: str, events: list[dict[str, Any]],
                      plans: Mapping[str, Plan]) -> None:
        """Count in ``billing.usage`` what a stopped instance settled (or admitted, for an
        unfinished request) but never wrote: ``events`` are the billed events its journal
        held, each with its ``ledger`` record. Once per instance and usage document: the
        ``recovered.<instance>`` mark goes in the same update as the counts."""
        usage = await self._collection()
        by_document: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            by_document.setdefault(event["ledger"]["usage"], []).append(event)
        for key, documents_events in by_document.items():
            await self._recover_document(usage, instance, key, documents_events, plans)

    async def _recover_document(self, usage, instance: str, key: str,
                                events: list[dict[str, Any]],
                                plans: Mapping[str, Plan]) -> None:
        user_id, _, month = key.rpartition(":")
        for _ in range(CAS_ATTEMPTS):
            doc = await usage.find_one({"_id": key}) or {}
            if instance in doc.get("recovered", {}):
                return
            applied = doc.get("writes", {}).get(instance, 0)
            unwritten = [e for e in events if e["ledger"].get("write", applied + 1) > applied]
            tokens = sum(math.ceil(e.get("tokens_billed", 0)) for e in unwritten)
            inc: dict[str, Any] = {"tokens": tokens, "requests": len(unwritten), "version": 1}
            for event in unwritten:
                for name, value in (event.get("usage") or {}).items():
                    inc[f"usage.{name}"] = inc.get(f"usage.{name}", 0) + value
            when: dict[str, Any] = {}  # when the overage happened: its newest request
            if (plan := plans.get(events[-1].get("plan_id", ""))) is not None:
                inc |= (over := _overage(plan, doc.get("tokens", 0), tokens))
                if over and (at := _newest(unwritten, month)) is not None:
                    when = {"$max": {"overage_at": at}}
            version = doc.get("version", {"$exists": False})
            try:
                result = await usage.update_one({"_id": key, "version": version}, {
                    "$inc": inc, "$set": {f"recovered.{instance}": datetime.now(UTC)},
                    "$unset": {f"leases.{instance}": ""},
                    "$setOnInsert": {"user_id": events[-1].get("user_id", user_id),
                                     "month": month}, **when}, upsert=not doc)
            except DuplicateKeyError:
                continue
            if result.matched_count or result.upserted_id is not None:
                logger.info(f"Recovered usage of stopped instance {instance} for {key}: "
                            f"{tokens} tokens in {len(unwritten)} requests")
                return
        raise UsageContention(f"usage recovery for {key}: too much contention")

    def applied_below(self) -> int:
        """Every write numbered below this is applied (or was never needed)."""
        waiting = [seq for a in self.accounts.values()
                   for seq in (a.pending.sequence if a.pending else None, a.open_sequence)
                   if seq is not None]
        return min(waiting, default=self._last_sequence + 1)

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


def _overage(plan: Plan, before: int, tokens: int) -> dict[str, Any]:
    """The overage fields of an update adding ``tokens`` to a month that had ``before``:
    exact however instances interleave, as ``before`` is what that very update changes."""
    over = overage_split(before, tokens, plan.monthly_tokens)
    if not over or plan.overage_price is None:
        return {}
    cost = Decimal128(Decimal(over) * plan.overage_price)
    return {"overage_tokens": over, "overage_cost": cost,
            f"overage_by_plan.{plan.id}.tokens": over, f"overage_by_plan.{plan.id}.cost": cost}


def _newest(events: list[dict[str, Any]], month: str) -> datetime | None:
    """When the newest of ``events`` finished (now, if none says), moved into ``month``;
    None for a malformed month."""
    finished = [aware(e["date_created"]) for e in events
                if isinstance(e.get("date_created"), datetime)]
    try:
        return within_month(max(finished, default=datetime.now(UTC)), month)
    except ValueError:
        return None


class UsageContention(PyMongoError):
    """Other instances kept changing the document; the write is retried next flush."""
