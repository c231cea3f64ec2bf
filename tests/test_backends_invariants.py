"""The account invariant on both stores (shared memory and Redis), through
the public API only.

The invariant, exactly (DESIGN "Accounts and risk limits"): an account's
reserved money is the sum of the notionals of its open positions, its open
position count is theirs, its worst-case room is theirs, and cash ==
opening cash + deposits - withdrawals + realized PnL of its closed
positions.  Checked after every step of a random sequence of openings,
price updates, closings, deposits, withdrawals, halts and limit changes run
against a plain-Python Decimal ledger, and after a multiprocess run with
more workers than cores.  Each test runs once per backend (``BACKENDS``,
conftest).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from conftest import create_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_accounts import AMOUNTS, ENTRIES, check_books, close, realized_of

from engine import Engine, RiskLimitError
from engine.accounts import from_units, money_of
from engine.tools.stress import StressConfig, run_stress

BACKENDS = ("shm", "redis")

OPS = st.one_of(
    st.tuples(st.just("open"), st.integers(0, 1), st.sampled_from(ENTRIES),
              st.sampled_from(AMOUNTS), st.sampled_from((1, -1))),
    st.tuples(st.just("price"), st.integers(0, 15), st.floats(1.0, 200.0)),
    st.tuples(st.just("close"), st.integers(0, 15)),
    st.tuples(st.just("deposit"), st.integers(0, 1), st.decimals(0, 500, places=8)),
    st.tuples(st.just("withdraw"), st.integers(0, 1), st.decimals(0, 500, places=8)),
    st.tuples(st.just("halt"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("limits"), st.integers(0, 1), st.integers(0, 4),
              st.decimals(0, 2000, places=2)),
)


class Ledger:
    """Two accounts as plain Decimals, and the positions open on them."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.books = [dict(cash=Decimal(1000), reserved=Decimal(0), realized=Decimal(0), n=0,
                           halted=False, max_exposure=Decimal(800), max_positions=3,
                           max_loss=Decimal(60)) for _ in range(2)]
        self.ids = [eng.open_account(1000, 800, 3, 60) for _ in range(2)]
        self.positions: list[tuple[int, int, float, float, int]] = []   # id, acct, e, a, s
        self.last: dict[int, float] = {}

    def step(self, o: tuple[Any, ...]) -> None:
        """Apply ``o`` to the engine and to the ledger; the outcomes must agree."""
        eng, kind = self.eng, o[0]
        if kind == "open":
            _, k, e, amt, side = o
            m = self.books[k]
            notional = from_units(money_of(e, amt))
            want = ("halted" if m["halted"] else "count" if m["n"] >= m["max_positions"] else
                    "exposure" if m["reserved"] + notional > m["max_exposure"] else
                    "cash" if notional > m["cash"] - m["reserved"] else None)
            try:
                p = eng.open_position(e, amt, side=side, account=self.ids[k])
            except RiskLimitError as err:
                assert err.limit == want
                return
            assert want is None
            m["reserved"] += notional
            m["n"] += 1
            self.positions.append((p, k, e, amt, side))
            self.last[p] = e
        elif kind == "price" and self.positions:
            p = self.positions[o[1] % len(self.positions)][0]
            eng.update_price(p, o[2])
            self.last[p] = o[2]
        elif kind == "close" and self.positions:
            p, k, e, amt, side = self.positions.pop(o[1] % len(self.positions))
            close(eng, p)
            m = self.books[k]
            r = realized_of(e, amt, side, self.last[p])
            m["reserved"] -= from_units(money_of(e, amt))
            m["n"] -= 1
            m["cash"] += r
            m["realized"] += r
            if m["realized"] < 0 and m["realized"] <= -m["max_loss"]:
                m["halted"] = True
            eng.release_position(p)
        elif kind == "deposit":
            eng.deposit(self.ids[o[1]], o[2])
            self.books[o[1]]["cash"] += o[2]
        elif kind == "withdraw":
            m = self.books[o[1]]
            if o[2] > m["cash"] - m["reserved"]:
                with pytest.raises(RiskLimitError):
                    eng.withdraw(self.ids[o[1]], o[2])
            else:
                eng.withdraw(self.ids[o[1]], o[2])
                m["cash"] -= o[2]
        elif kind == "halt":
            eng.halt_account(self.ids[o[1]], o[2])
            self.books[o[1]]["halted"] = o[2]
        elif kind == "limits":
            _, k, mp, mx = o
            eng.update_account(self.ids[k], lambda acc: {"max_positions": mp, "max_exposure": mx})
            m = self.books[k]
            m.update(max_positions=mp, max_exposure=mx)
            if m["realized"] < 0 and m["realized"] <= -m["max_loss"]:   # re-checked, as
                m["halted"] = True                                      # a closing does

    def check(self) -> None:
        """Every account: the invariant, and the ledger's figures."""
        for k, acct in enumerate(self.ids):
            a, m = check_books(self.eng, acct), self.books[k]
            assert (a.cash, a.reserved, a.realized_pnl, a.open_positions, a.halted) == (
                m["cash"], m["reserved"], m["realized"], m["n"], m["halted"]), (a, m)


class TestAccountLedger:
    # one instance per backend (the parametrization) and no state on it: differing executors
    # are safe; the backend fixture is a constant string
    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.differing_executors])
    @given(ops=st.lists(OPS, max_size=40))
    def test_books_follow_a_decimal_ledger_after_every_step(self, backend: str,
                                                            ops: list[tuple[Any, ...]]) -> None:
        """After every step the books equal a plain Decimal ledger's and the invariant holds."""
        eng = Engine.create(capacity=32, **create_args(backend))
        try:
            ledger = Ledger(eng)
            for o in ops:
                ledger.step(o)
                ledger.check()
        finally:
            eng.unlink()
            eng.close()


class TestAccountStress:
    def test_books_exact_after_a_multiprocess_run(self, backend: str) -> None:
        """After a multiprocess run every account's books equal the workers' journals.

        Four spawned workers (more than the cores) open, price, close and
        release positions and move money on three shared accounts; afterwards
        every account's cash, reserved, realized and open count equal what
        the workers' journals add up to.  Allowed: refusals by a limit.
        Forbidden: any difference, any violation.
        """
        res = run_stress(StressConfig(workers=4, seconds=2.0, mix="accounts",
                                      **create_args(backend)))
        assert res.violations == 0, res.violation_messages
        a = res.accounts
        assert a is not None
        assert a["closes"]["closed"] > 0 and a["money"]["n_deposits"] > 0
        assert len(a["books"]) == a["final_scan"]["accounts"] == 3
        for b in a["books"]:
            assert (b["cash"], b["reserved"], b["realized"], b["open_positions"]) == (
                b["want_cash"], b["want_reserved"], b["want_realized"],
                b["want_open_positions"]), b
