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

Each instance takes *leases* — slices of the bucket — and admits requests against its
lease in memory. It keeps the lease topped up ahead of need: when an admission leaves it
below a low-water mark (half a slice, or one request like the user's newest), a
background task takes the next slice — at once if the bucket as last seen holds it, else
when its refill will have (a timer) — so that in steady state no request waits for the
database. A slice is a tenth of the capacity, or one request like the newest if more, but
at most half the capacity (a bigger request takes what it lacks on its own path). A
request waits for the database only when the lease lacks its tokens while the bucket as
last seen holds them: a user's first request on this instance, a burst faster than the
top-ups, a request larger than a slice. That wait is one conditional update (two when
the bucket is not as last seen, full or not; more only under contention); admitting on
the bucket as last seen instead is not safe: every instance could admit on the same view,
and a view grows stale. Requests behind it wait on the account's lock and take from
the new lease in memory. When the bucket as last seen, plus its refill since, cannot cover
a request, it is refused without asking the database (and a top-up is timed for the
refill, for the retry). A request that used less than it took gives the rest back to the
lease; one that used more leaves the lease in debt, charged to the bucket before the next
slice. A lease is kept while the user made a request in the last ``KEEP`` seconds (a
minute, the bucket's whole refill: so a user's steady pace, however slow against the
limit, finds it kept) and goes back to the bucket after; meanwhile the other instances
share the capacity less the slices kept. A stopped instance's lease needs no expiry: it
was taken from the bucket, which refills.

Clocks: ``full_at`` is wall-clock time; instances whose clocks differ by ``d`` seconds can
together admit up to ``d * capacity / 60`` tokens more (or fewer) than the bucket allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from asyncio import sleep
from dataclasses import dataclass, field
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from .. import background
from .database import Database

logger = logging.getLogger(__name__)

WINDOW = 60.0  # seconds for an empty bucket to fill again
SLICES = 10  # a slice is at least capacity / SLICES
KEEP = WINDOW  # seconds a user's lease is kept (and topped up) after their last request
ATTEMPTS = 8


@dataclass(slots=True, eq=False)
class TpmAccount:
    """One user's shared TPM bucket, as this instance sees it."""

    user_id: Any
    capacity: int
    lease: int = 0  # taken from the bucket for this instance, not yet by a request; < 0: debt
    full_at: float = 0.0  # the bucket's full_at as last seen (0: never seen)
    holds: int = 0  # requests admitted against the lease and not settled
    newest: int = 0  # tokens the newest request asked for: the slice kept covers one more
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    topping: asyncio.Task | None = None  # the background top-up, while one runs

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

    @property
    def slice(self) -> int:
        """What the lease is topped up to."""
        return min(self.capacity // 2, max(self.capacity // SLICES, self.newest))

    @property
    def low(self) -> bool:
        """The lease is below its low-water mark: top it up."""
        return self.lease < max(self.slice // 2, min(self.newest, self.slice))

    def active(self) -> bool:
        return time.monotonic() - self.last_used <= KEEP

    def wait_for(self, tokens: int, now: float) -> float:
        """Seconds until the bucket as last seen covers what the lease lacks (0: maybe now)."""
        return max(0.0, (tokens - self.level(now)) * self.per_token)

    def take(self, tokens: int) -> bool:
        """The hot path: ``tokens`` taken from the lease in memory, if it holds them."""
        self.last_used, self.newest = time.monotonic(), tokens
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
        if account.take(tokens):  # the hot path: no await
            self._top_up_soon(account)
            return True
        async with account.lock:
            if account.take(tokens):  # another request (or a top-up) extended it meanwhile
                admitted = True
            elif account.wait_for(tokens, time.time()) > 0:  # not even as last seen
                admitted = False
            else:
                await self._extend(account, tokens)
                admitted = account.take(tokens)
        self._top_up_soon(account)
        return admitted

    async def _extend(self, account: TpmAccount, tokens: int) -> None:
        """Under the account's lock: the lease extended to hold ``tokens`` — a slice, if
        the bucket has it — or left as it is when the bucket lacks them."""
        if account.lease < 0:  # a debt is charged in full first, as the bucket would
            debt, account.lease = -account.lease, 0
            try:
                await self._move(account, debt)
            except BaseException:
                account.lease -= debt
                raise
        shortfall = tokens - account.lease
        if shortfall > 0:
            want = max(shortfall, account.slice - account.lease)
            account.lease += await self._grant(account, want, shortfall)

    def _top_up_soon(self, account: TpmAccount) -> None:
        if account.topping is None and account.low and \
                self.accounts.get((account.user_id, account.capacity)) is account:
            account.topping = asyncio.create_task(self._top_up(account))

    async def _top_up(self, account: TpmAccount) -> None:
        """In the background: the lease back to a slice, once the bucket as last seen
        holds what it lacks (a debt is charged whatever it holds); while the user is
        active. Each round either sleeps until that refill or asks the database, which
        updates the bucket as last seen."""
        try:
            while account.low and account.active():
                if (wait := _top_up_wait(account)) > 0:
                    await sleep(wait)
                    continue
                async with account.lock:  # requests may have changed it meanwhile
                    if account.low and _top_up_wait(account) <= 0:
                        await self._extend(account, account.slice)
        except PyMongoError as e:  # the next request's own path tries again
            logger.warning(f"TPM lease top-up for {account.key} failed: {type(e).__name__}")
        except Exception:
            logger.exception(f"TPM lease top-up for {account.key} failed")
        finally:
            account.topping = None

    def settle(self, account: TpmAccount, tokens: int) -> None:
        """A request admitted against the lease ended: ``tokens`` is what it used less what
        it took (negative: the rest goes back to the lease)."""
        account.holds -= 1
        account.give(-tokens)

    async def remaining(self, user_id: Any, capacity: int) -> float:
        """What this instance may still admit for the user: the shared bucket's level as
        the database holds it now, plus this instance's lease (other instances' leases
        are theirs). For ``/v1/usage``; no request waits for it."""
        key = (user_id, capacity)
        doc = await (await self._collection()).find_one({"_id": f"{user_id}:{capacity}"},
                                                        {"full_at": 1}) or {}
        own = self.accounts.get(key)
        seen = TpmAccount(user_id, capacity, lease=own.lease if own else 0,
                          full_at=doc.get("full_at", 0.0))
        return seen.level(time.time())

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
            # Or it is full, or new. The one the bucket as last seen says goes first: a
            # user's first request after a while finds it full, and waits for one update.
            updates = [self._take_from_partial, self._take_from_full]
            if account.full_at <= now:
                updates.reverse()
            for update in updates:
                if (doc := await update(tpm, account, want * per, now)) is not None:
                    break
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

    async def _take_from_partial(self, tpm, account: TpmAccount, seconds: float,
                                 now: float) -> dict | None:
        return await tpm.find_one_and_update(
            {"_id": account.key, "full_at": {"$gt": now, "$lte": now + WINDOW - seconds}},
            {"$inc": {"full_at": seconds}}, return_document=ReturnDocument.AFTER)

    async def _take_from_full(self, tpm, account: TpmAccount, seconds: float,
                              now: float) -> dict | None:
        with contextlib.suppress(DuplicateKeyError):  # not full: None
            return await tpm.find_one_and_update(
                {"_id": account.key, "full_at": {"$lte": now}},
                {"$set": {"full_at": now + seconds},
                 "$setOnInsert": {"user_id": account.user_id}},
                upsert=True, return_document=ReturnDocument.AFTER)
        return None

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
        """Hand the leases (and debts) of users idle for ``KEEP`` back to their buckets;
        forget the idle.
        A hand-back is not retried: its reply may be lost after it applied, and a lease
        lost instead comes back by the bucket's refill within a minute."""
        for key, account in list(self.accounts.items()):
            if account.active() or account.lock.locked():
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
                    and account.topping is None and not account.active()
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
        for account in list(self.accounts.values()):
            account.last_used = -math.inf
            await background.stop(account.topping)  # a slice it took meanwhile: refilled
        with contextlib.suppress(PyMongoError, TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)


def _top_up_wait(account: TpmAccount) -> float:
    """Seconds until the bucket as last seen holds what the lease lacks of a slice (a
    debt is charged whatever the bucket holds)."""
    lacks = account.slice - max(0, account.lease)
    return (lacks - account.shared_level(time.time())) * account.per_token


class TpmContention(PyMongoError):
    """Other instances kept changing the bucket; the request is refused as retryable."""
