"""The key watcher (storage/key_watch.py) and what KeyAuth does with each change: the
changes come from a stream the test feeds one at a time (no sleeps), and from the real
embedded database."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from mitmproxy.test import taddons
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import AutoReconnect, OperationFailure

from llm_billing.keyauth import KeyAuth, token_hash
from llm_billing.settings import Settings
from llm_billing.storage import key_watch
from llm_billing.storage.key_watch import PIPELINE, KeyWatcher


class FakeStream:
    """A change stream whose changes (or errors) the test puts in, one ``try_next`` each."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.alive = True
        self.resume_token: dict[str, Any] = {"_data": "open"}

    async def try_next(self) -> dict[str, Any] | None:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            self.resume_token = item["_id"]
        return item

    async def __aenter__(self) -> FakeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.alive = False


class FakeKeys:
    """``cgc.api_keys``: documents by secret for lookups, and the streams ``watch`` opens
    (or errors it raises), in order."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.queries = 0
        self.opened: list[Any] = []  # what each watch() gets, in order
        self.watches: list[dict[str, Any]] = []  # the arguments of each watch()
        self.watched = asyncio.Event()

    async def find_one(self, query: dict[str, Any], projection: Any = None) -> Any:
        self.queries += 1
        doc = self.docs.get(query["secret"])
        return doc if doc is not None and doc.get("access_level") == "COMPLETION" else None

    async def watch(self, pipeline: Any, **kwargs: Any) -> FakeStream:
        self.watches.append(kwargs)
        self.watched.set()
        opened = self.opened.pop(0)
        if isinstance(opened, BaseException):
            raise opened
        opened.resume_token = kwargs["resume_after"] or opened.resume_token  # as pymongo
        return opened


class FakeDatabase:
    def __init__(self) -> None:
        self.keys = FakeKeys()

    async def client(self) -> Any:
        return type("Client", (), {"cgc": type("Db", (), {"api_keys": self.keys})})()


def key_doc(token: str, **fields: Any) -> dict[str, Any]:
    return {"_id": ObjectId(), "secret": token_hash(token), "access_level": "COMPLETION",
            "user_id": f"u-{token}", "date_expiry": None, **fields}


class Changes:
    """Feeds a KeyAuth's watcher: each change is applied before ``send`` returns."""

    def __init__(self, auth: KeyAuth, database: FakeDatabase) -> None:
        self.auth, self.database = auth, database
        self.stream = FakeStream()
        self.applied = asyncio.Event()
        self.missed = 0
        self._count = 0
        changed, expire = auth.key_changed, auth.watcher._missed

        def key_changed(key_id: Any, doc: Any) -> None:
            changed(key_id, doc)
            self.applied.set()

        def missed() -> None:
            self.missed += 1
            expire()

        auth.watcher._changed, auth.watcher._missed = key_changed, missed

    async def send(self, operation: str, doc: dict[str, Any], **change: Any) -> None:
        self._count += 1
        full = {} if operation == "delete" else {
            "fullDocument": {k: v for k, v in doc.items() if k != "_id"}}
        self.applied.clear()
        await self.stream.queue.put({"_id": {"_data": f"t{self._count}"},
                                     "operationType": operation,
                                     "documentKey": {"_id": doc["_id"]}, **full, **change})
        await self.applied.wait()


def run_with_watcher(test: Callable[[KeyAuth, FakeDatabase, Changes], Any]) -> None:
    async def go():
        database = FakeDatabase()
        auth = KeyAuth(database, Settings())  # type: ignore[arg-type]
        changes = Changes(auth, database)
        database.keys.opened.append(changes.stream)
        with taddons.context(auth) as tctx:
            tctx.configure(auth, key_cache_ttl=3600, key_cache_negative_ttl=3600)
            auth.watcher.start()
            await database.keys.watched.wait()
            try:
                await test(auth, database, changes)
            finally:
                await auth.watcher.stop()

    asyncio.run(go())


