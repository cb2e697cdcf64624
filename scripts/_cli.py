"""Shared plumbing of the CLI scripts: import path and a database to talk to."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

from llm_billing.storage.embedded_db import DEFAULT_PORT, start_embedded_db  # noqa: E402


@contextlib.contextmanager
def database_uri(data_dir: Path | None = None, port: int = DEFAULT_PORT) -> Iterator[str]:
    """``MONGODB_URI``, else the embedded database (started for the script if not running)."""
    if uri := os.environ.get("MONGODB_URI"):
        yield uri
        return
    data_dir = data_dir or Path(os.environ.get("LLM_BILLING_DATA_DIR", ROOT / "data"))
    uri, process = start_embedded_db(data_dir, port)
    try:
        yield uri
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
