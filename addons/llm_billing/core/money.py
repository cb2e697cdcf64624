"""Amounts as stored (sans-I/O): BSON Decimal128, built without bson's slow path.

``bson.Decimal128(Decimal)`` converts digit by digit in Python (10 to 40 µs, paid for every
event); the IEEE 754-2008 BID encoding of a Decimal whose coefficient fits in 113 bits is
three integer operations. Anything else (more than 34 digits, NaN, infinities, extreme
exponents) takes bson's own path, which rounds or raises exactly as before.
"""

from __future__ import annotations

from decimal import Context, Decimal

from bson.decimal128 import Decimal128

_EXPONENT_BIAS = 6176
_DIGITS = 34  # Decimal128's precision
_EXACT = Context(prec=_DIGITS)  # scaleb below never rounds: the digits fit
_LOW_64 = (1 << 64) - 1


def as_decimal128(value: Decimal) -> Decimal128:
    """The Decimal128 that ``bson.Decimal128(value)`` gives, sooner."""
    sign, digits, exponent = value.as_tuple()
    if isinstance(exponent, int) and len(digits) <= _DIGITS and (
            -_EXPONENT_BIAS <= exponent <= 6111):
        coefficient = int(value.copy_abs().scaleb(-exponent, _EXACT))
        high = (sign << 63) | ((exponent + _EXPONENT_BIAS) << 49) | (coefficient >> 64)
        return Decimal128((high, coefficient & _LOW_64))
    return Decimal128(value)
