"""Router addon: pick the backend by model and rewrite the request for it.

Exact path matching (seed 000). The body's ``model`` chooses the first backend that serves
it. The request goes upstream with ``X-User-ID``/``X-Plan-ID`` (seed 000) and, for an
OpenAI-compatible stream that did not ask for usage, ``stream_options.include_usage`` —
the meter hides the extra usage chunk again so the client sees the stream it asked for.
Upstream credentials are attached by ``UpstreamCredentials`` at the end of the chain.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from . import context
from .core.backend_tokenizer import COUNTED_PROTOCOLS
from .core.config import Backend, Config
from .core.estimate import prompt_size
from .core.usage import dump_json, parse_json
from .errors import error_response
from .settings import Settings

CALLER_HEADERS = ("x-user-id", "x-plan-id")
MAX_MODEL_NAME = 256


def inject_include_usage(body: dict[str, Any]) -> bool:
    """Ask an OpenAI-compatible server for the final usage chunk; True if we had to.

    Only for ``stream: true``: vLLM rejects ``stream_options`` on non-streaming requests.
    """
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                              "include_usage": True}
    return True


def upstream_path(backend: Backend, request_path: str) -> str:
    return backend.path_prefix + request_path


class Router:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        config = self.settings.config
        assert config is not None
        ctx = context.of(flow)
        if ctx is not None and ctx.replayed:  # routed already, when it was saved
            return
        path = flow.request.path.partition("?")[0]
        if config.route_for(path) is None:
            flow.response = error_response(
                "openai", 404, f"Unknown path {path!r}. Supported: {', '.join(config.routes)}.",
                "unknown_path")
            return
        if ctx is None:  # KeyAuth answered
            return
        self._route(flow, ctx, config)

    def _route(self, flow: http.HTTPFlow, ctx: context.RequestContext, config: Config) -> None:
        fmt = ctx.protocol.error_format
        body = parse_json(flow.request.content or b"")
        if not isinstance(body, dict):
            flow.response = error_response(
                fmt, 400, "The request body must be a JSON object.", "invalid_json")
            return
        model = ctx.route.model_from_path(ctx.path) or body.get("model")
        if not isinstance(model, str) or not model:
            flow.response = error_response(
                fmt, 400, "The request body must name a 'model'.", "missing_model")
            return
        if len(model) > MAX_MODEL_NAME or not model.isprintable():
            # e.g. a lone surrogate: no event naming it could ever be stored
            flow.response = error_response(
                fmt, 400, "The 'model' must be a printable name of at most "
                f"{MAX_MODEL_NAME} characters.", "invalid_model")
            return
        backend = config.backend_for(model)
        if backend is None:
            flow.response = error_response(
                fmt, 404, f"The model '{model}' does not exist or you do not have access to it.",
                "model_not_found")
            return
        if backend.auth.missing_env:
            flow.response = error_response(
                fmt, 503, f"The backend for model '{model}' is not configured.",
                "backend_unavailable")
            return
        ctx.model, ctx.backend = model, backend
        ctx.plan_id = ctx.plan.id if ctx.plan else config.default_plan
        ctx.stream = ctx.route.streaming_path or body.get("stream") is True
        ctx.prompt_tokens, ctx.prompt_bound = prompt_size(body)
        ctx.request_bytes = len(flow.request.raw_content or b"")
        ctx.body = body  # the limits may set its output limit
        if backend.usage_fallback.tokenizer and ctx.protocol in COUNTED_PROTOCOLS:
            ctx.tokenizer_input = body  # if no usage comes, the backend counts this
        if ctx.protocol.accepts_stream_options and inject_include_usage(body):
            ctx.usage_injected = True
            flow.request.content = dump_json(body)
            # The meter edits this stream; keep it uncompressed so it can.
            flow.request.headers["accept-encoding"] = "identity"
        request = flow.request
        request.scheme, request.host, request.port = backend.scheme, backend.host, backend.port
        request.path = upstream_path(backend, request.path)
        for name in CALLER_HEADERS:
            request.headers.pop(name, None)
        request.headers["X-User-ID"] = str(ctx.caller.user_id)
        request.headers["X-Plan-ID"] = ctx.plan_id
        context.summarize(flow)
