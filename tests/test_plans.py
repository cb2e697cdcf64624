"""Plan arithmetic: seed 000's table, reservations, the TPM bucket, overage splits."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_billing.core.config import ConfigError, parse_config
from llm_billing.core.dates import openai_duration
from llm_billing.core.plans import (
    TokenBucket,
    overage_split,
    parse_plans,
)


def test_seed_000_plan_table():
    plans = parse_plans(None)
    free, starter, pro, enterprise = (plans[p] for p in ("free", "starter", "pro",
                                                           "enterprise"))
    assert (free.price, free.monthly_tokens, free.tokens_per_minute) == (0, 10_000, 1_000)
    assert free.blocks_at_quota and free.overage_price is None
    assert (starter.price, starter.monthly_tokens, starter.tokens_per_minute) == \
        (29, 100_000, 10_000)
    assert starter.overage_price == Decimal("0.002") and not starter.blocks_at_quota
    assert (pro.price, pro.monthly_tokens, pro.tokens_per_minute) == (99, 1_000_000, 100_000)
    assert pro.overage_price == Decimal("0.001")
    assert enterprise.price == 499 and enterprise.monthly_tokens == 0
    assert enterprise.tokens_per_minute == 0 and not enterprise.blocks_at_quota
    assert [p.stripe_price for p in (free, starter, pro, enterprise)] == [
        None, "price_starter_llmgateway", "price_pro_llmgateway",
        "price_enterprise_llmgateway"]


def test_operators_add_and_override_plans():
    plans = parse_plans({"team": {"monthly_tokens": 5, "overage": "0.01"},
                         "free": {"monthly_tokens": 20_000, "tokens_per_minute": 2_000}})
    assert plans["team"].overage_price == Decimal("0.01")
    assert plans["free"].monthly_tokens == 20_000 and "pro" in plans


@pytest.mark.parametrize(("plans", "message"), [
    ({"x": {"monthly_tokens": -1}}, "non-negative integer"),
    ({"x": {"overage": "lots"}}, "not a number"),
    ({"x": {"quota": 1}}, "unknown field 'quota'"),
])
def test_plan_errors(plans, message):
    text = '[[backends]]\nname="b"\nurl="http://x"\nmodels=["m"]\n'
    for plan_id, fields in plans.items():
        text += f"[plans.{plan_id}]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"')
                                                  for k, v in fields.items())
    with pytest.raises(ConfigError, match=message):
        parse_config(text, {})


def test_token_bucket_refills_and_carries_debt():
    bucket = TokenBucket(600, now=0.0)  # 10 tokens a second
    assert bucket.wait_for(600, 0.0) == 0 and math.isinf(bucket.wait_for(601, 0.0))
    bucket.take(500, 0.0)
    assert bucket.wait_for(200, 0.0) == pytest.approx(10.0)
    bucket.adjust(+150, 1.0)  # used 150 more than it reserved: in debt
    assert bucket.level(1.0) == pytest.approx(600 - 500 + 10 - 150)
    assert bucket.reset_after(1.0) == pytest.approx((600 + 40) / 10)
    assert bucket.level(1000.0) == 600  # never above capacity


@given(st.integers(0, 10**7), st.lists(st.integers(0, 10**5), max_size=20),
       st.integers(1, 10**7))
def test_overage_splits_add_up_however_writes_interleave(start, writes, quota):
    total, over = start, 0
    for added in writes:
        over += overage_split(total, added, quota)
        total += added
    assert over == max(0, total - quota) - max(0, start - quota)


@pytest.mark.parametrize(("seconds", "text"), [(0.12, "120ms"), (6, "6s"), (90, "1m30s"),
                                               (360, "6m"), (1.5, "1.5s")])
def test_openai_reset_format(seconds, text):
    assert openai_duration(seconds) == text
