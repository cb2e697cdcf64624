"""Limits addon: monthly token quotas and tokens-per-minute, checked before a request
runs and settled to its real usage after.

Before (``request``): hold an estimate — the prompt's tokens estimated from its text plus
its output limit (or ``reserve_output_tokens``) — against the user's TPM bucket and, for
a plan that blocks at its quota, against this instance's lease of the monthly quota (see
quota.py). Refused: 429 in the caller's format with ``Retry-After``. After (``response``
/ ``error``): the hold is replaced by what the request was billed. Every response to a
limited plan carries OpenAI's ``x-ratelimit-*-tokens`` headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mitmproxy import ctx, http
from pymongo.errors import PyMongoError

from . import context
from .core.dates import month_of, openai_duration, seconds_to_next_month
from .core.events import tokens_billed
from .core.outcome import Outcome
from .core.plans import Plan, TokenBucket, reservation
from .errors import error_response
from .settings import Settings
from .storage.database import Database
from .storage.ledger import Account, QuotaLedger

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Hold:
    account: Account
    tokens: int
    bucket: TokenBucket | None


class Limits:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.settings = settings
        self.ledger = QuotaLedger(database, f"proxy-{uuid.uuid4().hex[:12]}")
        self.buckets: dict[Any, TokenBucket] = {}
        self._flusher: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option("limits", bool, True, "Enforce plan quotas and tokens per minute.")
        loader.add_option("usage_flush_interval_ms", int, 500,
                          "How often settled usage is written to billing.usage.")

    def running(self) -> None:
        if self._flusher is None:
            interval = ctx.options.usage_flush_interval_ms / 1000
            self._flusher = asyncio.create_task(self.ledger.run(interval))

    async def done(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.ledger.close(timeout=ctx.options.event_shutdown_timeout)

    async def request(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if (rc is None or flow.response or rc.replayed or rc.backend is None
                or not ctx.options.limits):
            return
        config = self.settings.config
        assert config is not None
        plan = rc.plan or config.plan(None)
        tokens = reservation(rc.prompt_chars, rc.output_limit, config.reserve_output_tokens)
        now_mono, now = time.monotonic(), datetime.now(UTC)
        bucket = self._bucket(rc.caller.user_id, plan, now_mono)
        fmt = rc.protocol.error_format
        if bucket is not None and (wait := bucket.wait_for(tokens, now_mono)) > 0:
            if math.isinf(wait):
                message = (f"Request too large for plan {plan.name}: it may use {tokens} "
                           f"tokens, the limit is {plan.tokens_per_minute} tokens per minute.")
                wait = 60.0
            else:
                message = (f"Rate limit reached on tokens per minute (TPM): limit "
                           f"{plan.tokens_per_minute}, requested {tokens}. Please try again "
                           f"in {openai_duration(wait)}.")
            self._refuse(flow, fmt, message, "rate_limit_exceeded", wait, bucket, now_mono)
            return
        account = self.ledger.account(rc.caller.user_id, month_of(now), plan)
        try:
            admitted = await self.ledger.reserve(account, tokens)
        except PyMongoError as e:  # a blocking plan's quota can't be checked: fail closed
            logger.warning(f"Quota check failed ({type(e).__name__}) for {account.key}")
            flow.response = error_response(
                fmt, 503, "Usage limits are temporarily unavailable; retry shortly.")
            return
        if not admitted:
            message = (f"You exceeded your monthly quota of {plan.monthly_tokens} tokens "
                       f"on plan {plan.name}. Upgrade your plan to continue.")
            self._refuse(flow, fmt, message, "insufficient_quota",
                         seconds_to_next_month(now), bucket, now_mono)
            return
        if bucket is not None:
            bucket.take(tokens, now_mono)
        rc.hold = Hold(account, tokens, bucket)

    def _bucket(self, user_id: Any, plan: Plan, now: float) -> TokenBucket | None:
        if not plan.tokens_per_minute:
            return None
        bucket = self.buckets.get(user_id)
        if bucket is None or bucket.capacity != plan.tokens_per_minute:
            bucket = self.buckets[user_id] = TokenBucket(plan.tokens_per_minute, now)
        return bucket

    def _refuse(self, flow: http.HTTPFlow, fmt: str, message: str, code: str, wait: float,
                bucket: TokenBucket | None, now: float) -> None:
        flow.response = error_response(fmt, 429, message, code)
        flow.response.headers["retry-after"] = str(max(1, math.ceil(wait)))
        if bucket is not None:
            _rate_headers(flow.response, bucket, now)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if rc is not None and isinstance(rc.hold, Hold) and rc.hold.bucket is not None \
                and flow.response is not None:
            _rate_headers(flow.response, rc.hold.bucket, time.monotonic())

    def settled(self, rc: context.RequestContext, outcome: Outcome) -> None:
        """The flow ended (see settle.py): its hold becomes what it was billed."""
        if not isinstance(rc.hold, Hold):
            return
        hold, rc.hold = rc.hold, None
        used = math.ceil(tokens_billed(rc, outcome))
        self.ledger.settle(hold.account, hold.tokens, used, outcome.usage)
        if hold.bucket is not None:
            hold.bucket.adjust(used - hold.tokens, time.monotonic())


def _rate_headers(response: http.Response, bucket: TokenBucket, now: float) -> None:
    response.headers["x-ratelimit-limit-tokens"] = str(bucket.capacity)
    response.headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(
        bucket.level(now))))
    response.headers["x-ratelimit-reset-tokens"] = openai_duration(bucket.reset_after(now))
