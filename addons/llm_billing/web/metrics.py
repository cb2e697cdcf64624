"""``/metrics``: Prometheus text (prometheus-client), from a registry of this proxy's own.

Counted where it happens, at the cost of a counter increment: each settled request (the
``Metrics`` addon is a consumer of the Settle step: requests by route, model and status,
tokens by class, cost, upstream duration), the hooks around the upstream (time to first
byte, the latency the proxy adds each way) and refusals (401/429 by reason). Read at
scrape time: the event writer's queue, the journal's files, the database failures the
driver saw, the key cache's hits and misses.

Label values stay few: routes and backends are configured ones, a status is a number, and
models are the names requests used, up to ``MAX_MODELS`` of them (then ``other``).

``metrics_token`` protects the page: ``MetricsGate`` runs before KeyAuth (which strips
``Authorization`` from every request) and refuses a ``/metrics`` request without that bearer
token; it keeps nothing.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mitmproxy import ctx, http
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import context, errors
from ..core.events import event_cost, tokens_billed
from ..core.outcome import Outcome
from ..core.rollups import TOKEN_CLASSES
from ..settings import Settings
from ..storage.database import Database

if TYPE_CHECKING:
    from ..eventlog import EventLog
    from ..keyauth import KeyAuth

logger = logging.getLogger(__name__)

PATH = "/metrics"
MAX_MODELS = 200  # distinct model labels; later models count as "other"
MAX_MODEL_LENGTH = 100
OTHER = "other"
UPSTREAM_BUCKETS = (.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PROXY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)


class Metrics:
    """Addon (timing and refusal hooks), Settle consumer and route provider."""

    def __init__(self, settings: Settings, database: Database, event_log: EventLog,
                 key_auth: KeyAuth) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("llm_proxy_requests", "Requests settled, by route, model and "
                                "HTTP status ('none': no response).",
                                ["route", "model", "status"], registry=r)
        self.tokens = Counter("llm_proxy_tokens", "Tokens of billed requests by class: prompt "
                              "and completion are all of them, the others subsets.",
                              ["class", "model"], registry=r)
        self.billed = Counter("llm_proxy_billed_tokens", "Tokens counted against quotas (the "
                              "metering expression's value where a route has one).",
                              ["model"], registry=r)
        self.cost = Counter("llm_proxy_cost", "Cost of billed requests at the configured "
                            "prices.", ["model", "currency"], registry=r)
        self.ttfb = Histogram("llm_proxy_upstream_ttfb_seconds", "From sending the request "
                              "upstream to its response headers.", ["backend"],
                              buckets=UPSTREAM_BUCKETS, registry=r)
        self.duration = Histogram("llm_proxy_upstream_duration_seconds", "From sending the "
                                  "request upstream to the end of its response.", ["backend"],
                                  buckets=UPSTREAM_BUCKETS, registry=r)
        self.added = Histogram("llm_proxy_added_latency_seconds", "Latency the proxy adds: "
                               "'request' from the request received to sent upstream, "
                               "'response' from the upstream's response headers to the "
                               "client's (as far as addon hooks see).", ["direction"],
                               buckets=PROXY_BUCKETS, registry=r)
        self.refusals = Counter("llm_proxy_refusals", "401 and 429 answers of the proxy "
                                "itself, by status and reason.", ["status", "reason"],
                                registry=r)
        Gauge("llm_proxy_event_queue_depth", "Events waiting for the event writer (queued or "
              "being written).", registry=r).set_function(event_log.backlog)
        Gauge("llm_proxy_journal_files", "Event journal segment files not yet finished with.",
              registry=r).set_function(lambda: event_log.journal.files()
                                       if event_log.journal else 0)
        r.register(_ReadCounters(database, key_auth))
        self._request_latency = self.added.labels("request")
        self._response_latency = self.added.labels("response")
        self._models: set[str] = set()
        self._per_model: dict[tuple[str, str], _ModelCounters] = {}
        self._warned_open = False

    def load(self, loader) -> None:
        loader.add_option(
            "metrics_token", str, "",
            "Bearer token /metrics requires ('Authorization: Bearer <token>'); empty: open.")

    def configure(self, updated: set[str]) -> None:
        if "metrics_token" in updated and not ctx.options.metrics_token \
                and not self._warned_open:
            self._warned_open = True  # once: at startup, not at every option change
            logger.warning(f"{PATH} is open: anyone who can reach the proxy's port can read it "
                           "(requests, models, tokens and costs by model). Protect it with "
                           "--set metrics_token=<token> (scrapers then send 'Authorization: "
                           "Bearer <token>') or keep the port off untrusted networks.")

    def routes(self) -> list[Route]:
        return [Route(PATH, self.endpoint)]

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def gate(self) -> MetricsGate:
        """The addon that checks ``metrics_token``; it goes before KeyAuth."""
        return MetricsGate()

    # hooks: after the limits and the event log, so "sent" is right before going upstream
    def request(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if rc is None or rc.backend is None or flow.response or rc.replayed:
            return
        rc.sent_upstream = now = time.time()
        if flow.request.timestamp_end:
            self._request_latency.observe(now - flow.request.timestamp_end)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        response = flow.response
        if rc is None or rc.backend is None or not rc.sent_upstream or response is None:
            return
        self.ttfb.labels(rc.backend.name).observe(response.timestamp_start - rc.sent_upstream)
        self._response_latency.observe(time.time() - response.timestamp_start)

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.status_code not in (401, 429):
            return
        if (code := errors.code_of(response)) is None:
            return  # the upstream's answer, or not ours to count
        if response.status_code == 429 and context.of(flow) is None:
            code = "unknown_key_lookups"  # KeyAuth's, before any key was known
        self.refusals.labels(str(response.status_code), code).inc()

    def settled(self, rc: context.RequestContext, outcome: Outcome) -> None:
        """The flow ended (see settle.py)."""
        model = self._model(rc.model)
        status = "none" if outcome.status is None else str(outcome.status)
        self.requests.labels(rc.route.path, model, status).inc()
        if rc.sent_upstream and rc.backend is not None:
            self.duration.labels(rc.backend.name).observe(time.time() - rc.sent_upstream)
        usage, config = outcome.usage, self.settings.config
        if usage is None or config is None:
            return
        counters = self._counters(model, config.prices.currency)
        for name, counter in counters.tokens:
            if count := getattr(usage, name):
                counter.inc(count)
        counters.billed.inc(tokens_billed(rc, outcome))
        if cost := event_cost(rc, outcome, config.prices):
            counters.cost.inc(float(cost))

    def _model(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS or len(model) > MAX_MODEL_LENGTH:
            return OTHER
        self._models.add(model)
        return model

    def _counters(self, model: str, currency: str) -> _ModelCounters:
        """The model's counters, looked up once (labels() costs a lock and a tuple)."""
        counters = self._per_model.get((model, currency))
        if counters is None:
            counters = self._per_model[model, currency] = _ModelCounters(
                tokens=tuple((name, self.tokens.labels(name.removesuffix("_tokens"), model))
                             for name in TOKEN_CLASSES),
                billed=self.billed.labels(model), cost=self.cost.labels(model, currency))
        return counters


