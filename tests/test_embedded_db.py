"""The embedded database's cheaper write path (storage/mongoeco_fast.py): same results as
mongoeco's own, at a fraction of the CPU per stored event."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pytest
from bson import SON, Decimal128, Int64, ObjectId
from mongoeco.core.codec import DocumentCodec
from mongoeco.types import ObjectId as MongoecoObjectId
from pymongo import InsertOne, MongoClient
from pymongo.errors import BulkWriteError

from llm_billing.storage import mongoeco_fast


def an_event(**fields) -> dict:
    return {"_id": ObjectId(), "date_created": datetime.datetime.now(datetime.UTC),
            "user_id": "u", "api_key_id": ObjectId(), "model": "gpt-4o-mini", "status": 200,
            "stream": True, "prompt_n": 9, "completion_n": 20,
            "usage": {"prompt_tokens": 9, "completion_tokens": 20, "cache_read_tokens": 0},
            "usage_estimated": False, "tokens_billed": 29.5, "cost": Decimal128("0.00001335"),
            "price": {"input": "0.15"}, "ledger": {"instance": "i", "write": 1},
            "metering": {"expression": "x", "value": None}, **fields}


VALUES = [
    an_event(),
    DocumentCodec.to_internal(an_event()),  # what the engine serializes
    {"nested": [[1, {"a": (2, 3)}], {"b": {"c": [datetime.datetime(2026, 1, 1)]}}]},
    {"edges": [2**31, -(2**31) - 1, 2**63 - 1, -(2**63), Int64(5), True, 1.5, float("inf")]},
    {"$mongoeco": {"type": "int32", "value": 1}},  # looks tagged: mongoeco escapes it
    {"son": SON([("b", 1), ("a", {"x": Decimal("1.5")})]), "raw": b"\x00\x01", "s": "é"},
    [],
    "plain",
    {"when": [datetime.datetime(2026, 1, 1, 23, 59, 59, 999999,  # to ms, naive UTC
                                datetime.timezone(datetime.timedelta(hours=-5))),
              datetime.datetime(2026, 1, 1, 1, 2, 3, 4567), datetime.datetime.min,
              datetime.datetime.max]},
    {"ids": [MongoecoObjectId(), ObjectId(), MongoecoObjectId(b"abcdefghijkl")]},
]
BAD = [{"big": 2**63}, {"deep": [{"big": -(2**63) - 1}]}, {"set": {1, 2}}, {1: "int key"},
       {"ok": 1, "inner": {2: "x"}}]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_fast_encode_is_mongoecos_encode(value) -> None:
    assert mongoeco_fast.fast_encode(value) == mongoeco_fast._original_encode(value)


@pytest.mark.parametrize("value", BAD, ids=range(len(BAD)))
def test_fast_encode_raises_mongoecos_error(value) -> None:
    with pytest.raises(Exception) as theirs:
        mongoeco_fast._original_encode(value)
    with pytest.raises(type(theirs.value), match=str(theirs.value)):
        mongoeco_fast.fast_encode(value)


def test_insert_outcomes_ordered_and_not(db: MongoClient) -> None:
    """Through the wire: a duplicate is an error at its index; unordered goes on past it,
    ordered stops there; the stored documents read back as sent."""
    events = db.billing[f"test_embedded_{ObjectId()}"]
    first, dup = an_event(), an_event()
    events.insert_one(dup)
    with pytest.raises(BulkWriteError) as unordered:
        events.insert_many([first, dup, an_event(), an_event()], ordered=False)
    assert unordered.value.details["nInserted"] == 3
    assert [(e["index"], e["code"]) for e in unordered.value.details["writeErrors"]] == \
        [(1, 11000)]
    with pytest.raises(BulkWriteError) as ordered:
        events.bulk_write([InsertOne(an_event()), InsertOne(dup), InsertOne(an_event())])
    assert ordered.value.details["nInserted"] == 1
    assert [(e["index"], e["code"]) for e in ordered.value.details["writeErrors"]] == \
        [(1, 11000)]
    assert events.count_documents({}) == 5
    stored = events.find_one({"_id": first["_id"]})
    assert stored == first | {"date_created": first["date_created"].replace(
        microsecond=first["date_created"].microsecond // 1000 * 1000)}  # BSON: ms
    result = db.billing.command({"insert": events.name, "documents": [{"no_id": 1}]})
    assert result["n"] == 1 and events.count_documents({"no_id": 1}) == 1


# The direct insert path for the event collections (mongoeco_fast._insert_unrecorded):
# the same command replies and stored documents as mongoeco's insert_many, in process.

def a_failure(**fields) -> dict:
    return {"_id": ObjectId(), "date_created": datetime.datetime.now(datetime.UTC),
            "user_id": "u", "model": "m", "status": 502, "error": "upstream", **fields}


def insert_script() -> list[dict]:
    """Insert commands covering what the event writer sends and how they can fail."""
    stored, lone = an_event(), an_event(ref=7)
    return [
        {"insert": "events", "documents": [stored, an_event(), a_failure()], "ordered": False},
        {"insert": "events", "documents": [an_event(), stored, an_event(), stored, an_event()],
         "ordered": False},  # duplicates: errors at their index, the rest stored
        {"insert": "events", "documents": [an_event(), stored, an_event()]},  # ordered: stops
        {"insert": "events", "documents": [stored]},
        {"insert": "events", "documents": [lone]},
        # a unique secondary index ("ref"): lone, then within batches
        {"insert": "events", "documents": [an_event(ref=7)]},
        {"insert": "events", "documents": [an_event(), an_event(ref=7), an_event()],
         "ordered": False},
        {"insert": "events", "documents": [an_event(ref=7), an_event()]},
        {"insert": "events", "documents": [{"no_id": 1}, {"no_id": 2}]},
        {"insert": "events", "documents": [an_event(_id=[1, 2]), an_event()],
         "ordered": False},  # an invalid _id: mongoeco's own path (with change records)
        {"insert": "events", "documents": []},
        # a validator: the engine refuses the batch, insert_many takes the rest (exact)
        {"insert": "checked", "documents": [an_event(), an_event(status="x"), an_event()],
         "ordered": False},
        {"insert": "checked", "documents": [an_event(), an_event(status="x"), an_event()]},
    ]


def run_script(path: str, unrecorded: set[str], script: list[dict],
               monkeypatch) -> tuple[list, list, int]:
    """Replies, stored documents and change records after ``script``."""
    import asyncio
    import sqlite3

    from mongoeco import AsyncMongoClient
    from mongoeco.api._async._database_admin_write_commands import (
        DatabaseAdminWriteCommandService,
    )

    from llm_billing.storage.embedded_db import _fast_insert_engine

    monkeypatch.setattr(DatabaseAdminWriteCommandService, "command_insert",
                        mongoeco_fast.batch_insert)

    async def run() -> tuple[list, list]:
        engine = _fast_insert_engine(path, frozenset(unrecorded))
        async with AsyncMongoClient(engine) as client:
            await client.billing.events.create_index("ref", unique=True, sparse=True)
            await client.billing.create_collection(
                "checked", validator={"status": {"$type": "int"}})
            replies = []
            for command in script:
                try:
                    replies.append(await client.billing.command(command))
                except Exception as e:  # compared, not hidden
                    replies.append(repr(e))
            documents = []
            for name in ("events", "checked"):
                async for doc in client.billing[name].find({}).sort("date_created"):
                    if "no_id" in doc:  # its _id made by the server
                        del doc["_id"]
                    documents.append(doc)
            return replies, documents

    replies, documents = asyncio.run(run())
    with sqlite3.connect(path) as conn:
        changes = conn.execute("SELECT COUNT(*) FROM change_outbox_identities").fetchone()[0]
    return replies, documents, changes


def test_unrecorded_inserts_are_insert_many(tmp_path, monkeypatch) -> None:
    """Same replies (n, writeErrors with index, code, message, key) and same stored
    documents as mongoeco's insert_many; only the change records differ."""
    import copy

    script = insert_script()
    direct, stock = (run_script(str(tmp_path / f"{name}.sqlite3"), unrecorded,
                                copy.deepcopy(script), monkeypatch)
                     for name, unrecorded in (("direct", {"billing.events", "billing.checked"}),
                                              ("stock", set())))
    (direct_replies, direct_docs, direct_changes), (replies, docs, changes) = direct, stock
    assert direct_replies == replies
    assert direct_docs == docs
    assert [r["n"] for r in replies[:10]] == [3, 3, 1, 0, 1, 0, 2, 0, 2, 1]
    assert isinstance(replies[10], str)  # no documents: mongoeco's error
    assert [(r["n"], [e["index"] for e in r["writeErrors"]]) for r in replies[11:]] == \
        [(2, [1]), (1, [1])]
    assert [e["index"] for e in replies[1]["writeErrors"]] == [1, 3]
    assert [e["index"] for e in replies[2]["writeErrors"]] == [1]
    assert [(e["index"], e["code"]) for e in replies[5]["writeErrors"]] == [(0, 11000)]
    assert [(e["index"], e["code"]) for e in replies[6]["writeErrors"]] == [(1, 11000)]
    assert [(e["index"], e["code"]) for e in replies[9]["writeErrors"]] == [(0, 53)]
    assert len(docs) == 16
    # the invalid _id's batch and the validator's went mongoeco's path
    assert (direct_changes, changes) == (1 + 3, 16)
