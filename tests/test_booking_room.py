"""Every accepted booked opening can be closed (issue 18, item 8).

A close books realized = side x (money(last, amount) - notional).  Nothing
bounds the last price but the band ENG_BOOK_PRICE_MULT x entry; the opening
reserves room for the worst close within it (worst_gain, worst_loss on the
books) and is refused with MoneyError when cash or realized could leave
int64; a deposit that would eat that room is refused too.  So a close in the
band always books; one above it is refused (nothing changes) until a price
within it is written.  transition_many reports an element's error as that
error, never as CONFLICT.
"""

from __future__ import annotations

import contextlib
import re
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import Engine, MoneyError, Outcome, RiskLimitError, State, Trigger
from engine._native import lib
from engine.accounts import UNITS_MAX, from_units, money_of

BACKENDS = ("shm", "redis")

MULT = lib.ENG_BOOK_PRICE_MULT
TO_EXIT = (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED)
MAX = from_units(UNITS_MAX)          # 92233720368.54775807
RANGE = f"[{from_units(-UNITS_MAX - 1)}, {MAX}]"
BIG = 90_000_000_000                 # 9e18 units: near the top of money


def exiting(eng: Engine, entry: float, amount: float, side: int, acct: int) -> int:
    pos = eng.open_position(entry, amount, side=side, token=1, account=acct)
    for t in TO_EXIT:
        assert eng.transition(pos, t) is Outcome.APPLIED
    return pos


def worst(entry: float, amount: float, side: int) -> tuple[int, int]:
    """(gain, loss) in units of the position's close within the band."""
    n, top = money_of(entry, amount), money_of(entry * MULT, amount)
    return (top - n, n) if side > 0 else (n, top - n)


def check_room(eng: Engine, acct: int) -> None:
    """worst_gain / worst_loss are the sums over the open positions, and the
    room holds: cash, realized + worst_gain <= max; - worst_loss >= min."""
    row = next(r for r in eng.accounts() if int(r["id"]) == acct)
    rows = eng.snapshot()
    mine = [r for r in rows if int(r["account"]) == acct and State(int(r["state"])) != State.CLOSED]
    sums = [worst(float(r["entry_price"]), float(r["amount"]), int(r["side"])) for r in mine]
    assert int(row["worst_gain"]) == sum(g for g, _ in sums)
    assert int(row["worst_loss"]) == sum(lo for _, lo in sums)
    for money in (int(row["cash"]), int(row["realized"])):
        assert money + int(row["worst_gain"]) <= UNITS_MAX
        assert money - int(row["worst_loss"]) >= -UNITS_MAX - 1
    a = eng.account(acct)
    assert a.cash == a.opening_cash + a.deposits - a.withdrawals + a.realized_pnl


class TestOpeningKeepsRoom:
    def test_an_opening_whose_close_could_not_be_booked_is_refused_with_the_range(
            self, engine: Engine) -> None:
        """Cash near the top of money, a long whose close at 1024 x entry
        would pass it: MoneyError at the opening naming the band, the worst
        gain and the range; nothing changes (before: accepted, and its close
        was refused for good)."""
        a = engine.open_account(BIG, BIG, 4, BIG)
        before = engine.account(a)
        with pytest.raises(MoneyError) as exc:
            engine.open_position(100.0, 100_000.0, side=1, token=1, account=a)
        msg = str(exc.value)
        assert f"{MULT} x entry_price 100.0 = {100.0 * MULT!r}" in msg, msg
        assert str(from_units(worst(100.0, 100_000.0, 1)[0])) in msg, msg
        assert RANGE in msg and f"cash {from_units(BIG * 10**8)}" in msg, msg
        assert engine.account(a) == before
        assert len(engine.snapshot()) == 0

    def test_a_position_worth_more_than_money_at_the_band_top_is_refused(
            self, engine: Engine) -> None:
        """entry x amount x 1024 past the money range: MoneyError naming it."""
        a = engine.open_account(BIG, BIG, 4, BIG)
        with pytest.raises(MoneyError, match=re.escape(f"[0, {MAX}]")):
            engine.open_position(1_000_000.0, 10_000.0, side=-1, token=1, account=a)
        assert engine.account(a).reserved == 0

    def test_realized_wins_leave_no_room_for_the_next_opening(self, engine: Engine) -> None:
        """Large wins grow realized while the cash is withdrawn: the opening
        whose worst gain would pass realized's top is refused at the opening
        (before: accepted, then its close failed as EBADMONEY for good)."""
        amount = 30_000_000.0      # notional 3e15 units, worst gain 1023 x that
        a = engine.open_account(amount, amount, 4, BIG)
        wins = 0
        with pytest.raises(MoneyError) as exc:
            for wins in range(10):   # noqa: B007 - three fit in int64, the fourth does not
                p = exiting(engine, 1.0, amount, 1, a)
                engine.update_price(p, float(MULT))            # the band's top
                assert engine.transition(p, Trigger.EXIT_COMPLETED) is Outcome.APPLIED
                engine.withdraw(a, engine.account(a).cash - int(amount))
                check_room(engine, a)
        assert wins == 3
        assert "no room to book it" in str(exc.value) and RANGE in str(exc.value)
        acc = engine.account(a)
        assert int(acc.realized_pnl * 10**8) + worst(1.0, amount, 1)[0] > UNITS_MAX
        assert acc.open_positions == 0 and acc.reserved == 0

    def test_a_deposit_that_would_eat_the_room_is_refused(self, engine: Engine) -> None:
        """An open long keeps room for its worst gain: a deposit past it is
        refused with the numbers; nothing changes (before: accepted, and the
        long's close at the band's top then failed)."""
        a = engine.open_account(10_000_000, 10_000_000, 4, BIG)
        p = exiting(engine, 100.0, 100_000.0, 1, a)
        before = engine.account(a)
        with pytest.raises(MoneyError) as exc:
            engine.deposit(a, BIG)
        msg = str(exc.value)
        assert "worst-case gains" in msg and str(MAX) in msg, msg
        assert engine.account(a) == before
        engine.update_price(p, 100.0 * MULT)
        assert engine.transition(p, Trigger.EXIT_COMPLETED) is Outcome.APPLIED
        check_room(engine, a)


