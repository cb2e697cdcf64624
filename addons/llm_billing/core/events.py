"""Billing events as stored in MongoDB (pure: context and outcome in, documents out).

``billing.events_completion`` follows seed 002's contract: the six fields ``date_created``,
``user_id``, ``api_key_id``, ``model``, ``prompt_n``, ``completion_n`` keep their names and
types; the rest is ours. Requests the upstream failed go to ``billing.events_failed``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .money import as_decimal128
from .outcome import PROMPT_ESTIMATE, Outcome
from .prices import PriceTable
from .request import RequestContext
from .usage import Usage

UNFINISHED = (f"proxy stopped before the response finished: prompt estimated "
              f"({PROMPT_ESTIMATE}), output unknown")


def _common(ctx: RequestContext, result: Outcome, finished: datetime) -> dict[str, Any]:
    assert ctx.backend is not None
    doc: dict[str, Any] = {
        "_id": ctx.event_id,
        "date_created": finished,
        "user_id": ctx.caller.user_id,
        "api_key_id": ctx.caller.key_id,
        "model": ctx.model,
    }
    doc.update({
        "backend": ctx.backend.name,
        "path": ctx.path,
        "plan_id": ctx.plan_id,
        "stream": ctx.stream,
        "status": result.status,
        "duration_ms": round((finished.timestamp() - ctx.started) * 1000),
    })
    if result.error:
        doc["error"] = result.error
    if ctx.ledger is not None:
        doc["ledger"] = dict(ctx.ledger)
    return doc


def tokens_billed(ctx: RequestContext, result: Outcome) -> int | float:
    """What a request counts against quotas: the route's metering expression's value when
    it has one that evaluated, else every token the provider reported."""
    if result.usage is None:
        return 0
    if ctx.route.metering is not None and result.metered is not None:
        return result.metered
    return result.usage.total_tokens


def completion_event(ctx: RequestContext, result: Outcome, prices: PriceTable,
                     finished: datetime | None = None) -> dict[str, Any]:
    """The completion event of a billed request."""
    assert result.usage is not None
    finished = finished or datetime.now(UTC)
    usage = result.usage
    doc = _common(ctx, result, finished)
    doc |= {
        "prompt_n": usage.prompt_tokens,
        "completion_n": usage.completion_tokens,
        "usage": usage.as_document(),
        "usage_estimated": result.estimated,
        "complete": result.complete,
        "tokens_billed": tokens_billed(ctx, result),
    }
    if result.estimate_method:
        doc["estimate_method"] = result.estimate_method
    if result.usage_anomaly:
        doc["usage_anomaly"] = result.usage_anomaly
    if result.timings is not None:
        doc["timings"] = result.timings
    if ctx.route.metering is not None:
        doc["metering"] = {"expression": ctx.route.metering.source, "value": result.metered}
        if result.metering_error:
            doc["metering"]["error"] = result.metering_error
    price, cost = prices.price_for(ctx.model), event_cost(ctx, result, prices)
    if price is not None and cost is not None:
        doc |= {"cost": as_decimal128(cost), "currency": prices.currency,
                "price": price.as_document(), "price_version": prices.version}
    return doc


def event_cost(ctx: RequestContext, result: Outcome, prices: PriceTable) -> Decimal | None:
    """What a billed request costs in ``prices.currency``; None when its model has no price."""
    price = prices.price_for(ctx.model)
    if price is None or result.usage is None:
        return None
    cost = None
    if ctx.route.metering is not None and result.metered is not None:
        cost = price.unit_cost(Decimal(str(result.metered)))
    return price.cost(result.usage) if cost is None else cost


def failure_event(ctx: RequestContext, result: Outcome,
                  finished: datetime | None = None) -> dict[str, Any]:
    """The record of a request the upstream failed (nothing billed)."""
    return _common(ctx, result, finished or datetime.now(UTC))


def intent_event(ctx: RequestContext, prices: PriceTable) -> dict[str, Any]:
    """What a request is billed if the proxy stops before recording its real outcome:
    its prompt, estimated. Journaled when the request goes upstream; stored only then."""
    outcome = Outcome(status=None, usage=Usage(prompt_tokens=ctx.prompt_tokens),
                      estimated=True, estimate_method=UNFINISHED, error=UNFINISHED)
    return completion_event(ctx, outcome, prices,
                            finished=datetime.fromtimestamp(ctx.started, UTC))
