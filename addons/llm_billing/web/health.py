"""``/health``: ``{"status":"ok"}`` while the database answers and the event writer keeps
up; 503 with the reasons when not. Cheap: a status refreshed in the background every
``HEALTH_INTERVAL`` seconds, never a query per call.

The writer keeps up while few events wait in memory and the journal holds few segment
files: each file holds events not yet stored, or whose usage is not yet written, or left
by a stopped proxy and not yet replayed (``health_max_journal_files``)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from mitmproxy import ctx
from pymongo.errors import PyMongoError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import background
from ..storage.database import Database

if TYPE_CHECKING:
    from ..eventlog import EventLog

logger = logging.getLogger(__name__)

HEALTH_INTERVAL = 2.0
MAX_BACKLOG = 10_000  # events queued or in flight before the writer counts as behind
MAX_JOURNAL_FILES = 20  # the open segment, and a few waiting for their usage write


class Health:
    """Addon (background check) and route provider."""

    def __init__(self, database: Database, event_log: EventLog) -> None:
        self.database = database
        self.event_log = event_log
        self.problems: list[str] = ["starting"]
        self._task: asyncio.Task | None = None
        self.max_journal_files = MAX_JOURNAL_FILES

    def load(self, loader) -> None:
        loader.add_option(
            "health_max_journal_files", int, MAX_JOURNAL_FILES,
            "Journal segment files (events not yet stored, or their usage not yet written) "
            "above which /health answers 503.")

    def configure(self, updated: set[str]) -> None:
        if "health_max_journal_files" in updated:
            self.max_journal_files = ctx.options.health_max_journal_files

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def done(self) -> None:
        await background.stop(self._task)

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
        journal = self.event_log.journal
        if journal is not None and (files := journal.files()) > self.max_journal_files:
            problems.append(f"journal backlog: {files} segment files not finished")
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
