"""Tokens per minute shared by every proxy instance on one database.

A user's TPM bucket (capacity = the plan's tokens per minute, refilled at capacity / 60
per second, as core/plans.py ``TokenBucket``) is one ``billing.tpm`` document,
``_id: "<user_id>:<capacity>"``, holding the time the bucket will be full again:
``full_at`` (seconds since the epoch; GCRA's "theoretical arrival time"). Its level at
``now`` is ``capacity - max(0, full_at - now) * capacity / 60``. Taking ``n`` tokens moves
``full_at`` on by ``n * 60 / capacity`` from ``max(full_at, now)``: one conditional update
does it atomically, and its condition (``full_at`` no later than ``now + 60 - n * 60 /
capacity``) is what keeps the database from ever granting more than the bucket holds,
however many instances ask at once.

Each instance takes *leases* — a slice of the bucket (a tenth of the capacity, or what a
request lacks, whichever is more) — and admits requests against its lease in memory, so
the request path goes to the database only when the lease runs short (that one request
waits for the new slice, as with the monthly quota's lease in ledger.py; requests behind
it wait on the account's lock, then take from the new lease in memory). When the bucket,
as last seen plus its refill since, cannot cover a request, it is refused without asking
the database. A request that used less than it took gives the rest back to the lease; one
that used more leaves the lease in debt, charged to the bucket before the next slice. The
lease goes back to the bucket once the user has been idle for ``IDLE_RELEASE`` seconds. A
stopped instance's lease needs no expiry: it was taken from the bucket, which refills.

Clocks: ``full_at`` is wall-clock time; instances whose clocks differ by ``d`` seconds can
together admit up to ``d * capacity / 60`` tokens more (or fewer) than the bucket allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from .database import Database
from .ledger import IDLE_RELEASE

logger = logging.getLogger(__name__)

WINDOW = 60.0  # seconds for an empty bucket to fill again
SLICES = 10  # a lease is at least capacity / SLICES
ATTEMPTS = 8


@dataclass(slots=True, eq=False)
class TpmAccount:
    """One user's shared TPM bucket, as this instance sees it."""

    user_id: Any
    capacity: int
    lease: int = 0  # taken from the bucket for this instance, not yet by a request; < 0: debt
    full_at: float = 0.0  # the bucket's full_at as last seen (0: never seen)
    holds: int = 0  # requests admitted against the lease and not settled
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> str:
        return f"{self.user_id}:{self.capacity}"

    @property
    def per_token(self) -> float:
        return WINDOW / self.capacity

    def shared_level(self, now: float) -> float:
        """The bucket's level as last seen, refilled since (others may have taken some)."""
        return self.capacity - max(0.0, self.full_at - now) / self.per_token

    def level(self, now: float) -> float:
        """What this instance may still admit: its lease plus the bucket as last seen."""
        return min(self.capacity, self.lease + self.shared_level(now))

    def wait_for(self, tokens: int, now: float) -> float:
        """Seconds until the bucket as last seen covers what the lease lacks (0: maybe now)."""
        return max(0.0, (tokens - self.level(now)) * self.per_token)

    def take(self, tokens: int) -> bool:
        """The hot path: ``tokens`` taken from the lease in memory, if it holds them."""
        self.last_used = time.monotonic()
        if self.lease >= tokens:
            self.lease -= tokens
            self.holds += 1
            return True
        return False

    def give(self, tokens: int) -> None:
        """Tokens back to the lease (negative: a request used more than it took)."""
        self.lease += tokens
        self.last_used = time.monotonic()


