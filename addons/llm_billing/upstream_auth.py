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

An upstream may quote a key back (``Incorrect API key provided: sk-…``). So an error
response (status >= 400) is not streamed: ``UpstreamCredentials.responseheaders`` — after
the meter set its stream — holds its body until complete and passes it on decoded, with
every configured secret and the client's token redacted (core/redact.py); its headers and
reason are redacted at once. The redactor's ``error`` redacts the flow's error message;
Settle redacts the error text it records (events, journal, log).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

from mitmproxy import flow as mflow
from mitmproxy import http

from . import context
from .core.config import UpstreamAuth
from .core.decoding import decoder_for
from .core.redact import HeldErrorBody, Redactor

REDACTED = "<redacted>"


def apply_credential(headers: MutableMapping[str, str], query: MutableMapping[str, str],
                     auth: UpstreamAuth, value: str) -> None:
    """Put the credential where the backend wants it: a request's headers or query (a
    flow's, or a call of the proxy's own to the backend)."""
    if auth.type == "bearer":
        headers["authorization"] = f"Bearer {value}"
    elif auth.type == "header":
        headers[auth.name] = value
    elif auth.type == "query":
        query[auth.name] = value


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

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = context.of(flow)
        if ctx is not None and ctx.meter is not None and flow.response is not None \
                and flow.response.status_code >= 400 and flow.response.stream is ctx.meter:
            hold_error_body(flow, ctx)

    @staticmethod
    def _attach(flow: http.HTTPFlow) -> None:
        if found := _credentialed(flow):
            _, auth = found
            assert auth.value is not None
            apply_credential(flow.request.headers, flow.request.query, auth, auth.value)


class CredentialRedactor:
    def update(self, flows: Sequence[mflow.Flow]) -> None:
        for flow in flows:
            self._redact(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._sent(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._sent(flow)
        if flow.error is not None and (ctx := context.of(flow)) is not None:
            flow.error.msg = Redactor(ctx.secrets).text(flow.error.msg)

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
            apply_credential(request.headers, request.query, auth, REDACTED)


def hold_error_body(flow: http.HTTPFlow, ctx: context.RequestContext) -> None:
    """An upstream's error goes on whole once complete, decoded and redacted."""
    response = flow.response
    assert response is not None and ctx.meter is not None
    redactor = Redactor(ctx.secrets)
    response.reason = redactor.text(response.reason)
    response.headers.fields = tuple((name, redactor(value))
                                    for name, value in response.headers.fields)
    headers = response.headers
    try:
        decode = decoder_for(headers.get("content-encoding", ""))
    except KeyError:  # an encoding we cannot read: redacted as it is
        decode = None
    else:
        headers.pop("content-encoding", None)  # passed on decoded
    headers.pop("content-length", None)  # redaction may change the length
    if flow.request.http_version == "HTTP/1.1" and "transfer-encoding" not in headers:
        headers["transfer-encoding"] = "chunked"
    response.stream = HeldErrorBody(ctx.meter, redactor, decode)
