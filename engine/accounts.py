"""Accounts: exact fixed-point money and the ``Account`` record.

Money lives in the segment as int64 units of ``1 / ENG_MONEY_SCALE`` (1e-8).
Calls take int, float or ``Decimal``; ``Account`` gives ``Decimal``s back.
An int or a ``Decimal`` must be exact at that scale (a finer ``Decimal`` is
refused); a float is the binary number it is, rounded to the nearest unit
(ties to even).

A position's notional and its realized PnL are computed in C:
``money(p, a)`` is ``p * a * ENG_MONEY_SCALE`` in double precision, rounded
to the unit half away from zero (``llround``).  notional = money(entry,
amount); realized = side * (money(last price, amount) - notional): each leg
is rounded once and the difference is exact.  :func:`money_of` is the same
computation in Python (for models and checks).
"""

from __future__ import annotations

import math
import struct
from decimal import ROUND_HALF_UP, Context, Decimal
from fractions import Fraction
from typing import Any, NamedTuple

from engine._native import ffi, lib
from engine.errors import EngineTypeError, MoneyError, shown

SCALE: int = int(lib.ENG_MONEY_SCALE)
_DIGITS = len(str(SCALE)) - 1
assert 10**_DIGITS == SCALE, SCALE
UNITS_MAX = 2**63 - 1
_WHOLE_MAX = UNITS_MAX // SCALE
_WHOLE_DIGITS = len(str(_WHOLE_MAX)) - 1   # adjusted() of the largest whole amount
_EXACT = Context(prec=40)
_ONE_UNIT = Decimal(1).scaleb(-_DIGITS)
#: fields of Account that update_account may change
LIMITS = ("max_exposure", "max_positions", "max_loss", "halted")


class Account(NamedTuple):
    """One consistent read of an account's books (money as ``Decimal``)."""

    id: int
    cash: Decimal
    reserved: Decimal
    realized_pnl: Decimal
    open_positions: int
    halted: bool
    version: int
    max_exposure: Decimal
    max_positions: int
    max_loss: Decimal
    opening_cash: Decimal
    deposits: Decimal
    withdrawals: Decimal
    #: the account's key (``open_account(key=)``): str where the bytes are
    #: UTF-8, else bytes; None when it has none
    key: str | bytes | None = None

    @property
    def available(self) -> Decimal:
        """Cash not reserved by open positions: what an opening or a
        withdrawal may use."""
        return self.cash - self.reserved


def to_units(value: Any, what: str = "money") -> int:
    """``value`` (int, float or Decimal, >= 0) in units of 1/SCALE; a typed
    error naming ``what``, the value and the allowed range otherwise.

    The range is checked before any exact arithmetic, in time that does not
    grow with the exponent: ``Decimal("1E+100000000")`` and
    ``Decimal("1E-100000000")`` are refused at once (an exact ``Fraction``
    of either has a hundred million digits)."""
    if value.__class__ is int and 0 <= value <= _WHOLE_MAX:
        return value * SCALE   # the common case, exact
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise EngineTypeError(f"{what} must be an int, float or Decimal, got {shown(value)} "
                              f"({type(value).__name__})")
    if (isinstance(value, float) and not math.isfinite(value)) or (
            isinstance(value, Decimal) and not value.is_finite()):
        raise MoneyError(f"{what} must be finite, got {value!r}")
    if isinstance(value, int):   # an int subclass, or out of range
        units = int(value) * SCALE if 0 <= value <= _WHOLE_MAX else -1
    elif isinstance(value, float):
        units = round(Fraction(value) * SCALE)   # ties to even; a float's exponent is small
    elif value.is_zero():
        units = 0
    elif value.is_signed() or value.adjusted() > _WHOLE_DIGITS:
        units = -1   # negative, or 10**(_WHOLE_DIGITS + 1) and above: out of range
    else:
        # 0 < value < 10**(_WHOLE_DIGITS + 1): at most _WHOLE_DIGITS + 1 + _DIGITS
        # digits at the fixed point, so _EXACT quantizes without rounding them
        q = value.quantize(_ONE_UNIT, context=_EXACT) if value.adjusted() >= -_DIGITS else None
        if q is None or q != value:
            raise MoneyError(f"{what} {shown(value)} is finer than the fixed point: money has "
                             f"{_DIGITS} decimal places")
        units = int(q.scaleb(_DIGITS, context=_EXACT))
    if not 0 <= units <= UNITS_MAX:
        raise MoneyError(f"{what} must be in [0, {from_units(UNITS_MAX)}], got {shown(value)}")
    return units


def from_units(units: int) -> Decimal:
    """Exact ``Decimal`` of ``units`` of 1/SCALE, with all its places (exponent
    -8: 0 is ``0E-8``).  Exact: an int64 has 19 digits, the context 40."""
    return _EXACT.multiply(int(units), _ONE_UNIT)


def money_of(price: float, amount: float) -> int:
    """What C books for ``price * amount``, in units (see the module doc)."""
    x = price * amount * float(SCALE)
    if not (x >= 0.0) or x >= 2.0**63:
        raise MoneyError(f"{price!r} x {amount!r} is beyond the fixed-point range")
    return int(Decimal(x).to_integral_value(rounding=ROUND_HALF_UP))


def _row_struct() -> struct.Struct:
    """Unpacks (in _ROW_FIELDS order) the fields of an ``eng_account_row``
    that an ``Account`` needs; offsets from the compiled module."""
    books = ffi.offsetof("eng_account_row", "b")
    at = [(ffi.offsetof("eng_account_row", n), n, c) for n, c in (("id", "Q"), ("version", "Q"))]
    at += [(books + ffi.offsetof("eng_books", n), n, c) for n, c in _ROW_FIELDS[2:]]
    fmt, pos = "<", 0
    for off, _name, code in sorted(at):
        fmt += "x" * (off - pos) + code
        pos = off + struct.calcsize(code)
    assert [n for _, n, _ in sorted(at)] == [n for n, _ in _ROW_FIELDS], "field order"
    return struct.Struct(fmt)


_ROW_FIELDS = (("id", "Q"), ("version", "Q"), ("cash", "q"), ("reserved", "q"),
               ("realized", "q"), ("opening_cash", "q"), ("deposits", "q"),
               ("withdrawals", "q"), ("max_exposure", "q"), ("max_loss", "q"),
               ("max_positions", "I"), ("open_positions", "I"), ("halted", "I"))
_ROW = _row_struct()


def account_from_row(row: Any) -> Account:
    """An ``Account`` from an ``eng_account_row``."""
    (aid, version, cash, reserved, realized, opening, deposits, withdrawals, max_exposure,
     max_loss, max_positions, open_positions, halted) = _ROW.unpack_from(ffi.buffer(row))
    m = from_units
    n = row.key_len
    return Account(aid, m(cash), m(reserved), m(realized), open_positions, bool(halted), version,
                   m(max_exposure), max_positions, m(max_loss), m(opening), m(deposits),
                   m(withdrawals), key_value(ffi.buffer(row.key)[:n]) if n else None)


def key_value(data: bytes) -> str | bytes:
    """A key as the API returns it: str where the bytes are UTF-8, else bytes."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data
