"""The web face on the proxy's own port: /portal, /docs, /health, /metrics (Starlette).

Served from inside mitmproxy by the ``WebApp`` addon (serve.py), mitmproxy's ``asgiapp``
convention matched by path instead of host; never forwarded upstream.
"""
