"""WebApp addon: answers the web face's paths with an ASGI app, inside mitmproxy.

mitmproxy's own convention (``mitmproxy.addons.asgiapp``) serves an app for a host; the
billing proxy runs in reverse mode, where every request names the same (unused) reverse
target, so this addon matches by path prefix instead and hands the flow to
``asgiapp.serve``. It runs before the Router (which answers unknown paths with 404), and
KeyAuth has already stripped any client key from the request (first hook).

Everything the app does is async (pymongo's async client), so a page never stalls the
streams that share the event loop.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.addons import asgiapp

PREFIXES = ("/portal", "/docs", "/health", "/metrics", "/static")


def is_web_path(path: str) -> bool:
    path = path.partition("?")[0]
    return any(path == p or path.startswith(p + "/") for p in PREFIXES)


class WebApp:
    def __init__(self, app) -> None:
        self.app = app  # an ASGI app (see app.py)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live or flow.error or not is_web_path(flow.request.path):
            return
        await asgiapp.serve(self.app, flow)
