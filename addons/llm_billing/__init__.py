"""llm-billing-proxy: per-token billing for LLM APIs as mitmproxy addons.

Pure modules (no I/O): sse, usage, config, errors, events.
Addons (mitmproxy hooks): database, keyauth, router, upstream_auth, meter, eventlog.
"""
