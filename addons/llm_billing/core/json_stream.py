"""Complete values of a JSON body that arrives in pieces (sans-I/O).

Gemini's ``streamGenerateContent`` without ``alt=sse`` streams one JSON array,
``[{…},\\r\\n{…}, …]``, each element a complete response chunk with its own cumulative
``usageMetadata``. ``JSONSplitter`` returns each element that is an object or array as soon
as its last byte arrives, so a response cut off mid-array still yields every element it
delivered. A body that is an object is one value, returned when complete.

Each byte is scanned once, whatever the chunking: the scanner's state (depth, inside a
string, after a backslash) carries across pieces, and ``re`` skips from one structural
byte to the next in C. Only the unfinished value's bytes are held.
"""

from __future__ import annotations

import re

_BOM = b"\xef\xbb\xbf"
_IN_STRING = re.compile(rb'["\\]')  # what ends a string or escapes the next byte
_STRUCTURE = re.compile(rb'["{}\[\]]')  # outside strings, all that changes the state
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_QUOTE, _BACKSLASH = 0x22, 0x5C
_OPENERS = (0x7B, 0x5B)  # { [


class JSONSplitter:
    """Bytes in, complete JSON values out (as bytes, for ``json.loads``). Never raises;
    malformed input yields values that fail to parse, or none."""

    def __init__(self, max_value_bytes: int) -> None:
        self.max_value_bytes = max_value_bytes
        self.complete = False  # the top-level value ended (or the body is not one we read)
        self.skipped = 0  # values longer than max_value_bytes, dropped
        self._head = b""  # leading bytes until the first significant one (BOM, spaces)
        self._started = False
        self._value_depth = 0  # depth of the values returned: 1 inside a top-level array
        self._depth = 0
        self._in_string = False
        self._escaped = False  # a piece ended on a backslash inside a string
        self._open = False  # a value to return has started
        self._value = bytearray()  # its bytes from earlier pieces
        self._oversized = False

    @property
    def held(self) -> int:
        """Bytes held: those of the unfinished value so far."""
        return len(self._value) + len(self._head)

    def feed(self, data: bytes) -> list[bytes]:
        if self.complete or not data:
            return []
        pos = 0
        if not self._started:
            data, pos = self._start(data)
            if not self._started or self.complete:
                return []
        values: list[bytes] = []
        start = 0 if self._open else -1  # where the open value begins in this piece
        end = len(data)
        while pos < end:
            if self._in_string:
                if self._escaped:
                    self._escaped, pos = False, pos + 1
                    continue
                match = _IN_STRING.search(data, pos)
                if match is None:
                    break
                i = match.start()
                if data[i] == _BACKSLASH:
                    self._escaped, pos = i + 1 == end, i + 2
                else:
                    self._in_string, pos = False, i + 1
                continue
            match = _STRUCTURE.search(data, pos)
            if match is None:
                break
            i = match.start()
            byte, pos = data[i], i + 1
            if byte == _QUOTE:
                self._in_string = True
            elif byte in _OPENERS:
                if self._depth == self._value_depth and not self._open:
                    self._open, start = True, i
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == self._value_depth and self._open:
                    self._close(data[start:pos], values)
                    start = -1
                if self._depth <= 0:  # the top-level value ended; the rest is ignored
                    self.complete = True
                    return values
        if self._open:
            self._hold(data[start:])
        return values

    def _start(self, data: bytes) -> tuple[bytes, int]:
        """Skip a BOM and whitespace; decide what the body is from its first byte."""
        head = self._head + data
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._head = head
            return head, 0
        self._head = b""
        if head.startswith(_BOM):
            head = head[len(_BOM):]
        match = _NOT_SPACE.search(head)
        if match is None:  # only whitespace so far
            return head, len(head)
        self._started = True
        first = head[match.start()]
        if first == 0x5B:  # [ : the values are its elements
            self._value_depth = self._depth = 1
            return head, match.start() + 1
        if first != 0x7B:  # not an object either: nothing a meter can read
            self.complete = True
        return head, match.start()

    def _hold(self, part: bytes) -> None:
        if self._oversized:
            return
        if len(self._value) + len(part) > self.max_value_bytes:
            self._oversized = True
            self._value.clear()
        else:
            self._value += part

    def _close(self, last: bytes, values: list[bytes]) -> None:
        self._hold(last)
        if self._oversized:
            self.skipped += 1
        else:
            values.append(bytes(self._value))
        self._open = self._oversized = False
        self._value.clear()
