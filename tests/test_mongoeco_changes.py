"""Change streams over the embedded database's wire protocol (storage/mongoeco_changes.py),
with pymongo as any client would use them."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from llm_billing.storage import mongoeco_changes
from llm_billing.storage.embedded_db import _fast_insert_engine
from llm_billing.storage.mongoeco_changes import HISTORY_LOST, ChangeStreamWireServer


@pytest.fixture
def scratch(db: MongoClient) -> Collection:
    return db.scratch[f"watched_{uuid.uuid4().hex[:8]}"]


def changes(stream, count: int) -> list[dict]:
    """The next ``count`` changes (each getMore waits up to its maxAwaitTimeMS)."""
    found = []
    for _ in range(count + 20):
        if (change := stream.try_next()) is not None:
            found.append(change)
            if len(found) == count:
                break
    return found


def test_inserts_updates_replaces_and_deletes_as_a_replica_set_sends_them(
        scratch: Collection, db: MongoClient):
    with scratch.watch([{"$match": {"fullDocument.skip": {"$ne": True}}}],
                       full_document="updateLookup", max_await_time_ms=200) as stream:
        key = scratch.insert_one({"secret": "a", "level": 1}).inserted_id
        scratch.insert_one({"skip": True})  # filtered by the stream's own $match
        db.scratch.elsewhere.insert_one({"other": "collection"})
        scratch.update_one({"_id": key}, {"$set": {"level": 2}})
        scratch.replace_one({"_id": key}, {"secret": "b"})
        scratch.delete_one({"_id": key})
        found = changes(stream, 4)
    assert [c["operationType"] for c in found] == ["insert", "update", "replace", "delete"]
    assert {c["documentKey"]["_id"] for c in found} == {key}
    assert found[0]["fullDocument"] == {"_id": key, "secret": "a", "level": 1}
    assert found[1]["fullDocument"]["level"] == 2  # updateLookup: the document as now
    assert found[2]["fullDocument"] == {"_id": key, "secret": "b"}
    assert "fullDocument" not in found[3]
    assert found[0]["ns"] == {"db": "scratch", "coll": scratch.name}
    assert len({c["_id"]["_data"] for c in found}) == 4


def test_a_stream_resumes_after_its_token_with_what_happened_while_closed(
        scratch: Collection):
    with scratch.watch(max_await_time_ms=100) as stream:
        scratch.insert_one({"n": 1})
        [first] = changes(stream, 1)
        stream.try_next()  # an empty batch: its postBatchResumeToken
        token = stream.resume_token
    scratch.insert_one({"n": 2})  # while nobody watches
    with scratch.watch(resume_after=first["_id"], max_await_time_ms=100) as stream:
        assert [c["fullDocument"]["n"] for c in changes(stream, 1)] == [2]
    with scratch.watch(resume_after=token, max_await_time_ms=100) as stream:
        assert [c["fullDocument"]["n"] for c in changes(stream, 1)] == [2]


def test_a_token_from_another_run_is_history_lost(scratch: Collection):
    with pytest.raises(OperationFailure) as error:
        scratch.watch(resume_after={"_data": "0" * 32})
    assert error.value.code == HISTORY_LOST


def test_a_dropped_collection_hides_no_later_change(scratch: Collection, db: MongoClient):
    """mongoeco's "invalidate" took the next write's change number: that change was lost."""
    dropped = db.scratch[f"dropped_{uuid.uuid4().hex[:8]}"]
    dropped.insert_one({"x": 1})
    with scratch.watch(max_await_time_ms=200) as stream:
        dropped.drop()
        scratch.insert_one({"after": "drop"})
        assert [c["fullDocument"]["after"] for c in changes(stream, 1)] == ["drop"]


def test_streams_close_with_kill_cursors_and_with_their_connection(tmp_path: Path):
    async def go():
        engine = _fast_insert_engine(str(tmp_path / "db.sqlite3"))
        async with ChangeStreamWireServer(engine=engine, host="127.0.0.1", port=0) as server:
            streams = server._executor.change_streams
            uri = f"mongodb://127.0.0.1:{server.address.port}/?directConnection=true"
            client = AsyncMongoClient(uri)
            first = await client.cgc.api_keys.watch(max_await_time_ms=50)
            second = await client.cgc.api_keys.watch(max_await_time_ms=50)
            assert len(streams) == 2
            await first.close()  # killCursors
            assert len(streams) == 1
            await client.cgc.api_keys.insert_one({"secret": "s"})
            assert (await second.try_next())["fullDocument"]["secret"] == "s"
            await client.close()  # the connection ends without killCursors reaching it
            for _ in range(100):
                if not streams:
                    break
                await asyncio.sleep(0.01)
            assert len(streams) == 0

    asyncio.run(go())


def test_a_token_older_than_the_history_kept_is_history_lost(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(mongoeco_changes, "HISTORY", 3)

    async def go():
        engine = _fast_insert_engine(str(tmp_path / "db.sqlite3"))
        async with ChangeStreamWireServer(engine=engine, host="127.0.0.1", port=0) as server:
            client = AsyncMongoClient(f"mongodb://127.0.0.1:{server.address.port}/"
                                      "?directConnection=true")
            keys = client.cgc.api_keys
            async with await keys.watch(max_await_time_ms=50) as stream:
                token = stream.resume_token
            await keys.insert_one({"n": 1})
            async with await keys.watch(resume_after=token, max_await_time_ms=50) as stream:
                assert (await stream.try_next())["fullDocument"]["n"] == 1  # still kept
            await keys.insert_many([{"n": n} for n in range(2, 6)])
            with pytest.raises(OperationFailure) as error:
                await keys.watch(resume_after=token)
            assert error.value.code == HISTORY_LOST
            await client.close()

    asyncio.run(go())
