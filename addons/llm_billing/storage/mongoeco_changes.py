"""Change streams over the embedded database's wire protocol.

mongoeco 4.11 has change streams in process only (``collection.watch()``); its wire server
answers ``aggregate`` with a ``$changeStream`` stage "Unsupported aggregation stage", so a
driver's ``watch()`` (KeyAuth's key watcher, mongosh's ``db.api_keys.watch()``) failed.
``ChangeStreamWireServer`` serves them from the server's own change hub, as a replica set
does: ``aggregate`` opens a tailable cursor (its id apart from mongoeco's cursors),
``getMore`` waits up to its ``maxTimeMS`` for changes, each change's ``_id`` and every
batch's ``postBatchResumeToken`` resume it (``resumeAfter`` / ``startAfter``), and
``killCursors`` or the connection's end closes it. Stages after ``$changeStream`` are
mongoeco's change-stream stages ($match, $project, $addFields, ...).

The hub records changes only while someone watches, so the server watches from its start
(one registration, for as long as it runs): every change of this run is in the hub, in
order, and a resume token is a position in it. A token from another run (the server was
restarted) or one the hub no longer retains (the last ``HISTORY`` changes: seconds of
writes at least, the time a watcher takes to reconnect; ~4 KB each) is refused with
ChangeStreamHistoryLost, as MongoDB refuses one that fell off its oplog: the watcher then
knows it may have missed changes. The event collections write no change record at all
(mongoeco_fast.py), so nobody can watch those.

``install()``: a dropped collection publishes no "invalidate" change. mongoeco published it
outside the engine's commit sequence, taking the number of the next write's change, which
the engine then skipped as already delivered: after any drop, the next insert, update or
delete anywhere was never seen by any stream (a key created then stayed refused).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from dataclasses import dataclass
from typing import Any

from mongoeco.api import AsyncMongoClient
from mongoeco.api._async.collection import AsyncCollection
from mongoeco.change_streams import ChangeStreamHub, compile_change_stream_pipeline
from mongoeco.core.aggregation import apply_pipeline
from mongoeco.core.codec import DocumentCodec
from mongoeco.errors import OperationFailure
from mongoeco.types import ChangeEventSnapshot
from mongoeco.wire.connections import WireConnectionContext, WireConnectionRegistry

from .mongoeco_wire import DriverWireExecutor, DriverWireServer

CURSOR_IDS_FROM = 1 << 40  # apart from mongoeco's own cursor ids (1, 2, ...)
DEFAULT_AWAIT_MS = 1000  # MongoDB's default for a getMore on a tailable cursor
MAX_AWAIT_MS = 60_000
MAX_BATCH = 1000
HISTORY = 2000  # changes the hub keeps for streams that resume (mongoeco's default: 10,000)
FULL_DOCUMENT_MODES = ("default", "updateLookup", "whenAvailable", "required")
HISTORY_LOST = 286  # MongoDB's ChangeStreamHistoryLost


class ResumeTokens:
    """A resume token is this run's id and a position in the hub (hex, as MongoDB's)."""

    def __init__(self) -> None:
        self.run = secrets.token_hex(8).upper()

    def token(self, offset: int) -> dict[str, str]:
        return {"_data": f"{self.run}{offset:016X}"}

    def offset(self, token: Any, hub: ChangeStreamHub) -> int:
        data = token.get("_data") if isinstance(token, dict) else None
        if not isinstance(data, str) or not data.startswith(self.run):
            raise OperationFailure("resume token from another run of the embedded database: "
                                   "changes since may be lost", code=HISTORY_LOST)
        try:
            offset = int(data[len(self.run):], 16)
        except ValueError:
            raise OperationFailure("malformed resume token", code=HISTORY_LOST) from None
        if not hub.state.base_offset <= offset <= hub.current_offset():
            raise OperationFailure("resume token no longer in the change history",
                                   code=HISTORY_LOST)
        return offset


@dataclass(slots=True)
class _Stream:
    """One open change stream: where it is in the hub, and what it returns."""

    namespace: str  # "db.coll", "db.$cmd.aggregate" or "admin.$cmd.aggregate"
    db_name: str | None  # None: the whole deployment
    coll_name: str | None  # None: the whole database
    pipeline: list[dict[str, Any]] | None
    full_document: str
    offset: int  # the next change to look at
    connection_id: int

    def transform(self, event: ChangeEventSnapshot, change_id: dict[str, str]
                  ) -> dict[str, Any] | None:
        """The change as the client sees it, or None when out of scope or filtered out."""
        if (self.db_name is not None and event.db_name != self.db_name) or \
                (self.coll_name is not None and event.coll_name != self.coll_name):
            return None
        document = event.to_document() | {"_id": change_id}
        if document["operationType"] == "update" and self.full_document == "default":
            document.pop("fullDocument", None)  # else the hub's post-image ("updateLookup")
        if self.pipeline is not None:
            transformed = apply_pipeline([document], self.pipeline)
            if not transformed:
                return None
            document = transformed[0]
        return DocumentCodec.to_pymongo(document)


class ChangeStreams:
    """The open change streams of one wire server, over its client's change hub."""

    def __init__(self, hub: ChangeStreamHub) -> None:
        self.hub = hub
        hub.register_watcher()  # for the server's lifetime: every change is recorded
        self.tokens = ResumeTokens()
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(CURSOR_IDS_FROM)

    def __len__(self) -> int:
        return len(self._streams)

    def owns(self, cursor_id: Any) -> bool:
        return cursor_id in self._streams

    def open(self, body: dict[str, Any], db_name: str,
             connection: WireConnectionContext) -> dict[str, Any]:
        pipeline = body["pipeline"]
        options = pipeline[0]["$changeStream"]
        if not isinstance(options, dict):
            raise OperationFailure("$changeStream takes a document")
        target = body["aggregate"]
        if isinstance(target, str):
            scope: tuple[str | None, str | None] = (db_name, target)
            namespace = f"{db_name}.{target}"
        elif options.get("allChangesForCluster"):
            if db_name != "admin":
                raise OperationFailure("allChangesForCluster needs the admin database")
            scope, namespace = (None, None), "admin.$cmd.aggregate"
        else:
            scope, namespace = (db_name, None), f"{db_name}.$cmd.aggregate"
        full_document = options.get("fullDocument", "default")
        if full_document not in FULL_DOCUMENT_MODES:
            raise OperationFailure(f"unknown fullDocument mode {full_document!r}")
        stages = compile_change_stream_pipeline(DocumentCodec.to_internal(pipeline[1:])) \
            if len(pipeline) > 1 else None
        stream = _Stream(namespace, *scope, stages, full_document, self._start(options),
                         connection.connection_id)
        cursor_id = next(self._ids)
        self._streams[cursor_id] = stream
        return {"cursor": {"firstBatch": [],
                           "postBatchResumeToken": self.tokens.token(stream.offset),
                           "id": cursor_id, "ns": namespace}, "ok": 1.0}

    def _start(self, options: dict[str, Any]) -> int:
        """Where a new stream starts in the hub."""
        resume = options.get("resumeAfter") or options.get("startAfter")
        if resume is not None:
            return self.tokens.offset(resume, self.hub)
        if (start := options.get("startAtOperationTime")) is not None:  # a change's clusterTime
            return self.hub.offset_at_or_after_cluster_time(
                start.time if hasattr(start, "time") else int(start))
        return self.hub.current_offset()

    async def get_more(self, body: dict[str, Any]) -> dict[str, Any]:
        cursor_id = body["getMore"]
        stream = self._streams[cursor_id]
        wait_ms = body.get("maxTimeMS")
        wait = min(MAX_AWAIT_MS, DEFAULT_AWAIT_MS if wait_ms is None else wait_ms) / 1000
        limit = min(MAX_BATCH, body.get("batchSize") or MAX_BATCH)
        batch: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while len(batch) < limit:
            # Once something is found, only what is already there joins the batch.
            timeout = 0.0 if batch else max(0.0, deadline - loop.time())
            try:
                offset, event = await self.hub.wait_for_event_async(
                    stream.offset, timeout_seconds=timeout)
            except OperationFailure as e:  # it fell behind what the hub retains
                self.close(cursor_id)
                raise OperationFailure(str(e), code=HISTORY_LOST) from None
            if cursor_id not in self._streams:
                break  # killed while it waited
            if event is None:
                if batch or loop.time() >= deadline:
                    break
                continue  # woken for another stream
            stream.offset = offset
            try:
                change = stream.transform(event, self.tokens.token(offset))
            except Exception:  # its pipeline cannot take this change: the stream ends
                self.close(cursor_id)
                raise
            if change is not None:
                batch.append(change)
        return {"cursor": {"nextBatch": batch,
                           "postBatchResumeToken": self.tokens.token(stream.offset),
                           "id": cursor_id if cursor_id in self._streams else 0,
                           "ns": stream.namespace}, "ok": 1.0}

    def kill(self, cursor_ids: list[Any]) -> dict[str, Any]:
        killed = [i for i in cursor_ids if self.close(i)]
        unknown = [i for i in cursor_ids if i not in killed]
        return {"cursorsKilled": killed, "cursorsNotFound": unknown, "cursorsAlive": [],
                "cursorsUnknown": unknown, "ok": 1.0}

    def close(self, cursor_id: Any) -> bool:
        if self._streams.pop(cursor_id, None) is None:
            return False
        self.hub.wake_waiters()  # a getMore waiting on it returns
        return True

    def close_connection(self, connection_id: int) -> None:
        for cursor_id in [i for i, s in self._streams.items()
                          if s.connection_id == connection_id]:
            self.close(cursor_id)


