"""Database addon: one async pymongo client for the other addons.

``MONGODB_URI`` (or ``--set mongodb_uri=...``) picks a real MongoDB; without it the
embedded mongoeco server is started in its own process, so database work never runs on
the proxy's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path

from mitmproxy import ctx, exceptions
from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure

from .. import background
from . import indexes
from .embedded_db import DEFAULT_PORT, start_embedded_db
from .monitor import DatabaseMonitor

logger = logging.getLogger(__name__)


class Database:
    def __init__(self) -> None:
        self._client: AsyncMongoClient | None = None
        self._ready = asyncio.Event()
        self._embedded: subprocess.Popen | None = None
        self._failure: str | None = None
        self._indexes: asyncio.Task | None = None  # indexes.ensure, in the background
        self.monitor = DatabaseMonitor()  # failures the driver saw (the metrics)

    def load(self, loader) -> None:
        loader.add_option(
            "mongodb_uri", str, os.environ.get("MONGODB_URI", ""),
            "MongoDB URI; empty starts the embedded database (env: MONGODB_URI).",
        )
        loader.add_option(
            "billing_data_dir", str, os.environ.get("LLM_BILLING_DATA_DIR", "data"),
            "Directory of the embedded database's SQLite file.",
        )
        loader.add_option(
            "embedded_db_port", int, DEFAULT_PORT, "Loopback port of the embedded database."
        )
        # pymongo logs every command and server check at DEBUG, as JSON: with the key
        # watcher's getMore each second that flooded mitmweb's event log (and debug
        # terminal logs) with lines no operator reads. Its warnings still show.
        logging.getLogger("pymongo").setLevel(logging.INFO)

    def configure(self, updated: set[str]) -> None:
        if "embedded_db_port" in updated and not 0 < ctx.options.embedded_db_port < 65536:
            raise exceptions.OptionsError("embedded_db_port must be a TCP port number")

    async def running(self) -> None:
        try:
            uri = ctx.options.mongodb_uri
            if not uri:
                data_dir = Path(ctx.options.billing_data_dir)
                uri, self._embedded = await asyncio.to_thread(
                    start_embedded_db, data_dir, ctx.options.embedded_db_port
                )
                logger.info(f"Embedded MongoDB (mongoeco) on {uri}, data in {data_dir}/")
            self._client = AsyncMongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=5000,
                                            event_listeners=[self.monitor])
            self._indexes = asyncio.create_task(indexes.ensure(self._client))
        except Exception as e:  # requests get 503s instead of waiting forever
            self._failure = f"database unavailable: {e}"
            logger.error(f"Cannot start the database: {e}")
        finally:
            self._ready.set()

    async def client(self) -> AsyncMongoClient:
        """The client, once ``running`` has connected it."""
        await self._ready.wait()
        if self._client is None:
            raise ConnectionFailure(self._failure or "database not started")
        return self._client

    async def done(self) -> None:
        await background.stop(self._indexes)
        if self._client is not None:
            await self._client.close()
        if self._embedded is not None:
            self._embedded.terminate()
            await asyncio.to_thread(self._embedded.wait, 10)
