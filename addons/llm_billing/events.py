"""Completion events as stored in ``billing.events_completion`` (seed 002's contract).

The six contract fields keep their names and types; the rest is ours.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .context import RequestContext
from .meter import Outcome


def completion_event(ctx: RequestContext, result: Outcome, finished: datetime | None = None,
                     path: str = "") -> dict[str, Any]:
    assert result.usage is not None and ctx.backend is not None
    finished = finished or datetime.now(UTC)
    usage = result.usage
    event: dict[str, Any] = {
        "_id": ctx.event_id,
        "date_created": finished,
        "user_id": ctx.caller.user_id,
        "api_key_id": ctx.caller.key_id,
        "model": ctx.model,
        "prompt_n": usage.prompt_tokens,
        "completion_n": usage.completion_tokens,
        "usage": usage.as_document(),
        "usage_estimated": result.estimated,
        "backend": ctx.backend.name,
        "path": path,
        "plan_id": ctx.plan_id,
        "stream": ctx.stream,
        "status": result.status,
        "complete": result.complete,
        "duration_ms": round((finished.timestamp() - ctx.started) * 1000),
    }
    if result.estimate_method:
        event["estimate_method"] = result.estimate_method
    if result.error:
        event["error"] = result.error
    return event
