"""EventLog addon: one event per billed (or failed) request, written off the hot path.

When a request goes upstream, a provisional event (its prompt, estimated) is appended to
the local journal (journal.py: survives any crash of the proxy); when it finishes, its
real event is appended and queued, and only that one is stored — the provisional one counts only
if the proxy died in between. One background task writes the queue in batches with
``insert_many(ordered=False)``, retrying with backoff while the database is unavailable.
Every event's ``_id`` was fixed when its request started, so a retried batch — or a
journal replayed after a crash — can never bill twice: a duplicate-key error means that
event is already stored.

After each batch, the completion events it newly stored (never the duplicates: those were
counted when first stored) are added to the daily rollups in ``billing.usage_daily``
(core/rollups.py), for charts. Rollups are at most once: a crash between the insert and
the rollup update, or a rollup update whose reply was lost, leaves that batch out of
them. They may undercount, never double count, and are never used for billing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import bson
from mitmproxy import ctx, http
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, PyMongoError, ServerSelectionTimeoutError

from . import background, context
from .core.events import completion_event, failure_event, intent_event
from .core.outcome import Outcome
from .core.rollups import daily_updates
from .settings import Settings
from .storage.database import Database
from .storage.journal import Journal, Segment, append_lines
from .storage.ledger import QuotaLedger

logger = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
COMPLETIONS = "events_completion"
FAILED = "events_failed"
ROLLUPS = "usage_daily"
INTENT = "intent"  # journal only: a request's provisional event
DEAD_LETTER_FILE = "rejected-events.jsonl"
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # MongoDB's limit

# collection, document, the journal segments holding it (and its provisional event)
Queued = tuple[str, dict[str, Any], tuple[Segment | None, ...]]


def split_bulk_error(batch: list[dict], error: BulkWriteError) -> tuple[list[dict], list[dict]]:
    """(to retry, rejected for good) after a partial batch failure; duplicates are stored."""
    retry: list[dict] = []
    rejected: list[dict] = []
    failed = {e["index"]: e.get("code") for e in error.details.get("writeErrors", [])}
    for index, code in sorted(failed.items()):
        if code == DUPLICATE_KEY:
            continue
        (rejected if code in (121, 2) else retry).append(batch[index])
    return retry, rejected


def unstorable(doc: dict[str, Any]) -> str | None:
    """Why the database can never take ``doc`` (e.g. an int beyond int64), or None."""
    try:
        size = len(bson.encode(doc))
    except Exception as e:  # whatever BSON refuses
        return f"{type(e).__name__}: {e}"
    return f"{size} bytes" if size > MAX_DOCUMENT_BYTES else None


class EventLog:
    def __init__(self, database: Database, settings: Settings | None = None,
                 ledger: QuotaLedger | None = None) -> None:
        self.database = database
        self.settings = settings
        self.ledger = ledger  # the usage ledger its journal keeps segments for
        self.queue: asyncio.Queue[Queued] = asyncio.Queue()
        self.written = 0
        self.journal: Journal | None = None
        self._writer: asyncio.Task | None = None
        self._in_flight: list[Queued] = []

    def load(self, loader) -> None:
        loader.add_option("event_batch_size", int, 500, "Most events written in one batch.")
        # 250 ms, not less: each write costs the embedded database a fixed ~2 ms of CPU
        # (insert command + rollup update), so fewer, bigger batches halve its CPU per event.
        loader.add_option(
            "event_flush_interval_ms", int, 250, "Milliseconds an event may wait for its batch."
        )
        loader.add_option(
            "event_shutdown_timeout", int, 10,
            "Seconds to keep writing at shutdown; what is left stays in the journal.",
        )
        loader.add_option(
            "event_journal_segment_events", int, 1000,
            "Events per journal file; a file is deleted once all its events are stored.",
        )

    def running(self) -> None:
        if self._writer is None:
            journal = Journal(self._data_dir() / "journal",
                              ctx.options.event_journal_segment_events)
            if self.ledger is not None:  # one id: the journal's files name the ledger's writes
                journal.token = self.ledger.instance
                journal.usage_applied_below = self.ledger.applied_below
            self.journal = journal
            self._writer = asyncio.create_task(self._run())

    def request(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if (rc is None or flow.response or rc.backend is None or rc.replayed
                or self.journal is None or not rc.protocol.billed):
            return
        assert self.settings is not None and self.settings.config is not None
        rc.intent = self.journal.append(INTENT, intent_event(rc, self.settings.config.prices))

    def settled(self, rc: context.RequestContext, outcome: Outcome) -> None:
        """The flow ended (see settle.py): journal and queue its one event."""
        if outcome.usage is None:
            logger.info(f"Not billed: {rc.model} for user {rc.caller.user_id}: "
                        f"status {outcome.status}, {outcome.error or 'no usage'}")
            self.submit(FAILED, failure_event(rc, outcome), rc.intent)
            return
        assert self.settings is not None and self.settings.config is not None
        prices = self.settings.config.prices
        self.submit(COMPLETIONS, completion_event(rc, outcome, prices), rc.intent)

    def submit(self, collection: str, doc: dict[str, Any], intent: Segment | None = None) -> None:
        write = (doc.get("ledger") or {}).get("write", 0)
        segment = self.journal.append(collection, doc, write) if self.journal else None
        self.queue.put_nowait((collection, doc, (segment, intent)))

    async def _run(self) -> None:
        try:
            await self._replay_journals()
        except Exception:  # a bug must not stop event writing; the files stay for next time
            logger.exception("Journal replay failed")
        while True:
            # Visible to done() from the moment it leaves the queue.
            batch = self._in_flight = [await self._next_event()]
            deadline = time.monotonic() + ctx.options.event_flush_interval_ms / 1000
            while len(batch) < ctx.options.event_batch_size:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            for collection in (COMPLETIONS, FAILED):
                docs = [doc for name, doc, _ in batch if name == collection]
                if docs:
                    await self.write(docs, collection)
            if self.journal is not None:
                for _, _, segments in batch:
                    for segment in segments:
                        self.journal.stored(segment)
                self.journal.collect()
            self._in_flight = []

    async def _next_event(self) -> Queued:
        """The next queued event; while none comes, segments whose usage got written since
        they were stored are deleted every second."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), 1.0)
            except TimeoutError:
                if self.journal is not None:
                    self.journal.collect()

    async def write(self, batch: list[dict[str, Any]], collection: str = COMPLETIONS) -> None:
        """Store ``batch`` in ``billing.<collection>``, retrying until the database takes it.
        A document it can never take goes to the dead-letter file alone: checked one by one
        first, since the driver refuses a whole batch for one it cannot encode."""
        storable, rejected = [], []
        for doc in batch:
            if reason := unstorable(doc):
                logger.error(f"Event {doc.get('_id')} cannot be stored: {reason}")
                rejected.append(doc)
            else:
                storable.append(doc)
        if rejected:
            self._dead_letter(collection, rejected)
        inserted = await self._insert(storable, collection)
        if collection == COMPLETIONS and inserted:
            await self._roll_up(inserted)

    async def _insert(self, batch: list[dict[str, Any]], collection: str) -> list[dict[str, Any]]:
        """The documents of ``batch`` this call stored (not those stored before)."""
        delay = 0.1
        pending = batch
        inserted: list[dict[str, Any]] = []
        while pending:
            try:
                client = await self.database.client()
                await client.billing[collection].insert_many(pending, ordered=False)
                self.written += len(pending)
                return inserted + pending
            except BulkWriteError as e:
                retry, rejected = split_bulk_error(pending, e)
                self.written += e.details.get("nInserted", 0)
                failed = {error["index"] for error in e.details.get("writeErrors", [])}
                inserted += [doc for index, doc in enumerate(pending) if index not in failed]
                if rejected:
                    self._dead_letter(collection, rejected)
                pending = retry
            except PyMongoError as e:
                logger.warning(f"Event write failed ({type(e).__name__}); retrying in {delay:.1f}s"
                               f" ({len(pending)} events waiting + {self.queue.qsize()} queued)")
            except Exception:  # refused by the driver: find the one to set aside, store the rest
                if len(pending) > 1:
                    half = len(pending) // 2
                    inserted += await self._insert(pending[:half], collection)
                    inserted += await self._insert(pending[half:], collection)
                    return inserted
                logger.exception("An event could not be written")
                self._dead_letter(collection, pending)
                return inserted
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        return inserted

    async def _roll_up(self, events: list[dict[str, Any]]) -> None:
        """Add newly stored events to ``billing.usage_daily``. Retried only when the update
        surely was not applied (no server reachable, or the ops the server refused);
        otherwise dropped: see the module doc."""
        ops = [UpdateOne({"_id": _id}, update, upsert=True)
               for _id, update in daily_updates(events)]
        delay = 0.1
        while ops:
            try:
                client = await self.database.client()
                await client.billing[ROLLUPS].bulk_write(ops, ordered=False)
                return
            except BulkWriteError as e:
                errors = e.details.get("writeErrors", [])
                # Two writers upserting one new day at once: the loser is retried.
                again = {error["index"] for error in errors if error.get("code") == DUPLICATE_KEY}
                if len(again) < len(errors):
                    logger.warning(f"Daily usage rollup: {len(errors) - len(again)} updates "
                                   "refused; charts may undercount")
                ops = [op for index, op in enumerate(ops) if index in again]
            except ServerSelectionTimeoutError:
                pass
            except PyMongoError as e:
                logger.warning(f"Daily usage rollup of {len(events)} events skipped "
                               f"({type(e).__name__}); charts may undercount")
                return
            if ops:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _dead_letter(self, collection: str, docs: list[dict[str, Any]]) -> None:
        logger.error(f"{len(docs)} events cannot be stored; kept in {DEAD_LETTER_FILE}")
        append_lines(self._data_dir() / DEAD_LETTER_FILE, [(collection, d) for d in docs])

    @staticmethod
    def _data_dir() -> Path:  # a method: mitmproxy inspects addon attributes at load
        return Path(ctx.options.billing_data_dir)

    async def _replay_journals(self) -> None:
        """Events journaled by proxy processes that ended before storing them: each
        request's real event, or — if it never finished — its provisional one."""
        assert self.journal is not None
        paths = list(self.journal.orphans())
        if not paths:
            return
        final: dict[str, list[dict[str, Any]]] = {COMPLETIONS: [], FAILED: []}
        intents: dict[Any, dict[str, Any]] = {}
        for path in paths:
            for collection, doc in self.journal.read(path):
                _id = doc.get("_id")
                if collection not in (INTENT, *final) or _id is None or not _hashable(_id):
                    logger.warning(f"{path.name}: journaled event skipped: collection "
                                   f"{collection!r}, _id {type(_id).__name__}")
                elif collection == INTENT:
                    intents[_id] = doc
                else:
                    final[collection].append(doc)
        done = {doc["_id"] for docs in final.values() for doc in docs}
        unfinished = [_id for _id in intents if _id not in done]
        # Its real event may be stored while its provisional one's segment was not deleted
        # (other events in it were unstored): no journal line says it finished.
        stored = await self._stored_ids(unfinished)
        final[COMPLETIONS] += [intents[_id] for _id in unfinished if _id not in stored]
        logger.info(f"Writing journaled events of a stopped proxy: {len(done)} finished, "
                    f"{len(unfinished) - len(stored)} unfinished (estimated), {len(stored)} "
                    "finished and stored already")
        for collection, docs in final.items():
            for start in range(0, len(docs), 500):
                await self.write(docs[start : start + 500], collection)
        await self._recover_usage(paths, [d for docs in final.values() for d in docs])
        for path in paths:
            path.unlink()

    async def _recover_usage(self, paths: list[Path], events: list[dict[str, Any]]) -> None:
        """What the stopped instances settled but never wrote to ``billing.usage``."""
        if self.ledger is None or self.settings is None or self.settings.config is None:
            return
        assert self.journal is not None
        for instance in sorted({self.journal.token_of(path) for path in paths}):
            counted = [e for e in events if isinstance(e.get("ledger"), dict)
                       and e["ledger"].get("instance") == instance
                       and isinstance(e["ledger"].get("usage"), str)]
            while True:
                try:
                    await self.ledger.recover(instance, counted, self.settings.config.plans)
                    break
                except PyMongoError as e:
                    logger.warning(f"Usage recovery waits for the database ({type(e).__name__})")
                    await asyncio.sleep(1.0)

    async def _stored_ids(self, ids: list[Any]) -> set[Any]:
        """Which of ``ids`` are stored events, completed or failed (waits for the database)."""
        found: set[Any] = set()
        delay = 0.1
        for start in range(0, len(ids), 1000):
            query = {"_id": {"$in": ids[start : start + 1000]}}
            for collection in (COMPLETIONS, FAILED):
                while True:
                    try:
                        client = await self.database.client()
                        cursor = client.billing[collection].find(query, {"_id": 1})
                        found.update([doc["_id"] async for doc in cursor])
                        break
                    except PyMongoError as e:
                        logger.warning(f"Journal replay: event lookup failed "
                                       f"({type(e).__name__}); retrying in {delay:.1f}s")
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 10.0)
        return found

    def backlog(self) -> int:
        """Events queued or being written."""
        return self.queue.qsize() + len(self._in_flight)

    async def done(self) -> None:
        """Drain the queue for a while; what is left stays in the journal for next time."""
        if self._writer is None:
            return
        deadline = time.monotonic() + ctx.options.event_shutdown_timeout
        while (self.queue.qsize() or self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await background.stop(self._writer)
        unsent = len(self._in_flight) + self.queue.qsize()
        if self.journal is not None:
            self.journal.close()
        if unsent:
            logger.warning(f"{unsent} events not yet stored; they are in the journal and "
                           "are written at the next start")


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
