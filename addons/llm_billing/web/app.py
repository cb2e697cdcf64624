"""The web face's ASGI app: one Starlette application, its routes mounted by concern.

``build(database, settings, health)`` is what llm_billing_proxy.py serves. Each area
lives in its own module and contributes routes: health.py (``/health``), and — as they
are built — metrics, docs, portal.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from ..settings import Settings
from ..storage.database import Database
from .health import Health


def build(database: Database, settings: Settings, health: Health,
          extra: list[BaseRoute] | None = None) -> Starlette:
    routes: list[BaseRoute] = [*health.routes(), *(extra or [])]
    return Starlette(routes=routes)
