"""BackendTokenizer addon: responses that report no usage, counted by their backend.

Settle hands over a flow whose response ended without usage (a llama-cpp-python stream,
a cut stream, counts not trusted) when its backend's ``usage_fallback`` is ``tokenize``:
the prompt and the delivered output are counted with the backend's own tokenizer
(core/backend_tokenizer.py says how, per server) in a background task — the client has
its last byte already — and the flow is then settled with those counts, or with the
estimate if the tokenizer fails or is too slow. At shutdown, counts in flight are waited
for before the ledger and the event log close (this addon is listed before them).

Whatever the fallback, a backend whose complete responses carry no usage is named once
in the log, so an operator knows how its requests are billed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Generator
from dataclasses import replace
from typing import Any

import httpx

from .core.backend_tokenizer import (
    COUNTED_PROTOCOLS,
    CountedUsage,
    TokenizeCall,
    TokenizerError,
    usage_calls,
)
from .core.config import Backend
from .core.outcome import Outcome
from .core.redact import Redactor
from .core.request import RequestContext
from .core.usage import Usage
from .upstream_auth import apply_credential

logger = logging.getLogger(__name__)

TIMEOUT = 10.0  # seconds for all of one response's tokenizer calls
MAX_REASON = 300  # characters of why counting failed, in the log and the event
CONCURRENCY = 8  # tokenizer calls in flight per backend: a burst must not swamp it


class BackendTokenizer:
    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport  # tests: a backend in-process
        self._client: httpx.AsyncClient | None = None
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._tasks: set[asyncio.Task] = set()
        self._warned: set[str] = set()
        # httpx logs each request's URL at INFO: a query credential (and an alert URL's
        # token, quota_alerts.py) would show in the proxy's log. Its warnings still do.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def wants(self, rc: RequestContext, outcome: Outcome) -> bool:
        """Whether this settled flow's usage is for the backend to count. A backend
        whose complete response carries no usage is named in the log, once."""
        meter = rc.meter
        if meter is None or rc.backend is None or outcome.usage is None:
            return False
        tracker = meter.tracker
        if tracker.usage is not None and tracker.usage_anomaly is None:
            return False  # the provider reported it
        if outcome.complete:
            self._warn_once(rc.backend)
        return (rc.tokenizer_input is not None and rc.protocol in COUNTED_PROTOCOLS
                and not rc.replayed  # offline re-billing stays offline: estimated
                and tracker.output_text is not None)

    def count_later(self, rc: RequestContext, outcome: Outcome,
                    settle: Callable[[Outcome], None]) -> None:
        """Count in the background, then ``settle`` with the counted outcome."""
        task = asyncio.create_task(self._count(rc, outcome, settle))
        self._tasks.add(task)  # held until done, or it may be collected mid-run
        task.add_done_callback(self._tasks.discard)

    async def done(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=TIMEOUT + 1)
        if self._client is not None:
            await self._client.aclose()

    async def _count(self, rc: RequestContext, outcome: Outcome,
                     settle: Callable[[Outcome], None]) -> None:
        assert rc.backend is not None and rc.meter is not None
        assert rc.tokenizer_input is not None
        backend = rc.backend
        calls = usage_calls(backend.usage_fallback, rc.protocol, rc.tokenizer_input,
                            rc.meter.tracker.output_text or "")
        try:
            async with asyncio.timeout(TIMEOUT):
                counted = await self._run(backend, calls)
        except Exception as e:  # whatever went wrong, the request is still settled
            if not isinstance(e, TokenizerError | httpx.HTTPError | TimeoutError | ValueError):
                logger.exception(f"counting request {rc.event_id} failed")
            reason = _reason(e)
            if redactor := Redactor(rc.secrets):  # an answer quoted may hold a key
                reason = redactor.text(reason)
            reason = reason[:MAX_REASON]  # cut once redacted: no head of a secret is left
            logger.warning(f"backend {backend.name!r}: its tokenizer could not count "
                           f"request {rc.event_id} ({reason}); billed by estimate")
            settle(replace(outcome, estimate_method=f"{outcome.estimate_method}; "
                                                    f"backend tokenizer failed: {reason}"))
            return
        # Reasoning and cache counts are unknown here: only their totals are counted.
        usage = Usage(prompt_tokens=counted.prompt_tokens,
                      completion_tokens=counted.completion_tokens)
        settle(replace(outcome, usage=usage, estimated=not counted.exact,
                       estimate_method=counted.method))

    async def _run(self, backend: Backend,
                   calls: Generator[TokenizeCall, Any, CountedUsage]) -> CountedUsage:
        client = self._client = self._client or httpx.AsyncClient(
            timeout=TIMEOUT, transport=self._transport)
        slots = self._slots.setdefault(backend.name, asyncio.Semaphore(CONCURRENCY))
        headers: dict[str, str] = {}
        params: dict[str, str] = {}
        if backend.auth.value is not None:
            apply_credential(headers, params, backend.auth, backend.auth.value)
        answer = None
        try:
            while True:
                call = calls.send(answer)
                url = (f"{backend.scheme}://{backend.host}:{backend.port}"
                       f"{backend.path_prefix}{call.path}")
                async with slots:
                    response = await client.post(url, json=call.body, headers=headers,
                                                 params=params)
                if response.status_code != 200:
                    raise TokenizerError(f"{call.path} answered {response.status_code}")
                answer = response.json()
        except StopIteration as end:
            return end.value

    def _warn_once(self, backend: Backend) -> None:
        if backend.name in self._warned:
            return
        self._warned.add(backend.name)
        if backend.usage_fallback.tokenizer:
            how = f"counted with its tokenizer ({backend.usage_fallback.tokenizer})"
        else:
            how = ("estimated from characters; for exact counts set usage_fallback = "
                   '{ type = "tokenize", api = "vllm" | "llama-server" | "llama-cpp-python" }')
        logger.warning(f"backend {backend.name!r} sends responses without usage: they are {how}")


def _reason(error: Exception) -> str:
    """Why counting failed, without the URL (a query credential would be in it)."""
    if isinstance(error, TokenizerError):
        return str(error)
    if isinstance(error, TimeoutError):
        return f"no answer within {TIMEOUT:g} s"
    return type(error).__name__
