"""``/health``: ``{"status":"ok"}`` while the database answers and the event writer keeps
up; 503 with the reasons when not. Cheap: a status refreshed in the background every
``HEALTH_INTERVAL`` seconds, never a query per call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from pymongo.errors import PyMongoError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..storage.database import Database

if TYPE_CHECKING:
    from ..eventlog import EventLog

logger = logging.getLogger(__name__)

HEALTH_INTERVAL = 2.0
MAX_BACKLOG = 10_000  # events queued or in flight before the writer counts as behind


class Health:
    """Addon (background check) and route provider."""

    def __init__(self, database: Database, event_log: EventLog) -> None:
        self.database = database
        self.event_log = event_log
        self.problems: list[str] = ["starting"]
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check(self) -> None:
        problems = []
        try:
            client = await self.database.client()
            await asyncio.wait_for(client.admin.command("ping"), HEALTH_INTERVAL)
        except (PyMongoError, TimeoutError) as e:
            problems.append(f"database unreachable ({type(e).__name__})")
        backlog = self.event_log.backlog()
        if backlog > MAX_BACKLOG:
            problems.append(f"event writer behind: {backlog} events waiting")
        if problems != self.problems and problems:
            logger.warning(f"Unhealthy: {'; '.join(problems)}")
        self.problems = problems

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a bug must not leave a stale "ok"
                logger.exception("Health check failed")
                self.problems = ["health check failed"]
            await asyncio.sleep(HEALTH_INTERVAL)

    def routes(self) -> list[Route]:
        return [Route("/health", self.endpoint)]

    async def endpoint(self, request: Request) -> JSONResponse:
        if self.problems:
            return JSONResponse({"status": "unavailable", "problems": self.problems}, 503)
        return JSONResponse({"status": "ok"})
