"""Token usage read from provider responses (sans-I/O).

One ``UsageTracker`` per response. Feed it SSE events as they pass (``observe_event``) or
a whole JSON body (``observe_body``); it keeps the latest usage the provider reported —
usage fields are cumulative snapshots, so the last value wins and deltas are never added.
It also counts the characters of delivered content, so a stream that ends before its
usage can still be estimated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from .sse import SSEEvent


class Protocol(StrEnum):
    """The wire dialect of a route: decides usage parsing and the error format."""

    OPENAI_CHAT = "openai-chat"
    OPENAI_COMPLETIONS = "openai-completions"
    OPENAI_EMBEDDINGS = "openai-embeddings"
    ANTHROPIC_MESSAGES = "anthropic-messages"

    @property
    def error_format(self) -> str:
        return "anthropic" if self is Protocol.ANTHROPIC_MESSAGES else "openai"

    @property
    def accepts_stream_options(self) -> bool:
        return self in (Protocol.OPENAI_CHAT, Protocol.OPENAI_COMPLETIONS)


@dataclass(frozen=True, slots=True)
class Usage:
    """Provider-neutral token counts.

    ``prompt_tokens`` is every input token (cached ones included) and ``completion_tokens``
    every output token (reasoning included); the other fields are subsets of those.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def as_document(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }


def _int(value: Any) -> int:
    """A token count from untrusted JSON: non-negative int, anything else is 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def openai_usage(usage: dict[str, Any]) -> Usage:
    """OpenAI chat/completions/embeddings ``usage`` object (also vLLM, llama.cpp)."""
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cache_read_tokens=_int(_dict(usage.get("prompt_tokens_details")).get("cached_tokens")),
        reasoning_tokens=_int(
            _dict(usage.get("completion_tokens_details")).get("reasoning_tokens")
        ),
    )


def anthropic_usage(usage: dict[str, Any], previous: Usage | None = None) -> Usage:
    """Anthropic ``usage``: fields absent from a ``message_delta`` keep their earlier value.

    Anthropic's ``input_tokens`` excludes cache reads and writes; prompt_tokens adds them.
    """
    base = previous or Usage()
    uncached = base.prompt_tokens - base.cache_read_tokens - base.cache_write_tokens
    if "input_tokens" in usage:
        uncached = _int(usage["input_tokens"])
    read = _int(usage["cache_read_input_tokens"]) if "cache_read_input_tokens" in usage \
        else base.cache_read_tokens
    write = _int(usage["cache_creation_input_tokens"]) \
        if "cache_creation_input_tokens" in usage else base.cache_write_tokens
    output = _int(usage["output_tokens"]) if "output_tokens" in usage \
        else base.completion_tokens
    return replace(
        base,
        prompt_tokens=uncached + read + write,
        cache_read_tokens=read,
        cache_write_tokens=write,
        completion_tokens=output,
    )


def parse_json(data: str | bytes) -> Any:
    """JSON or None; never raises."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def is_usage_only_chunk(payload: Any) -> bool:
    """The extra chunk OpenAI-compatible servers send for ``include_usage``."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("usage"), dict)
        and payload.get("choices") == []
    )


class UsageTracker:
    """Latest usage of one response, plus delivered-content size for estimates."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.usage: Usage | None = None
        self.finished = False  # the stream said it was complete ([DONE], message_stop)
        self.error: str | None = None  # an in-stream error event's message
        self.output_chars = 0

    def observe_event(self, event: SSEEvent) -> Any:
        """Take one SSE event; returns its parsed JSON payload (or None)."""
        if event.data == "[DONE]":
            self.finished = True
            return None
        payload = parse_json(event.data)
        if not isinstance(payload, dict):
            return payload
        if self.protocol is Protocol.ANTHROPIC_MESSAGES:
            self._anthropic_event(payload)
        else:
            self._openai_payload(payload)
        return payload

    def observe_body(self, body: bytes) -> None:
        """A whole non-streamed JSON response body."""
        payload = parse_json(body)
        if not isinstance(payload, dict):
            return
        if self.protocol is Protocol.ANTHROPIC_MESSAGES:
            if isinstance(payload.get("usage"), dict):
                self.usage = anthropic_usage(payload["usage"])
            for block in payload.get("content") or []:
                self.output_chars += _text_size(block)
        else:
            self._openai_payload(payload)
        self.finished = True

    def _openai_payload(self, payload: dict[str, Any]) -> None:
        if isinstance(payload.get("usage"), dict):
            self.usage = openai_usage(payload["usage"])
        if isinstance(payload.get("error"), dict):
            self.error = str(payload["error"].get("message", "error"))
        for choice in payload.get("choices") or []:
            if isinstance(choice, dict):
                self.output_chars += _text_size(choice.get("delta") or choice.get("message"))
                self.output_chars += _text_size(choice.get("text"))

    def _anthropic_event(self, payload: dict[str, Any]) -> None:
        kind = payload.get("type")
        if kind == "message_start":
            usage = _dict(_dict(payload.get("message")).get("usage"))
            self.usage = anthropic_usage(usage, self.usage)
        elif kind == "message_delta" and isinstance(payload.get("usage"), dict):
            self.usage = anthropic_usage(payload["usage"], self.usage)
        elif kind == "content_block_delta":
            self.output_chars += _text_size(payload.get("delta"))
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            self.error = str(_dict(payload.get("error")).get("message", "error"))


def _text_size(part: Any) -> int:
    """Characters of generated content in a message, delta or content block."""
    if isinstance(part, str):
        return len(part)
    if not isinstance(part, dict):
        return 0
    size = 0
    for key in ("content", "text", "reasoning_content", "thinking", "partial_json", "arguments"):
        value = part.get(key)
        if isinstance(value, str):
            size += len(value)
    for call in part.get("tool_calls") or []:
        if isinstance(call, dict):
            size += _text_size(call.get("function"))
    return size


PROMPT_FIELDS = ("messages", "system", "prompt", "input", "instructions", "tools")


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of text a request sends as prompt, for estimates when usage is missing."""
    return sum(_strings_size(body.get(key)) for key in PROMPT_FIELDS)


def _strings_size(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth > 32:
        return 0
    if isinstance(value, dict):
        return sum(_strings_size(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return sum(_strings_size(v, depth + 1) for v in value)
    return 0
