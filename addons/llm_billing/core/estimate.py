"""Token estimates, for when a provider reports no usage (sans-I/O).

Only ever used where no count exists: reservations before a request runs, and responses
cut off before their usage. Every billed estimate is flagged on its event.
"""

from __future__ import annotations

import math
from typing import Any

CHARS_PER_TOKEN = 4  # the usual rough ratio for English text


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


PROMPT_FIELDS = ("messages", "system", "prompt", "input", "instructions", "tools", "contents",
                 "systemInstruction")


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
