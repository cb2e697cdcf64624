"""Bare mitmdump's fair comparison: stream every response, as our proxy does."""

from mitmproxy import http


def responseheaders(flow: http.HTTPFlow) -> None:
    if flow.response is not None:
        flow.response.stream = True
