"""What the addons know about one request, shared between their hooks.

Kept beside the flow rather than in ``flow.metadata``: metadata is copied and serialized
when flows are saved or shown, and this holds live objects (ObjectIds, the meter).
``flow.metadata["llm_billing"]`` gets a plain, secret-free snapshot instead: mitmweb shows
it, and a saved flow replayed offline (``mitmdump -nr``) is billed again from it.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bson import ObjectId, json_util
from mitmproxy import http

from .config import Backend, Route
from .plans import Plan
from .usage import Protocol

if TYPE_CHECKING:
    from .meter import Outcome, StreamMeter

METADATA_KEY = "llm_billing"


@dataclass(slots=True)
class Caller:
    """The API key document that authenticated the request."""

    key_id: Any  # the key document's _id, as stored
    user_id: Any


@dataclass(slots=True)
class RequestContext:
    caller: Caller
    route: Route
    path: str  # as the client sent it, without the query
    event_id: ObjectId = field(default_factory=ObjectId)  # fixed now: retries can't bill twice
    started: float = field(default_factory=time.time)
    plan_id: str = ""
    model: str = ""
    backend: Backend | None = None
    stream: bool = False
    usage_injected: bool = False  # we added stream_options.include_usage; hide its chunk
    prompt_chars: int = 0  # characters of prompt text, for estimates only
    output_limit: int | None = None  # the request's max_tokens (or equivalent)
    request_bytes: int = 0
    plan: Plan | None = None  # the user's plan (UserPlans)
    hold: Any = None  # the Limits addon's reservation for this request
    replayed: bool = False  # rebuilt from a saved flow, not a live request
    meter: StreamMeter | None = None
    outcome: Outcome | None = None  # set once, in response or error
    sending: bool = False  # request hook done, response headers not yet in
    logged: bool = False  # its event went to the event log
    intent: Any = None  # the journal segment holding its provisional event

    @property
    def protocol(self) -> Protocol:
        return self.route.protocol


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
        prompt_chars=ctx.prompt_chars, request_bytes=ctx.request_bytes, started=ctx.started,
        ids=json_util.dumps({"event_id": ctx.event_id, "user_id": ctx.caller.user_id,
                             "key_id": ctx.caller.key_id}),
        **extra,
    )


def restore(flow: http.HTTPFlow, route: Route, backend: Backend | None) -> RequestContext:
    """The context of a saved flow, from its snapshot (see ``summarize``)."""
    summary = flow.metadata[METADATA_KEY]
    ids = json_util.loads(summary["ids"])
    ctx = RequestContext(
        caller=Caller(key_id=ids["key_id"], user_id=ids["user_id"]), route=route,
        path=summary["path"], event_id=ids["event_id"], started=summary["started"],
        plan_id=summary["plan_id"], model=summary["model"], backend=backend,
        stream=summary["stream"], usage_injected=summary["usage_injected"],
        prompt_chars=summary["prompt_chars"], request_bytes=summary["request_bytes"],
        replayed=True,
    )
    attach(flow, ctx)
    return ctx
