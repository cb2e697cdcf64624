"""Token usage read from provider responses (sans-I/O).

One ``UsageTracker`` per response. Feed it SSE events as they pass (``observe_event``) or
a whole body (``observe_body``); it keeps the latest usage the provider reported — usage
fields are cumulative snapshots, so the last value wins and deltas are never added. It
also counts the characters of delivered content, so a stream cut off before its final
usage can still be estimated. Every count must be an integer in 0..``MAX_TOKENS``: a
response that reports anything else is not trusted (``usage_anomaly`` says why) and is
billed an estimate, never the absurd value.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from enum import StrEnum
from typing import Any

from .sse import SSEEvent

MAX_TOKENS = 10**9
"""The most one count of one request may be. The largest context windows are ~10**7
tokens, so anything above is a broken or hostile upstream; and at most a few such counts
per event keep every sum (events, a user's month in billing.usage) far inside int64."""


class Protocol(StrEnum):
    """The wire dialect of a route: decides usage parsing and the error format."""

    OPENAI_CHAT = "openai-chat"
    OPENAI_COMPLETIONS = "openai-completions"
    OPENAI_EMBEDDINGS = "openai-embeddings"
    OPENAI_RESPONSES = "openai-responses"
    ANTHROPIC_MESSAGES = "anthropic-messages"
    ANTHROPIC_COUNT_TOKENS = "anthropic-count-tokens"  # forwarded, never billed
    GEMINI = "gemini"

    @property
    def error_format(self) -> str:
        if self in (Protocol.ANTHROPIC_MESSAGES, Protocol.ANTHROPIC_COUNT_TOKENS):
            return "anthropic"
        return "google" if self is Protocol.GEMINI else "openai"

    @property
    def billed(self) -> bool:
        """False for a route that is forwarded but costs nothing (no limits, no event)."""
        return self is not Protocol.ANTHROPIC_COUNT_TOKENS

    @property
    def accepts_stream_options(self) -> bool:
        return self in (Protocol.OPENAI_CHAT, Protocol.OPENAI_COMPLETIONS)


@dataclass(frozen=True, slots=True)
class Usage:
    """Provider-neutral token counts.

    ``prompt_tokens`` is every input token (cached ones included) and ``completion_tokens``
    every output token (reasoning included); the other fields are subsets of those, and
    ``cache_write_1h_tokens`` (Anthropic's one-hour cache writes) a subset of
    ``cache_write_tokens``.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0

    @property
    def uncached_prompt_tokens(self) -> int:
        return max(0, self.prompt_tokens - self.cache_read_tokens - self.cache_write_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_document(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cache_write_1h_tokens": self.cache_write_1h_tokens,
        }


class UntrustedCount(ValueError):
    """A token count that is not an integer in 0..MAX_TOKENS; ``value`` is what came."""

    def __init__(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            reason = "is not a number"
        elif isinstance(value, float) and math.isfinite(value) and not value.is_integer():
            reason = "is not an integer"
        else:
            reason = "out of range"
        super().__init__(f"{_show(value)} {reason}")
        self.value = value


def _show(value: Any) -> str:
    text = repr(value)
    if isinstance(value, int) and len(text) > 20:  # 10**30 → '1e+30', never 4,000 digits
        return format(Decimal(value).normalize(), ".3g")
    return text if len(text) <= 40 else text[:37] + "..."


def _int(value: Any) -> int:
    """A token count from untrusted JSON: absent (null) is 0, an integer (or integral
    float) in 0..MAX_TOKENS is itself; anything else raises ``UntrustedCount``."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UntrustedCount(value)
    if isinstance(value, float) and not value.is_integer():  # NaN, ±inf, 1.5
        raise UntrustedCount(value)
    if not 0 <= value <= MAX_TOKENS:
        raise UntrustedCount(value)
    return int(value)


def _path_of(value: Any, tree: Any, path: str = "", depth: int = 0) -> str | None:
    """Where in ``tree`` (dicts, lists) this very object is: names an untrusted count."""
    if tree is value:
        return path
    items = tree.items() if isinstance(tree, dict) else (
        enumerate(tree) if isinstance(tree, list) else ())
    for key, child in items if depth < 8 else ():  # counts are shallow; hostile JSON is not
        if found := _path_of(value, child, f"{path}.{key}" if path else str(key), depth + 1):
            return found
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def openai_usage(usage: dict[str, Any]) -> Usage:
    """OpenAI chat/completions/embeddings ``usage`` (also vLLM, llama.cpp)."""
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cache_read_tokens=_int(_dict(usage.get("prompt_tokens_details")).get("cached_tokens")),
        reasoning_tokens=_int(
            _dict(usage.get("completion_tokens_details")).get("reasoning_tokens")
        ),
    )


