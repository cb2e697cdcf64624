"""Incremental Content-Encoding decoders, so a compressed stream can be metered as it
passes (the client still receives the compressed bytes untouched)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

Decoder = Callable[[bytes], bytes]


def _zlib(wbits: int) -> Decoder:
    d = zlib.decompressobj(wbits)
    return d.decompress


def _gzip() -> Decoder:
    """Every member of a multi-member gzip stream (RFC 1952 allows several; curl, browsers
    and urllib3 decode them all): a decompressor stops at the end of its member, so a new
    one takes what follows. Like urllib3, data after a complete member that does not
    decode (trailing garbage, zero padding) is ignored."""
    d = zlib.decompressobj(31)
    first = True
    ignore_rest = False

    def decode(data: bytes) -> bytes:
        nonlocal d, first, ignore_rest
        out = bytearray()
        while data and not ignore_rest:
            try:
                out += d.decompress(data)
            except zlib.error:
                if first:
                    raise
                ignore_rest = True
                break
            if not d.eof:
                break
            data = d.unused_data  # the next member's first bytes, if any arrived
            d = zlib.decompressobj(31)
            first = False
        return bytes(out)

    return decode


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
    "gzip": _gzip,
    "x-gzip": _gzip,
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