class TestCloseAlwaysBooks:
    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.differing_executors])
    @given(cash=st.integers(0, BIG),
           legs=st.lists(st.tuples(st.floats(0.01, 1e6), st.floats(0.001, 1e6),
                                   st.sampled_from((1, -1)), st.booleans()),
                         min_size=1, max_size=4))
    @example(cash=BIG, legs=[(100.0, 100_000.0, 1, True)])
    @example(cash=BIG, legs=[(1000.0, 50_000.0, -1, True), (1.0, 1.0, 1, False)])
    def test_every_accepted_opening_closes_at_either_end_of_its_band(
            self, engine: Engine, cash: int, legs: list[tuple[float, float, int, bool]]) -> None:
        """Openings refused or accepted; each accepted one closes APPLIED at
        1024 x entry or at the smallest price; the books stay exact and the
        room holds after every step."""
        a = engine.open_account(cash, BIG, 8, BIG)
        opened = []
        for entry, amount, side, high in legs:
            with contextlib.suppress(MoneyError, RiskLimitError):   # refused: nothing changed
                opened.append((exiting(engine, entry, amount, side, a), entry, high))
            check_room(engine, a)
        for pos, entry, high in opened:
            engine.update_price(pos, entry * MULT if high else 5e-324)
            assert engine.transition(pos, Trigger.EXIT_COMPLETED) is Outcome.APPLIED
            check_room(engine, a)
            engine.release_position(pos)
        engine.halt_account(a, False)
        engine.close_account(a)

    def test_a_close_above_the_band_is_refused_then_books_within_it(
            self, engine: Engine) -> None:
        """A last price above 1024 x entry: MoneyError naming the price and the
        band, the position stays EXITING with its reservation; a price within
        the band closes it."""
        a = engine.open_account(1_000_000, 1_000_000, 4, BIG)
        p = exiting(engine, 2.0, 10.0, -1, a)
        engine.update_price(p, 2.0 * MULT * 1.5)
        before = engine.account(a)
        with pytest.raises(MoneyError) as exc:
            engine.transition(p, Trigger.EXIT_COMPLETED, exit_reason=4)
        msg = str(exc.value)
        assert f"{2.0 * MULT * 1.5!r}" in msg and f"= {2.0 * MULT!r}]" in msg, msg
        assert engine.state(p) is State.EXITING and engine.account(a) == before
        assert engine.context(p).exit_reason == 0
        engine.update_price(p, 2.0 * MULT)
        assert engine.transition(p, Trigger.EXIT_COMPLETED) is Outcome.APPLIED
        acc = engine.account(a)
        assert acc.reserved == 0 and acc.realized_pnl == Decimal(20) - Decimal(20 * MULT)
        check_room(engine, a)


class TestTransitionManyErrors:
    def test_an_element_error_raises_it_with_every_outcome(self, engine: Engine) -> None:
        """[closable, close above the band, closable]: MoneyError for index 1
        with .outcomes = [APPLIED, MANY_ERROR | EBADMONEY, APPLIED]; the two
        others applied (before: CONFLICT, and the cause was lost)."""
        a = engine.open_account(1_000_000, 1_000_000, 8, BIG)
        ps = [exiting(engine, 1.0, 10.0, 1, a) for _ in range(3)]
        engine.update_price(ps[1], 1e12)
        with pytest.raises(MoneyError) as exc:
            engine.transition_many(np.array(ps), int(Trigger.EXIT_COMPLETED))
        outs = exc.value.outcomes
        assert [int(x) for x in outs] == [int(Outcome.APPLIED),
                                          lib.ENG_MANY_ERROR | -lib.ENG_EBADMONEY,
                                          int(Outcome.APPLIED)]
        assert "element 1" in str(exc.value) and "1000000000000.0" in str(exc.value)
        assert [engine.state(p) for p in ps] == [State.CLOSED, State.EXITING, State.CLOSED]
        check_room(engine, a)

    def test_released_and_guarded_elements_keep_their_outcomes(self, engine: Engine) -> None:
        """An element released meanwhile is still INVALID: only errors raise."""
        p = engine.open_position(1.0, 1.0, token=1)
        q = engine.open_position(1.0, 1.0, token=1)
        out = engine.transition_many(np.array([p, q]), int(Trigger.POSITION_OPENED))
        assert [int(x) for x in out] == [int(Outcome.APPLIED)] * 2
        out = engine.transition_many(np.array([p, q]), int(Trigger.POSITION_OPENED))
        assert [int(x) for x in out] == [int(Outcome.INVALID)] * 2

