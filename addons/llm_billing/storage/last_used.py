"""When each API key was last used, written in the background.

KeyAuth notes ``key id → time`` in memory on every authenticated request (no database
wait on the request path); every ``FLUSH_SECONDS`` the newest times are written to
``cgc.api_keys`` as ``date_last_used`` with ``$max`` bulk updates, so instances and late
flushes never move it back. A failed flush keeps the times for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any

from pymongo import UpdateOne
from pymongo.errors import PyMongoError

from .. import background
from .database import Database

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 2.0
SHUTDOWN_FLUSH_TIMEOUT = 5.0


class KeysLastUsed:
    def __init__(self, database: Database, interval: float = FLUSH_SECONDS) -> None:
        self.database = database
        self.interval = interval
        self._pending: dict[Any, datetime] = {}
        self._task: asyncio.Task | None = None

    def note(self, key_id: Any, at: datetime) -> None:
        """A request used ``key_id`` at ``at``: memory only."""
        if (seen := self._pending.get(key_id)) is None or at > seen:
            self._pending[key_id] = at

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await background.stop(self._task)
        self._task = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), SHUTDOWN_FLUSH_TIMEOUT)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:  # a bug must not end the flushes for the process's lifetime
                logger.exception("Writing keys' last use failed")

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            client = await self.database.client()
            await client.cgc.api_keys.bulk_write(
                [UpdateOne({"_id": key_id}, {"$max": {"date_last_used": at}})
                 for key_id, at in pending.items()], ordered=False)
        except PyMongoError as e:
            logger.warning(f"Keys' last use not written ({type(e).__name__}); retried")
            for key_id, at in pending.items():
                self.note(key_id, at)
