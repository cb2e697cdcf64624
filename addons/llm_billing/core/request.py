"""What the proxy knows about one request (sans-I/O data): who called, where it goes,
what was held for it and, once it ended, its outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bson import ObjectId

from .config import Backend, Route
from .outcome import Outcome
from .plans import Plan
from .usage import Protocol

if TYPE_CHECKING:
    from .stream_meter import StreamMeter


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
    prompt_tokens: int = 0  # estimated prompt tokens (what tokens-per-minute holds)
    prompt_bound: int = 0  # at most this many prompt tokens (what a blocking quota holds)
    body: dict[str, Any] | None = None  # the parsed request, until the limits are applied
    # The parsed request, kept to the end when the backend's tokenizer counts what a
    # response without usage cost (its backend's usage_fallback).
    tokenizer_input: dict[str, Any] | None = None
    clamped_output: int | None = None  # the output limit the limits gave the request
    request_bytes: int = 0
    plan: Plan | None = None  # the user's plan (UserPlans)
    hold: Any = None  # the Limits addon's reservation for this request
    # Where the Limits addon counts it: usage document, instance and (once settled) the
    # number of the usage write that carries it — recorded on its events (ledger.recover).
    ledger: dict[str, Any] | None = None
    replayed: bool = False  # rebuilt from a saved flow, not a live request
    meter: StreamMeter | None = None
    outcome: Outcome | None = None  # set once, by the Settle addon
    sending: bool = False  # request hook done, response headers not yet in
    sent_upstream: float = 0.0  # time.time() when it went upstream (metrics)
    # Non-streamed: if the client leaves once the request went upstream, the answer is still
    # read and billed (finish_upstream.py); no ``error`` fires for the client's leaving.
    finish_upstream: bool = False
    intent: Any = None  # the journal segment holding its provisional event
    # The client's token and every configured upstream secret: redacted from what the
    # upstream answers (core/redact.py). Never shown: not in repr, nor in the flow's summary.
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def protocol(self) -> Protocol:
        return self.route.protocol
