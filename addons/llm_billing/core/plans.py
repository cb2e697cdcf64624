"""Plans, reservations and rate arithmetic (sans-I/O).

Seed 000's plan table is the default; ``[plans.<id>]`` tables in config.toml replace or add
plans. A quota or rate of 0 (or absent) means unlimited. Overage is either "blocked" or a
price per token past the monthly quota.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .validation import ConfigValueError, non_negative_decimal, non_negative_int

BLOCKED = "blocked"
CLAMP, REFUSE = "clamp", "refuse"


class PlanError(ConfigValueError):
    pass


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    name: str
    price: Decimal  # per month, for display and Stripe
    monthly_tokens: int  # 0: unlimited
    tokens_per_minute: int  # 0: unlimited
    overage: str  # "blocked", or the decimal price per token past the quota
    stripe_price: str | None = None
    # A request that would not fit (quota left, TPM capacity): "clamp" its output limit to
    # what fits, or "refuse" it. Default: clamp on plans that block at their quota.
    when_over: str = ""
    default_output_limit: int = 4096  # the output limit a clamped request gets if it had none

    @property
    def clamps(self) -> bool:
        return (self.when_over or (CLAMP if self.blocks_at_quota else REFUSE)) == CLAMP

    @property
    def blocks_at_quota(self) -> bool:
        return self.monthly_tokens > 0 and self.overage == BLOCKED

    @property
    def overage_price(self) -> Decimal | None:
        return None if self.overage == BLOCKED else Decimal(self.overage)


DEFAULT_PLANS: dict[str, dict[str, Any]] = {  # seed 000's table
    "free": {"name": "Free", "price": "0", "monthly_tokens": 10_000,
             "tokens_per_minute": 1_000, "overage": BLOCKED},
    "starter": {"name": "Starter", "price": "29", "monthly_tokens": 100_000,
                "tokens_per_minute": 10_000, "overage": "0.002",
                "stripe_price": "price_starter_llmgateway"},
    "pro": {"name": "Pro", "price": "99", "monthly_tokens": 1_000_000,
            "tokens_per_minute": 100_000, "overage": "0.001",
            "stripe_price": "price_pro_llmgateway"},
    "enterprise": {"name": "Enterprise", "price": "499", "monthly_tokens": 0,
                   "tokens_per_minute": 0, "overage": BLOCKED,
                   "stripe_price": "price_enterprise_llmgateway"},
}


def _count(value: Any, where: str) -> int:
    return non_negative_int(value, where, " (0 = unlimited)")


def parse_plan(plan_id: str, item: Any) -> Plan:
    where = f"plans.{plan_id}"
    if not isinstance(item, dict):
        raise PlanError(f"{where}: must be a table")
    known = {"name", "price", "monthly_tokens", "tokens_per_minute", "overage", "stripe_price",
             "when_over", "default_output_limit"}
    if unknown := set(item) - known:
        raise PlanError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    overage = str(item.get("overage", BLOCKED))
    if overage != BLOCKED:
        non_negative_decimal(overage, f"{where}.overage")
    stripe_price = item.get("stripe_price")
    if stripe_price is not None and not isinstance(stripe_price, str):
        raise PlanError(f"{where}.stripe_price: must be a string")
    when_over = item.get("when_over", "")
    if when_over not in ("", CLAMP, REFUSE):
        raise PlanError(f"{where}.when_over: must be {CLAMP!r} or {REFUSE!r}")
    default_output = non_negative_int(item.get("default_output_limit", 4096),
                                      f"{where}.default_output_limit")
    return Plan(
        id=plan_id, name=str(item.get("name", plan_id)),
        price=non_negative_decimal(item.get("price", "0"), f"{where}.price"),
        monthly_tokens=_count(item.get("monthly_tokens", 0), f"{where}.monthly_tokens"),
        tokens_per_minute=_count(item.get("tokens_per_minute", 0),
                                 f"{where}.tokens_per_minute"),
        overage=overage, stripe_price=stripe_price, when_over=when_over,
        default_output_limit=default_output,
    )


def parse_plans(data: Any) -> dict[str, Plan]:
    """Seed 000's plans, overridden or extended by the config's ``[plans]``."""
    if data is not None and not isinstance(data, dict):
        raise PlanError("plans: must be a table of [plans.<id>] tables")
    merged = {**DEFAULT_PLANS, **(data or {})}
    return {plan_id: parse_plan(plan_id, item) for plan_id, item in merged.items()}


# --- Reservations ------------------------------------------------------------------------

def overage_split(before: int, added: int, quota: int) -> int:
    """How many of ``added`` tokens fall past ``quota`` when the total was ``before``."""
    if quota <= 0:
        return 0
    return max(0, before + added - quota) - max(0, before - quota)


# --- Tokens per minute -------------------------------------------------------------------

class TokenBucket:
    """Tokens-per-minute as a bucket of ``capacity`` refilled at capacity/60 per second.

    ``take`` reserves an estimate; ``adjust`` settles it to the real usage later, which may
    leave the bucket in debt (negative) — the next requests then wait for it to refill.
    """

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / 60.0
        self._level = float(capacity)
        self._at = now

    def level(self, now: float) -> float:
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def wait_for(self, tokens: int, now: float) -> float:
        """Seconds until ``tokens`` can be taken (0: now; inf: never, above capacity)."""
        if tokens > self.capacity:
            return math.inf
        missing = tokens - self.level(now)
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, tokens: int, now: float) -> None:
        self._level = self.level(now) - tokens

    def adjust(self, delta: int, now: float) -> None:
        self._level = self.level(now) - delta

    def reset_after(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level(now)) / self.rate)
