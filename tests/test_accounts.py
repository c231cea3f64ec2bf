"""Accounts: exact books, reservations and risk limits (DESIGN "Accounts and
risk limits").

The invariant checked throughout, exactly: reserved == the sum of the
notionals of the account's open positions, and cash == opening cash +
deposits - withdrawals + realized PnL of its closed positions.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import (
    Account,
    ArgumentError,
    Engine,
    EngineTypeError,
    FieldError,
    MoneyError,
    NotOpenError,
    RiskLimitError,
    StaleAccountError,
    StaleIdError,
    State,
    Trigger,
    UnknownAccountError,
)
from engine._native import lib
from engine.accounts import from_units, money_of, to_units

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)

CLOSE = (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
         Trigger.EXIT_COMPLETED)


def close(eng: Engine, pos: int) -> None:
    """Drive a position from CREATED to CLOSED (the last step is booked)."""
    for trig in CLOSE:
        assert eng.transition(pos, trig).name == "APPLIED"
    assert eng.state(pos) == State.CLOSED


def realized_of(entry: float, amount: float, side: int, last: float) -> Decimal:
    """What the engine books when a position closes at ``last``."""
    diff = money_of(last, amount) - money_of(entry, amount)
    return from_units(diff if side > 0 else -diff)


def check_books(eng: Engine, acct: int, realized: Decimal | None = None) -> Account:
    """The invariant, exactly, against the open positions in snapshot()."""
    a = eng.account(acct)
    rows = eng.snapshot()
    mine = rows[(rows["account"] == acct)]
    open_rows = [r for r in mine if State(int(r["state"])) != State.CLOSED]
    want_reserved = sum((from_units(money_of(float(r["entry_price"]), float(r["amount"])))
                         for r in open_rows), Decimal(0))
    assert a.reserved == want_reserved, (a, want_reserved)
    assert a.open_positions == len(open_rows)
    gain = loss = 0   # the room the open positions keep: their worst closes in the band
    for r in open_rows:
        n = money_of(float(r["entry_price"]), float(r["amount"]))
        top = money_of(float(r["entry_price"]) * lib.ENG_BOOK_PRICE_MULT, float(r["amount"])) - n
        g, lo = (top, n) if int(r["side"]) > 0 else (n, top)
        gain, loss = gain + g, loss + lo
    row = next(b for b in eng.accounts() if int(b["id"]) == acct)
    assert (int(row["worst_gain"]), int(row["worst_loss"])) == (gain, loss), (row, gain, loss)
    assert a.cash == a.opening_cash + a.deposits - a.withdrawals + a.realized_pnl, a
    if realized is not None:
        assert a.realized_pnl == realized, (a.realized_pnl, realized)
    return a


class TestMoney:
    def test_units_round_trip_exactly(self) -> None:
        """ints and Decimals at 1e-8 are exact; floats round to the nearest unit."""
        assert to_units(1) == lib.ENG_MONEY_SCALE
        assert to_units(Decimal("0.00000001")) == 1
        assert to_units(0.1) == 10_000_000
        assert from_units(123456789) == Decimal("1.23456789")
        assert from_units(-5) == Decimal("-0.00000005")

    @pytest.mark.parametrize("bad", [-1, -0.01, Decimal("-1"), math.nan, math.inf,
                                     Decimal("NaN"), Decimal("Infinity"), 2**63,
                                     Decimal("1e12"), Decimal("0.000000001")])
    def test_bad_money_is_refused(self, bad: Any) -> None:
        """Negative, non-finite, beyond int64 units, finer than 1e-8: MoneyError."""
        with pytest.raises(MoneyError):
            to_units(bad)

    @pytest.mark.parametrize("bad", [True, "1", None, 1j, [1]])
    def test_wrong_types_are_refused(self, bad: Any) -> None:
        """bool, str, None, complex: EngineTypeError."""
        with pytest.raises(EngineTypeError):
            to_units(bad)

    @given(st.floats(0.01, 1e5), st.floats(0.001, 1e4))
    def test_money_of_matches_c(self, price: float, amount: float) -> None:
        """The Python replica of C's rounding gives the same units."""
        assert money_of(price, amount) == lib.eng_money_of(price, amount)


