"""The events CSV export (up to 50,000 rows) is streamed a database batch at a time, and
the event loop runs other work between two batches (the proxy's streams share it)."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import math
import uuid
from datetime import UTC, datetime, timedelta

from pymongo import AsyncMongoClient
from starlette.requests import Request
from starlette.responses import StreamingResponse

from llm_billing.web.portal import admin
from llm_billing.web.portal.admin import EVENT_COLUMNS, AdminPages

BATCH = 20  # instead of 500: fewer events to insert
EVENTS = 2 * BATCH + 17


class FixedDatabase:
    def __init__(self, client: AsyncMongoClient) -> None:
        self._client = client

    async def client(self) -> AsyncMongoClient:
        return self._client


def get(path: str, query: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "headers": [],
                    "query_string": query.encode()})


def test_events_csv_is_streamed_in_batches_that_let_the_loop_run(mongo_uri: str, monkeypatch):
    monkeypatch.setattr(admin, "BATCH", BATCH)
    user = f"csv-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC).replace(microsecond=0)

    async def run() -> tuple[StreamingResponse, list[str], list[int]]:
        client = AsyncMongoClient(mongo_uri, tz_aware=True)
        events = client.billing.events_completion
        try:
            await events.insert_many([
                {"user_id": user, "model": "=cmd", "date_created": now - timedelta(seconds=i),
                 "prompt_n": i, "completion_n": 1, "tokens_billed": i + 1, "status": 200}
                for i in range(EVENTS)])
            pages = AdminPages(FixedDatabase(client), None)  # type: ignore[arg-type]
            endpoint = AdminPages.events.__wrapped__  # past the login check
            response = await endpoint(pages, get("/portal/events", f"user={user}&format=csv"))
            ticks = 0

            async def ticker() -> None:  # counts the loop's turns given to others
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            chunks, ticks_at = [], []
            async for chunk in response.body_iterator:
                chunks.append(chunk)
                ticks_at.append(ticks)
            task.cancel()
            return response, chunks, ticks_at
        finally:
            await events.delete_many({"user_id": user})
            await client.close()

    response, chunks, ticks_at = asyncio.run(run())
    assert isinstance(response, StreamingResponse)
    assert "content-length" not in response.headers
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="events.csv"'
    assert len(chunks) == 1 + math.ceil(EVENTS / BATCH)  # the header, then one per batch
    assert all(b > a for a, b in itertools.pairwise(ticks_at)), ticks_at
    rows = list(csv.reader(io.StringIO("".join(chunks))))
    assert rows[0] == list(EVENT_COLUMNS)
    assert len(rows) == 1 + EVENTS
    column = {name: i for i, name in enumerate(EVENT_COLUMNS)}
    assert [int(r[column["prompt_n"]]) for r in rows[1:]] == list(range(EVENTS))  # newest first
    assert {r[column["model"]] for r in rows[1:]} == {"'=cmd"}  # still not a formula
