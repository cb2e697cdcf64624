"""What the addons know about one request, shared between their hooks.

Kept beside the flow rather than in ``flow.metadata``: metadata is copied and serialized
when flows are saved or shown, and this holds live objects (ObjectIds, the meter).
``flow.metadata["llm_billing"]`` gets a plain, secret-free snapshot instead: mitmweb shows
it, and a saved flow replayed offline (``mitmdump -nr``) is billed again from it.
"""

from __future__ import annotations

import weakref
from typing import Any

from bson import json_util
from mitmproxy import http

from .core.config import Backend, Route
from .core.estimate import estimate_tokens
from .core.request import Caller, RequestContext

__all__ = ["Caller", "RequestContext", "attach", "of", "restore", "summarize"]

METADATA_KEY = "llm_billing"


_contexts: weakref.WeakKeyDictionary[http.HTTPFlow, RequestContext] = (
    weakref.WeakKeyDictionary()
)


def attach(flow: http.HTTPFlow, context: RequestContext) -> None:
    _contexts[flow] = context


def of(flow: http.HTTPFlow) -> RequestContext | None:
    return _contexts.get(flow)


def summarize(flow: http.HTTPFlow, **extra: Any) -> None:
    """Record the request's billing facts in the flow's metadata (plain values only)."""
    ctx = _contexts.get(flow)
    if ctx is None:
        return
    summary = flow.metadata.setdefault(METADATA_KEY, {})
    summary.update(
        event_id=str(ctx.event_id), user_id=str(ctx.caller.user_id), model=ctx.model,
        backend=ctx.backend.name if ctx.backend else None, plan_id=ctx.plan_id,
        path=ctx.path, stream=ctx.stream, usage_injected=ctx.usage_injected,
        prompt_tokens=ctx.prompt_tokens, request_bytes=ctx.request_bytes, started=ctx.started,
        **extra,
    )
    if "ids" not in summary:  # fixed once the key is known; extended JSON is not cheap
        summary["ids"] = json_util.dumps({"event_id": ctx.event_id,
                                          "user_id": ctx.caller.user_id,
                                          "key_id": ctx.caller.key_id})


def restore(flow: http.HTTPFlow, route: Route, backend: Backend | None) -> RequestContext:
    """The context of a saved flow, from its snapshot (see ``summarize``)."""
    summary = flow.metadata[METADATA_KEY]
    ids = json_util.loads(summary["ids"])
    ctx = RequestContext(
        caller=Caller(key_id=ids["key_id"], user_id=ids["user_id"]), route=route,
        path=summary["path"], event_id=ids["event_id"], started=summary["started"],
        plan_id=summary["plan_id"], model=summary["model"], backend=backend,
        stream=summary["stream"], usage_injected=summary["usage_injected"],
        prompt_tokens=_prompt_tokens(summary), request_bytes=summary["request_bytes"],
        replayed=True,
    )
    attach(flow, ctx)
    return ctx


def _prompt_tokens(summary: dict[str, Any]) -> int:
    """A snapshot's prompt estimate; flows saved before 0.2 hold characters instead."""
    if "prompt_tokens" in summary:
        return summary["prompt_tokens"]
    return estimate_tokens(summary.get("prompt_chars", 0))
