"""What one response came to: the ``Outcome`` every consumer of a settled flow reads
(the ledger, the limits, the event log), and the usage to bill when the provider reported
none or only part of it (sans-I/O)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .estimate import CHARS_PER_TOKEN, estimate_tokens
from .usage import Usage, UsageTracker


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the meter concluded about one response."""

    status: int | None  # None when no response came
    usage: Usage | None  # None: nothing to bill (upstream failed)
    estimated: bool = False
    estimate_method: str | None = None
    complete: bool = False  # the response said it was finished
    error: str | None = None
    response_bytes: int = 0
    timings: dict[str, Any] | None = None  # llama.cpp's, when it sent them
    metered: int | float | None = None  # the route's metering expression's value
    metering_error: str | None = None
    usage_anomaly: str | None = None  # why the provider's usage was not trusted



PROMPT_ESTIMATE = f"text characters/{CHARS_PER_TOKEN} plus media by kind"


def settle_usage(tracker: UsageTracker, prompt_tokens: int) -> tuple[Usage, str | None]:
    """The usage to bill and, when it is estimated, how. ``prompt_tokens``: the request's
    estimated prompt (core/estimate.py)."""
    if tracker.usage_anomaly:  # an absurd count: nothing the provider said is billed
        return (Usage(prompt_tokens=prompt_tokens,
                      completion_tokens=estimate_tokens(tracker.output_chars)),
                f"provider usage not trusted: output: delivered characters/"
                f"{CHARS_PER_TOKEN}; prompt: {PROMPT_ESTIMATE}")
    usage = tracker.usage
    if usage is not None and tracker.usage_final:
        return usage, None
    delivered = estimate_tokens(tracker.output_chars)
    if usage is not None:  # e.g. Anthropic's message_start: input exact, output so far
        partial = replace(usage, completion_tokens=max(usage.completion_tokens, delivered))
        return partial, f"output: delivered characters/{CHARS_PER_TOKEN}; input: provider"
    estimate = Usage(prompt_tokens=prompt_tokens, completion_tokens=delivered)
    return estimate, (f"output: delivered characters/{CHARS_PER_TOKEN}; "
                      f"prompt: {PROMPT_ESTIMATE}")


