"""Secrets out of what an upstream answers (sans-I/O).

An upstream that refuses its key may quote it in its error: whole (``invalid x-api-key:
sk-ant-…``), escaped inside JSON or a URL, or masked like OpenAI's ``sk-abc1***…wxyz``.
``Redactor`` replaces each of those forms of the given secrets with ``<redacted>``.
``HeldErrorBody`` is the stream callable of an error response: it passes nothing on until
the (capped) body is complete — a secret may span chunks — then all of it, decoded and
redacted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

from .decoding import Decoder
from .outcome import Outcome

if TYPE_CHECKING:
    from .config import Config

REDACTED = "<redacted>"
MAX_ERROR_BODY = 256 << 10  # decoded bytes of an error body passed on; the rest is dropped
MIN_MASKED_SECRET = 12  # shorter secrets are only redacted whole
_MASK = re.compile(rb"\*{3,}|\.{3,}|\xe2\x80\xa6")  # a key's hidden middle: ***, ..., …
MAX_SHOWN = 64  # bytes of a masked key's visible head (or tail) looked at


def _forms(secret: str) -> set[str]:
    """How ``secret`` may appear in a body: as is, JSON-escaped, URL-encoded."""
    escaped = json.dumps(secret)[1:-1]
    forms = {secret, escaped, json.dumps(secret, ensure_ascii=False)[1:-1],
             escaped.replace("/", "\\/"), quote(secret, safe=""), quote_plus(secret, safe="")}
    forms |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), f) for f in set(forms)}
    return {f for f in forms if f}


class Redactor:
    """Replaces the secrets it was given, in any of their forms, with ``<redacted>``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = sorted({f.encode() for s in secrets if s for f in _forms(s)}, key=len,
                       reverse=True)  # longest first: a form never leaves part of a longer one
        self._whole = re.compile(b"|".join(map(re.escape, forms))) if forms else None
        self._maskable = [f for f in forms if len(f) >= MIN_MASKED_SECRET]

    def __bool__(self) -> bool:
        return self._whole is not None

    def __call__(self, data: bytes) -> bytes:
        if self._whole is not None:
            data = self._whole.sub(REDACTED.encode(), data)
        return self._unmask(data) if self._maskable else data

    def text(self, text: str) -> str:
        return self(text.encode("utf-8", "surrogatepass")).decode("utf-8", "surrogatepass")

    def _unmask(self, data: bytes) -> bytes:
        """Masked keys out: a mask between the start and the end of a secret's form."""
        out, done = bytearray(), 0
        for mask in _MASK.finditer(data):
            found = self._masked(data, mask.start(), mask.end(), done)
            if found is not None:
                out += data[done:found[0]] + REDACTED.encode()
                done = found[1]
        return bytes(out + data[done:]) if out else data

    def _masked(self, data: bytes, start: int, end: int, done: int) -> tuple[int, int] | None:
        """The span of a masked secret around the mask ``data[start:end]``, if one is: at
        least 3 of its first bytes before, maybe some of its last after, not all of it."""
        spans = []
        for secret in self._maskable:
            limit = min(len(secret) - 1, MAX_SHOWN, start - done)
            head = next((k for k in range(limit, 2, -1)
                         if data[start - k:start] == secret[:k]), 0)
            if head:
                limit = min(len(secret) - 1 - head, MAX_SHOWN)
                tail = next((j for j in range(limit, 0, -1)
                             if data[end:end + j] == secret[-j:]), 0)
                spans.append((start - head, end + tail))
        return max(spans, key=lambda span: span[1] - span[0], default=None)


def configured_secrets(config: Config) -> tuple[str, ...]:
    """Every secret the config holds: the backends' keys, Stripe's."""
    keys = [b.auth.value for b in config.backends]
    keys += [config.stripe.secret_key, config.stripe.webhook_secret]
    return tuple(k for k in keys if k)


def redact_outcome(outcome: Outcome, secrets: Iterable[str]) -> Outcome:
    """The outcome, its error texts (quoted from the upstream) redacted."""
    if not (outcome.error or outcome.metering_error) or not (redactor := Redactor(secrets)):
        return outcome
    return replace(
        outcome, error=outcome.error and redactor.text(outcome.error),
        metering_error=outcome.metering_error and redactor.text(outcome.metering_error))


class HeldErrorBody:
    """The stream callable of an error response: each chunk goes to ``meter`` as it comes
    (the error text it reads is redacted where it is recorded) and is held, decoded, up to
    ``cap`` bytes; at the end the held body goes on at once, redacted. A body that stops
    decoding is cut there."""

    def __init__(self, meter: Callable[[bytes], Any], redactor: Redactor,
                 decode: Decoder | None, cap: int = MAX_ERROR_BODY) -> None:
        self._meter = meter
        self._redactor = redactor
        self._decode = decode
        self._cap = cap
        self._body = bytearray()
        self._cut = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        self._meter(chunk)
        if chunk:
            self._hold(chunk)
            return []
        return [self._redactor(bytes(self._body))] if self._body else []

    def _hold(self, chunk: bytes) -> None:
        if self._cut:
            return
        try:
            data = self._decode(chunk) if self._decode else chunk
        except Exception:  # not what its Content-Encoding says
            self._cut = True
            return
        room = self._cap - len(self._body)
        self._body += data[:room]
        self._cut = len(data) > room
