"""Upstream credentials: attached as late as possible, redacted as early as possible.

``UpstreamCredentials`` must run after every observer of the ``request`` hook (mitmweb's
view, dumpers), so the entry script adds it at the end of the master's addon chain.
``CredentialRedactor`` runs early in ``responseheaders``/``error`` — by then the request
has been sent — and puts a placeholder back, so saved flows, logs and mitmweb never hold
the key. Upstream keys come from the environment only (see ``config.UpstreamAuth``).
"""

from __future__ import annotations

from mitmproxy import http

from . import context
from .config import UpstreamAuth

REDACTED = "<redacted>"


def apply_credential(request: http.Request, auth: UpstreamAuth, value: str) -> None:
    if auth.type == "bearer":
        request.headers["authorization"] = f"Bearer {value}"
    elif auth.type == "header":
        request.headers[auth.name] = value
    elif auth.type == "query":
        request.query[auth.name] = value


class UpstreamCredentials:
    name = "llm_billing_upstream_credentials"

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = context.of(flow)
        if flow.response or ctx is None or ctx.backend is None:
            return
        auth = ctx.backend.auth
        if auth.value is not None:
            apply_credential(flow.request, auth, auth.value)


class CredentialRedactor:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    def _redact(self, flow: http.HTTPFlow) -> None:
        ctx = context.of(flow)
        if ctx is None or ctx.backend is None or ctx.backend.auth.value is None:
            return
        auth = ctx.backend.auth
        current = (
            flow.request.query.get(auth.name) if auth.type == "query"
            else flow.request.headers.get("authorization" if auth.type == "bearer" else auth.name)
        )
        if current is not None:
            apply_credential(flow.request, auth, REDACTED)
