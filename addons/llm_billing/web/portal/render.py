"""Rendering portal pages: Jinja2 templates (autoescaped), with what every page needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from .session import csrf_token

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")


def render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    account = getattr(request.state, "account", None)
    return templates.TemplateResponse(request, template, {
        "csrf": csrf_token(request), "account": account, **context}, status_code=status)
