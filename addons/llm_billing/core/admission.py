"""What a request may use before it runs (sans-I/O): its output limit in every provider's
dialect, and how much of a plan's tokens it must hold.

A request holds its prompt plus the most output it may produce. Against tokens per minute
the prompt counts as estimated; against a blocking quota it counts as an *upper bound*
(core/estimate.py ``prompt_size``: every token is at least one byte), so that on a plan
that blocks at its quota the provider can never be asked for more than is left: when the
request would not fit, a plan that clamps lowers the request's output limit — adding one
when it had none — to what fits, and the provider itself stops there.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

from .plans import Plan
from .usage import Protocol

OUTPUT_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Gemini's REST API reads proto field names as well as their camelCase JSON names.
GEMINI_CONFIGS = ("generationConfig", "generation_config")
GEMINI_LIMITS = ("maxOutputTokens", "max_output_tokens")
GEMINI_ANSWERS = ("candidateCount", "candidate_count")
OPENAI_ANSWERS = ("n", "best_of")  # best_of: generated (and billed) server-side
ANTHROPIC_MIN_THINKING = 1024  # Anthropic's least thinking budget; max_tokens must exceed it


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def _loose_count(value: Any) -> int | None:
    """A count as a lenient server reads it (pydantic takes ``"4"`` and ``4.0`` for 4)."""
    with contextlib.suppress(ValueError, OverflowError):
        if isinstance(value, str | float) and not isinstance(value, bool):
            return max(0, math.ceil(float(value)))
    return _count(value)


def _gemini_configs(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for name in GEMINI_CONFIGS if isinstance(c := body.get(name), dict)]


def output_limit(body: dict[str, Any]) -> int | None:
    """The most output one answer may produce, when the request says so: the largest of
    its limits (servers differ in the field they honour: vLLM takes max_completion_tokens
    over max_tokens). None also when one of them is not a plain count."""
    values = [body.get(f) for f in OUTPUT_LIMIT_FIELDS]
    values += [c.get(f) for c in _gemini_configs(body) for f in GEMINI_LIMITS]
    counts = [_count(v) for v in values if v is not None]
    return None if not counts or None in counts else max(c for c in counts if c is not None)


def answers(body: dict[str, Any], protocol: Protocol) -> int:
    """How many answers the request asks for, each up to the output limit."""
    match protocol:
        case Protocol.OPENAI_CHAT | Protocol.OPENAI_COMPLETIONS:
            values = [body.get(f) for f in OPENAI_ANSWERS]
        case Protocol.GEMINI:
            values = [c.get(f) for c in _gemini_configs(body) for f in GEMINI_ANSWERS]
        case _:
            return 1
    return max([1, *(n for n in map(_loose_count, values) if n is not None)])


def least_output(body: dict[str, Any], protocol: Protocol) -> int:
    """The smallest output limit the provider accepts for this request."""
    if protocol is Protocol.OPENAI_EMBEDDINGS:
        return 0
    thinking = body.get("thinking")
    if protocol is Protocol.ANTHROPIC_MESSAGES and isinstance(thinking, dict) \
            and thinking.get("type") == "enabled":
        return ANTHROPIC_MIN_THINKING + 1
    return 1


def set_output_limit(body: dict[str, Any], protocol: Protocol, limit: int,
                     openai_native: bool = False) -> None:
    """Make ``limit`` the request's output limit, over all its answers, in its provider's
    field (and in every other limit field the request has, whichever a server honours).

    ``openai_native``: the backend is OpenAI's own API, where ``max_completion_tokens`` is
    the field every chat model takes (self-hosted servers know ``max_tokens``)."""
    if protocol is Protocol.OPENAI_EMBEDDINGS:
        return
    limit //= answers(body, protocol)
    for name in OUTPUT_LIMIT_FIELDS:
        if name in body:
            body[name] = limit
    match protocol:
        case Protocol.OPENAI_RESPONSES:
            body["max_output_tokens"] = limit
        case Protocol.GEMINI:
            configs = _gemini_configs(body)
            if not configs:
                body["generationConfig"] = {}
                configs = [body["generationConfig"]]
            for generation in configs:
                present = [f for f in GEMINI_LIMITS if f in generation]
                for name in present or ["maxOutputTokens"]:
                    generation[name] = limit
        case Protocol.OPENAI_CHAT:
            present = [f for f in ("max_completion_tokens", "max_tokens") if f in body]
            for name in present or ["max_completion_tokens" if openai_native else "max_tokens"]:
                body[name] = limit
        case Protocol.ANTHROPIC_MESSAGES:
            body["max_tokens"] = limit
            thinking = body.get("thinking")
            if isinstance(thinking, dict) and (budget := _count(thinking.get("budget_tokens"))) \
                    is not None and budget >= limit:
                thinking["budget_tokens"] = max(ANTHROPIC_MIN_THINKING, limit - 1)
        case _:
            body["max_tokens"] = limit


@dataclass(frozen=True, slots=True)
class Need:
    """What a request asks of its plan before it runs."""

    prompt: int  # estimated prompt tokens
    prompt_bound: int  # at most this many prompt tokens
    output: int  # the output it may produce, all answers: its own limit, else a default
    least_output: int  # below this the request is not worth sending (clamping plans)
    limited: bool  # the request set its own output limit

    @property
    def minimum(self) -> int:
        return self.prompt + self.least_output

    @property
    def tokens(self) -> int:
        return self.prompt + self.output


def need_of(body: dict[str, Any], protocol: Protocol, plan: Plan, prompt: int,
            prompt_bound: int, reserve_output: int) -> Need:
    """The request's need under ``plan``: a clamping plan gives an unlimited request
    ``default_output_limit``; else ``reserve_output`` is held for it. Per answer: a
    request for ``n`` answers needs ``n`` times that."""
    limit = output_limit(body)
    count = answers(body, protocol)
    least = least_output(body, protocol) * count
    if protocol is Protocol.OPENAI_EMBEDDINGS:
        output = 0
    elif limit is not None:
        output = limit * count
    else:
        output = (plan.default_output_limit if plan.clamps else reserve_output) * count
    output = max(output, least) if plan.clamps else output
    return Need(prompt, max(prompt, prompt_bound), output,
                least if plan.clamps else output, limit is not None)

