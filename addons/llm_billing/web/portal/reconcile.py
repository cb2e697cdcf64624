"""The Stripe reconciliation page (admins): per user and month, the overage recorded, put
in the outbox and reported to Stripe — what ``scripts/billing.py stripe-reconcile``
prints, from the same function (core/reconcile.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

from ...core import reconcile
from ...core.dates import month_of
from ...storage.database import Database
from .admin import csv_response
from .render import render
from .session import requires
from .usage import MONTH


class ReconcilePage:
    def __init__(self, database: Database) -> None:
        self.database = database

    @requires("admin")
    async def reconcile(self, request: Request) -> Response:
        month = request.query_params.get("month", "")
        if not MONTH.fullmatch(month):
            month = month_of(datetime.now(UTC))
        client = await self.database.client()
        rows = reconcile.reconcile(
            await client.billing.usage.find(reconcile.usage_query(month)).to_list(),
            await client.billing.stripe_outbox.find(reconcile.outbox_query(month)).to_list())
        if request.query_params.get("format") == "csv":
            return csv_response(f"stripe-reconcile-{month}.csv", list(reconcile.COLUMNS),
                                [row.cells() for row in rows])
        return render(request, "reconcile.html", rows=rows, month=month)
