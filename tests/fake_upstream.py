"""A stand-in LLM server that speaks OpenAI's and Anthropic's exact wire formats.

Deterministic: the same request gets the same bytes (ids come from the ``X-Test-Id``
header), so a test can render what the upstream *would* have sent and compare bytes.
It records every request it received and every byte it sent, per test id.

Scenarios, chosen by the ``X-Fake-Scenario`` request header:
- ``greedy``: every answer uses its whole output limit (2,000 tokens when it sets none).
- ``gated``: send the first content chunk, then wait for ``release(test_id)`` before the
  rest — proves the proxy does not buffer.
- ``status-<code>``: answer with that HTTP error in the provider's error format.
- ``cut``: stop mid-stream without usage or terminator, closing the connection.
- ``content-length``: frame the stream with ``Content-Length`` instead of chunked.
- ``usage-huge``: chat completions report ``completion_tokens`` 10**30 (a broken upstream).
- ``held``: wait for ``release(test_id)`` before answering at all (not even headers).
- ``echo-key``: 401 quoting the credential it got, whole and masked (as many servers do);
  ``echo-key-chunked`` sends it in 5-byte chunks, ``echo-key-gzip`` gzipped, in pieces.

With an ``X-Replay: <case>`` header it sends a recorded response from ``tests/corpus``.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

CREATED = 1_700_000_000
GREEDY = "_fake_greedy"  # set on a request's body by the "greedy" scenario
CORPUS = Path(__file__).resolve().parent / "corpus"


def load_case(name: str) -> dict[str, Any]:
    """A recorded exchange from tests/corpus (see its README); a class its ``expected``
    leaves out is 0."""
    case = json.loads((CORPUS / f"{name}.json").read_text())
    case["expected"].setdefault("cache_write_1h_tokens", 0)
    return case


def corpus_names() -> list[str]:
    return sorted(p.stem for p in CORPUS.glob("*.json"))
WORDS = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?"]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def prompt_tokens_for(body: dict[str, Any]) -> int:
    """A deterministic 'tokenizer': enough to give every request its own count."""
    return 7 + len(json.dumps(body.get("messages") or body.get("input") or body.get("prompt")
                              or "")) // 4


def completion_words(body: dict[str, Any]) -> list[str]:
    if body.get(GREEDY):  # a model that always uses its whole output budget
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 2_000)
        return (WORDS * (n // len(WORDS) + 1))[:n]
    n = body.get("max_tokens") or body.get("max_completion_tokens") or len(WORDS)
    return (WORDS * 10)[: min(int(n), 60)]


@dataclass
class Exchange:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    sent: bytearray = field(default_factory=bytearray)
    usage: dict[str, Any] | None = None  # what the upstream reported
    finished: bool = False  # the last byte was sent


# --- OpenAI chat completions -------------------------------------------------------------

def openai_chat_usage(body: dict[str, Any]) -> dict[str, Any]:
    prompt = prompt_tokens_for(body)
    completion = len(completion_words(body))
    cached = prompt // 2 if "cache" in _dumps(body.get("messages", "")) else 0
    reasoning = 12 if str(body.get("model", "")).startswith("o") else 0
    return {
        "prompt_tokens": prompt, "completion_tokens": completion + reasoning,
        "total_tokens": prompt + completion + reasoning,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }


def openai_chat_stream(body: dict[str, Any], test_id: str) -> list[bytes]:
    """The SSE events OpenAI sends, one bytes object per event."""
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    base = {"id": f"chatcmpl-{test_id}", "object": "chat.completion.chunk", "created": CREATED,
            "model": "gpt-4o-mini-2024-07-18", "service_tier": "default",
            "system_fingerprint": "fp_b376dfbbd5"}

    def chunk(delta: dict, finish: str | None) -> bytes:
        obj = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                    "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        return f"data: {_dumps(obj)}\n\n".encode()

    events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    events += [chunk({"content": w}, None) for w in completion_words(body)]
    events.append(chunk({}, "stop"))
    if include_usage:
        usage_chunk = {**base, "choices": [], "usage": openai_chat_usage(body)}
        events.append(f"data: {_dumps(usage_chunk)}\n\n".encode())
    events.append(b"data: [DONE]\n\n")
    return events


def openai_chat_json(body: dict[str, Any], test_id: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{test_id}", "object": "chat.completion", "created": CREATED,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": "".join(completion_words(body)),
                                             "refusal": None, "annotations": []},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": openai_chat_usage(body), "service_tier": "default",
        "system_fingerprint": "fp_b376dfbbd5",
    }


def openai_completions_stream(body: dict[str, Any], test_id: str) -> list[bytes]:
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    base = {"id": f"cmpl-{test_id}", "object": "text_completion", "created": CREATED,
            "model": body.get("model", "")}
    events = []
    for w in completion_words(body):
        obj = {**base, "choices": [{"text": w, "index": 0, "logprobs": None,
                                    "finish_reason": None}]}
        if include_usage:
            obj["usage"] = None
        events.append(f"data: {_dumps(obj)}\n\n".encode())
    if include_usage:
        usage = openai_chat_usage(body)
        usage.pop("prompt_tokens_details")
        usage.pop("completion_tokens_details")
        events.append(f"data: {_dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
    events.append(b"data: [DONE]\n\n")
    return events


def openai_embeddings_json(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    tokens = prompt_tokens_for(body)
    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": [0.0125, -0.5, 0.25]}
                     for i in range(len(items))],
            "model": body.get("model"), "usage": {"prompt_tokens": tokens,
                                                  "total_tokens": tokens}}


# --- Anthropic messages ------------------------------------------------------------------

def anthropic_usage(body: dict[str, Any]) -> dict[str, Any]:
    cached = "cache" in _dumps(body.get("messages", ""))
    usage = {"input_tokens": prompt_tokens_for(body),
             "cache_creation_input_tokens": 1024 if cached else 0,
             "cache_read_input_tokens": 2048 if cached else 0,
             "output_tokens": len(completion_words(body)), "service_tier": "standard"}
    if '"ttl":"1h"' in _dumps(body.get("messages", "")):  # a one-hour cache_control block
        usage["cache_creation"] = {"ephemeral_5m_input_tokens": 256,
                                   "ephemeral_1h_input_tokens": 768}
    return usage


def anthropic_message_json(body: dict[str, Any], test_id: str) -> dict[str, Any]:
    return {"id": f"msg_{test_id}", "type": "message", "role": "assistant",
            "model": body.get("model"),
            "content": [{"type": "text", "text": "".join(completion_words(body))}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": anthropic_usage(body)}


def anthropic_stream(body: dict[str, Any], test_id: str) -> list[bytes]:
    usage = anthropic_usage(body)
    start_usage = {**usage, "output_tokens": 1}
    message = {**anthropic_message_json(body, test_id), "content": [], "stop_reason": None,
               "usage": start_usage}

    def event(name: str, data: dict) -> bytes:
        return f"event: {name}\ndata: {_dumps(data)}\n\n".encode()

    events = [
        event("message_start", {"type": "message_start", "message": message}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    events += [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": w}})
               for w in completion_words(body)]
    events += [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": usage["output_tokens"]}}),
        event("message_stop", {"type": "message_stop"}),
    ]
    return events


def error_json(path: str, status: int) -> dict[str, Any]:
    if path.endswith("/messages"):
        return {"type": "error", "error": {"type": "overloaded_error" if status == 529
                                           else "api_error", "message": "Overloaded"}}
    return {"error": {"message": "The server had an error", "type": "server_error",
                      "param": None, "code": None}}



# --- OpenAI Responses API ----------------------------------------------------------------

def responses_usage(body: dict[str, Any]) -> dict[str, Any]:
    prompt = prompt_tokens_for(body)
    reasoning = 24 if str(body.get("model", "")).startswith("o") else 0
    output = len(completion_words(body)) + reasoning
    cached = prompt // 2 if "cache" in _dumps(body.get("input", "")) else 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + output}


def responses_json(body: dict[str, Any], test_id: str, status: str = "completed",
                   usage: bool = True) -> dict[str, Any]:
    text = "".join(completion_words(body))
    return {
        "id": f"resp_{test_id}", "object": "response", "created_at": CREATED,
        "status": status, "error": None, "incomplete_details": None, "instructions": None,
        "max_output_tokens": body.get("max_output_tokens"), "model": body.get("model"),
        "output": [{"id": f"msg_{test_id}", "type": "message", "status": status,
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        if usage else [],
        "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto", "tools": [],
        "top_p": 1.0, "usage": responses_usage(body) if usage else None, "metadata": {},
    }


def responses_stream(body: dict[str, Any], test_id: str) -> list[bytes]:
    def event(name: str, data: dict) -> bytes:
        return f"event: {name}\ndata: {_dumps({'type': name, **data})}\n\n".encode()

    start = responses_json(body, test_id, "in_progress", usage=False)
    item = {"id": f"msg_{test_id}", "type": "message", "status": "in_progress",
            "role": "assistant", "content": []}
    events = [event("response.created", {"sequence_number": 0, "response": start}),
              event("response.in_progress", {"sequence_number": 1, "response": start}),
              event("response.output_item.added", {"sequence_number": 2, "output_index": 0,
                                                   "item": item})]
    seq = 3
    for word in completion_words(body):
        events.append(event("response.output_text.delta", {
            "sequence_number": seq, "item_id": item["id"], "output_index": 0,
            "content_index": 0, "delta": word}))
        seq += 1
    events.append(event("response.completed", {"sequence_number": seq,
                                               "response": responses_json(body, test_id)}))
    return events


# --- Google Gemini -----------------------------------------------------------------------

def gemini_usage(body: dict[str, Any], upto: int | None = None) -> dict[str, Any]:
    prompt = 5 + len(_dumps(body.get("contents", ""))) // 4
    words = completion_words(body)
    candidates = len(words) if upto is None else upto
    meta: dict[str, Any] = {"promptTokenCount": prompt,
                            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
    if upto is None or upto:
        meta["candidatesTokenCount"] = candidates
    thoughts = 31 if upto is None else 0
    if thoughts:
        meta["thoughtsTokenCount"] = thoughts
    if "cache" in _dumps(body.get("contents", "")):
        meta["cachedContentTokenCount"] = 4
    meta["totalTokenCount"] = prompt + candidates + thoughts
    return meta


def _gemini_chunk(text: str, model: str, usage: dict, finish: bool) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                 "index": 0}
    if finish:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
            "responseId": "fake-response-id"}


def gemini_json(body: dict[str, Any], model: str) -> dict[str, Any]:
    return _gemini_chunk("".join(completion_words(body)), model, gemini_usage(body), True)


def gemini_stream_chunks(body: dict[str, Any], model: str) -> list[dict[str, Any]]:
    words = completion_words(body)
    chunks = [_gemini_chunk(w, model, gemini_usage(body, upto=i + 1), False)
              for i, w in enumerate(words[:-1])]
    chunks.append(_gemini_chunk(words[-1], model, gemini_usage(body), True))
    return chunks


def gemini_sse(body: dict[str, Any], model: str) -> list[bytes]:
    # Google's SSE uses CRLF line endings.
    return [f"data: {json.dumps(c)}\r\n\r\n".encode() for c in gemini_stream_chunks(body, model)]


# --- vLLM and llama.cpp flavours of OpenAI chat streaming --------------------------------

def vllm_chat_stream(body: dict[str, Any], test_id: str) -> list[bytes]:
    """vLLM: no "usage":null on ordinary chunks; the usage chunk has choices []."""
    base = {"id": f"chatcmpl-{test_id}", "object": "chat.completion.chunk",
            "created": CREATED, "model": body.get("model")}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": w}, "logprobs": None,
                                     "finish_reason": None}]} for w in completion_words(body)]
    events.append({**base, "choices": [{"index": 0, "delta": {"content": ""}, "logprobs": None,
                                        "finish_reason": "stop", "stop_reason": None}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = openai_chat_usage(body)
        events.append({**base, "choices": [], "usage": {
            "prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["total_tokens"],
            "completion_tokens": usage["completion_tokens"]}})
    return [f"data: {_dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def llamacpp_timings(body: dict[str, Any]) -> dict[str, Any]:
    n = len(completion_words(body))
    return {"prompt_n": prompt_tokens_for(body), "prompt_ms": 12.5, "prompt_per_token_ms": 1.1,
            "prompt_per_second": 880.0, "predicted_n": n, "predicted_ms": 80.0,
            "predicted_per_token_ms": 8.9, "predicted_per_second": 112.5}


def llamacpp_chat_stream(body: dict[str, Any], test_id: str) -> list[bytes]:
    """llama.cpp: usage only when asked, in a choices-[] chunk that also has timings;
    otherwise the timings ride on the finish chunk."""
    base = {"created": CREATED, "id": f"chatcmpl-{test_id}", "model": body.get("model"),
            "system_fingerprint": "b6000-fake", "object": "chat.completion.chunk"}
    events = [{"choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant",
                                                                        "content": None}}],
               **base}]
    events += [{"choices": [{"finish_reason": None, "index": 0, "delta": {"content": w}}],
                **base} for w in completion_words(body)]
    finish = {"choices": [{"finish_reason": "stop", "index": 0, "delta": {}}], **base}
    events.append(finish)
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = openai_chat_usage(body)
        events.append({"choices": [], **base, "usage": {
            "completion_tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["total_tokens"]},
            "timings": llamacpp_timings(body)})
    else:
        finish["timings"] = llamacpp_timings(body)
    return [f"data: {_dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def _huge_completion_tokens(event: bytes) -> bytes:
    return re.sub(rb'"completion_tokens":\d+', b'"completion_tokens":%d' % 10**30, event)


# --- The server --------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    # socketserver's default backlog is 5: a burst of new connections (two proxy workers,
    # 24 clients) overflowed it and a connect failed (502) on a busy machine. Real
    # servers listen with a backlog in the hundreds.
    request_queue_size = 1024


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, chunk_delay: float = 0.0):
        self.exchanges: dict[str, Exchange] = {}
        self.gates: dict[str, threading.Event] = {}
        self.calls: Counter[str] = Counter()  # requests received, per test id
        self.chunk_delay = chunk_delay
        self._lock = threading.Lock()
        upstream = self

        class Handler(_Handler):
            fake = upstream

        self.server = _Server((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gate(self, test_id: str) -> threading.Event:
        with self._lock:
            return self.gates.setdefault(test_id, threading.Event())

    def release(self, test_id: str) -> None:
        self.gate(test_id).set()

    def exchange(self, test_id: str) -> Exchange:
        return self.exchanges[test_id]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small SSE writes go out at once, like real servers
    fake: FakeUpstream

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        test_id = self.headers.get("x-test-id") or f"anon{time.monotonic_ns()}"
        ex = Exchange("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, raw)
        self.fake.exchanges[test_id] = ex
        self.fake.calls[test_id] += 1
        body = json.loads(raw or b"{}")
        scenario = self.headers.get("x-fake-scenario", "")
        if scenario == "greedy":
            body[GREEDY] = True
        if scenario == "held":
            self.fake.gate(test_id).wait(30)
        path = self.path.partition("?")[0]
        if replay := self.headers.get("x-replay"):
            return self._replay(ex, load_case(replay))
        if scenario.startswith("echo-key"):
            return self._echo_key(ex, path, scenario)
        if scenario.startswith("status-"):
            status = int(scenario.removeprefix("status-"))
            return self._json(ex, status, error_json(path, status))
        streaming = body.get("stream") is True
        model = str(body.get("model", ""))
        if path.endswith("/chat/completions"):
            if model.startswith("vllm-") and "stream_options" in body and not streaming:
                return self._json(ex, 400, {"object": "error", "message": "Stream options "
                                            "can only be defined when `stream=True`.",
                                            "type": "BadRequestError", "param": None,
                                            "code": 400})
            if not streaming:
                ex.usage = openai_chat_usage(body)
                doc = openai_chat_json(body, test_id)
                if scenario == "usage-huge":
                    doc["usage"]["completion_tokens"] = 10**30
                return self._json(ex, 200, doc)
            flavour = (vllm_chat_stream if model.startswith("vllm-") else
                       llamacpp_chat_stream if model.startswith("llamacpp-") else
                       openai_chat_stream)
            if (body.get("stream_options") or {}).get("include_usage"):
                ex.usage = openai_chat_usage(body)
            events = flavour(body, test_id)
            if scenario == "usage-huge":
                events = [_huge_completion_tokens(e) for e in events]
            return self._sse(ex, events, test_id, scenario)
        if path.endswith("/completions"):
            events = openai_completions_stream(body, test_id)
            return self._sse(ex, events, test_id, scenario)
        if path.endswith("/embeddings"):
            doc = openai_embeddings_json(body)
            ex.usage = doc["usage"]
            return self._json(ex, 200, doc)
        if path.endswith("/responses"):
            ex.usage = responses_usage(body)
            if not streaming:
                return self._json(ex, 200, responses_json(body, test_id))
            return self._sse(ex, responses_stream(body, test_id), test_id, scenario)
        if path.endswith("/messages/count_tokens"):  # Anthropic counts for free
            return self._json(ex, 200, {"input_tokens": prompt_tokens_for(body)})
        if path.endswith("/messages"):
            ex.usage = anthropic_usage(body)
            if not streaming:
                return self._json(ex, 200, anthropic_message_json(body, test_id))
            events = anthropic_stream(body, test_id)
            if scenario == "error-mid-stream":  # Anthropic reports overload inside a 200
                events = [*events[:5], b'event: error\ndata: {"type":"error","error":'
                          b'{"type":"overloaded_error","message":"Overloaded"}}\n\n']
            return self._sse(ex, events, test_id, scenario)
        if ":generateContent" in path or ":streamGenerateContent" in path:
            gemini_model = path.rsplit("/", 1)[-1].split(":")[0]
            ex.usage = gemini_usage(body)
            if ":generateContent" in path:
                return self._json(ex, 200, gemini_json(body, gemini_model))
            if "alt=sse" in self.path:
                return self._sse(ex, gemini_sse(body, gemini_model), test_id, scenario)
            array = json.dumps(gemini_stream_chunks(body, gemini_model), indent=2).encode()
            return self._sse(ex, [array[i:i + 200] for i in range(0, len(array), 200)],
                             test_id, scenario, content_type="application/json")
        return self._json(ex, 404, {"error": {"message": "no such path"}})

    def _echo_key(self, ex: Exchange, path: str, scenario: str) -> None:
        key = (self.headers.get("authorization", "").removeprefix("Bearer ")
               or self.headers.get("x-api-key") or self.headers.get("x-goog-api-key")
               or parse_qs(urlsplit(self.path).query).get("key", [""])[0])
        masked = f"{key[:8]}{'*' * max(3, len(key) - 12)}{key[-4:]}"
        message = f"Incorrect API key provided: {key} ({masked})."
        doc = ({"type": "error", "error": {"type": "authentication_error", "message": message}}
               if path.endswith("/messages") else
               {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key", "key": key}})
        data = _dumps(doc).encode()
        if scenario == "echo-key":
            return self._json(ex, 401, doc)
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        if scenario == "echo-key-gzip":
            self.send_header("content-encoding", "gzip")
            data = gzip.compress(data)
        self.end_headers()
        for i in range(0, len(data), 5):
            self._chunk(ex, data[i:i + 5])
            time.sleep(0.001)  # separate reads, so the key spans chunks
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        ex.finished = True

    def _replay(self, ex: Exchange, case: dict[str, Any]) -> None:
        """Send a recorded response: its status, headers and chunks as separate writes."""
        response = case["response"]
        ex.usage = case["expected"]
        self.send_response(response["status"])
        for name, value in response["headers"].items():
            self.send_header(name, value)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        compressor = zlib.compressobj(wbits=31) if response["gzip"] else None
        for text in response["chunks"]:
            data = text.encode()
            if compressor:
                data = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
            self._chunk(ex, data)
            time.sleep(0.002)  # separate TCP segments, so the proxy sees separate reads
        if compressor:
            self._chunk(ex, compressor.flush())
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        ex.finished = True

    def _chunk(self, ex: Exchange, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
            self.wfile.flush()
            ex.sent += data

    def _write(self, ex: Exchange, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        ex.sent += data

    def _json(self, ex: Exchange, status: int, doc: dict[str, Any]) -> None:
        data = _dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-request-id", "req_fake")
        self.end_headers()
        self._write(ex, data)
        ex.finished = True

    def _sse(self, ex: Exchange, events: list[bytes], test_id: str, scenario: str,
             content_type: str = "text/event-stream; charset=utf-8") -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        if scenario == "content-length":  # a server that buffers, then sends one body
            self.send_header("content-length", str(sum(map(len, events))))
            self.send_header("cache-control", "no-cache")
            self.end_headers()
            for event in events:
                self._write(ex, event)
            ex.finished = True
            return
        self.send_header("transfer-encoding", "chunked")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        for i, event in enumerate(events):
            if scenario == "cut" and i == len(events) // 2:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if scenario == "gated" and i == 2:
                self.fake.gate(test_id).wait(30)
            elif self.fake.chunk_delay:
                time.sleep(self.fake.chunk_delay)
            self.wfile.write(b"%x\r\n" % len(event) + event + b"\r\n")
            self.wfile.flush()
            ex.sent += event
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        ex.finished = True


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the fake LLM upstream.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args()
    fake = FakeUpstream(port=args.port, chunk_delay=args.chunk_delay)
    print(f"fake upstream on {fake.url}", flush=True)
    fake.server.serve_forever()
