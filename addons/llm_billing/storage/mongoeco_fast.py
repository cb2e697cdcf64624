"""Cheaper writes for the embedded database's process (mongoeco 4.11), same results.

``install()`` makes two changes, in the database process only:

**One pass to encode a document.** mongoeco encodes every document it stores (and every
write's change record, and every command's documents at the BSON boundary) with
``DocumentCodec.encode``, which validates a dict's whole subtree before encoding each of
its values — so every value is validated once per enclosing level — and wraps every scalar
in a numeric box to validate it. That was most of the database's CPU per stored event.

``fast_encode`` gives the same result: plain dicts, lists and tuples are walked once, and
str, int (in int64 range), float, bool and None are returned as they are, exactly what
``encode`` does with them after validating; mongoeco's ObjectId and a datetime (three in
each event) are tagged here as ``encode`` tags them; every other value (a Decimal128, a
SON...) goes to mongoeco's own ``encode``. On any error the whole value is encoded again
by mongoeco's ``encode``, so even the error raised is mongoeco's.

**Inserts in one batch.** mongoeco's ``insert`` command stores its documents one
``insert_one`` at a time — a transaction, a commit and a change-record dispatch each —
although its own ``insert_many`` writes a batch in one transaction with the same
per-document outcomes (ordered or not, a duplicate ``_id`` an error at its index).
``insert`` now calls ``insert_many``. Should ``insert_many`` fail otherwise (nothing the
proxy's events can cause), the command runs mongoeco's way: documents of the batch
already stored then show as duplicate-key errors, which the event writer counts as stored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mongoeco.api._async._database_admin_write_commands import (
    DatabaseAdminWriteCommandService,
    _write_command_result,
)
from mongoeco.api._async._write_command_validation import write_command_acknowledged
from mongoeco.api._command_bson import command_boolean
from mongoeco.core.bson_scalars import normalize_utc_bson_datetime
from mongoeco.core.codec import DocumentCodec, _InternalBsonArray, _InternalBsonDocument
from mongoeco.core.duplicate_keys import duplicate_key_error, write_error_message
from mongoeco.core.error_documents import write_error_details
from mongoeco.core.identity import is_valid_root_document_id
from mongoeco.errors import BulkWriteError, DuplicateKeyError
from mongoeco.types import (
    ObjectId,
    WriteCommandResult,
    WriteErrorEntry,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MARKER = DocumentCodec._MARKER
PLAIN = frozenset({str, float, bool, type(None)})
DICTS = frozenset({dict, _InternalBsonDocument})
LISTS = frozenset({list, tuple, _InternalBsonArray})
_original_encode = DocumentCodec.encode  # the staticmethod's function
_original_insert = DatabaseAdminWriteCommandService.command_insert
ENTRY_FIELDS = ("index", "errmsg", "code", "op")


class _Unusual(Exception):
    """A value the linear walk leaves to mongoeco (e.g. an int beyond int64)."""


def _encode(data: Any) -> Any:
    kind = type(data)
    if kind in PLAIN:
        return data
    if kind is int:
        if INT64_MIN <= data <= INT64_MAX:
            return data
        raise _Unusual
    if kind in DICTS:
        encoded = {}
        for key, value in data.items():
            if type(key) is not str:
                raise _Unusual
            encoded[key] = _encode(value)
        if DocumentCodec._MARKER in encoded and DocumentCodec._is_tagged_value(encoded):
            raise _Unusual
        return encoded
    if kind in LISTS:
        return [_encode(value) for value in data]
    if kind is ObjectId:  # mongoeco's, as the wire decodes it: what encode makes of it
        return {MARKER: {"type": "objectid", "value": str(data)}}
    if kind is datetime:
        return {MARKER: {"type": "datetime",
                         "value": normalize_utc_bson_datetime(data).isoformat()}}
    return _original_encode(data)  # exact for one value (SON, Decimal128, ...)


def fast_encode(data: Any) -> Any:
    """``DocumentCodec.encode(data)``, in one pass."""
    try:
        return _encode(data)
    except Exception:  # mongoeco's own encode decides, and raises its own error
        return _original_encode(data)


def _command_outcome(details: dict[str, Any]) -> WriteCommandResult:
    """An ``insert`` command's outcome from a ``BulkWriteError``'s details."""
    errors = [WriteErrorEntry(index=entry["index"], errmsg=entry["errmsg"],
                              code=entry.get("code"),
                              details={k: v for k, v in entry.items()
                                       if k not in ENTRY_FIELDS} or None)
              for entry in details["writeErrors"]]
    return WriteCommandResult(count=details["nInserted"], write_errors=errors)


async def _insert_unrecorded(collection: Any, documents: list[dict[str, Any]], *,
                             ordered: bool, bypass: bool, session: Any) -> WriteCommandResult:
    """``collection.insert_many``'s outcome, the documents written by the engine's own
    batch insert (preparation, unique indexes, validator, TTL) without a change record.

    What it skips: the two deep copies of each document (the command's documents are
    this call's own), the change record (serialised, hashed, compacted) and its dispatch
    (a lease and a thread per write), the profiler and currentOp entries. The engine stops
    a batch at its first duplicate (the stored prefix, then the rejected outcome); as
    ``insert_many``, unordered goes on with the rest. Whatever else the engine raises
    (nothing was written by that call: one transaction) is left to ``insert_many`` for the
    documents not yet written, so even rare errors are mongoeco's own."""
    for document in documents:
        if "_id" not in document:
            document["_id"] = DocumentCodec.to_pymongo(ObjectId())
    internal = [DocumentCodec.to_internal(document) for document in documents]
    engine = collection._engine
    context = collection._new_operation_context(session=session)  # publication: DISABLED
    errors: list[dict[str, Any]] = []  # as in a BulkWriteError's details
    count = start = 0
    while start < len(internal):
        batch = internal[start:]
        try:
            outcomes = await engine.insert_documents(
                collection._db_name, collection._collection_name, batch,
                bypass_document_validation=bypass,
                operation_context=context.derive(change_event_index=start))
        except DuplicateKeyError as error:  # a lone document's secondary unique key
            if len(batch) != 1:
                raise
            outcomes = (error,)
        except Exception:
            try:
                result = await collection.insert_many(documents[start:], ordered=ordered,
                                                      bypass_document_validation=bypass,
                                                      session=session)
                count += len(result.inserted_ids)
            except BulkWriteError as e:
                count += e.details["nInserted"]
                errors += [entry | {"index": entry["index"] + start}
                           for entry in e.details["writeErrors"]]
            break
        for position, outcome in enumerate(outcomes):
            if isinstance(outcome, DuplicateKeyError) or not outcome:
                error = (outcome if isinstance(outcome, DuplicateKeyError)
                         else duplicate_key_error(outcome, "Duplicate key"))
                errors.append(WriteErrorEntry(
                    index=start + position, code=error.code, errmsg=write_error_message(error),
                    details=write_error_details(error), operation=documents[start + position],
                ).to_document())
                start += position + 1
                break
            count += 1
        else:
            break
        if ordered:
            break
    return _command_outcome({"writeErrors": errors, "nInserted": count})


async def batch_insert(self: DatabaseAdminWriteCommandService, spec: dict[str, Any], *,
                       session: Any = None) -> Any:
    """mongoeco's ``insert`` command, its documents written by ``insert_many``, or — in
    the engine's ``unrecorded_collections`` — by ``_insert_unrecorded``."""
    admin = self._admin
    name = admin._require_collection_name(spec.get("insert"), "insert")
    documents = admin._normalize_insert_documents(spec.get("documents"))
    ordered = admin._normalize_ordered_from_command(spec.get("ordered"))
    bypass = command_boolean(spec.get("bypassDocumentValidation", False),
                             "bypassDocumentValidation", numeric=True)
    acknowledged = write_command_acknowledged(spec, dialect=admin._mongodb_dialect.key)
    collection = admin._database.get_collection(name)
    unrecorded = getattr(collection._engine, "unrecorded_collections", ())
    try:
        if (f"{collection._db_name}.{name}" in unrecorded and not
                getattr(session, "in_transaction", False) and
                all(is_valid_root_document_id(d.get("_id")) for d in documents)):
            outcome = await _insert_unrecorded(collection, documents, ordered=ordered,
                                               bypass=bypass, session=session)
        else:
            result = await collection.insert_many(documents, ordered=ordered,
                                                  bypass_document_validation=bypass,
                                                  session=session)
            outcome = WriteCommandResult(count=len(result.inserted_ids))
    except BulkWriteError as e:
        outcome = _command_outcome(e.details)
    except Exception:
        return await _original_insert(self, spec, session=session)
    return _write_command_result(outcome, acknowledged=acknowledged)


def install() -> None:
    """Both changes, in this process."""
    DocumentCodec.encode = staticmethod(fast_encode)
    DatabaseAdminWriteCommandService.command_insert = batch_insert