@dataclass(frozen=True, slots=True)
class _ModelCounters:
    tokens: tuple[tuple[str, Counter], ...]  # (Usage field, its counter)
    billed: Counter
    cost: Counter


class MetricsGate:
    """Refuses ``/metrics`` without the ``metrics_token`` bearer; reads the header only."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        expected = ctx.options.metrics_token
        path = flow.request.path.partition("?")[0]
        if not expected or not (path == PATH or path.startswith(PATH + "/")):
            return
        scheme, _, given = flow.request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              expected.encode()):
            return
        flow.response = http.Response.make(
            401, json.dumps({"error": "metrics need 'Authorization: Bearer <metrics_token>'"}),
            {"content-type": "application/json", "www-authenticate": "Bearer"})


class _ReadCounters:
    """Counters kept as plain numbers elsewhere, read at scrape time."""

    def __init__(self, database: Database, key_auth: KeyAuth) -> None:
        self._reads: list[tuple[str, str, str, Callable[[], tuple[tuple[str, float], ...]]]] = [
            ("llm_proxy_database_errors", "Database failures the driver saw: failed commands "
             "and failed heartbeats (server unreachable).", "kind",
             lambda: (("command", database.monitor.command_failures),
                      ("heartbeat", database.monitor.heartbeat_failures))),
            ("llm_proxy_key_cache_lookups", "API key lookups: 'hit' served from the cache, "
             "'miss' waited for the database (hit ratio: hit / (hit + miss)).", "result",
             lambda: tuple(zip(("hit", "miss"), key_auth.cache_counts(), strict=True))),
        ]

    def collect(self) -> Iterator[Metric]:
        for name, documentation, label, read in self._reads:
            family = CounterMetricFamily(name, documentation, labels=[label])
            for value, count in read():
                family.add_metric([value], count)
            yield family
