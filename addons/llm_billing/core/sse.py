"""Incremental Server-Sent Events parser (sans-I/O).

Feed it bytes as they arrive, split at any byte; it returns the events completed so far.
Follows the WHATWG event-stream rules: ``\\r\\n``, ``\\r`` or ``\\n`` line endings, comment
lines starting with ``:``, multi-line ``data:``, one optional space after the colon, a
leading BOM. With ``keep_raw`` it also returns the exact bytes of each block so a caller
can pass the stream on event by event and drop a block without changing any other byte.
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str  # "" when the block had no `event:` field (the spec's "message")
    data: str
    id: str | None


@dataclass(frozen=True, slots=True)
class SSEBlock:
    """One blank-line-terminated block of the stream.

    ``raw`` is the block's exact bytes (empty unless ``keep_raw``); ``event`` is None for a
    block with no data (comments only, or a lone ``\\n`` completing a ``\\r\\n`` pair split
    across feeds, in which case ``continues_previous`` is True).
    """

    raw: bytes
    event: SSEEvent | None
    continues_previous: bool = False


class SSEParser:
    """Bytes in, SSE blocks out. Never raises on any input."""

    def __init__(self, *, keep_raw: bool = False, max_event_bytes: int = 8 << 20) -> None:
        self.keep_raw = keep_raw
        self.max_event_bytes = max_event_bytes
        self._buf = bytearray()
        self._pos = 0  # next unparsed byte in _buf
        self._block_start = 0  # first byte of the pending block in _buf
        self._skip_lf = False  # last line ended with a bare \r: a following \n belongs to it
        self._started = False
        self._event = ""
        self._data: list[bytes] = []
        self._data_size = 0
        self._oversized = False
        self.last_event_id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEBlock]:
        blocks: list[SSEBlock] = []
        if not chunk:
            return blocks
        if not self._started and not self._buf and chunk[0] != _BOM[0]:
            self._started = True
        if self._started and not self._buf and not self._skip_lf:
            chunk = self._whole_blocks(chunk, blocks)
            if not chunk:
                return blocks
        self._buf += chunk
        if not self._started:
            if len(self._buf) < len(_BOM) and _BOM.startswith(bytes(self._buf)):
                return blocks
            self._started = True
            if self._buf.startswith(_BOM):
                self._pos = len(_BOM)
        if self._skip_lf and self._pos < len(self._buf):
            self._skip_lf = False
            if self._buf[self._pos] == 0x0A:
                self._pos += 1
                if self._pos - self._block_start == 1:  # the \n ended an already emitted block
                    blocks.append(SSEBlock(self._take_raw(self._pos), None, True))
        self._parse_lines(blocks)
        self._compact()
        return blocks

    def _whole_blocks(self, chunk: bytes, blocks: list[SSEBlock]) -> bytes:
        """Fast path for what servers send: whole blocks of one ``data:`` line, or of an
        ``event:`` and a ``data:`` line, ``\\n``-terminated — split in C instead of line by
        line. Anything else (and the unterminated rest) is left to the line parser: this
        returns what it should parse."""
        # _data_size, not _data: an oversized event's lines are dropped, yet it goes on
        if self._data_size or self._event or b"\r" in chunk:
            return chunk
        *whole, rest = chunk.split(b"\n\n")
        fields = []
        for block in whole:
            name, two_lines, data = block.rpartition(b"\n")
            if (not data.startswith(b"data:") or len(block) >= self.max_event_bytes or (
                    two_lines and (not name.startswith(b"event:") or b"\n" in name))):
                return chunk
            fields.append((name, data))
        for (name, data), block in zip(fields, whole, strict=True):
            value = data[6:] if data[5:6] == b" " else data[5:]
            event = name[7:] if name[6:7] == b" " else name[6:]
            blocks.append(SSEBlock(block + b"\n\n" if self.keep_raw else b"", SSEEvent(
                event.decode("utf-8", "replace"), value.decode("utf-8", "replace"),
                self.last_event_id)))
        return rest

    @property
    def pending_raw_size(self) -> int:
        """Bytes of the unfinished block held for the caller (``keep_raw`` only)."""
        return len(self._buf) - self._block_start if self.keep_raw else 0

    def release_pending(self) -> bytes:
        """Give up raw tracking: the unfinished block's bytes so far, and no more held
        from now on (parsing goes on)."""
        held = bytes(self._buf[self._block_start :]) if self.keep_raw else b""
        self.keep_raw = False
        self._block_start = len(self._buf)
        self._compact()
        return held

    def finish(self) -> list[SSEBlock]:
        """End of stream: returns the unterminated rest, if any.

        The spec discards an unterminated last event; a meter should not (a server that
        closes right after its usage line must still be billed), so its event is returned
        with the rest's bytes.
        """
        rest = bytes(self._buf[self._block_start :]) if self.keep_raw else b""
        pending = bytes(self._buf[self._pos :])
        had_rest = len(self._buf) > self._block_start
        if pending:
            self._field(pending)
        event = self._dispatch()
        self._buf.clear()
        self._pos = self._block_start = 0
        return [SSEBlock(rest, event)] if had_rest or event else []

    def _parse_lines(self, blocks: list[SSEBlock]) -> None:
        buf = self._buf
        while True:
            lf = buf.find(b"\n", self._pos)
            cr = buf.find(b"\r", self._pos, lf if lf >= 0 else len(buf))
            if cr >= 0:
                end, nxt = cr, cr + 1
                if nxt < len(buf):
                    if buf[nxt] == 0x0A:
                        nxt += 1
                else:
                    self._skip_lf = True
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                return
            line = bytes(buf[self._pos : end])
            self._pos = nxt
            if line:
                self._field(line)
            else:
                blocks.append(SSEBlock(self._take_raw(nxt), self._dispatch()))

    def _take_raw(self, end: int) -> bytes:
        raw = bytes(self._buf[self._block_start : end]) if self.keep_raw else b""
        self._block_start = end
        return raw

    def _compact(self) -> None:
        # Without keep_raw only the unfinished line is kept; with it, the unfinished block.
        cut = self._block_start if self.keep_raw else self._pos
        if cut:
            del self._buf[:cut]
            self._pos -= cut
            self._block_start = max(0, self._block_start - cut)

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ':' comment
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data_size += len(value) + 1
            if self._data_size > self.max_event_bytes:
                self._oversized = True
                self._data.clear()
            elif not self._oversized:
                self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self.last_event_id = value.decode("utf-8", "replace")

    def _dispatch(self) -> SSEEvent | None:
        has_data = self._data_size > 0 and not self._oversized
        event = None
        if has_data:
            data = b"\n".join(self._data).decode("utf-8", "replace")
            event = SSEEvent(self._event, data, self.last_event_id)
        self._reset_block()
        return event

    def _reset_block(self) -> None:
        self._event = ""
        self._data = []
        self._data_size = 0
        self._oversized = False
