"""Error responses in the caller's own API format, so its SDK raises its typed error."""

from __future__ import annotations

import json
import weakref

from mitmproxy import http

# status -> (OpenAI error type, Anthropic error type, Google status)
_KINDS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT"),
    401: ("invalid_request_error", "authentication_error", "UNAUTHENTICATED"),
    403: ("invalid_request_error", "permission_error", "PERMISSION_DENIED"),
    404: ("invalid_request_error", "not_found_error", "NOT_FOUND"),
    413: ("invalid_request_error", "request_too_large", "INVALID_ARGUMENT"),
    429: ("rate_limit_exceeded", "rate_limit_error", "RESOURCE_EXHAUSTED"),
    500: ("server_error", "api_error", "INTERNAL"),
    502: ("server_error", "api_error", "UNAVAILABLE"),
    503: ("server_error", "api_error", "UNAVAILABLE"),
    504: ("server_error", "api_error", "DEADLINE_EXCEEDED"),
}


def error_body(error_format: str, status: int, message: str, code: str | None = None) -> bytes:
    """The JSON error body OpenAI, Anthropic or Google would send for ``status``."""
    openai_type, anthropic_type, google_status = _KINDS.get(status, _KINDS[500])
    if error_format == "anthropic":
        body: dict = {"type": "error", "error": {"type": anthropic_type, "message": message}}
    elif error_format == "google":
        body = {"error": {"code": status, "message": message, "status": google_status}}
    else:
        body = {"error": {"message": message, "type": openai_type, "param": None, "code": code}}
    return json.dumps(body).encode()


# The code of each response the proxy made itself, whatever its format (the metrics'
# refusal reasons); nothing is added to the response.
_codes: weakref.WeakKeyDictionary[http.Response, str] = weakref.WeakKeyDictionary()


def error_response(
    error_format: str, status: int, message: str, code: str | None = None
) -> http.Response:
    response = http.Response.make(
        status, error_body(error_format, status, message, code),
        {"content-type": "application/json"},
    )
    if code:
        _codes[response] = code
    return response


def code_of(response: http.Response) -> str | None:
    """The code ``error_response`` made ``response`` with; None for any other response."""
    return _codes.get(response)
