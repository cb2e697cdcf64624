"""WebApp addon: answers the web face's paths with an ASGI app, inside mitmproxy.

mitmproxy's own convention (``mitmproxy.addons.asgiapp``) serves an app for a host; the
billing proxy runs in reverse mode, where every request names the same (unused) reverse
target, so this addon matches by path prefix instead and hands the flow to
``asgiapp.serve``. It runs before the Router (which answers unknown paths with 404), and
KeyAuth has already stripped any client key from the request (first hook).

Everything the app does is async (pymongo's async client), so a page never stalls the
streams that share the event loop. Parsing a form is not (python-multipart, on the loop):
a request body over ``MAX_BODY`` gets 413 before the app sees it — 120 MB of ``&`` took
43 s of the loop to parse (1 MB: 0.4 s). Once answered, a form's body (passwords) and the session
cookie are dropped from the flow, so flow files and mitmweb do not keep them.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.addons import asgiapp

PREFIXES = ("/portal", "/docs", "/health", "/metrics", "/static")
MAX_BODY = 16 * 1024  # the portal's largest form is a few hundred bytes; 7 ms to parse


def is_web_path(path: str) -> bool:
    path = path.partition("?")[0]
    return any(path == p or path.startswith(p + "/") for p in PREFIXES)


class WebApp:
    def __init__(self, app) -> None:
        self.app = app  # an ASGI app (see app.py)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live or flow.error or not is_web_path(flow.request.path):
            return
        if len(flow.request.raw_content or b"") > MAX_BODY:
            flow.response = http.Response.make(413, b"Request body too large",
                                               {"content-type": "text/plain"})
            return
        await asgiapp.serve(self.app, flow)
        if flow.request.raw_content:
            flow.request.content = b""
        flow.request.headers.pop("cookie", None)