def responses_usage(usage: dict[str, Any]) -> Usage:
    """OpenAI Responses API ``usage``."""
    return Usage(
        prompt_tokens=_int(usage.get("input_tokens")),
        completion_tokens=_int(usage.get("output_tokens")),
        cache_read_tokens=_int(_dict(usage.get("input_tokens_details")).get("cached_tokens")),
        reasoning_tokens=_int(_dict(usage.get("output_tokens_details")).get("reasoning_tokens")),
    )


def gemini_usage(meta: dict[str, Any]) -> Usage:
    """Gemini ``usageMetadata``: candidates exclude thoughts, so output adds them."""
    thoughts = _int(meta.get("thoughtsTokenCount"))
    return Usage(
        prompt_tokens=(_int(meta.get("promptTokenCount"))
                       + _int(meta.get("toolUsePromptTokenCount"))),
        completion_tokens=_int(meta.get("candidatesTokenCount")) + thoughts,
        cache_read_tokens=_int(meta.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


def anthropic_usage(usage: dict[str, Any], previous: Usage | None = None) -> Usage:
    """Anthropic ``usage``: fields absent from a ``message_delta`` keep their earlier value.

    Anthropic's ``input_tokens`` excludes cache reads and writes; prompt_tokens adds them.
    ``cache_creation`` splits the writes by cache lifetime (5 minutes, 1 hour), which are
    priced differently.
    """
    base = previous or Usage()

    def field(name: str, current: int, source: dict[str, Any] = usage) -> int:
        return _int(source[name]) if source.get(name) is not None else current

    by_lifetime = _dict(usage.get("cache_creation"))
    base_5m = max(0, base.cache_write_tokens - base.cache_write_1h_tokens)
    write_5m = field("ephemeral_5m_input_tokens", base_5m, by_lifetime)
    write_1h = field("ephemeral_1h_input_tokens", base.cache_write_1h_tokens, by_lifetime)
    uncached = field("input_tokens", base.uncached_prompt_tokens)
    read = field("cache_read_input_tokens", base.cache_read_tokens)
    write = field("cache_creation_input_tokens", write_5m + write_1h)
    return replace(
        base,
        prompt_tokens=uncached + read + write,
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=min(write_1h, write),  # a part of the writes, never more
        completion_tokens=field("output_tokens", base.completion_tokens),
    )


def parse_json(data: str | bytes) -> Any:
    """JSON or None; never raises."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def dump_json(value: Any) -> bytes:
    """A request body as UTF-8 JSON, like clients send it. A lone surrogate (``"\\ud800"``
    is valid JSON, but no UTF-8) goes back out as the same JSON escape."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace")


def is_usage_only_chunk(payload: Any) -> bool:
    """The extra chunk OpenAI-compatible servers send for ``include_usage``."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("usage"), dict)
        and payload.get("choices") == []
    )


def _error_message(error: Any) -> str:
    error = _dict(error)
    return str(error.get("message") or error.get("type") or error.get("status") or "error")


_CONTENT_ONLY_STREAMS = (Protocol.OPENAI_CHAT, Protocol.OPENAI_COMPLETIONS)
_NOT_CONTENT_ONLY = ('"timings"', '"error"', "\\u")
MAX_DEFERRED = 64 << 10  # characters of content-only events held before they are counted
MAX_KEPT_TEXT = 4 << 20  # characters of delivered content kept for a backend tokenizer


def content_only(data: str) -> bool:
    """An OpenAI chunk that can only carry content. Its usage, timings and errors are
    under these keys — ``"usage":null``, in every chunk once usage was asked for, carries
    none — and a key spelled with escapes (``"\\u0075sage"``) has a backslash-u. Quotes
    in a JSON string are escaped, so content never holds a quoted key."""
    if any(key in data for key in _NOT_CONTENT_ONLY):
        return False
    usage = data.count('"usage"')
    return usage == 0 or usage == data.count('"usage":null')


class UsageTracker:
    """Latest usage of one response, plus delivered-content size for estimates.

    Most events of a stream only carry content, whose size matters only if the response
    never reports usage. Those of an OpenAI stream are recognised by a substring search
    and parsed later, if at all (``output_chars``), instead of one by one as they pass.
    """

    def __init__(self, protocol: Protocol, keep_text: bool = False) -> None:
        """``keep_text``: also keep the delivered content (up to ``MAX_KEPT_TEXT``
        characters), for a backend tokenizer to count when no usage comes."""
        self.protocol = protocol
        self.usage: Usage | None = None
        self.usage_final = False  # the usage covers the whole response (not a start value)
        self.finished = False  # the response said it was complete ([DONE], message_stop…)
        self.error: str | None = None  # an error reported inside a 200 response
        self._output_chars = 0
        self._deferred: list[str] = []  # content-only events not parsed yet
        self._deferred_size = 0
        self._can_defer = protocol in _CONTENT_ONLY_STREAMS
        self.timings: dict[str, Any] | None = None  # llama.cpp's per-request timings
        self.usage_anomaly: str | None = None  # why the reported usage is not trusted
        # One buffer, not a str per delta (~60 bytes each): ~4 bytes a character at most.
        self._kept: io.StringIO | None = io.StringIO() if keep_text else None

    @property
    def output_chars(self) -> int:
        """Characters of delivered content so far."""
        self._count_deferred()
        return self._output_chars

    @property
    def output_text(self) -> str | None:
        """The delivered content, if kept and not over ``MAX_KEPT_TEXT``."""
        self._count_deferred()
        return None if self._kept is None else self._kept.getvalue()

    def _deliver(self, part: Any) -> None:
        texts = _texts(part)
        self._output_chars += sum(map(len, texts))
        if self._kept is not None:
            for text in texts:
                self._kept.write(text)
            if self._output_chars > MAX_KEPT_TEXT:
                self._kept = None  # too long to send to a tokenizer: estimated instead

    def observe_event(self, event: SSEEvent) -> Any:
        """Take one SSE event; returns its parsed JSON payload, or None (not JSON, or a
        content-only event whose parsing is deferred)."""
        data = event.data
        if data == "[DONE]":
            self.finished = True
            return None
        if self._can_defer and content_only(data):
            self._deferred.append(data)
            self._deferred_size += len(data)
            if self._deferred_size > MAX_DEFERRED:
                self._count_deferred()
            return None
        payload = parse_json(data)
        if isinstance(payload, dict):
            self._observe(payload, event.event)
        return payload

    def _count_deferred(self) -> None:
        deferred, self._deferred, self._deferred_size = self._deferred, [], 0
        for data in deferred:
            payload = parse_json(data)
            if isinstance(payload, dict):
                self._observe(payload, "")

    def observe_body(self, body: bytes) -> None:
        """A whole non-streamed body: a JSON object, or a JSON array of them (Gemini's
        streamGenerateContent without ``alt=sse``)."""
        payload = parse_json(body)
        for item in payload if isinstance(payload, list) else [payload]:
            self.observe_json(item)
        self.body_complete()

    def observe_json(self, payload: Any) -> None:
        """One complete value of a non-streamed body: the body, or one element of a
        top-level array (see core/json_stream.py)."""
        if isinstance(payload, dict):
            self._observe(payload, "")

    def body_complete(self) -> None:
        """The whole non-streamed body arrived: its usage covers the response."""
        if self.usage is not None:
            self.usage_final = True
            self.finished = True

    def _take(self, extract: Callable[..., Usage], reported: dict[str, Any],
              *previous: Usage | None) -> None:
        """The provider's usage, unless a count in it is absurd: then the response's usage
        is never trusted again (the outcome estimates it) and the anomaly is recorded."""
        try:
            self.usage = extract(reported, *previous)
        except UntrustedCount as e:
            where = _path_of(e.value, reported) or "a token count"
            self.usage_anomaly = self.usage_anomaly or f"{where} {e}"

    def _observe(self, payload: dict[str, Any], event_name: str) -> None:
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            self._dispatch(payload, event_name)  # odd shapes teach nothing; never raise

    def _dispatch(self, payload: dict[str, Any], event_name: str) -> None:
        match self.protocol:
            case Protocol.ANTHROPIC_MESSAGES:
                self._anthropic(payload)
            case Protocol.OPENAI_RESPONSES:
                self._responses(payload, event_name)
            case Protocol.GEMINI:
                self._gemini(payload)
            case _:
                self._openai(payload)

    def _openai(self, payload: dict[str, Any]) -> None:
        if isinstance(payload.get("usage"), dict):
            self._take(openai_usage, payload["usage"])
            self.usage_final = True
        if isinstance(payload.get("timings"), dict):
            self.timings = payload["timings"]
        if payload.get("error"):
            self.error = _error_message(payload["error"])
        for choice in _list(payload.get("choices")):
            if isinstance(choice, dict):
                self._deliver(choice.get("delta") or choice.get("message"))
                self._deliver(choice.get("text"))

    def _anthropic(self, payload: dict[str, Any]) -> None:
        kind = payload.get("type")
        if kind == "message_start":
            usage = _dict(_dict(payload.get("message")).get("usage"))
            self._take(anthropic_usage, usage, self.usage)
        elif kind == "message_delta" and isinstance(payload.get("usage"), dict):
            self._take(anthropic_usage, payload["usage"], self.usage)
            self.usage_final = True
        elif kind == "content_block_delta":
            self._deliver(payload.get("delta"))
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            self.error = _error_message(payload.get("error"))
        elif kind == "message":  # a non-streamed response
            if isinstance(payload.get("usage"), dict):
                self._take(anthropic_usage, payload["usage"])
            for block in _list(payload.get("content")):
                self._deliver(block)
                self._deliver(_json_text(_dict(block).get("input")))

    def _responses(self, payload: dict[str, Any], event_name: str) -> None:
        kind = "response" if payload.get("object") == "response" else (
            payload.get("type") or event_name)
        response = _dict(payload.get("response")) if "response" in payload else payload
        if kind in ("response.completed", "response.failed", "response.incomplete", "response"):
            if isinstance(response.get("usage"), dict):
                self._take(responses_usage, response["usage"])
                self.usage_final = True
            self.finished = True
            if response.get("error"):
                self.error = _error_message(response["error"])
            if kind == "response":  # non-streamed: count its output for the record
                for item in _list(response.get("output")):
                    for part in _list(_dict(item).get("content")):
                        self._deliver(part)
                    self._deliver(_dict(item).get("arguments"))
        elif kind.endswith(".delta") and isinstance(payload.get("delta"), str):
            self._deliver(payload["delta"])
        elif kind == "error":
            self.error = _error_message(payload.get("error") or payload)

    def _gemini(self, payload: dict[str, Any]) -> None:
        if isinstance(payload.get("usageMetadata"), dict):
            self._take(gemini_usage, payload["usageMetadata"])
        if payload.get("error"):
            self.error = _error_message(payload["error"])
        for candidate in _list(payload.get("candidates")):
            candidate = _dict(candidate)
            for part in _list(_dict(candidate.get("content")).get("parts")):
                self._deliver(part)
                self._deliver(_json_text(_dict(part).get("functionCall")))
            if candidate.get("finishReason"):
                self.finished = True
                self.usage_final = self.usage is not None


def _json_text(value: Any) -> str:
    return json.dumps(value) if value is not None else ""


def _texts(part: Any) -> list[str]:
    """The generated content in a message, delta or content block."""
    if isinstance(part, str):
        return [part]
    if not isinstance(part, dict):
        return []
    texts = [value for key in ("content", "text", "reasoning_content", "thinking",
                               "partial_json", "arguments")
             if isinstance(value := part.get(key), str)]
    for call in _list(part.get("tool_calls")):
        if isinstance(call, dict):
            texts += _texts(call.get("function"))
    return texts
