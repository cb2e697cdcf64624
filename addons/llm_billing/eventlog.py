"""EventLog addon: one completion event per billed request, written off the hot path.

Events go into an in-memory queue; one background task writes them in batches with
``insert_many(ordered=False)``, retrying with backoff while the database is unavailable.
Every event's ``_id`` was fixed when its request started, so a retried batch can never
bill twice: a duplicate-key error means that event is already stored. Events still
unwritten at shutdown are spilled to a file and written at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from bson import json_util
from mitmproxy import ctx, http
from pymongo.errors import BulkWriteError, PyMongoError

from . import context
from .database import Database
from .events import completion_event, failure_event
from .settings import Settings

logger = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
COMPLETIONS = "events_completion"
FAILED = "events_failed"
SPILL_FILE = "unsent-events.jsonl"
DEAD_LETTER_FILE = "rejected-events.jsonl"


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


def _append_jsonl(path: Path, events: list[tuple[str, dict]]) -> None:
    """(collection, document) pairs as canonical extended JSON, one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for collection, doc in events:
            line = {"collection": collection, "doc": doc}
            try:
                text = json_util.dumps(line, json_options=json_util.CANONICAL_JSON_OPTIONS)
            except (TypeError, ValueError):  # keep what can be kept, readable
                text = json.dumps(line, default=repr)
            f.write(text + "\n")


class EventLog:
    def __init__(self, database: Database, settings: Settings | None = None) -> None:
        self.database = database
        self.settings = settings
        # (collection, document): completions and upstream failures share one writer
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.written = 0
        self._writer: asyncio.Task | None = None
        self._in_flight: list[tuple[str, dict[str, Any]]] = []

    def load(self, loader) -> None:
        loader.add_option("event_batch_size", int, 500, "Most events written in one batch.")
        loader.add_option(
            "event_flush_interval_ms", int, 50, "Milliseconds an event may wait for its batch."
        )
        loader.add_option(
            "event_shutdown_timeout", int, 10,
            "Seconds to keep writing at shutdown before spilling events to a file.",
        )

    def running(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._run())

    def response(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def _log(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if rc is None or rc.outcome is None or rc.logged:
            return
        rc.logged = True
        if rc.outcome.usage is None:
            logger.info(f"Not billed: {rc.model} for user {rc.caller.user_id}: "
                        f"status {rc.outcome.status}, {rc.outcome.error or 'no usage'}")
            self.queue.put_nowait((FAILED, failure_event(rc, rc.outcome)))
            return
        assert self.settings is not None and self.settings.config is not None
        prices = self.settings.config.prices
        self.queue.put_nowait((COMPLETIONS, completion_event(rc, rc.outcome, prices)))

    async def _run(self) -> None:
        await self._replay_spill()
        while True:
            # Visible to done() from the moment it leaves the queue.
            batch = self._in_flight = [await self.queue.get()]
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
                docs = [doc for name, doc in batch if name == collection]
                if docs:
                    await self.write(docs, collection)
            self._in_flight = []

    async def write(self, batch: list[dict[str, Any]], collection: str = COMPLETIONS) -> None:
        """Store ``batch`` in ``billing.<collection>``, retrying until the database takes it."""
        delay = 0.1
        pending = batch
        while pending:
            try:
                client = await self.database.client()
                await client.billing[collection].insert_many(pending, ordered=False)
                self.written += len(pending)
                return
            except BulkWriteError as e:
                retry, rejected = split_bulk_error(pending, e)
                self.written += e.details.get("nInserted", 0)
                if rejected:
                    logger.error(f"{len(rejected)} events rejected by the database; kept in "
                                 f"{DEAD_LETTER_FILE}")
                    _append_jsonl(self._data_dir() / DEAD_LETTER_FILE,
                                  [(collection, doc) for doc in rejected])
                pending = retry
            except PyMongoError as e:
                logger.warning(f"Event write failed ({type(e).__name__}); retrying in {delay:.1f}s"
                               f" ({len(pending)} events waiting + {self.queue.qsize()} queued)")
            except Exception:  # e.g. a value BSON cannot encode: keep it, go on writing
                logger.exception(f"{len(pending)} events could not be written; kept in "
                                 f"{DEAD_LETTER_FILE}")
                _append_jsonl(self._data_dir() / DEAD_LETTER_FILE,
                              [(collection, doc) for doc in pending])
                return
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    @staticmethod
    def _data_dir() -> Path:  # a method: mitmproxy inspects addon attributes at load
        return Path(ctx.options.billing_data_dir)

    async def _replay_spill(self) -> None:
        path = self._data_dir() / SPILL_FILE
        if not path.exists():
            return
        lines = [json_util.loads(line) for line in path.read_text().splitlines() if line.strip()]
        logger.info(f"Writing {len(lines)} events spilled at the last shutdown")
        for collection in (COMPLETIONS, FAILED):
            docs = [line["doc"] for line in lines if line["collection"] == collection]
            for start in range(0, len(docs), 500):
                await self.write(docs[start : start + 500], collection)
        path.unlink()

    async def done(self) -> None:
        """Drain the queue; what the database does not take in time goes to the spill file."""
        if self._writer is None:
            return
        deadline = time.monotonic() + ctx.options.event_shutdown_timeout
        while (self.queue.qsize() or self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        unsent = self._in_flight + [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        if unsent:
            _append_jsonl(self._data_dir() / SPILL_FILE, unsent)
            logger.warning(f"{len(unsent)} events not yet stored; saved to {SPILL_FILE}, "
                           "written at next start")
