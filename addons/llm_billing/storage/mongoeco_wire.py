"""What MongoDB's other drivers (Node: mongosh, Compass) need from mongoeco 4.11's wire
server, in the embedded database's process only (pymongo takes int32 cursor ids).

**Cursor ids are int64.** mongoeco replies with a cursor's ``id`` as a Python int, which
BSON encodes as int32; the Node driver reads ``cursor.id`` as an int64 only and fails every
read (``BSON element "id" is missing``). ``DriverWireServer`` sends it, in every reply
(``firstBatch`` and ``nextBatch``: find, aggregate, listCollections, listIndexes, getMore),
as an int64, and the ids of ``killCursors``' reply too. Drivers then send the ids back as
int64, which mongoeco's ``getMore`` and ``killCursors`` refuse ("must be an integer"): they
reach mongoeco as plain ints again.

**$bsonSize of a Decimal128 (and of typed numbers).** mongoeco's sizer raises on a
decimal (a stored ``cost`` reaches it as pymongo's ``bson.Decimal128``), so
``listDatabases`` (it sizes every stored document), ``dbStats``, ``collStats`` and
``$bsonSize`` fail once one event is stored. ``install()`` sizes them as BSON does: 16
bytes for a decimal, 8 for an int64 or a double, 4 for an int32.
"""

from __future__ import annotations

import decimal
from typing import Any

from bson.decimal128 import Decimal128 as PublicDecimal128
from bson.int64 import Int64
from mongoeco.core.aggregation import runtime
from mongoeco.core.bson_scalars import BsonDecimal128, BsonDouble, BsonInt32, BsonInt64
from mongoeco.types import Decimal128
from mongoeco.wire import AsyncMongoEcoProxyServer
from mongoeco.wire.executor import WireCommandExecutor

_original_value_size = runtime._bson_value_size
BSON_SIZES = {PublicDecimal128: 16, Decimal128: 16, BsonDecimal128: 16, decimal.Decimal: 16,
              Int64: 8, BsonInt64: 8, BsonDouble: 8, BsonInt32: 4}


def bson_value_size(value: Any) -> int:
    """mongoeco's ``_bson_value_size``, also for decimals and its typed numbers."""
    size = BSON_SIZES.get(type(value))
    return _original_value_size(value) if size is None else size


def _as_int64(value: Any) -> Any:
    return Int64(value) if type(value) is int else value


def int64_cursor_ids(reply: Any) -> Any:
    """``reply`` with its cursor id (and killCursors' ids) as int64, as MongoDB sends them."""
    if not isinstance(reply, dict):
        return reply
    cursor = reply.get("cursor")
    if isinstance(cursor, dict) and "id" in cursor:
        reply = reply | {"cursor": cursor | {"id": _as_int64(cursor["id"])}}
    if "cursorsKilled" in reply:
        reply = reply | {key: [_as_int64(i) for i in reply[key]] for key in
                         ("cursorsKilled", "cursorsNotFound", "cursorsAlive", "cursorsUnknown")
                         if isinstance(reply.get(key), list)}
    return reply


def _plain_int(value: Any) -> Any:
    return value.value if type(value) is BsonInt64 else value


def plain_cursor_ids(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with a getMore's or killCursors' int64 cursor ids as mongoeco's ints."""
    if "getMore" in body:
        return body | {"getMore": _plain_int(body["getMore"])}
    if "killCursors" in body and isinstance(body.get("cursors"), list):
        return body | {"cursors": [_plain_int(i) for i in body["cursors"]]}
    return body


class DriverWireExecutor(WireCommandExecutor):
    def _build_request_context(self, body: dict[str, Any], **kwargs: Any) -> Any:
        return super()._build_request_context(plain_cursor_ids(body), **kwargs)


class DriverWireServer(AsyncMongoEcoProxyServer):
    """mongoeco's wire server, its cursor ids int64 both ways."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._executor = DriverWireExecutor(self._client, self._cursor_store,
                                            self._session_store, surface=self._surface,
                                            auth=self._auth)

    def _render_wire_result(self, header: Any, request_id: int, state: Any) -> Any:
        state.result = int64_cursor_ids(state.result)
        return super()._render_wire_result(header, request_id, state)


def install() -> None:
    """The sizer's change, in this process (the server is ``DriverWireServer``)."""
    runtime._bson_value_size = bson_value_size
