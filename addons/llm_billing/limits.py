"""Limits addon: monthly token quotas and tokens-per-minute, checked before a request
runs and settled to its real usage after.

Before (``request``): the request's need (core/admission.py) is taken from the user's TPM
bucket at once — before anything is awaited, so concurrent requests see each other — then
from this instance's lease of the user's TPM bucket shared by every instance (tpm.py), and
held against its lease of a blocking plan's monthly quota (ledger.py).
A plan that clamps lowers the request's output limit to what fits; a request that can
never fit gets a 429 the SDKs do not retry (``x-should-retry: false``); one that must
wait for the bucket gets a 429 with ``Retry-After``. After (``settled``, from the Settle
addon): the hold becomes what the request was billed. Every response to a limited plan,
its 429s included, carries OpenAI's ``x-ratelimit-{limit,remaining,reset}-tokens`` headers
(TPM) and ``x-ratelimit-{limit,remaining,reset}-quota-tokens`` (the monthly quota).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mitmproxy import ctx, http
from pymongo.errors import PyMongoError

from . import background, context
from .core.admission import Need, need_of, set_output_limit
from .core.api_info import quota_left
from .core.dates import month_of, openai_duration, seconds_to_next_month
from .core.events import tokens_billed
from .core.outcome import Outcome
from .core.plans import Plan, TokenBucket
from .core.usage import dump_json
from .errors import error_response
from .settings import Settings
from .storage.database import Database
from .storage.ledger import IDLE_RELEASE, Account, QuotaLedger
from .storage.tpm import TpmAccount, TpmLeases

logger = logging.getLogger(__name__)

OPENAI_HOST = "api.openai.com"


@dataclass(slots=True)
class Hold:
    account: Account
    tokens: int  # held against the account (prompt bound + output)
    bucket: TokenBucket | None
    bucket_tokens: int  # taken from the bucket (prompt estimate + output)
    tpm: TpmAccount | None = None  # the shared TPM lease it was taken from too


class Limits:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.settings = settings
        self.ledger = QuotaLedger(database, uuid.uuid4().hex[:12])
        self.buckets: dict[Any, TokenBucket] = {}  # this instance's own view of TPM
        self.tpm = TpmLeases(database)  # TPM across instances
        self._flusher: asyncio.Task | None = None
        self._tpm_flusher: asyncio.Task | None = None
        self._reading: dict[str, asyncio.Task] = {}  # accounts whose used tokens are read

    def load(self, loader) -> None:
        loader.add_option("limits", bool, True, "Enforce plan quotas and tokens per minute.")
        loader.add_option("usage_flush_interval_ms", int, 500,
                          "How often settled usage is written to billing.usage.")

    def running(self) -> None:
        if self._flusher is None:
            interval = ctx.options.usage_flush_interval_ms / 1000
            self._flusher = asyncio.create_task(self.ledger.run(interval))
            self._tpm_flusher = asyncio.create_task(self.tpm.run(interval))

    async def done(self) -> None:
        await background.stop(self._flusher)
        await background.stop(self._tpm_flusher)
        await self.ledger.close(timeout=ctx.options.event_shutdown_timeout)
        await self.tpm.close(timeout=ctx.options.event_shutdown_timeout)

    async def request(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if (rc is None or flow.response or rc.replayed or rc.backend is None
                or not ctx.options.limits or not rc.protocol.billed):
            return
        config = self.settings.config
        assert config is not None
        body, rc.body = rc.body or {}, None
        plan = rc.plan or config.plan(None)
        need = need_of(body, rc.protocol, plan, rc.prompt_tokens, rc.prompt_bound,
                       config.reserve_output_tokens)
        now_mono, now = time.monotonic(), datetime.now(UTC)
        bucket = self._bucket(rc.caller.user_id, plan, now_mono)
        output = need.output

        def rate(output: int) -> int:
            """What the bucket holds for the request: a request that set no output limit
            holds what one usually uses (it may use more: the bucket then goes into debt),
            so that a clamping plan's generous default does not drain it."""
            if need.limited:
                return need.prompt + output
            return need.prompt + min(output, config.reserve_output_tokens)

        leased_tpm: TpmAccount | None = None
        if bucket is not None:
            if need.minimum > bucket.capacity:
                return await self._refuse(
                    flow, rc, bucket, now_mono,
                    f"Request too large for plan {plan.name}: it needs at least "
                    f"{need.minimum} tokens, the limit is {plan.tokens_per_minute} tokens per "
                    "minute. Shorten the prompt or lower the output limit.",
                    "rate_limit_exceeded", 60, retry=False, plan=plan)
            if plan.clamps:
                output = min(output, bucket.capacity - need.prompt)
            if (wait := bucket.wait_for(rate(output), now_mono)) > 0:
                return await self._refuse_tpm(flow, rc, bucket, plan, rate(output), wait)
            bucket.take(rate(output), now_mono)  # before any await: see module doc
            tpm = self.tpm.account(rc.caller.user_id, plan.tokens_per_minute)
            if (leased := await self._lease(tpm, rate(output))) is False:  # other instances
                bucket.adjust(-rate(output), time.monotonic())
                wait = tpm.wait_for(rate(output), time.time())
                return await self._refuse_tpm(flow, rc, bucket, plan, rate(output), wait)
            leased_tpm = tpm if leased else None
        account = self.ledger.account(rc.caller.user_id, month_of(now), plan)
        if plan.monthly_tokens and not plan.blocks_at_quota and not account.used_read:
            self._read_used(account)  # for the quota headers; a lease reads it otherwise
        least = need.prompt_bound + min(output, need.least_output)
        try:
            held = await self.ledger.reserve(account, need.prompt_bound + output, least)
        except Exception as e:  # a blocking plan's quota can't be checked: fail closed
            self._undo(account, bucket, leased_tpm, rate(output))
            if isinstance(e, PyMongoError):
                logger.warning(f"Quota check failed ({type(e).__name__}) for {account.key}")
            else:  # e.g. a usage document that is not ours to read: still fail closed
                logger.exception(f"Quota check failed for {account.key}")
            flow.response = error_response(rc.protocol.error_format, 503,
                                           "Usage limits are temporarily unavailable; retry "
                                           "shortly.")
            return
        if not held:
            self._undo(account, bucket, leased_tpm, rate(output))
            if not self.ledger.exhausted(account, least):  # held by requests in flight
                return await self._refuse(
                    flow, rc, bucket, now_mono, f"Your monthly quota on plan {plan.name} is "
                    "held by requests in progress. Please try again shortly.",
                    "rate_limit_exceeded", IDLE_RELEASE, account=account)
            return await self._refuse(
                flow, rc, bucket, now_mono,
                f"You exceeded your monthly quota of {plan.monthly_tokens} tokens on plan "
                f"{plan.name}. Upgrade your plan to continue.", "insufficient_quota",
                seconds_to_next_month(now), retry=False, account=account)
        taken = rate(output)
        if plan.blocks_at_quota:
            output = min(output, held - need.prompt_bound)
        if bucket is not None and rate(output) < taken:  # clamped: give the rest back
            bucket.adjust(rate(output) - taken, now_mono)
            if leased_tpm is not None:
                leased_tpm.give(taken - rate(output))
        rc.hold = Hold(account, held, bucket, rate(output), leased_tpm)
        rc.ledger = {"usage": account.key, "instance": self.ledger.instance}
        self._apply_output_limit(flow, rc, body, need, plan, output)

    def _apply_output_limit(self, flow: http.HTTPFlow, rc: context.RequestContext,
                            body: dict[str, Any], need: Need, plan: Plan, output: int) -> None:
        """The request may use only what it holds: say so in the request itself."""
        if not (plan.blocks_at_quota or output < need.output) or not body:
            return
        if not need.limited or output < need.output:
            assert rc.backend is not None
            set_output_limit(body, rc.protocol, output,
                             openai_native=rc.backend.host == OPENAI_HOST)
            rc.clamped_output = output
        # Sent as measured, even unchanged: a key given twice is read as its last value here
        # but as its first by some servers.
        flow.request.content = dump_json(body)

    def _read_used(self, account: Account) -> None:
        """Read the account's used tokens in the background, once at a time."""
        if account.key not in self._reading:
            task = asyncio.create_task(self._read(account))
            self._reading[account.key] = task

    async def _read(self, account: Account) -> None:
        try:
            await self.ledger.read_used(account)
        except PyMongoError as e:  # the next request tries again
            logger.warning(f"Reading used tokens of {account.key} failed: {type(e).__name__}")
        finally:
            self._reading.pop(account.key, None)

    async def _lease(self, tpm: TpmAccount, tokens: int) -> bool | None:
        """``tokens`` taken from this instance's lease of the user's shared TPM bucket
        (True), or not: the bucket lacks them (False), or the database did not answer
        (None: admitted on this instance's bucket alone, as before TPM was shared)."""
        try:
            return await self.tpm.acquire(tpm, tokens)
        except PyMongoError as e:
            logger.warning(f"TPM lease for {tpm.key} failed ({type(e).__name__}): "
                           "this instance's own bucket applies")
            return None

    def _undo(self, account: Account, bucket: TokenBucket | None, tpm: TpmAccount | None,
              tokens: int) -> None:
        self.ledger.release(account)
        if bucket is not None:
            bucket.adjust(-tokens, time.monotonic())
        if tpm is not None:
            self.tpm.settle(tpm, -tokens)

    def _bucket(self, user_id: Any, plan: Plan, now: float) -> TokenBucket | None:
        if not plan.tokens_per_minute:
            return None
        bucket = self.buckets.get(user_id)
        if bucket is None or bucket.capacity != plan.tokens_per_minute:
            bucket = self.buckets[user_id] = TokenBucket(plan.tokens_per_minute, now)
        return bucket

    async def _refuse(self, flow: http.HTTPFlow, rc: context.RequestContext,
                      bucket: TokenBucket | None, now: float, message: str, code: str,
                      wait: float, retry: bool = True, account: Account | None = None,
                      plan: Plan | None = None) -> None:
        """A 429 with the headers a success carries (TPM and monthly quota). One that
        retrying cannot cure says ``x-should-retry: false``: the openai and anthropic SDKs
        honour it and give up at once instead of retrying for minutes."""
        if account is None and plan is not None and plan.monthly_tokens:  # before the quota
            account = await self._read_account(rc.caller.user_id, plan)
        response = error_response(rc.protocol.error_format, 429, message, code)
        response.headers["retry-after"] = str(max(1, math.ceil(wait)))
        if not retry:
            response.headers["x-should-retry"] = "false"
        if bucket is not None:
            tpm = self.tpm.accounts.get((rc.caller.user_id, bucket.capacity))
            _rate_headers(response, bucket, tpm, now)
        if account is not None:
            _quota_headers(response, account, datetime.now(UTC))
        flow.response = response

    async def _refuse_tpm(self, flow: http.HTTPFlow, rc: context.RequestContext,
                          bucket: TokenBucket, plan: Plan, tokens: int, wait: float) -> None:
        message = (f"Rate limit reached on tokens per minute (TPM): limit "
                   f"{plan.tokens_per_minute}, requested {tokens}. "
                   f"Please try again in {openai_duration(wait)}.")
        await self._refuse(flow, rc, bucket, time.monotonic(), message,
                           "rate_limit_exceeded", wait, plan=plan)

    async def _read_account(self, user_id: Any, plan: Plan) -> Account:
        """The user's account of this month with its used tokens read (if the database
        answers: else the refusal goes without the quota headers)."""
        account = self.ledger.account(user_id, month_of(datetime.now(UTC)), plan)
        try:
            if not account.used_read:
                await self.ledger.read_used(account)
        except PyMongoError as e:
            logger.warning(f"Reading used tokens of {account.key} failed: {type(e).__name__}")
        finally:
            self.ledger.release(account)
        return account

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rc = context.of(flow)
        if rc is not None and isinstance(rc.hold, Hold) and flow.response is not None:
            if rc.hold.bucket is not None:
                _rate_headers(flow.response, rc.hold.bucket, rc.hold.tpm, time.monotonic())
            _quota_headers(flow.response, rc.hold.account, datetime.now(UTC))

    def settled(self, rc: context.RequestContext, outcome: Outcome) -> None:
        """The flow ended (see settle.py): its hold becomes what it was billed."""
        if not isinstance(rc.hold, Hold):
            return
        hold, rc.hold = rc.hold, None
        used = math.ceil(tokens_billed(rc, outcome))
        write = self.ledger.settle(hold.account, hold.tokens, used, outcome.usage)
        rc.ledger = {**(rc.ledger or {}), "write": write}  # on its event: see ledger.recover
        if hold.bucket is not None:
            hold.bucket.adjust(used - hold.bucket_tokens, time.monotonic())
        if hold.tpm is not None:
            self.tpm.settle(hold.tpm, used - hold.bucket_tokens)


def _quota_headers(response: http.Response, account: Account, now: datetime) -> None:
    """The month's allowance left, once the account's used tokens are known: what the
    database holds, what this instance settled but has not written, and what requests in
    flight (this one included) hold; it resets when the next month starts."""
    left = quota_left(account.plan, account.used + account.unflushed, account.reserved)
    if left is not None and account.used_read:
        response.headers["x-ratelimit-limit-quota-tokens"] = str(account.plan.monthly_tokens)
        response.headers["x-ratelimit-remaining-quota-tokens"] = str(left)
        response.headers["x-ratelimit-reset-quota-tokens"] = openai_duration(
            seconds_to_next_month(now))


def _rate_headers(response: http.Response, bucket: TokenBucket, tpm: TpmAccount | None,
                  now: float) -> None:
    """TPM left: this instance's bucket, or less when the shared bucket (as last seen,
    with this instance's lease) holds less."""
    level = bucket.level(now)
    if tpm is not None:
        level = min(level, tpm.level(time.time()))
    response.headers["x-ratelimit-limit-tokens"] = str(bucket.capacity)
    response.headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(level)))
    response.headers["x-ratelimit-reset-tokens"] = openai_duration(
        max(0.0, (bucket.capacity - level) / bucket.rate))
