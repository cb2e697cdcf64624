"""llm-billing-proxy: per-token billing for LLM APIs as mitmproxy addons.

- ``core/``: pure code, no I/O (SSE, usage per provider, prices, plans, expressions,
  config, event documents, the stream meter).
- ``storage/``: database, journal, ledger, cache — everything that awaits I/O.
- the modules here: the mitmproxy addons (hooks), one concern each.
"""
