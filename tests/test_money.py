"""as_decimal128 is bson's Decimal128 conversion, bit for bit, only faster."""

from __future__ import annotations

from decimal import Decimal

from bson.decimal128 import Decimal128
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_billing.core.money import as_decimal128

DECIMALS = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=30),
    st.tuples(st.integers(0, 1), st.lists(st.integers(0, 9), max_size=40),
              st.integers(-6200, 6200)).map(lambda t: Decimal((t[0], tuple(t[1]) or (0,), t[2]))),
    st.sampled_from([Decimal("NaN"), Decimal("-Infinity"), Decimal("-0"), Decimal("0E-6176")]))


@settings(max_examples=2000, deadline=None)
@given(DECIMALS)
def test_same_bits_as_bson(value: Decimal):
    try:
        expected = Decimal128(value)
    except Exception as e:  # bson refuses it: so must we, the same way
        try:
            as_decimal128(value)
        except type(e):
            return
        raise AssertionError(f"{value!r} accepted, bson raised {e!r}") from None
    assert as_decimal128(value).bid == expected.bid
