"""A stand-in self-hosted server that streams without usage and exposes its tokenizer.

One class, three flavours, each with its server's exact tokenizer endpoints:

- ``llama-cpp-python``: ``POST /extras/tokenize/count`` ``{"input"}`` → ``{"count"}``, the
  BOS always added and specials parsed (as ``Llama.tokenize(…, special=True)``).
- ``vllm``: ``POST /tokenize`` with ``messages`` (chat template applied) or ``prompt`` →
  ``{"count", "max_model_len", "tokens"}``.
- ``llama-server``: ``POST /apply-template`` ``{"messages"}`` → ``{"prompt"}`` (without
  the template's leading BOS, which its tokenizer adds with the specials); ``POST
  /tokenize`` ``{"content", "add_special", "parse_special"}`` → ``{"tokens"}``.

Its "model" has a byte tokenizer: a token per UTF-8 byte, ``<s>`` one token when specials
are parsed, SPM's space before a text, and a chat template (``CHAT_TEMPLATE``).
Non-streamed answers report usage counted that way — the server's own count, which a
streamed request must be billed at.
Streams never carry usage, whatever ``stream_options`` says (llama-cpp-python's server).
``hold_tokenizer`` makes the tokenizer endpoints wait until ``release_tokenizer``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
BOS = "<s>"
OUTPUT = "Hello from a tiny model!"  # what every answer says (ASCII: one token per byte)


def tokens(text: str, add_bos: bool, parse_special: bool = True) -> int:
    """As llama.cpp's SPM tokenizer: a text (and each part after a special token) gets
    a space put before it — one more token than the same text generated mid-answer."""
    parts = text.split(BOS) if parse_special else [text]
    return add_bos + len(parts) - 1 + sum(len(part.encode()) + 1 for part in parts if part)


def render(messages: list[dict[str, Any]]) -> str:
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        CHAT_TEMPLATE).render(messages=messages, bos_token=BOS, add_generation_prompt=True)


def server_usage(path: str, body: dict[str, Any]) -> dict[str, int]:
    """What the server counts for a request: its rendered chat (which holds the BOS), or
    its completion prompt with the BOS added."""
    if path.endswith("/chat/completions"):
        prompt = tokens(render(body["messages"]), add_bos=False)
    else:
        prompt = tokens(body["prompt"], add_bos=True)
    completion = len(OUTPUT.encode())  # the tokens it generated: no space put before them
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class TokenizerUpstream:
    def __init__(self, flavour: str, api_key: str | None = None) -> None:
        self.flavour, self.api_key = flavour, api_key
        self.tokenizer_calls: list[tuple[str, dict[str, Any]]] = []
        self._open = threading.Event()
        self._open.set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hold_tokenizer(self) -> None:
        self._open.clear()

    def release_tokenizer(self) -> None:
        self._open.set()

    def stop(self) -> None:
        self._open.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                path = self.path.partition("?")[0]
                if upstream.api_key and self.headers.get("authorization") != \
                        f"Bearer {upstream.api_key}":
                    return self._json(401, {"error": {"message": "bad key", "code": 401}})
                if path.endswith("/completions"):
                    return self._complete(path, body)
                upstream.tokenizer_calls.append((path, body))
                upstream._open.wait(60)
                answer = upstream.tokenize(path, body)
                self._json(404, {"detail": "Not Found"}) if answer is None \
                    else self._json(200, answer)

            def _complete(self, path: str, body: dict[str, Any]) -> None:
                chat = path.endswith("/chat/completions")
                usage = server_usage(path, body)
                base = {"id": "cmpl-1", "created": 1_700_000_000, "model": body["model"],
                        "object": "chat.completion" if chat else "text_completion"}
                choice = {"index": 0, "logprobs": None, "finish_reason": "length"}
                if not body.get("stream"):
                    answer = ({"message": {"role": "assistant", "content": OUTPUT}} if chat
                              else {"text": OUTPUT})
                    return self._json(200, {**base, "choices": [{**choice, **answer}],
                                            "usage": usage})
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                base["object"] = "chat.completion.chunk" if chat else "text_completion"
                pieces = [OUTPUT[i:i + 5] for i in range(0, len(OUTPUT), 5)]
                for i, piece in enumerate(pieces):
                    last = i == len(pieces) - 1
                    part = {"delta": {"content": piece}} if chat else {"text": piece}
                    event = {**base, "choices": [{**choice, **part,
                                                  "finish_reason": "length" if last else None}]}
                    self._chunk(f"data: {json.dumps(event)}\r\n\r\n".encode())
                self._chunk(b"data: [DONE]\r\n\r\n")
                self._chunk(b"")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _json(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def tokenize(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The flavour's tokenizer endpoint; None for a path it does not have."""
        match self.flavour, path:
            case "llama-cpp-python", "/extras/tokenize/count":
                return {"count": tokens(body["input"], add_bos=True)}
            case "vllm", "/tokenize":
                if "messages" in body:  # the chat template holds the BOS
                    count = tokens(render(body["messages"]), add_bos=False)
                else:
                    count = tokens(body["prompt"], body.get("add_special_tokens", True))
                return {"count": count, "max_model_len": 4096, "tokens": [0] * count}
            case "llama-server", "/apply-template":  # its BOS comes when it is tokenized
                return {"prompt": render(body["messages"]).removeprefix(BOS)}
            case "llama-server", "/tokenize":
                count = tokens(body["content"], body.get("add_special", False),
                               body.get("parse_special", True))
                return {"tokens": [0] * count}
        return None
