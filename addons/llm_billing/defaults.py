"""ProxyDefaults addon: the mitmproxy settings the billing proxy needs, so that a plain
``mitmdump -s addons/llm_billing_proxy.py`` works.

- Reverse mode: clients talk to us as if we were the API. Every request is answered here
  or rewritten to its backend, so the reverse target itself is never contacted.
- ``connection_strategy=lazy``: connect upstream per request, after routing (eager would
  connect to the reverse target as soon as a client connects).
- ``body_size_limit`` (unless set): mitmproxy reads a request's whole body before any
  hook can answer it, so without a limit anyone could announce (and send) gigabytes, to
  any path. The default fits the largest LLM requests (inline images, audio, PDFs).
- ``save_stream_filter`` / mitmweb's ``view_filter`` (unless set): portal flows are not
  written by ``-w`` nor shown in mitmweb — the page that shows a new key's token once, and
  session cookies, pass through mitmproxy's flow machinery, and mitmproxy's Save runs
  before any hook of ours could redact them.
- ``UpstreamCredentials`` joins the very end of the addon chain (see upstream_auth).
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

from .upstream_auth import UpstreamCredentials

logger = logging.getLogger(__name__)

UNUSED_REVERSE_TARGET = "reverse:http://127.0.0.1:9"
BODY_SIZE_LIMIT = "128m"
NOT_PORTAL = "!(~u ://[^/]+/portal)"


class ProxyDefaults:
    def load(self, loader) -> None:
        addons = ctx.master.addons
        if addons.get(UpstreamCredentials.name) is None:
            addons.add(UpstreamCredentials())

    def running(self) -> None:
        # Not in load/configure: the command line is applied after scripts load and would
        # set the mode back. Until this runs the router still answers or rewrites every
        # request, so the brief default listener forwards nothing anywhere else.
        updates = {}
        if list(ctx.options.mode) == ["regular"]:
            updates["mode"] = [UNUSED_REVERSE_TARGET]
        if ctx.options.connection_strategy != "lazy":
            updates["connection_strategy"] = "lazy"
        if not ctx.options.body_size_limit:
            updates["body_size_limit"] = BODY_SIZE_LIMIT
        for name in ("save_stream_filter", "view_filter"):  # view_filter: mitmweb only
            if name in ctx.options and not getattr(ctx.options, name):
                updates[name] = NOT_PORTAL
        if updates:
            logger.info(f"Billing proxy defaults: {updates}")
            ctx.options.update(**updates)
