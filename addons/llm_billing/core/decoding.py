"""Incremental Content-Encoding decoders, so a compressed stream can be metered as it
passes (the client still receives the compressed bytes untouched)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

Decoder = Callable[[bytes], bytes]


def _zlib(wbits: int) -> Decoder:
    d = zlib.decompressobj(wbits)
    return d.decompress


def _deflate() -> Decoder:
    # "deflate" is zlib-wrapped by the RFC, raw in some servers: decide on the first bytes.
    state: dict[str, Decoder] = {}

    def decode(data: bytes) -> bytes:
        if "d" not in state:
            state["d"] = _zlib(15) if data[:1] and (data[0] & 0x0F) == 8 else _zlib(-15)
        return state["d"](data)

    return decode


def _brotli() -> Decoder:
    import brotli

    return brotli.Decompressor().process


def _zstd() -> Decoder:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress


_FACTORIES: dict[str, Callable[[], Decoder]] = {
    "gzip": lambda: _zlib(31),
    "x-gzip": lambda: _zlib(31),
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}


def decoder_for(content_encoding: str) -> Decoder | None:
    """A decoder for the header's value; None for identity. Raises KeyError if unknown."""
    encodings = [e.strip().lower() for e in content_encoding.split(",") if e.strip()]
    encodings = [e for e in encodings if e != "identity"]
    if not encodings:
        return None
    decoders = [_FACTORIES[e]() for e in reversed(encodings)]  # applied last-first

    def decode(data: bytes) -> bytes:
        for d in decoders:
            data = d(data)
        return data

    return decode