class TpmLeases:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.accounts: dict[tuple[Any, int], TpmAccount] = {}

    def account(self, user_id: Any, capacity: int) -> TpmAccount:
        account = self.accounts.get((user_id, capacity))
        if account is None:
            account = self.accounts[(user_id, capacity)] = TpmAccount(user_id, capacity)
        return account

    async def acquire(self, account: TpmAccount, tokens: int) -> bool:
        """Take ``tokens`` (at most the capacity) for a request: from the lease, after
        extending it from the bucket if it is short. False when the bucket cannot cover
        them now (``account.wait_for`` says how long until it may)."""
        if account.take(tokens):
            return True
        async with account.lock:
            if account.take(tokens):  # another request extended it meanwhile
                return True
            if account.wait_for(tokens, time.time()) > 0:  # not even as last seen
                return False
            if account.lease < 0:  # a debt is charged in full first, as the bucket would
                debt, account.lease = -account.lease, 0
                try:
                    await self._move(account, debt)
                except BaseException:
                    account.lease -= debt
                    raise
            shortfall = tokens - account.lease
            want = max(shortfall, account.capacity // SLICES)
            account.lease += await self._grant(account, want, shortfall)
            return account.take(tokens)

    def settle(self, account: TpmAccount, tokens: int) -> None:
        """A request admitted against the lease ended: ``tokens`` is what it used less what
        it took (negative: the rest goes back to the lease)."""
        account.holds -= 1
        account.give(-tokens)

    async def _collection(self):
        return (await self.database.client()).billing.tpm

    async def _grant(self, account: TpmAccount, want: int, least: int) -> int:
        """Take up to ``want`` tokens from the bucket (at least ``least``, else none):
        the amount taken. One conditional update in the common case."""
        if least > account.capacity:
            return 0
        tpm, per, now = await self._collection(), account.per_token, time.time()
        want = min(want, account.capacity)
        for _ in range(ATTEMPTS):
            # The bucket is not full: it must still hold ``want`` after refilling until now.
            doc = await tpm.find_one_and_update(
                {"_id": account.key, "full_at": {"$gt": now, "$lte": now + WINDOW - want * per}},
                {"$inc": {"full_at": want * per}}, return_document=ReturnDocument.AFTER)
            if doc is None:  # full, or new
                with contextlib.suppress(DuplicateKeyError):  # not full: it is read below
                    doc = await tpm.find_one_and_update(
                        {"_id": account.key, "full_at": {"$lte": now}},
                        {"$set": {"full_at": now + want * per},
                         "$setOnInsert": {"user_id": account.user_id}},
                        upsert=True, return_document=ReturnDocument.AFTER)
            if doc is not None:
                account.full_at = doc["full_at"]
                return want
            doc = await tpm.find_one({"_id": account.key})
            if doc is None:
                continue
            account.full_at = doc["full_at"]
            left = math.floor(account.shared_level(now))
            if left < max(least, 1):
                return 0
            want = min(want, left)  # what is left: taken if nobody takes it first
        raise TpmContention(f"TPM lease for {account.key}: too much contention")

    async def _move(self, account: TpmAccount, tokens: int) -> None:
        """Charge ``tokens`` to the bucket (negative: hand them back), whatever it holds."""
        tpm, per, now = await self._collection(), account.per_token, time.time()
        for _ in range(ATTEMPTS):
            doc = await tpm.find_one_and_update(
                {"_id": account.key, "full_at": {"$gt": now}},
                {"$inc": {"full_at": tokens * per}}, return_document=ReturnDocument.AFTER)
            if doc is None and tokens < 0:
                return  # the bucket is full (or gone): nothing to give back to
            if doc is None:
                with contextlib.suppress(DuplicateKeyError):
                    doc = await tpm.find_one_and_update(
                        {"_id": account.key, "full_at": {"$lte": now}},
                        {"$set": {"full_at": now + tokens * per},
                         "$setOnInsert": {"user_id": account.user_id}},
                        upsert=True, return_document=ReturnDocument.AFTER)
            if doc is not None:
                account.full_at = doc["full_at"]
                return
        raise TpmContention(f"TPM charge for {account.key}: too much contention")

    async def flush(self) -> None:
        """Hand idle users' leases (and debts) back to their buckets; forget the idle.
        A hand-back is not retried: its reply may be lost after it applied, and a lease
        lost instead comes back by the bucket's refill within a minute."""
        for key, account in list(self.accounts.items()):
            idle = time.monotonic() - account.last_used > IDLE_RELEASE
            if not idle or account.lock.locked():
                continue
            if account.lease:  # out of memory first: a request arriving now takes a new one
                amount, account.lease = account.lease, 0
                try:
                    await self._move(account, -amount)
                except PyMongoError as e:
                    logger.warning(f"TPM lease hand-back for {account.key} failed: "
                                   f"{type(e).__name__}")
            # Checked after the await above: a request may have used it meanwhile.
            if (account.lease == 0 and account.holds == 0 and not account.lock.locked()
                    and time.monotonic() - account.last_used > IDLE_RELEASE
                    and self.accounts.get(key) is account):
                del self.accounts[key]

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
            except Exception:  # a bug must not stop hand-backs for good
                logger.exception("TPM lease hand-back failed")

    async def close(self, timeout: float) -> None:
        """Every lease handed back at shutdown."""
        for account in self.accounts.values():
            account.last_used = 0.0
        with contextlib.suppress(PyMongoError, TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)


class TpmContention(PyMongoError):
    """Other instances kept changing the bucket; the request is refused as retryable."""
