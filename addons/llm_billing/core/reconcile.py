"""Stripe reconciliation (sans-I/O): per user and month, the overage tokens recorded
(``billing.usage`` ``overage_tokens``), put in the outbox (``outboxed_tokens``) and
reported to Stripe (``billing.stripe_outbox`` items with status ``sent``). Shared by
``scripts/billing.py stripe-reconcile`` and the portal's reconciliation page.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

COLUMNS = ("month", "user", "overage_recorded", "in_outbox", "reported_to_stripe",
           "not_yet_reported", "state", "detail")
# Outbox states after a failed attempt (stripe_reporter.py): retried with backoff.
FAILED_STATES = ("retry", "no_customer")


@dataclass(frozen=True, slots=True)
class Reconciled:
    month: str
    user_id: str
    recorded: int
    outboxed: int
    reported: int
    state: str  # ok | pending | failing
    detail: str  # why failing: the last error, or over-reported

    @property
    def not_reported(self) -> int:
        return self.recorded - self.reported

    def cells(self) -> list[Any]:
        return [self.month, self.user_id, self.recorded, self.outboxed, self.reported,
                self.not_reported, self.state, self.detail]


def usage_query(month: str) -> dict[str, Any]:
    """The ``billing.usage`` documents to reconcile: the month's with overage."""
    return {"month": month, "overage_tokens": {"$gt": 0}}


def outbox_query(month: str) -> dict[str, Any]:
    return {"month": month}


def reconcile(usage_docs: Iterable[dict[str, Any]],
              outbox_items: Iterable[dict[str, Any]]) -> list[Reconciled]:
    """One row per usage document with overage, sorted by month and user. ``ok``: all
    recorded overage reached Stripe; ``failing``: an unsent item's last attempt failed, or
    Stripe got more than was recorded; ``pending``: the rest is on its way."""
    sent: dict[tuple[str, str], int] = {}
    failure: dict[tuple[str, str], str] = {}
    for item in outbox_items:
        at = (str(item.get("month")), str(item.get("user_id")))
        if item.get("status") == "sent":
            sent[at] = sent.get(at, 0) + int(item.get("value") or 0)
        elif item.get("status") in FAILED_STATES:
            failure[at] = str(item.get("error") or item["status"])[:200]
    rows = []
    for doc in usage_docs:
        month = str(doc.get("month") or str(doc.get("_id", "")).rpartition(":")[2])
        at = (month, str(doc.get("user_id")))
        recorded = int(doc.get("overage_tokens") or 0)
        reported = sent.get(at, 0)
        if reported > recorded:
            state, detail = "failing", "over-reported"
        elif reported == recorded:
            state, detail = "ok", ""
        elif at in failure:
            state, detail = "failing", failure[at]
        else:
            state, detail = "pending", ""
        rows.append(Reconciled(month, at[1], recorded, int(doc.get("outboxed_tokens") or 0),
                               reported, state, detail))
    return sorted(rows, key=lambda row: (row.month, row.user_id))
