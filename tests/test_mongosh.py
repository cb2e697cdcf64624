"""Reads of the embedded database by MongoDB's other drivers (storage/mongoeco_wire.py):
cursor ids as int64 in every cursor reply, listDatabases with a Decimal128 stored, and the
real mongosh (the Node driver) when it is installed (``MONGOSH`` or ``mongosh`` on PATH)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from bson import Decimal128, Int64
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient

from conftest import ROOT, insert_key, openai_client, wait_for_events

MONGOSH = os.environ.get("MONGOSH") or shutil.which("mongosh")


@pytest.fixture
def scratch(db: MongoClient):
    name = f"mongosh_{uuid.uuid4().hex[:8]}"
    yield db.get_database(name, codec_options=CodecOptions(document_class=RawBSONDocument))
    db.drop_database(name)


def cursor_id(reply: RawBSONDocument) -> object:
    return reply["cursor"]["id"]  # an int64 element decodes as Int64, an int32 as int


def test_cursor_ids_are_int64(scratch) -> None:
    scratch.c.insert_many([{"i": i} for i in range(5)])
    replies = {
        "find": scratch.command({"find": "c"}),
        "find batch": scratch.command({"find": "c", "batchSize": 2}),
        "aggregate": scratch.command({"aggregate": "c", "pipeline": [],
                                      "cursor": {"batchSize": 1}}),
        "listCollections": scratch.command({"listCollections": 1}),
        "listIndexes": scratch.command({"listIndexes": "c"}),
    }
    assert {name: type(cursor_id(r)) for name, r in replies.items()} == \
        dict.fromkeys(replies, Int64)
    open_id = cursor_id(replies["find batch"])
    assert open_id != 0
    # a driver sends the id back as int64 (mongosh always does)
    more = scratch.command({"getMore": Int64(open_id), "collection": "c", "batchSize": 1})
    assert type(cursor_id(more)) is Int64 and cursor_id(more) == open_id
    assert len(list(more["cursor"]["nextBatch"])) == 1
    last = scratch.command({"getMore": Int64(open_id), "collection": "c"})
    assert type(cursor_id(last)) is Int64 and cursor_id(last) == 0
    assert len(list(last["cursor"]["nextBatch"])) == 2
    agg_id = cursor_id(replies["aggregate"])
    killed = scratch.command({"killCursors": "c", "cursors": [Int64(agg_id)]})
    assert list(killed["cursorsKilled"]) == [agg_id]


def test_list_databases_with_a_decimal128_stored(db: MongoClient, scratch) -> None:
    scratch.events.insert_one({"cost": Decimal128("0.00001335"), "n": Int64(3)})
    assert scratch.name in db.list_database_names()
    size = scratch.command({"aggregate": "events", "cursor": {},
                            "pipeline": [{"$project": {"_id": 0, "s": {"$bsonSize": "$$ROOT"}}}]})
    # {_id: ObjectId, cost: decimal (16 bytes), n: int64 (8)}, as MongoDB sizes it
    assert [doc["s"] for doc in size["cursor"]["firstBatch"]] == \
        [4 + (1 + 4 + 12) + (1 + 5 + 16) + (1 + 2 + 8) + 1]


MONGOSH_SCRIPT = """
db = db.getSiblingDB("cgc");
print("keys=" + db.api_keys.find({user_id: "%(user)s"}).batchSize(2).toArray().length);
print("one=" + db.api_keys.findOne({user_id: "%(user)s"}).user_id);
print("count=" + db.api_keys.countDocuments({user_id: "%(user)s"}));
print("names=" + db.getCollectionNames().includes("api_keys"));
print("sample=" + db.api_keys.countDocuments({user_id: {$in: ["user1", "user2", "user3"]}}));
show dbs
const events = db.getSiblingDB("billing").events_completion.find({user_id: "%(user)s"}).toArray();
print("events=" + events.length + " cost=" + events[0].cost);
"""


@pytest.mark.skipif(not MONGOSH, reason="mongosh is not installed (npm install mongosh; "
                    "set MONGOSH=/path/to/mongosh or put it on PATH)")
def test_mongosh_reads_after_traffic(db: MongoClient, mongo_uri: str, proxy) -> None:
    def mongosh(script: str) -> str:
        done = subprocess.run([MONGOSH, mongo_uri, "--quiet", "--norc"], input=script,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Error" not in done.stdout + done.stderr, \
            done.stdout + done.stderr
        return done.stdout

    sample = mongosh(Path(ROOT, "sample.js").read_text())
    assert "token1 -> user1" in sample
    key = insert_key(db)
    for _ in range(2):
        insert_key(db, user_id=key.user_id)
    openai_client(proxy, key.token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    wait_for_events(db, key.user_id, 1)
    out = mongosh(MONGOSH_SCRIPT % {"user": key.user_id})
    for line in ("keys=3", f"one={key.user_id}", "count=3", "names=true", "sample=3",
                 "events=1 cost="):
        assert line in out, out
    assert re.search(r"\bbilling +[\d.]+ [KMG]?i?B\n", out), out  # show dbs
