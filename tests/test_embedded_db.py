"""The embedded database's cheaper write path (storage/mongoeco_fast.py): same results as
mongoeco's own, at a fraction of the CPU per stored event."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pytest
from bson import SON, Decimal128, Int64, ObjectId
from mongoeco.core.codec import DocumentCodec
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
