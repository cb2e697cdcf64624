"""Cheaper writes for the embedded database's process (mongoeco 4.11), same results.

``install()`` makes two changes, in the database process only:

**One pass to encode a document.** mongoeco encodes every document it stores (and every
write's change record, and every command's documents at the BSON boundary) with
``DocumentCodec.encode``, which validates a dict's whole subtree before encoding each of
its values — so every value is validated once per enclosing level — and wraps every scalar
in a numeric box to validate it. That was most of the database's CPU per stored event.

``fast_encode`` gives the same result: plain dicts, lists and tuples are walked once, and
str, int (in int64 range), float, bool and None are returned as they are, exactly what
``encode`` does with them after validating; every other value (a datetime, an ObjectId, a
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

from typing import Any

from mongoeco.api._async._database_admin_write_commands import (
    DatabaseAdminWriteCommandService,
    _write_command_result,
)
from mongoeco.api._async._write_command_validation import write_command_acknowledged
from mongoeco.api._command_bson import command_boolean
from mongoeco.core.codec import DocumentCodec, _InternalBsonArray, _InternalBsonDocument
from mongoeco.errors import BulkWriteError
from mongoeco.types import WriteCommandResult, WriteErrorEntry

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
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
    return _original_encode(data)  # exact for one value (SON, datetime, ObjectId, ...)


def fast_encode(data: Any) -> Any:
    """``DocumentCodec.encode(data)``, in one pass."""
    try:
        return _encode(data)
    except Exception:  # mongoeco's own encode decides, and raises its own error
        return _original_encode(data)


async def batch_insert(self: DatabaseAdminWriteCommandService, spec: dict[str, Any], *,
                       session: Any = None) -> Any:
    """mongoeco's ``insert`` command, its documents written by ``insert_many``."""
    admin = self._admin
    name = admin._require_collection_name(spec.get("insert"), "insert")
    documents = admin._normalize_insert_documents(spec.get("documents"))
    ordered = admin._normalize_ordered_from_command(spec.get("ordered"))
    bypass = command_boolean(spec.get("bypassDocumentValidation", False),
                             "bypassDocumentValidation", numeric=True)
    acknowledged = write_command_acknowledged(spec, dialect=admin._mongodb_dialect.key)
    collection = admin._database.get_collection(name)
    try:
        result = await collection.insert_many(documents, ordered=ordered,
                                              bypass_document_validation=bypass,
                                              session=session)
        outcome = WriteCommandResult(count=len(result.inserted_ids))
    except BulkWriteError as e:
        errors = [WriteErrorEntry(index=entry["index"], errmsg=entry["errmsg"],
                                  code=entry.get("code"),
                                  details={k: v for k, v in entry.items()
                                           if k not in ENTRY_FIELDS} or None)
                  for entry in e.details["writeErrors"]]
        outcome = WriteCommandResult(count=e.details["nInserted"], write_errors=errors)
    except Exception:
        return await _original_insert(self, spec, session=session)
    return _write_command_result(outcome, acknowledged=acknowledged)


def install() -> None:
    """Both changes, in this process."""
    DocumentCodec.encode = staticmethod(fast_encode)
    DatabaseAdminWriteCommandService.command_insert = batch_insert
