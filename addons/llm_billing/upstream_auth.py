"""Upstream credentials: on the request only while it is being sent, redacted otherwise.

mitmproxy shows a flow to observers (mitmweb's view, dumpers, savers) in their own hooks
and again in the ``update`` hook it fires after every flow hook. So:

- ``UpstreamCredentials`` sits at the very end of the addon chain (the entry script puts it
  there) and attaches the credential in ``request`` and ``update`` — after every observer
  has seen the flow, just before mitmproxy sends it.
- ``CredentialRedactor`` sits early and replaces it with a placeholder in ``update``
  (before the observers' turn), ``responseheaders`` and ``error``.

So no pushed update, log line or saved flow ever holds the key. Upstream keys come from
the environment only (see ``config.UpstreamAuth``).
"""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy import flow as mflow
from mitmproxy import http

from . import context
from .core.config import UpstreamAuth

REDACTED = "<redacted>"


def apply_credential(request: http.Request, auth: UpstreamAuth, value: str) -> None:
    if auth.type == "bearer":
        request.headers["authorization"] = f"Bearer {value}"
    elif auth.type == "header":
        request.headers[auth.name] = value
    elif auth.type == "query":
        request.query[auth.name] = value


def _credentialed(flow: mflow.Flow) -> tuple[http.HTTPFlow, UpstreamAuth] | None:
    if not isinstance(flow, http.HTTPFlow):
        return None
    ctx = context.of(flow)
    if ctx is None or ctx.backend is None or ctx.backend.auth.value is None:
        return None
    return flow, ctx.backend.auth


class UpstreamCredentials:
    name = "llm_billing_upstream_credentials"

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = context.of(flow)
        if flow.response is None and ctx is not None and ctx.backend is not None \
                and not ctx.replayed:
            ctx.sending = True
            self._attach(flow)

    def update(self, flows: Sequence[mflow.Flow]) -> None:
        for flow in flows:
            ctx = context.of(flow) if isinstance(flow, http.HTTPFlow) else None
            if ctx is not None and ctx.sending:
                self._attach(flow)

    @staticmethod
    def _attach(flow: http.HTTPFlow) -> None:
        if found := _credentialed(flow):
            _, auth = found
            assert auth.value is not None
            apply_credential(flow.request, auth, auth.value)


class CredentialRedactor:
    def update(self, flows: Sequence[mflow.Flow]) -> None:
        for flow in flows:
            self._redact(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._sent(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._sent(flow)

    def _sent(self, flow: http.HTTPFlow) -> None:
        if (ctx := context.of(flow)) is not None:
            ctx.sending = False
        self._redact(flow)

    @staticmethod
    def _redact(flow: mflow.Flow) -> None:
        if not (found := _credentialed(flow)):
            return
        request, auth = found[0].request, found[1]
        present = (
            request.query.get(auth.name) if auth.type == "query"
            else request.headers.get("authorization" if auth.type == "bearer" else auth.name)
        )
        if present is not None:
            apply_credential(request, auth, REDACTED)
