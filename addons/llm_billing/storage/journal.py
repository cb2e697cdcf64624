"""A local append-only journal of billing events on their way to the database.

Each event is appended (one line, handed to the OS at once) before it is queued for
writing, so no crash of the proxy — SIGKILL included — loses one. A segment
file is deleted once every event in it is stored. At start, the segments left by a
process that is gone are written to the database and deleted; events carry the ``_id``
fixed when their request started, so one that was stored already is a no-op.

A line is ``<type> <record> <crc32 hex>``: type ``B`` is base64 BSON (exact types, ~5 µs, a
tenth of extended JSON's cost on the request path), ``J`` extended JSON for an event BSON
cannot encode. The checksum covers type and record, so a line cut short by a crash or
damaged on disk is skipped, never read as some other event. Lines of the previous version
(untagged base64 BSON, or ``J`` and JSON) are still read.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import IO, Any

import bson
from bson import json_util
from bson.codec_options import CodecOptions

logger = logging.getLogger(__name__)

Event = tuple[str, dict[str, Any]]  # (collection, document)

BSON_RECORD = "B"
JSON_RECORD = "J"
BSON_OPTIONS = CodecOptions(tz_aware=True, tzinfo=UTC)  # as the events were made
JSON_OPTIONS = json_util.JSONOptions(tz_aware=True, tzinfo=UTC)


def encode(collection: str, doc: dict[str, Any]) -> str:
    """One journal line, without its newline."""
    try:
        encoded = base64.b64encode(bson.encode({"c": collection, "d": doc})).decode()
        record = f"{BSON_RECORD} {encoded}"
    except (bson.errors.InvalidDocument, TypeError, ValueError, OverflowError):
        record = f"{JSON_RECORD} {readable(collection, doc)}"  # still kept
    return f"{record} {_checksum(record)}"


def decode(text: str) -> Event:
    """The event of one journal line; raises if it is cut short, damaged or no event."""
    if text[1:2] != " ":
        collection, doc = _decode_untagged(text)
    else:
        record, _, checksum = text.rpartition(" ")
        if checksum != _checksum(record):
            raise ValueError("checksum mismatch")
        kind, payload = record[:1], record[2:]
        if kind == BSON_RECORD:
            line = bson.decode(base64.b64decode(payload, validate=True), BSON_OPTIONS)
            collection, doc = line["c"], line["d"]
        elif kind == JSON_RECORD:
            line = json_util.loads(payload, json_options=JSON_OPTIONS)
            collection, doc = line["collection"], line["doc"]
        else:
            raise ValueError(f"unknown record type {kind!r}")
    if not isinstance(collection, str) or not isinstance(doc, dict):
        raise ValueError("not an event")
    return collection, doc


def _decode_untagged(text: str) -> Event:
    """A line of the previous version: base64 BSON, or ``J`` and extended JSON (base64
    never holds a ``{``; it may well start with ``J``)."""
    if text.startswith("J{"):
        line = json_util.loads(text[1:], json_options=JSON_OPTIONS)
        return line["collection"], line["doc"]
    line = bson.decode(base64.b64decode(text, validate=True), BSON_OPTIONS)
    return line["c"], line["d"]


def _checksum(record: str) -> str:
    return f"{zlib.crc32(record.encode()):08x}"


def readable(collection: str, doc: dict[str, Any]) -> str:
    """Extended JSON (canonical where it can be), for files people read."""
    line = {"collection": collection, "doc": doc}
    try:
        return json_util.dumps(line, json_options=json_util.CANONICAL_JSON_OPTIONS)
    except (TypeError, ValueError):
        return json.dumps(line, default=repr, skipkeys=True)  # any value, any key


def append_lines(path: Path, events: list[Event]) -> None:
    """Events as readable lines (the dead-letter file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(readable(c, d) + "\n" for c, d in events)


@dataclass(eq=False)
class Segment:
    path: Path
    file: IO[str] | None
    appended: int = 0
    stored: int = 0
    closed: bool = False
    usage_write: int = 0  # the highest usage write (ledger.py) its events were counted in

    def finished(self) -> bool:
        return self.closed and self.stored >= self.appended


def _no_usage_writes() -> int:
    return sys.maxsize


@dataclass
class Journal:
    """Segments of this process's events. A segment is deleted once all its events are
    stored *and* the usage writes they were counted in are applied (``usage_applied_below``,
    from the ledger): until then a crash leaves it for ``recover`` to finish the work."""

    directory: Path
    segment_events: int = 1000
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    usage_applied_below: Callable[[], int] = _no_usage_writes
    _current: Segment | None = None
    _sequence: int = 0
    _waiting: list[Segment] = field(default_factory=list)  # stored, usage not yet applied

    def append(self, collection: str, doc: dict[str, Any],
               usage_write: int = 0) -> Segment | None:
        """Journal one event (counted in usage write ``usage_write``, if any); None if the
        disk refused (the event still goes on)."""
        try:
            segment = self._segment()
            assert segment.file is not None
            segment.file.write(encode(collection, doc) + "\n")
            segment.file.flush()  # in the OS's hands: survives the process
        except OSError as e:
            logger.error(f"Event journal unavailable ({e}); events are kept in memory only")
            return None
        segment.appended += 1
        segment.usage_write = max(segment.usage_write, usage_write)
        if segment.appended >= self.segment_events:
            self._close(segment)
        return segment

    def stored(self, segment: Segment | None) -> None:
        """One event of ``segment`` is in the database (or set aside for good)."""
        if segment is None:
            return
        segment.stored += 1
        self._retire(segment)

    def collect(self) -> None:
        """Delete the segments whose usage writes were applied since they were stored."""
        applied_below = self.usage_applied_below()
        for segment in [s for s in self._waiting if s.usage_write < applied_below]:
            self._waiting.remove(segment)
            self._delete(segment)

    def _retire(self, segment: Segment) -> None:
        if not segment.finished():
            return
        if segment.usage_write < self.usage_applied_below():
            self._delete(segment)
        elif segment not in self._waiting:
            self._waiting.append(segment)

    def close(self) -> None:
        """Shutdown: the open segment is kept only if some of its events are not stored."""
        if self._current is not None:
            self._close(self._current)

    def files(self) -> int:
        """Segment files on disk, any process's: each holds events not yet finished with."""
        try:
            return sum(1 for _ in self.directory.glob("events-*.jsonl"))
        except OSError:
            return 0

    @staticmethod
    def token_of(path: Path) -> str:
        """The token (the ledger's instance id) of the process that wrote ``path``."""
        return path.stem.split("-", 3)[2]

    def orphans(self) -> Iterator[Path]:
        """Segments of processes that are gone (never this process's own)."""
        for path in sorted(self.directory.glob("events-*.jsonl")):
            _, pid, token, _ = path.stem.split("-", 3)
            if token == self.token:
                continue
            if int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another proxy on this host, sharing the data directory
            yield path

    @staticmethod
    def read(path: Path) -> list[Event]:
        events = []
        for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                events.append(decode(raw.decode()))
            except Exception as e:  # any decoder may choke on a damaged line
                logger.warning(f"{path.name}:{number}: unreadable journal line skipped "
                               f"({type(e).__name__})")
        return events

    def _segment(self) -> Segment:
        if self._current is None or self._current.closed:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._sequence += 1
            path = self.directory / (f"events-{os.getpid()}-{self.token}-"
                                     f"{self._sequence:06d}.jsonl")
            self._current = Segment(path, path.open("a"))
        return self._current

    def _close(self, segment: Segment) -> None:
        segment.closed = True
        if segment.file is not None:
            segment.file.close()
            segment.file = None
        self._retire(segment)

    @staticmethod
    def _delete(segment: Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
