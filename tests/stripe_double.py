"""A local stand-in for Stripe's API, for the real stripe library to talk to.

It answers the endpoints the proxy uses in Stripe's JSON shapes, records every request
(form-decoded), refuses a second meter event with the same identifier as Stripe does,
serves the subscriptions a test puts in ``subscriptions`` (``GET /v1/subscriptions/{id}``:
Stripe's current state, which webhook events only point at; 404 ``resource_missing`` for
others; ``GET /v1/subscriptions?customer=``: a customer's, not cancelled, newest first),
and can be switched "down" (HTTP 500 on every endpoint) to test retries. Also
signs webhook payloads the way Stripe does:
``Stripe-Signature: t=<ts>,v1=HMAC-SHA256(secret, "<ts>.<payload>")``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def event(kind: str, obj: dict[str, Any], event_id: str | None = None) -> bytes:
    """A webhook payload as Stripe sends it."""
    return json.dumps({
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}", "object": "event",
        "api_version": "2025-09-30.clover", "created": int(time.time()),
        "data": {"object": obj}, "livemode": False, "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None}, "type": kind,
    }).encode()


def subscription(subscription_id: str, customer: str | None, price: str,
                 status: str = "active", user_id: str | None = None) -> dict[str, Any]:
    """A subscription in Stripe's shape (API 2025-09-30), with one item of ``price``."""
    return {
        "id": subscription_id, "object": "subscription", "customer": customer,
        "status": status, "metadata": {"user_id": user_id} if user_id else {},
        "cancel_at_period_end": False, "created": int(time.time()), "livemode": False,
        "items": {"object": "list", "has_more": False, "data": [{
            "id": f"si_{subscription_id}", "object": "subscription_item", "quantity": 1,
            "price": {"id": price, "object": "price"}}]}}


def unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (``a[b][0][c]=v``) back into nested dicts (lists as dicts)."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return root


@dataclass
class Received:
    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]


@dataclass
class StripeDouble:
    requests: list[Received] = field(default_factory=list)
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    down: bool = False
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def start(self) -> StripeDouble:
        double = self

        class Handler(_Handler):
            stripe = double

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    def respond(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, dict]:
        n = next(self._ids)
        now = int(time.time())
        if self.down:
            return 500, {"error": {"type": "api_error",
                                   "message": "An unknown error occurred"}}
        if path == "/v1/subscriptions" and method == "GET":  # not cancelled, newest first
            listed = [s for s in reversed(self.subscriptions.values())
                      if s.get("customer") == params.get("customer")
                      and s.get("status") != "canceled"]
            return 200, {"object": "list", "data": listed, "has_more": False,
                         "url": "/v1/subscriptions"}
        if path.startswith("/v1/subscriptions/") and method == "GET":
            subscription_id = path.removeprefix("/v1/subscriptions/")
            if doc := self.subscriptions.get(subscription_id):
                return 200, doc
            return 404, {"error": {
                "type": "invalid_request_error", "code": "resource_missing", "param": "id",
                "message": f"No such subscription: '{subscription_id}'"}}
        if path == "/v1/checkout/sessions" and method == "POST":
            session_id = f"cs_test_{n:06d}"
            return 200, {
                "id": session_id, "object": "checkout.session", "mode": params.get("mode"),
                "url": f"https://checkout.stripe.com/c/pay/{session_id}",
                "client_reference_id": params.get("client_reference_id"),
                "customer": params.get("customer"), "metadata": params.get("metadata", {}),
                "status": "open", "payment_status": "unpaid", "subscription": None,
                "success_url": params.get("success_url"),
                "cancel_url": params.get("cancel_url"), "created": now, "livemode": False}
        if path == "/v1/billing_portal/sessions" and method == "POST":
            return 200, {"id": f"bps_{n:06d}", "object": "billing_portal.session",
                         "customer": params.get("customer"),
                         "url": f"https://billing.stripe.com/p/session/test_{n:06d}",
                         "return_url": params.get("return_url"), "created": now,
                         "livemode": False}
        if path == "/v1/billing/meter_events" and method == "POST":
            identifier = params.get("identifier") or uuid.uuid4().hex
            if identifier in self.meter_events:
                return 400, {"error": {
                    "type": "invalid_request_error", "code": "resource_already_exists",
                    "message": f"An event with identifier {identifier} already exists."}}
            doc = {"object": "billing.meter_event", "created": now,
                   "event_name": params.get("event_name"), "identifier": identifier,
                   "livemode": False, "payload": params.get("payload", {}),
                   "timestamp": int(params.get("timestamp", now))}
            self.meter_events[identifier] = doc
            return 200, doc
        return 404, {"error": {"type": "invalid_request_error",
                               "message": f"Unrecognized request URL ({method}: {path})."}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, no 40 ms ACK wait
    stripe: StripeDouble

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        self._answer("GET", unquote(path), unflatten(parse_qsl(query)))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
        self._answer("POST", self.path.partition("?")[0],
                     unflatten(parse_qsl(body, keep_blank_values=True)))

    def _answer(self, method: str, path: str, params: dict[str, Any]) -> None:
        self.stripe.requests.append(Received(method, path, params, dict(self.headers)))
        status, doc = self.stripe.respond(method, path, params)
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:14]}")
        self.end_headers()
        self.wfile.write(data)
