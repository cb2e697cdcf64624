"""JSON instead of mitmproxy's HTML for the errors the proxy core answers itself.

When the upstream cannot be reached, mitmproxy's HTTP layer writes its own error page
after the ``error`` hook; no addon hook can replace it. The SDKs want JSON, so we swap the
page builder once at load. The body reads as an OpenAI error and as an Anthropic error at
the same time (top-level ``type: "error"``), and it never echoes the upstream address.
"""

from __future__ import annotations

import json

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1, _http2

_PUBLIC_MESSAGES = {
    502: "The upstream server is unavailable.",
    503: "The upstream server is unavailable.",
    504: "The upstream server did not respond in time.",
}


def proxy_error_body(status_code: int, message: str) -> bytes:
    text = _PUBLIC_MESSAGES.get(status_code, message or "Proxy error.")
    kind = "api_error" if status_code >= 500 else "invalid_request_error"
    return json.dumps({
        "type": "error",
        "error": {"message": text, "type": kind, "param": None, "code": "upstream_error"
                  if status_code >= 500 else None},
    }).encode()


def _make_error_response(status_code: int, message: str = "") -> bytes:
    response = http.Response.make(
        status_code, proxy_error_body(status_code, message),
        http.Headers(Server=version.MITMPROXY, Connection="close",
                     Content_Type="application/json"),
    )
    return http1.assemble_response(response)


def install() -> None:
    _http1.make_error_response = _make_error_response
    _http2.format_error = proxy_error_body
