#!/usr/bin/env python3
"""A fast OpenAI-compatible upstream for benchmarks: asyncio, HTTP/1.1 keep-alive, one
streamed chat completion per request in OpenAI's exact wire format.

    python bench/sse_upstream.py --port 8000 [--chunks 20] [--delay-ms 0]

Each response has ``--chunks`` content events, then — only when the request asked for
``stream_options.include_usage``, as OpenAI does — the usage event, then ``[DONE]``.
With a delay the content events are written that many ms apart (an LLM's pace); without,
the whole stream is written at once. A request may set both for itself with the headers
``x-bench-chunks`` and ``x-bench-delay-ms``. ``GET`` answers an empty model list.

A request with ``x-bench-bytes: N`` gets a bulk stream instead: content events (one token
each) written as fast as the client takes them until at least N bytes of events, then
usage and ``[DONE]``; the response header ``x-bench-completion-tokens`` says the count
its usage will report (for checking the bill of a stream the client did not see usage of).
"""

from __future__ import annotations

import argparse
import asyncio
import json

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(payload: dict) -> bytes:
    return chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def stream_events(model: str, chunks: int, with_usage: bool) -> tuple[list[bytes], bytes]:
    """The content events and the usage event of one completion. Asked for usage, OpenAI
    adds ``"usage":null`` to every other chunk."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764500000,
            "model": model, "system_fingerprint": "fp_bench"}
    tail = {"usage": None} if with_usage else {}
    content = [event({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                 "content": ""},
                                           "logprobs": None, "finish_reason": None}], **tail})]
    content += [event({**base, "choices": [{"index": 0, "delta": {"content": f" tok{i}"},
                                            "logprobs": None, "finish_reason": None}], **tail})
                for i in range(chunks - 1)]
    content.append(event({**base, "choices": [{"index": 0, "delta": {},
                                               "logprobs": None, "finish_reason": "stop"}],
                          **tail}))
    usage = event({**base, "choices": [], "usage": {
        "prompt_tokens": 9, "completion_tokens": chunks, "total_tokens": 9 + chunks,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}})
    return content, usage


DONE = chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
BULK_BLOCK = 64 << 10  # bytes of events per write of a bulk stream


async def bulk(writer: asyncio.StreamWriter, model: str, size: int, with_usage: bool) -> None:
    """At least ``size`` bytes of content events, one HTTP chunk of ~64 KiB per write, the
    same block every time (cheap), then the usage event and ``[DONE]``."""
    content, usage = stream_events(model, 3, with_usage)
    one = content[1].split(b"\r\n", 1)[1][:-2]  # the event's bytes, without chunk framing
    per_block = max(1, BULK_BLOCK // len(one))
    block = chunk(one * per_block)
    blocks = -(-size // (len(one) * per_block))
    tokens = blocks * per_block
    payload = json.loads(usage.split(b"\r\n", 1)[1][len(b"data: "):-4])
    payload["usage"].update(completion_tokens=tokens, total_tokens=9 + tokens)
    usage = event(payload)
    writer.write(HEAD[:-2] + b"x-bench-completion-tokens: %d\r\n\r\n" % tokens)
    for _ in range(blocks):
        writer.write(block)
        await writer.drain()
    writer.write((usage if with_usage else b"") + DONE)
    await writer.drain()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                chunks: int, delay: float) -> None:
    cache: dict[tuple[str, int, bool], tuple[list[bytes], bytes]] = {}
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", 0))
            count = int(headers.get(b"x-bench-chunks", chunks))
            pace = float(headers.get(b"x-bench-delay-ms", delay * 1000)) / 1000
            body = await reader.readexactly(length) if length else b""
            if head.startswith(b"GET"):
                data = b'{"object":"list","data":[]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(data), data))
                continue
            request = json.loads(body or b"{}")
            model = request.get("model", "gpt-4o-mini")
            with_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            if size := int(headers.get(b"x-bench-bytes", 0)):
                await bulk(writer, model, size, with_usage)
                continue
            if (model, count, with_usage) not in cache:
                cache[model, count, with_usage] = stream_events(model, count, with_usage)
            content, usage = cache[model, count, with_usage]
            writer.write(HEAD)
            if pace:
                for piece in content:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(pace)
            else:
                writer.write(b"".join(content))
            writer.write((usage if with_usage else b"") + DONE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, args.chunks, args.delay_ms / 1000), "127.0.0.1", args.port,
        backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
