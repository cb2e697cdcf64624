"""What the addons know about one request, shared between their hooks.

Kept beside the flow rather than in ``flow.metadata``: metadata is copied and serialized
when flows are saved or shown, and this holds live objects (ObjectIds, the meter).
``flow.metadata["llm_billing"]`` gets a plain, secret-free summary for mitmweb instead.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from mitmproxy import http

from .config import Backend
from .usage import Protocol

if TYPE_CHECKING:
    from .meter import Outcome, StreamMeter


@dataclass(slots=True)
class Caller:
    """The API key document that authenticated the request."""

    key_id: Any  # the key document's _id, as stored
    user_id: Any


@dataclass(slots=True)
class RequestContext:
    caller: Caller
    protocol: Protocol
    event_id: ObjectId = field(default_factory=ObjectId)  # fixed now: retries can't bill twice
    started: float = field(default_factory=time.time)
    plan_id: str = ""
    model: str = ""
    backend: Backend | None = None
    stream: bool = False
    usage_injected: bool = False  # we added stream_options.include_usage; hide its chunk
    prompt_chars: int = 0  # characters of prompt text, for estimates only
    meter: StreamMeter | None = None
    outcome: Outcome | None = None  # set once, in response or error
    sending: bool = False  # request hook done, response headers not yet in
    logged: bool = False  # its completion event went to the event log


_contexts: weakref.WeakKeyDictionary[http.HTTPFlow, RequestContext] = (
    weakref.WeakKeyDictionary()
)


def attach(flow: http.HTTPFlow, context: RequestContext) -> None:
    _contexts[flow] = context


def of(flow: http.HTTPFlow) -> RequestContext | None:
    return _contexts.get(flow)


def summarize(flow: http.HTTPFlow, **extra: Any) -> None:
    """Show billing facts in mitmweb's flow metadata (plain values, no secrets)."""
    ctx = _contexts.get(flow)
    if ctx is None:
        return
    summary = flow.metadata.setdefault("llm_billing", {})
    summary.update(
        event_id=str(ctx.event_id), user_id=str(ctx.caller.user_id), model=ctx.model,
        backend=ctx.backend.name if ctx.backend else None, plan_id=ctx.plan_id, **extra,
    )