# exponents whose exact value has a hundred million digits (or a quintillion)
_HUGE_EXPONENTS = ("1E+100000000", "1E-100000000", "-1E+100000000", "1E+999999999999999999",
                   "1E-999999999999999999", "9.9E+100000000")


class TestMoneyInputBounds:
    """Money is range-checked before any exact arithmetic (issue 18, item 5)."""

    def test_a_huge_decimal_exponent_answers_in_a_child_process(self) -> None:
        """deposit() of Decimal("1E+100000000") raises MoneyError within the bound, no hang."""
        code = ("from decimal import Decimal\n"
                "from engine import Engine, MoneyError\n"
                "e = Engine.create(capacity=4)\n"
                "try:\n"
                "    a = e.open_account(1, 1, 1, 1)\n"
                "    for v in ('1E+100000000', '1E-100000000', '1E+999999999999999999'):\n"
                "        try:\n"
                "            e.deposit(a, Decimal(v))\n"
                "        except MoneyError as x:\n"
                "            print(type(x).__name__, x)\n"
                "finally:\n"
                "    e.close(); e.unlink()\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 3 and all(ln.startswith("MoneyError") for ln in lines), lines
        assert "1E+100000000" in lines[0] and "92233720368.54775807" in lines[0]
        assert "finer than the fixed point" in lines[1]

    @pytest.mark.parametrize("text", _HUGE_EXPONENTS)
    def test_every_money_path_refuses_a_huge_exponent_and_changes_nothing(
            self, engine: Engine, text: str) -> None:
        """Every money path refuses a huge exponent with MoneyError; the books do not move."""
        v = Decimal(text)
        a = engine.open_account(100, 1000, 4, 50)
        before = engine.account(a)
        calls = (lambda: engine.deposit(a, v), lambda: engine.withdraw(a, v),
                 lambda: engine.open_account(v, 1, 1, 1),
                 lambda: engine.open_account(1, v, 1, 1),
                 lambda: engine.open_account(1, 1, 1, v),
                 lambda: engine.update_account(a, lambda acc: {"max_exposure": v}),
                 lambda: engine.update_account(a, lambda acc: {"max_loss": v}))
        for call in calls:
            with pytest.raises(MoneyError, match=re.escape(repr(v)[:40])):
                call()
        assert engine.account(a) == before
        assert len(engine.accounts()) == 1

    @pytest.mark.parametrize("bad", [10**(10**6), -(10**(10**6)), Decimal("-0.5"),
                                     Decimal("1" + "0" * 5000 + "E-5000") * 10**11,
                                     Decimal("1." + "0" * 5000 + "1")],
                             ids=["long-int", "long-negative-int", "negative", "long-past-range",
                                  "long-finer"])
    def test_long_ints_and_decimals_are_refused_by_their_range(self, bad: Any) -> None:
        """Long ints and out-of-range or too-fine Decimals raise MoneyError with the range."""
        with pytest.raises(MoneyError, match=r"92233720368\.54775807|finer than the fixed"):
            to_units(bad)

    @pytest.mark.parametrize("good,units", [(Decimal("0E+100000000"), 0), (Decimal("-0"), 0),
                                            (Decimal("92233720368.54775807"), 2**63 - 1),
                                            (Decimal("1.000000000000000000000000000000"),
                                             10**8),
                                            (Decimal("1E-8"), 1), (Decimal("12E+9"), 12 * 10**17)])
    def test_exact_decimals_in_range_still_convert(self, good: Decimal, units: int) -> None:
        """Zero at any exponent, the largest amount, trailing zeros: exact units."""
        assert to_units(good) == units


class TestAccountBooks:
    def test_open_and_read(self, engine: Engine) -> None:
        """open_account returns an id; account() gives Decimals and the limits."""
        a = engine.open_account(cash=1000, max_exposure=Decimal("500.5"), max_positions=3,
                                max_loss=50.25, key="desk-A")
        acc = engine.account(a)
        assert (acc.cash, acc.reserved, acc.realized_pnl) == (Decimal(1000), 0, 0)
        assert (acc.max_exposure, acc.max_positions, acc.max_loss) == (Decimal("500.5"), 3,
                                                                        Decimal("50.25"))
        assert acc.opening_cash == 1000 and not acc.halted and acc.id == a

    def test_deposit_withdraw(self, engine: Engine) -> None:
        """Deposits and withdrawals move cash and their own totals."""
        a = engine.open_account(100, 100, 1, 10)
        engine.deposit(a, Decimal("0.00000001"))
        engine.withdraw(a, 50)
        acc = check_books(engine, a)
        assert acc.cash == Decimal("50.00000001")
        assert (acc.deposits, acc.withdrawals) == (Decimal("0.00000001"), 50)

    def test_withdraw_never_below_reserved(self, engine: Engine) -> None:
        """cash - reserved >= amount, else RiskLimitError('cash') and nothing changes."""
        a = engine.open_account(1000, 1000, 5, 100)
        engine.open_position(100.0, 6.0, account=a)            # reserves 600
        before = engine.account(a)
        with pytest.raises(RiskLimitError, match="available") as e:
            engine.withdraw(a, Decimal("400.00000001"))
        assert e.value.limit == "cash"
        assert engine.account(a) == before
        engine.withdraw(a, 400)
        assert engine.account(a).available == 0

    def test_accounts_array(self, engine: Engine) -> None:
        """accounts() has one consistent row per open account, money in units."""
        ids = [engine.open_account(i + 1, 10, 1, 1) for i in range(3)]
        rows = engine.accounts()
        assert sorted(rows["id"].tolist()) == sorted(ids)
        assert sorted(rows["cash"].tolist()) == [lib.ENG_MONEY_SCALE * i for i in (1, 2, 3)]

    def test_capacity(self, make_engine: Any) -> None:
        """max_accounts records; one more is a CapacityError; 0 is allowed."""
        eng = make_engine(max_accounts=2)
        eng.open_account(1, 1, 1, 1)
        eng.open_account(1, 1, 1, 1)
        with pytest.raises(MemoryError):
            eng.open_account(1, 1, 1, 1)
        none = make_engine(max_accounts=0)
        with pytest.raises(MemoryError):
            none.open_account(1, 1, 1, 1)

    def test_stale_account_id(self, make_engine: Any) -> None:
        """A closed account's id raises StaleAccountError (a StaleIdError) after reuse."""
        eng = make_engine(max_accounts=1)
        a = eng.open_account(1, 1, 1, 1)
        eng.close_account(a)
        b = eng.open_account(2, 2, 2, 2)
        assert b != a and b & 0xFFFFFF == a & 0xFFFFFF
        for call in (lambda: eng.account(a), lambda: eng.deposit(a, 1),
                     lambda: eng.withdraw(a, 0), lambda: eng.halt_account(a),
                     lambda: eng.open_position(100.0, 0.001, account=a)):
            with pytest.raises(StaleAccountError):
                call()
        assert eng.account(b).cash == 2
        assert isinstance(StaleAccountError("x"), StaleIdError)

    @pytest.mark.parametrize("bad", [0, 1, 2**24 + 63 + 1, (2**24) * 5 + 3, 2**56, -1])
    def test_unknown_account_ids(self, engine: Engine, bad: int) -> None:
        """Ids never issued or out of range: UnknownAccountError (a NotOpenError)."""
        with pytest.raises(UnknownAccountError):
            engine.account(bad)
        with pytest.raises(NotOpenError):
            engine.open_position(100.0, 1.0, account=bad)
        assert len(engine.snapshot()) == 0

    def test_bad_input_changes_nothing(self, engine: Engine) -> None:
        """Every refused call leaves the books as they were."""
        a = engine.open_account(100, 100, 2, 10)
        before = engine.account(a)
        for call, exc in ((lambda: engine.deposit(a, -1), MoneyError),
                          (lambda: engine.deposit(a, math.nan), MoneyError),
                          (lambda: engine.withdraw(a, math.inf), MoneyError),
                          (lambda: engine.deposit(a, 2**63), MoneyError),
                          (lambda: engine.deposit(a, "1"), EngineTypeError),
                          (lambda: engine.halt_account(a, 1), EngineTypeError),
                          (lambda: engine.account("a"), EngineTypeError),
                          (lambda: engine.open_account(-1, 1, 1, 1), MoneyError),
                          (lambda: engine.open_account(1, 1, -1, 1), ArgumentError),
                          (lambda: engine.open_account(1, 1, 1, 1, key=""), ArgumentError),
                          (lambda: engine.update_account(a, lambda x: {"cash": 5}),
                           ArgumentError),
                          (lambda: engine.update_account(a, lambda x: x._replace(cash=5)),
                           ArgumentError),
                          (lambda: engine.update_account(a, lambda x: {"max_loss": -1}),
                           MoneyError),
                          (lambda: engine.update_account(a, lambda x: 3), EngineTypeError),
                          (lambda: engine.open_position(1e200, 1e200, account=a), MoneyError)):
            with pytest.raises(exc):
                call()
        assert engine.account(a) == before
        assert len(engine.accounts()) == 1 and len(engine.snapshot()) == 0

    def test_account_needs_the_field(self, make_engine: Any) -> None:
        """A spec without the account role refuses account=."""
        from engine import ORDER_SPEC
        eng = make_engine(spec=ORDER_SPEC)
        with pytest.raises((FieldError, ArgumentError)):
            eng.open_position(100.0, 1.0, account=1)


class TestReservations:
    def test_open_reserves_close_books(self, engine: Engine) -> None:
        """Open reserves |entry x amount|; close releases it and books realized PnL."""
        a = engine.open_account(10_000, 5_000, 10, 1_000)
        p = engine.open_position(100.0, 2.5, side=-1, account=a)
        assert engine.context(p).account == a
        assert engine.account(a).reserved == 250
        engine.update_price(p, 90.0)
        close(engine, p)
        acc = check_books(engine, a, realized=Decimal(25))
        assert acc.cash == 10_025 and acc.reserved == 0 and acc.open_positions == 0

    def test_close_without_price_update_realizes_zero(self, engine: Engine) -> None:
        """A position closed before any price update realizes 0."""
        a = engine.open_account(1_000, 1_000, 10, 10)
        p = engine.open_position(33.3, 3.0, account=a)
        close(engine, p)
        check_books(engine, a, realized=Decimal(0))

    @pytest.mark.parametrize("limit,kwargs", [
        ("exposure", {"cash": 10_000, "max_exposure": 150, "max_positions": 5}),
        ("count", {"cash": 10_000, "max_exposure": 10_000, "max_positions": 1}),
        ("cash", {"cash": 150, "max_exposure": 10_000, "max_positions": 5}),
    ])
    def test_limits_refuse_and_change_nothing(self, engine: Engine, limit: str,
                                              kwargs: dict[str, int]) -> None:
        """Past a limit: RiskLimitError naming it and its numbers; nothing opens."""
        a = engine.open_account(max_loss=100, **kwargs)
        engine.open_position(100.0, 1.0, account=a)
        before, rows = engine.account(a), len(engine.snapshot())
        with pytest.raises(RiskLimitError) as e:
            engine.open_position(100.0, 1.0, account=a)
        assert (e.value.limit == limit and limit in str(e.value)) or "cash" in str(e.value)
        assert any(ch.isdigit() for ch in str(e.value))
        assert engine.account(a) == before and len(engine.snapshot()) == rows

    def test_halted_refuses_openings_not_closings(self, engine: Engine) -> None:
        """A halted account refuses openings; its open positions still close."""
        a = engine.open_account(1_000, 1_000, 5, 100)
        p = engine.open_position(10.0, 1.0, account=a)
        engine.halt_account(a)
        with pytest.raises(RiskLimitError, match="halted"):
            engine.open_position(10.0, 1.0, account=a)
        close(engine, p)
        engine.halt_account(a, False)
        engine.open_position(10.0, 1.0, account=a)
        check_books(engine, a)

    def test_max_loss_halts_by_itself(self, engine: Engine) -> None:
        """Realized losses reaching max_loss halt the account in the same booking."""
        a = engine.open_account(1_000, 1_000, 5, 10)
        p = engine.open_position(100.0, 1.0, account=a)
        engine.update_price(p, 95.0)
        close(engine, p)
        assert not engine.account(a).halted              # -5 of 10
        q = engine.open_position(100.0, 1.0, account=a)
        engine.update_price(q, 95.0)
        close(engine, q)
        assert engine.account(a).halted                  # -10 reaches 10
        with pytest.raises(RiskLimitError) as e:
            engine.open_position(1.0, 1.0, account=a)
        assert e.value.limit == "halted"

    def test_release_and_reuse_keeps_books(self, engine: Engine) -> None:
        """Release after close, reopen the slot without an account: books untouched."""
        a = engine.open_account(1_000, 1_000, 5, 100)
        p = engine.open_position(10.0, 1.0, account=a)
        close(engine, p)
        engine.release_position(p)
        q = engine.open_position(10.0, 1.0)
        close(engine, q)
        acc = check_books(engine, a, realized=Decimal(0))
        assert acc.cash == 1_000
        with pytest.raises(StaleIdError):
            engine.state(p)

    def test_context_write_on_account_position(self, engine: Engine) -> None:
        """A non-closing transition with fields on a booked position keeps books."""
        a = engine.open_account(1_000, 1_000, 5, 100)
        p = engine.open_position(10.0, 1.0, account=a)
        engine.transition(p, Trigger.POSITION_OPENED)
        engine.transition(p, Trigger.EXIT_CONDITION_MET, exit_reason=3)
        with pytest.raises(FieldError):
            engine.transition(p, Trigger.EXIT_CANCELLED, account=0)
        check_books(engine, a)


class TestUpdateAccount:
    def test_update_limits(self, engine: Engine) -> None:
        """fn's Account or dict sets limits and halted; version moves by one."""
        a = engine.open_account(100, 100, 1, 10)
        v = engine.account(a).version
        acc = engine.update_account(a, lambda x: x._replace(max_positions=7, halted=True))
        assert (acc.max_positions, acc.halted, acc.version) == (7, True, v + 1)
        acc = engine.update_account(a, lambda x: {"max_exposure": Decimal("1.5")})
        assert acc.max_exposure == Decimal("1.5") and acc.max_positions == 7

    def test_conflicts_retry_and_show_in_metrics(self, engine: Engine) -> None:
        """A version that moved under fn makes it run again; metrics count it."""
        a = engine.open_account(100, 100, 1, 10)
        calls = []

        def fn(acc: Account) -> dict[str, int]:
            calls.append(acc.version)
            if len(calls) < 3:
                engine.deposit(a, 1)        # another writer moves the version
            return {"max_positions": acc.max_positions + 1}

        acc = engine.update_account(a, fn)
        assert acc.max_positions == 2 and len(calls) == 3
        m = engine.metrics()["account"]
        assert m.conflicts >= 2 and m.retries == 2   # one per retry of update_account


# -- model test ------------------------------------------------------------------------

ENTRIES = (10.0, 33.3, 99.99, 101.5)
AMOUNTS = (0.5, 1.0, 2.25, 7.0)

# The Decimal-ledger model of the books (every op's outcome, the invariant after
# every step) runs on both backends: tests/test_backends_invariants.py.


# -- multiprocess ----------------------------------------------------------------------

N_ACCOUNTS = 3
CYCLES = 300


def account_worker(handle: Any, accts: list[int], seed: int, q: Any) -> None:
    """Open/close against shared accounts; report what this worker booked."""
    eng = Engine.attach(handle)
    rng = random.Random(seed)
    realized = [Decimal(0)] * len(accts)
    deposits = [Decimal(0)] * len(accts)
    withdrawals = [Decimal(0)] * len(accts)
    refused = 0
    kept: list[int] = []
    for i in range(CYCLES):
        k = rng.randrange(len(accts))
        e, amt, side = rng.choice(ENTRIES), rng.choice(AMOUNTS), rng.choice((1, -1))
        try:
            p = eng.open_position(e, amt, side=side, account=accts[k])
        except RiskLimitError:
            refused += 1
            continue
        px = round(e * rng.uniform(0.9, 1.1), 4)
        eng.update_price(p, px)
        if i % 25 == 0:
            kept.append(p)              # left open: it must stay reserved
            continue
        close(eng, p)
        realized[k] += realized_of(e, amt, side, px)
        eng.release_position(p)
        if i % 10 == 0:
            d = Decimal(rng.randrange(1, 10**6)) / 10**4
            eng.deposit(accts[k], d)
            deposits[k] += d
            try:
                eng.withdraw(accts[k], d / 2)
                withdrawals[k] += d / 2
            except RiskLimitError:
                pass
    q.put((os.getpid(), realized, deposits, withdrawals, refused, kept))
    eng.close()


class TestMultiprocess:
    def test_books_exact_with_more_workers_than_cores(self, make_engine: Any,
                                                      spawner: Any) -> None:
        """Books balance to the unit after more workers than cores share 3 accounts.

        N spawned workers share 3 accounts; afterwards the books balance to the unit.
        Allowed: refusals by limits.  Forbidden: any difference at all.
        """
        eng = make_engine(capacity=512)
        accts = [eng.open_account(50_000, 20_000, 40, 10**9) for _ in range(N_ACCOUNTS)]
        n = max(4, 2 * (os.cpu_count() or 2) + 1)
        q = spawner.ctx.Queue()
        for w in range(n):
            spawner.start(account_worker, eng.handle, accts, 1000 + w, q)
        results = [q.get(timeout=120) for _ in range(n)]
        spawner.join_all(30)
        for k, a in enumerate(accts):
            realized = sum((r[1][k] for r in results), Decimal(0))
            dep = sum((r[2][k] for r in results), Decimal(0))
            wd = sum((r[3][k] for r in results), Decimal(0))
            acc = check_books(eng, a, realized=realized)
            assert (acc.deposits, acc.withdrawals) == (dep, wd)
            assert acc.cash == Decimal(50_000) + dep - wd + realized
        kept = sum(len(r[5]) for r in results)
        assert sum(eng.account(a).open_positions for a in accts) == kept


@pytest.fixture
def eng() -> Iterator[Engine]:
    e = Engine.create(8)
    try:
        yield e
    finally:
        e.close()
        e.unlink()


@pytest.mark.shm_only
class TestMoneyOfAnyType:
    """Money conversion of a value of a type it refuses: a typed error whatever
    the value, never an error raised while writing the message."""

    @pytest.mark.parametrize("call", [
        lambda e, a, v: e.deposit(a, v),
        lambda e, a, v: e.withdraw(a, v),
        lambda e, a, v: e.open_account(v, 1000, 8, 1000),
    ], ids=["deposit", "withdraw", "open_account"])
    def test_a_fraction_too_long_to_print_is_a_type_error(
            self, eng: Engine, call: Callable[[Engine, int, Any], Any]) -> None:
        """A Fraction too long for int->str raises EngineTypeError naming its type."""
        a = eng.open_account(1000, 1000, 8, 1000)
        before = eng.account(a)
        with pytest.raises(EngineTypeError, match="Fraction"):
            call(eng, a, Fraction(10**5000, 3))
        assert eng.account(a) == before