def is_change_stream(body: dict[str, Any]) -> bool:
    pipeline = body.get("pipeline")
    return isinstance(pipeline, list) and bool(pipeline) and \
        isinstance(pipeline[0], dict) and "$changeStream" in pipeline[0]


class ChangeStreamExecutor(DriverWireExecutor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.change_streams = ChangeStreams(self._client._change_hub)

    async def execute_prepared(self, context: Any) -> dict[str, Any]:
        body, name = context.command_document, context.command_name
        streams = self.change_streams
        if name == "aggregate" and is_change_stream(body):
            self._auth.require_authenticated(context.connection, name)
            return streams.open(body, context.db_name, context.connection)
        if name == "getMore" and streams.owns(body.get("getMore")):
            self._auth.require_authenticated(context.connection, name)
            return await streams.get_more(body)
        if name == "killCursors" and any(streams.owns(i) for i in body.get("cursors") or ()):
            self._auth.require_authenticated(context.connection, name)
            return streams.kill(body["cursors"])
        return await super().execute_prepared(context)


class _Connections(WireConnectionRegistry):
    """The server's connections; a closed one's change streams close with it."""

    def __init__(self, streams: ChangeStreams) -> None:
        super().__init__()
        self._change_streams = streams

    def close(self, context: WireConnectionContext) -> None:
        super().close(context)
        self._change_streams.close_connection(context.connection_id)


class ChangeStreamWireServer(DriverWireServer):
    """mongoeco's wire server for any driver (mongoeco_wire.py), with change streams."""

    def __init__(self, *, engine: Any, **kwargs: Any) -> None:
        super().__init__(client=AsyncMongoClient(engine, change_stream_history_size=HISTORY),
                         **kwargs)
        self._owns_client = True  # connects and disconnects the engine, as with engine=
        self._executor = ChangeStreamExecutor(self._client, self._cursor_store,
                                              self._session_store, surface=self._surface,
                                              auth=self._auth)
        self._connections = _Connections(self._executor.change_streams)


async def drop_without_invalidate(self: AsyncCollection, *, session: Any = None) -> None:
    """mongoeco's ``AsyncCollection.drop`` without its "invalidate" change (see above)."""
    self._ensure_session_active(session)
    await self._engine.drop_collection(self._db_name, self._collection_name, context=session)


def install() -> None:
    """Drops that keep the change sequence whole, in this process (the database's)."""
    AsyncCollection.drop = drop_without_invalidate  # type: ignore[method-assign]
