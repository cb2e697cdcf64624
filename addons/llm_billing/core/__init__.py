"""The pure core: parsing, usage, prices, plans, expressions, config, event documents.

No I/O and no mitmproxy hooks here: bytes, JSON and numbers in, values out — unit-tested
and fuzzed without a network, a database or a proxy.
"""
