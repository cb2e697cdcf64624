"""Changes to ``cgc.api_keys`` as they happen, for KeyAuth's cache: a change stream.

A key created, revoked, expired, re-leveled or deleted outside this process (mongosh, the
CLI, another instance's portal) reaches the cache at once on every instance: each insert,
update, replace or delete is passed on as ``changed(key_id, document)`` (the key as it is
now, None once deleted). Where the database has change streams (the embedded database,
MongoDB replica sets), the watcher runs in the background for the proxy's lifetime,
resumes after its last change (its resume token) when the connection drops, and retries
with backoff while the database is unreachable. Whenever it starts without a resume token,
or the database no longer has the changes since (restart, history lost), changes may have
been missed: ``missed()`` is called once the stream is open again.

A standalone MongoDB has no change streams: one log line, and the watcher ends (keys then
change within KeyAuth's cache TTLs).

Our own ``date_last_used`` writes (storage/last_used.py, every few seconds per key in use)
are not changes that matter: the database filters them out where it says which fields an
update set (MongoDB); elsewhere KeyAuth sees the key unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pymongo.errors import OperationFailure, PyMongoError

from .. import background
from .database import Database

logger = logging.getLogger(__name__)

KEY_FIELDS = ("secret", "user_id", "access_level", "date_expiry")  # what KeyAuth reads
# Standalone server, unknown stage (old server), command not supported, not authorized.
NO_CHANGE_STREAMS = frozenset({40573, 40324, 115, 13})
# The resume token is no good: history lost (rolled off the oplog, database restarted),
# fatal change stream error, invalid token, capped position lost.
RESUME_FAILED = frozenset({286, 280, 260, 136})
AWAIT_MS = 1000  # each getMore waits this long for changes
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # seconds between attempts while the database fails

UPDATED = {"$ifNull": ["$updateDescription.updatedFields", {}]}
NOT_ONLY_LAST_USED = {"$or": [  # all but an update that set date_last_used and nothing else
    {"$ne": ["$operationType", "update"]},
    {"$gt": [{"$size": {"$ifNull": ["$updateDescription.removedFields", []]}}, 0]},
    {"$eq": [{"$size": {"$objectToArray": UPDATED}}, 0]},  # fields not told: keep it
    {"$gt": [{"$size": {"$filter": {"input": {"$objectToArray": UPDATED},
                                    "cond": {"$ne": ["$$this.k", "date_last_used"]}}}}, 0]},
]}
KEY_CHANGES = ("insert", "update", "replace", "delete")
PIPELINE: list[dict[str, Any]] = [
    {"$match": {"$expr": NOT_ONLY_LAST_USED}},
    {"$project": {"operationType": 1, "documentKey": 1,
                  **{f"fullDocument.{field}": 1 for field in KEY_FIELDS}}},
]


def no_change_streams(error: OperationFailure) -> bool:
    """The database cannot watch, for good: a standalone server, or no permission."""
    return error.code in NO_CHANGE_STREAMS or "$changeStream" in str(error)


class KeyWatcher:
    def __init__(self, database: Database,
                 changed: Callable[[Any, Mapping[str, Any] | None], None],
                 missed: Callable[[], None]) -> None:
        self.database = database
        self._changed, self._missed = changed, missed
        self.resume_token: Mapping[str, Any] | None = None
        self.watching = False  # a change stream is open
        self._failing = self._announced = False
        self._task: asyncio.Task | None = None
        self._stopping: asyncio.Event | None = None

    def start(self) -> None:
        if self._task is None:
            self._stopping = asyncio.Event()
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await background.stop(self._task, self._stopping)
        self._task = None
        self.watching = False

    async def _run(self) -> None:
        assert self._stopping is not None
        delay = RETRY_FIRST
        while not self._stopping.is_set():
            try:
                await self._watch()
                self.resume_token = None  # it ended (collection dropped): start afresh
            except OperationFailure as e:
                if e.code in RESUME_FAILED and self.resume_token is not None:
                    self.resume_token = None  # start afresh, at once
                    continue
                if no_change_streams(e):
                    logger.info(f"No change streams on this database ({e.code}): keys "
                                "changed outside the proxy apply within its key cache TTLs")
                    return
                self._failed(f"code {e.code}")
            except PyMongoError as e:
                self._failed(type(e).__name__)
            except Exception:  # a bug must not end the watching for the process's lifetime
                logger.exception("Watching cgc.api_keys failed")
                self.resume_token = None
                self._failing = True
            finally:
                if self.watching:
                    delay = RETRY_FIRST  # it had worked: this is a new failure
                self.watching = False
            if await background.pause(self._stopping, delay):
                return
            delay = min(RETRY_MAX, delay * 2)

    def _failed(self, reason: str) -> None:
        if not self._failing:  # once per outage
            logger.warning(f"Watching cgc.api_keys failed ({reason}); retrying")
        self._failing = True

    async def _watch(self) -> None:
        client = await self.database.client()
        async with await client.cgc.api_keys.watch(
                PIPELINE, full_document="updateLookup", resume_after=self.resume_token,
                max_await_time_ms=AWAIT_MS) as stream:
            self.watching = True
            if self._failing or not self._announced:
                logger.info("Watching cgc.api_keys: key changes apply at once")
            self._failing, self._announced = False, True
            if self.resume_token is None:
                self._missed()  # whatever changed before the stream opened
            self.resume_token = stream.resume_token
            while stream.alive:
                change = await stream.try_next()
                if change is not None:
                    self.apply(change)
                self.resume_token = stream.resume_token  # only once applied

    def apply(self, change: Mapping[str, Any]) -> None:
        operation = change.get("operationType")
        if operation not in KEY_CHANGES:  # the collection dropped or renamed
            self._missed()
            return
        key_id = (change.get("documentKey") or {}).get("_id")
        document = change.get("fullDocument") if operation != "delete" else None
        self._changed(key_id, document or None)