def test_a_change_drops_the_keys_cache_entries_at_once():
    """TTLs of an hour: only the changes make the cache look again."""
    async def test(auth: KeyAuth, database: FakeDatabase, changes: Changes) -> None:
        keys = database.keys
        new = key_doc("new")
        assert await auth.lookup(token_hash("new")) is None  # tried before it exists
        keys.docs[new["secret"]] = new
        await changes.send("insert", new)
        assert (await auth.lookup(token_hash("new"))).user_id == "u-new"

        valid = key_doc("valid")
        keys.docs[valid["secret"]] = valid
        assert await auth.lookup(token_hash("valid")) is not None
        queries = keys.queries
        used = valid | {"date_last_used": datetime.now(UTC)}  # our own writes: no change
        await changes.send("update", used)
        assert await auth.lookup(token_hash("valid")) is not None
        assert keys.queries == queries  # still cached

        releveled = valid | {"access_level": "READ"}
        keys.docs[valid["secret"]] = releveled
        await changes.send("update", releveled)
        assert await auth.lookup(token_hash("valid")) is None

        keys.docs[valid["secret"]] = valid  # back to COMPLETION, then revoked
        await changes.send("replace", valid)
        assert await auth.lookup(token_hash("valid")) is not None
        revoked = valid | {"date_expiry": datetime.now(UTC) - timedelta(seconds=1)}
        keys.docs[valid["secret"]] = revoked
        await changes.send("update", revoked)
        assert await auth.lookup(token_hash("valid")) is None

        gone = key_doc("gone")
        keys.docs[gone["secret"]] = gone
        assert await auth.lookup(token_hash("gone")) is not None
        del keys.docs[gone["secret"]]
        await changes.send("delete", gone)  # a delete names the _id only
        assert await auth.lookup(token_hash("gone")) is None

        rotated = key_doc("old")
        keys.docs[rotated["secret"]] = rotated
        assert await auth.lookup(token_hash("old")) is not None
        del keys.docs[rotated["secret"]]
        rotated = rotated | {"secret": token_hash("rotated")}
        keys.docs[rotated["secret"]] = rotated
        await changes.send("update", rotated)  # its secret changed
        assert await auth.lookup(token_hash("old")) is None
        assert await auth.lookup(token_hash("rotated")) is not None
        assert changes.missed == 1  # once, when the stream opened

    run_with_watcher(test)


def test_it_resumes_after_its_last_change_and_starts_afresh_when_history_is_lost(
        monkeypatch):
    pauses: list[float] = []

    async def no_wait(stopping: asyncio.Event, seconds: float) -> bool:
        pauses.append(seconds)
        return stopping.is_set()

    monkeypatch.setattr(key_watch.background, "pause", no_wait)

    async def test(auth: KeyAuth, database: FakeDatabase, changes: Changes) -> None:
        keys = database.keys
        doc = key_doc("k")
        keys.docs[doc["secret"]] = doc
        await changes.send("insert", doc)
        assert keys.watches[0]["resume_after"] is None and changes.missed == 1
        assert auth.watcher.watching

        resumed = FakeStream()
        keys.opened += [AutoReconnect("down"), AutoReconnect("down"), resumed]
        keys.watched.clear()
        await changes.stream.queue.put(AutoReconnect("connection lost"))
        while len(keys.watches) < 4:
            keys.watched.clear()
            await keys.watched.wait()
        assert [w["resume_after"] for w in keys.watches[1:]] == [{"_data": "t1"}] * 3
        assert pauses == [0.5, 1.0, 2.0]  # backoff, from the first of an outage
        assert changes.missed == 1  # resumed: nothing was missed

        fresh = FakeStream()  # the database restarted: the token is from its last run
        keys.opened += [OperationFailure("history lost", code=286), fresh]
        await resumed.queue.put(AutoReconnect("connection lost"))
        while len(keys.watches) < 6:
            keys.watched.clear()
            await keys.watched.wait()
        assert keys.watches[4]["resume_after"] == {"_data": "t1"}
        assert keys.watches[5]["resume_after"] is None  # at once, without the token
        changes.stream = fresh
        await changes.send("update", doc | {"user_id": "someone else"})  # it flows again
        assert changes.missed == 2  # from afresh: whatever changed meanwhile
        assert pauses == [0.5, 1.0, 2.0, 0.5]

    run_with_watcher(test)


def test_without_change_streams_one_line_and_no_retries(caplog):
    async def go():
        database = FakeDatabase()
        database.keys.opened.append(OperationFailure(
            "The $changeStream stage is only supported on replica sets", code=40573))
        watcher = KeyWatcher(database, lambda *_: None, lambda: None)  # type: ignore[arg-type]
        watcher.start()
        await asyncio.wait_for(watcher._task, 5)  # it ended by itself
        assert len(database.keys.watches) == 1
        await watcher.stop()

    with caplog.at_level(logging.INFO, logger=key_watch.__name__):
        asyncio.run(go())
    records = [r for r in caplog.records if r.name == key_watch.__name__]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "No change streams on this database (40573)" in records[0].message


