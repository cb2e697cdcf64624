"""Settle addon: the one step that ends a request.

When a flow ends — ``response``, or ``error`` for a hang-up on either side (the OpenAI
SDK hangs up right after ``[DONE]``, before the upstream's end of body, and mitmproxy
then fires ``error`` only) — ``settle`` computes the flow's final ``Outcome`` exactly
once and hands that same outcome to every consumer, in order: the limits (the hold
becomes the billed tokens in the ledger) and the event log. No consumer decides for
itself whether a flow is finished. A response without usage whose backend counts
tokens itself (``usage_fallback``) is handed over once those counts are in
(backend_tokenizer.py).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from mitmproxy import http

from . import context
from .backend_tokenizer import BackendTokenizer
from .core.expression import EvaluationError, billable
from .core.outcome import Outcome, settle_usage
from .core.redact import redact_outcome
from .core.request import RequestContext
from .core.stream_meter import StreamMeter
from .core.usage import parse_json
from .meter import Meter

logger = logging.getLogger(__name__)


class Consumer(Protocol):
    def settled(self, rc: RequestContext, outcome: Outcome) -> None: ...


class Settle:
    def __init__(self, *consumers: Consumer, tokenizer: BackendTokenizer | None = None) -> None:
        self.consumers = consumers
        self.tokenizer = tokenizer  # counts what responses without usage cost

    def response(self, flow: http.HTTPFlow) -> None:
        self.settle(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.settle(flow)

    def settle(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if rc is None or rc.backend is None or rc.outcome is not None \
                or not rc.protocol.billed:  # e.g. Anthropic's token counting
            return
        if rc.meter is None and flow.response is not None:
            # Not streamed through us (a saved flow replayed offline): meter the stored
            # body, plus the usage chunk we had kept from the client.
            rc.meter = Meter.meter_for(flow, rc)
            hidden = flow.metadata.get(context.METADATA_KEY, {}).get("hidden", "")
            rc.meter(flow.response.raw_content or b"")
            rc.meter(hidden.encode())
            rc.meter(b"")
        rc.outcome = redact_outcome(outcome(flow, rc), rc.secrets)  # errors may quote a key
        if self.tokenizer is not None and self.tokenizer.wants(rc, rc.outcome):
            # No usage came: the backend counts it, off the stream's path; settled then.
            self.tokenizer.count_later(rc, rc.outcome, lambda counted: self.feed(flow, rc, counted))
        else:
            self.feed(flow, rc, rc.outcome)

    def feed(self, flow: http.HTTPFlow, rc: RequestContext, result: Outcome) -> None:
        """Hand the flow's final outcome to every consumer, once."""
        rc.outcome = result
        context.summarize(flow, **_summary(rc))
        for consumer in self.consumers:
            try:
                consumer.settled(rc, result)
            except Exception:  # one consumer's bug must not cost the others their outcome
                logger.exception(f"{type(consumer).__name__} failed to settle {rc.event_id}")


def outcome(flow: http.HTTPFlow, ctx: RequestContext) -> Outcome:
    status = flow.response.status_code if flow.response else None
    error = flow.error.msg if flow.error else None
    meter = ctx.meter
    if meter is None:
        return Outcome(status=status, usage=None, error=error or "no response")
    meter.close()
    tracker = meter.tracker
    common: dict[str, Any] = dict(
        status=status, complete=tracker.finished, error=tracker.error or error,
        response_bytes=meter.response_bytes, timings=tracker.timings,
        usage_anomaly=tracker.usage_anomaly)
    if status is None or status >= 400:
        return Outcome(usage=None, **common)
    usage, method = settle_usage(tracker, ctx.prompt_tokens)
    if ctx.route.metering is not None:
        common["metered"], common["metering_error"] = _evaluate(flow, ctx, meter, status)
    return Outcome(usage=usage, estimated=method is not None, estimate_method=method, **common)


def _evaluate(flow: http.HTTPFlow, ctx: RequestContext, meter: StreamMeter,
              status: int) -> tuple[int | float | None, str | None]:
    """The route's metering expression over this response."""
    expression = ctx.route.metering
    assert expression is not None
    if meter.body_overflow and "allData" in expression.variables:
        return None, f"response larger than max_body_bytes ({ctx.route.max_body_bytes})"
    body = meter.body
    env = {
        "allData": body.decode("utf-8", "replace"),
        "lastChunk": meter.last_chunk.decode("utf-8", "replace"),
        "respBody": None if meter.sse else parse_json(body),
        "status": status, "responseBytes": meter.response_bytes,
        "requestBytes": ctx.request_bytes, "path": ctx.path, "method": flow.request.method,
        "userID": ctx.caller.user_id, "planID": ctx.plan_id, "keyID": str(ctx.caller.key_id),
    }
    try:
        return billable(expression.evaluate(env)), None
    except EvaluationError as e:
        return None, str(e)


def _summary(ctx: RequestContext) -> dict[str, Any]:
    result = ctx.outcome
    assert result is not None
    summary: dict[str, Any] = {
        "status": result.status,
        "usage": result.usage.as_document() if result.usage else None,
        "usage_estimated": result.estimated,
    }
    if ctx.meter is not None and ctx.meter.hidden:
        summary["hidden"] = ctx.meter.hidden.decode("utf-8", "replace")
    if result.metered is not None or result.metering_error:
        summary["metered"] = result.metered
    return summary
