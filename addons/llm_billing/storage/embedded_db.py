"""The embedded default database: a mongoeco wire server in its own process.

``python -m llm_billing.storage.embedded_db --data-dir DIR --port N`` serves MongoDB's wire
protocol from a SQLite file; pymongo reaches it over TCP like any MongoDB, so a real
server replaces it by URI alone. ``start_embedded_db`` reuses one already listening on
the port (another proxy instance's) or starts a child process that dies with its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PORT = 27117
DB_FILENAME = "billing.sqlite3"
# Inserted without a change record (mongoeco_fast.py): the proxy's event collections,
# written by its event writer only and watched by nobody. ``--record-event-changes``
# records them again, for a ``watch()`` on them.
UNRECORDED_COLLECTIONS = frozenset({"billing.events_completion", "billing.events_failed"})


def _fast_insert_engine(path: str, unrecorded_collections: frozenset[str] = frozenset()):
    from mongoeco.engines.sqlite import SQLiteEngine, id_contains_numeric_value

    class FastInsertSQLiteEngine(SQLiteEngine):
        """mongoeco 4.11 scans the whole collection to check each inserted ``_id`` for
        numeric equality (1 == 1.0). An ObjectId or string ``_id`` cannot equal a number,
        so the indexed storage-key check suffices and inserts stay flat as data grows.

        ``unrecorded_collections`` ("db.collection"): their ``insert`` commands write no
        change record, so a ``watch()`` does not see those inserts (mongoeco_fast.py)."""

        def __init__(self, path: str, unrecorded_collections: frozenset[str]) -> None:
            super().__init__(path)
            self.unrecorded_collections = unrecorded_collections

        def _validate_document_against_unique_indexes(self, db_name, coll_name, document,
                                                      **kwargs):
            if kwargs.get("scan_payload_id") and not id_contains_numeric_value(
                document.get("_id")
            ):
                kwargs["scan_payload_id"] = False
            return super()._validate_document_against_unique_indexes(
                db_name, coll_name, document, **kwargs
            )

    return FastInsertSQLiteEngine(path, unrecorded_collections)


async def serve(data_dir: Path, host: str, port: int, record_event_changes: bool = False) -> None:
    from . import mongoeco_changes, mongoeco_fast, mongoeco_wire

    mongoeco_fast.install()
    mongoeco_wire.install()  # and its DriverWireServer: what mongosh needs
    mongoeco_changes.install()  # and its ChangeStreamWireServer: watch() over the wire
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = _fast_insert_engine(
        str(data_dir / DB_FILENAME),
        frozenset() if record_event_changes else UNRECORDED_COLLECTIONS,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with mongoeco_changes.ChangeStreamWireServer(engine=engine, host=host,
                                                       port=port) as server:
        address = server.address
        print(f"embedded MongoDB ready on mongodb://{address.host}:{address.port}", flush=True)
        await stop.wait()


def uri_for(port: int, host: str = "127.0.0.1") -> str:
    return f"mongodb://{host}:{port}/?directConnection=true"


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _die_with_parent() -> None:
    # Linux: SIGTERM the database if the proxy that started it dies, even by SIGKILL.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_embedded_db(
    data_dir: Path, port: int = DEFAULT_PORT, timeout: float = 30.0, own_session: bool = False
) -> tuple[str, subprocess.Popen | None]:
    """URI of the embedded database, starting it if nothing listens on ``port``.

    Returns the process when this call started it (the caller stops it), else None.
    ``own_session``: out of the terminal's process group, so a Ctrl-C reaches only the
    caller, which stops the database after the processes that still write to it.
    """
    if is_listening(port):
        return uri_for(port), None
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_billing.storage.embedded_db",
         "--data-dir", str(data_dir), "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        start_new_session=own_session,
    )
    deadline = time.monotonic() + timeout
    while not is_listening(port):
        if process.poll() is not None:
            raise RuntimeError(f"embedded database exited with code {process.returncode}")
        if time.monotonic() > deadline:
            process.terminate()
            raise RuntimeError(f"embedded database did not listen on port {port}")
        time.sleep(0.05)
    return uri_for(port), process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--record-event-changes", action="store_true",
                        help="change records for inserted events too (for a watch() on them)")
    args = parser.parse_args()
    asyncio.run(serve(args.data_dir, args.host, args.port, args.record_event_changes))


if __name__ == "__main__":
    main()
