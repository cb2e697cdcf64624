"""The MongoDB indexes the proxy's and the portal's queries need, made once at startup.

``ensure`` runs as a background task of the Database addon: requests never wait for it, a
failure (database down, no permission) is logged and that index tried again later. Each
``create_index`` is idempotent (same keys, same default name: a no-op); on a real MongoDB
the build itself runs in the server without blocking writes, on the embedded database in
its own process. Only plain key specs are used, which mongoeco supports too.

mongoeco builds an index in one write transaction that holds up every other request
(a lookup by ``_id`` waited 107 s while it indexed 50,000 events), so on the embedded
database an index is only made while its collection is small (then kept up as documents
come, at no measurable insert cost); a bigger collection is left as it is, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.errors import OperationFailure, PyMongoError

logger = logging.getLogger(__name__)

FIRST_RETRY = 5.0  # seconds
MAX_RETRY = 600.0
# An index with these keys exists already under another name or options (made by hand).
CONFLICTS = (85, 86)  # IndexOptionsConflict, IndexKeySpecsConflict
EMBEDDED_BUILD_LIMIT = 5_000  # documents: a build of a few seconds at most


@dataclass(frozen=True)
class Index:
    database: str
    collection: str
    keys: tuple[tuple[str, int], ...]
    why: str

    def __str__(self) -> str:
        fields = ", ".join(f"{name} {direction}" for name, direction in self.keys)
        return f"{self.database}.{self.collection} ({fields})"


INDEXES = (
    Index("cgc", "api_keys", (("secret", ASCENDING),), "KeyAuth's lookup by key hash (seed 002)"),
    Index("cgc", "api_keys", (("user_id", ASCENDING), ("_id", DESCENDING)),
          "a user's keys, newest first (portal)"),
    Index("billing", "usage_daily", (("user_id", ASCENDING), ("day", ASCENDING)),
          "a user's month of daily rollups (usage page)"),
    Index("billing", "usage_daily", (("day", ASCENDING),),
          "everyone's month of daily rollups (admins' usage page)"),
    Index("billing", "events_completion", (("user_id", ASCENDING), ("date_created", DESCENDING)),
          "a user's events by date (events page, usage fallback, /usage cost)"),
    Index("billing", "events_completion", (("model", ASCENDING), ("date_created", DESCENDING)),
          "a model's events by date (events page)"),
    Index("billing", "events_completion", (("date_created", DESCENDING),),
          "newest events, dates (events page, usage fallback)"),
    Index("billing", "usage", (("month", ASCENDING), ("user_id", ASCENDING)),
          "a month's usage (users page, quota alerts, reconcile)"),
    Index("billing", "usage", (("overage_tokens", ASCENDING),),
          "usage with overage (Stripe reporter)"),
    Index("billing", "stripe_outbox", (("status", ASCENDING), ("next_attempt", ASCENDING)),
          "items due for sending"),
    Index("billing", "stripe_outbox", (("month", ASCENDING),), "a month's items (reconcile)"),
    Index("billing", "alert_outbox", (("status", ASCENDING), ("next_attempt", ASCENDING)),
          "alerts due for sending"),
    Index("billing", "users", (("stripe_customer_id", ASCENDING),),
          "Stripe webhooks naming a customer"),
    Index("billing", "portal_accounts", (("role", ASCENDING),), "is there an admin"),
)


async def ensure(client: AsyncMongoClient, indexes: tuple[Index, ...] = INDEXES,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 embedded: bool | None = None) -> None:
    """Create ``indexes`` until each exists (or conflicts with one made by hand, or is
    too big a build for an ``embedded`` database; None: ask the server)."""
    missing = list(indexes)
    delay = FIRST_RETRY
    while True:
        failed = []
        if embedded is None:
            try:  # by URI too: the tests and other instances share one mongoeco
                info = await client.admin.command("buildInfo")
                embedded = info.get("gitVersion") == "mongoeco"
            except PyMongoError as e:
                failed = [(index, e) for index in missing]
                missing = []
        for index in missing:
            collection = client[index.database][index.collection]
            try:
                if embedded and await _too_big(collection, index):
                    continue
                await collection.create_index(list(index.keys))
            except OperationFailure as e:
                if e.code in CONFLICTS:
                    logger.warning(f"Index on {index} not created: an index with these keys "
                                   f"or its name exists already ({e.code}); keeping it")
                    continue
                failed.append((index, e))
            except PyMongoError as e:
                failed.append((index, e))
        if not failed:
            logger.debug(f"Database indexes ensured ({len(indexes)})")
            return
        missing = [index for index, _ in failed]
        logger.warning(f"Database indexes: {len(failed)} not created yet ("
                       f"{failed[0][0]}: {type(failed[0][1]).__name__}); retrying in "
                       f"{delay:.0f}s")
        await sleep(delay)
        delay = min(delay * 2, MAX_RETRY)


async def _too_big(collection, index: Index) -> bool:
    """True (with a warning) for an embedded collection too big to index without a stall."""
    info = await collection.index_information()
    if any([tuple(k) for k in spec["key"]] == list(index.keys) for spec in info.values()):
        return False  # exists: create_index is a no-op
    count = await collection.estimated_document_count()
    if count <= EMBEDDED_BUILD_LIMIT:
        return False
    logger.warning(f"Index on {index} not built: the embedded database would stop answering "
                   f"while it indexes {count} documents (minutes for 50,000). "
                   f"A real MongoDB (MONGODB_URI) builds indexes without stopping.")
    return True