@pytest.mark.parametrize(("change", "kept"), [
    ({"operationType": "insert"}, True),
    ({"operationType": "delete"}, True),
    ({"operationType": "replace"}, True),
    ({"operationType": "update"}, True),  # fields not told (the embedded database)
    ({"operationType": "update",
      "updateDescription": {"updatedFields": {"date_last_used": 1}, "removedFields": []}},
     False),
    ({"operationType": "update", "updateDescription": {
        "updatedFields": {"date_last_used": 1, "access_level": "X"}, "removedFields": []}},
     True),
    ({"operationType": "update", "updateDescription": {
        "updatedFields": {"date_last_used": 1}, "removedFields": ["date_expiry"]}}, True),
    ({"operationType": "update", "updateDescription": {
        "updatedFields": {"date_expiry": 1}, "removedFields": []}}, True),
])
def test_the_pipeline_drops_only_our_date_last_used_writes(db: MongoClient, change: dict,
                                                           kept: bool):
    """As MongoDB runs it (here: the embedded database's aggregation)."""
    scratch = db.scratch[f"changes_{uuid.uuid4().hex[:8]}"]
    scratch.insert_one(change | {"documentKey": {"_id": 1}})
    assert len(list(scratch.aggregate(PIPELINE[:1]))) == int(kept)
    scratch.drop()


def test_with_the_embedded_database_a_key_created_after_it_was_tried_works_next(
        mongo_uri: str, db: MongoClient):
    """The real watcher on the real change stream; no TTL expires in this test."""
    token = uuid.uuid4().hex

    class Database:
        def __init__(self) -> None:
            self._client = AsyncMongoClient(mongo_uri, tz_aware=True)

        async def client(self) -> AsyncMongoClient:
            return self._client

    async def go():
        auth = KeyAuth(Database(), Settings())  # type: ignore[arg-type]
        created = asyncio.Event()
        changed = auth.key_changed

        def key_changed(key_id: Any, doc: Any) -> None:
            changed(key_id, doc)
            if doc is not None and doc.get("secret") == token_hash(token):
                created.set()

        auth.watcher._changed = key_changed
        with taddons.context(auth) as tctx:
            tctx.configure(auth, key_cache_ttl=3600, key_cache_negative_ttl=3600)
            auth.watcher.start()
            while not auth.watcher.watching:  # the stream is open
                await asyncio.sleep(0.01)
            assert await auth.lookup(token_hash(token)) is None
            await asyncio.to_thread(db.cgc.api_keys.insert_one, {
                "secret": token_hash(token), "access_level": "COMPLETION",
                "date_expiry": None, "user_id": "u-watched"})
            await asyncio.wait_for(created.wait(), 10)
            assert (await auth.lookup(token_hash(token))).user_id == "u-watched"
            await auth.watcher.stop()

    asyncio.run(go())


def test_a_key_deleted_while_its_lookup_is_under_way_is_not_cached_valid():
    """The lookup read the key, then it was deleted: a delete names only the _id, whose
    secret the cache does not know yet. The key must not stay valid for key_cache_ttl."""
    async def test(auth: KeyAuth, database: FakeDatabase, changes: Changes) -> None:
        keys = database.keys
        doc = key_doc("doomed")
        keys.docs[doc["secret"]] = doc
        read, gate = asyncio.Event(), asyncio.Event()
        find_one = keys.find_one

        async def held(query: dict[str, Any], projection: Any = None) -> Any:
            found = await find_one(query, projection)
            read.set()
            await gate.wait()
            return found
        keys.find_one = held  # type: ignore[method-assign]
        first = asyncio.create_task(auth.lookup(token_hash("doomed")))
        await read.wait()  # it has read the key
        del keys.docs[doc["secret"]]
        await changes.send("delete", doc)
        gate.set()
        await first  # came before the deletion: either answer will do
        keys.find_one = find_one  # type: ignore[method-assign]
        assert await auth.lookup(token_hash("doomed")) is None

    run_with_watcher(test)
