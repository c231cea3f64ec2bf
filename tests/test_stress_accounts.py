"""The account workload of the stress harness (``--mix accounts``): its mix
parsing and terms, its checkers on fabricated books and positions (each
planted error is one unit, 1e-8, off), a whole run that must come out clean,
and a run with a planted leak (withdrawals that take one more unit than the
worker journals) that must come out dirty.

Allowed in a clean run: RiskLimitError (any limit, each checked against the
books it carries), a withdrawal refused for cash, version conflicts of
update_account.  Forbidden: books that do not match the open positions and
the journals to the last unit, a read that does not add up, a refusal its
own numbers do not justify, a position of a worker changed by anyone else,
a broken chain.
"""

from __future__ import annotations

import json
import pathlib
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from test_stress import assert_gone, run_cli

from engine import Account
from engine.accounts import SCALE, from_units, money_of
from engine.spec import State
from engine.tools.stress import (
    ACCOUNT_KINDS,
    ACCOUNT_PRESETS,
    KINDS,
    ORDER_KINDS,
    PRESETS,
    StressConfig,
    is_account_mix,
    is_order_mix,
    parse_mix,
    run_stress,
    verify_books,
)
from engine.tools.stress.accounts import (
    CLIENT_OPS,
    LIMITS,
    VIOLATIONS,
    Journal,
    bar_factor,
    books_problem,
    notional_of,
    realized_of,
    refusal_problem,
    terms_for,
)

UNIT = Decimal(1) / SCALE           # one unit of money: 1e-8

A, B = 0x1000000, 0x1000001         # two account ids
OPENING = 1000 * SCALE


def account(acct: int, **books: Any) -> Account:
    """Fabricated books of account ``acct`` (money as Decimal)."""
    fields: dict[str, Any] = {
        "id": acct, "cash": from_units(OPENING), "reserved": Decimal(0),
        "realized_pnl": Decimal(0), "open_positions": 0, "halted": False, "version": 1,
        "max_exposure": Decimal(800), "max_positions": 5, "max_loss": Decimal(100),
        "opening_cash": from_units(OPENING), "deposits": Decimal(0), "withdrawals": Decimal(0)}
    fields.update(books)
    return Account(**fields)


def row(pos: int, acct: int, entry: float, amount: float,
        state: State = State.MONITORING) -> dict[str, Any]:
    return {"id": pos, "account": acct, "entry_price": entry, "amount": amount,
            "state": int(state)}


class Ledger:
    """A consistent fabricated end of run: two accounts, positions open on
    them, one closed but not released, journals that explain every unit."""

    def __init__(self) -> None:
        # entry x amount chosen so the notionals need rounding (not exact in binary)
        self.rows = [row(0x10, A, 100.1, 0.3), row(0x11, A, 99.97, 7.77),
                     row(0x12, B, 101.3, 2.5),
                     row(0x13, B, 95.0, 1.1, State.CLOSED)]   # closed: no reservation
        closes = [(A, realized_of(100.0, 3.0, 1, 101.37)), (A, realized_of(98.2, 1.9, -1, 99.1)),
                  (B, realized_of(95.0, 1.1, -1, 93.3))]
        self.journals = {A: Journal(deposits=12_345_678, withdrawals=5 * SCALE + 1,
                                    n_deposits=1, n_withdrawals=1),
                         B: Journal()}
        for acct, r in closes:
            self.journals[acct].realized += r
            self.journals[acct].closes += 1
        self.books = {}
        for acct in (A, B):
            j = self.journals[acct]
            mine = [r for r in self.rows if r["account"] == acct and r["state"] != State.CLOSED]
            reserved = sum(money_of(r["entry_price"], r["amount"]) for r in mine)
            cash = OPENING + j.deposits - j.withdrawals + j.realized
            self.books[acct] = account(acct, cash=from_units(cash), reserved=from_units(reserved),
                                       realized_pnl=from_units(j.realized),
                                       open_positions=len(mine),
                                       deposits=from_units(j.deposits),
                                       withdrawals=from_units(j.withdrawals))
        self.held = {r["id"]: r["account"] for r in self.rows}

    def verify(self, **kw: Any) -> dict[str, int]:
        rep = verify_books(self.books, self.rows, dict.fromkeys(self.books, OPENING),
                           self.journals, self.held, **kw)
        return rep.by_category


class TestAccountMix:
    def test_accounts_preset(self) -> None:
        """``accounts`` selects the account workload with its preset weights."""
        assert is_account_mix("accounts") and is_account_mix("accounts,cash=4")
        assert not is_order_mix("accounts") and not is_account_mix("orders")
        assert parse_mix("accounts") == ACCOUNT_PRESETS["accounts"]
        assert set(parse_mix("accounts")) == set(ACCOUNT_KINDS)
        assert parse_mix("accounts,cash=4,books=0") == {**ACCOUNT_PRESETS["accounts"],
                                                        "cash": 4, "books": 0}
        assert is_account_mix(dict.fromkeys(ACCOUNT_KINDS, 1))

    def test_other_presets_unchanged(self) -> None:
        """Every position preset and the order preset parse as before."""
        for name, weights in PRESETS.items():
            assert not is_account_mix(name)
            assert parse_mix(name) == {k: weights.get(k, 0) for k in KINDS}
        assert set(parse_mix("orders")) == set(ORDER_KINDS)

    @pytest.mark.parametrize("bad", ["accounts,price=1", "accounts,own=1", "cash=1,accounts",
                                     "accounts,trade=-1", "default,trade=1", "orders,cash=1",
                                     "accounts," + ",".join(f"{k}=0" for k in ACCOUNT_KINDS)])
    def test_bad_account_mix(self, bad: str) -> None:
        """A bad account mix (other kinds, preset after weights, bad weights) is refused."""
        with pytest.raises(ValueError):
            parse_mix(bad)

    def test_config(self) -> None:
        """The account workload's defaults: slots, accounts, the leak fault.

        Slots: 64, or twice what the workers hold; 3 accounts by default; the
        leak fault only for the account workload; at least one account.
        """
        assert StressConfig(mix="accounts", workers=4).positions == 64
        assert StressConfig(mix="accounts", workers=16).positions == 128
        assert StressConfig(mix="accounts", positions=8).positions == 8
        assert StressConfig(mix="accounts").accounts == 3
        StressConfig(mix="accounts", fault="leak").check()
        with pytest.raises(ValueError):
            StressConfig(fault="leak").check()
        with pytest.raises(ValueError):
            StressConfig(mix="orders", fault="leak").check()
        with pytest.raises(ValueError):
            StressConfig(mix="accounts", accounts=0).check()

    @pytest.mark.parametrize("workers", [1, 2, 8, 32])
    def test_terms(self, workers: int) -> None:
        """The account terms sit above the average load: limits, cash, bands.

        The limits sit above what an account carries on average, the cash
        above the exposure, the bands around the limits.
        """
        t = terms_for(workers, 4, 3)
        m = workers * 4 / 3
        assert t.max_positions > m and t.max_exposure > m * 100 * SCALE
        assert t.cash > t.max_exposure > 0 and 0 < t.max_loss < t.cash
        assert t.exposure_band[0] < t.max_exposure < t.exposure_band[1]
        assert t.positions_band[0] <= t.max_positions < t.positions_band[1]
        json.dumps(t.as_dict())


class TestMoneyRules:
    def test_notional_and_realized_as_c_books_them(self, make_engine: Any) -> None:
        """Recomputed bookings equal the engine's to the unit, rounding included."""
        eng = make_engine(capacity=8)
        acct = eng.open_account(10**6, 10**6, 100, 10**6)
        want = 0
        for entry, amount, side, last in ((100.1, 0.3, 1, 101.37), (99.97, 7.77, -1, 98.03),
                                          (101.3, 2.5, 1, 100.0), (90.123456789, 9.87, -1, 90.5),
                                          # two legs rounded apart != the difference rounded
                                          (92.68728488224802, 8.55062050090371, 1,
                                           105.27549237953228),
                                          (94.66168900515146, 2.693232144639351, -1,
                                           94.37562074675377)):
            pos = eng.open_position(entry, amount, side, 0, account=acct)
            assert eng.account(acct).reserved == from_units(notional_of(entry, amount))
            eng.update_price(pos, last)
            for trig in ("POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED",
                         "EXIT_COMPLETED"):
                assert eng.transition(pos, trig).name == "APPLIED"
            want += realized_of(entry, amount, side, eng.price(pos).price)
            assert eng.account(acct).realized_pnl == from_units(want)
            eng.release_position(pos)
        assert want != 0
        # the cases above tell C's rounding (each leg) from rounding the difference
        assert realized_of(92.68728488224802, 8.55062050090371, 1, 105.27549237953228) \
            != round((105.27549237953228 - 92.68728488224802) * 8.55062050090371 * SCALE)

    def test_refusals_justified_or_not(self) -> None:
        """Each limit is justified by its own numbers; one unit short of the limit is not."""
        need = 100 * SCALE
        full = account(A, reserved=Decimal(900), open_positions=5, halted=True)
        for limit in LIMITS:
            assert refusal_problem(limit, full, need + 1) is None, limit
        # exposure: reserved 700 + 100 == 800 is allowed; one unit more is not
        assert refusal_problem("exposure", account(A, reserved=Decimal(700)), need) is not None
        assert refusal_problem("exposure", account(A, reserved=Decimal(700)), need + 1) is None
        # cash: available 1000 - 900 = 100 covers exactly 100
        rich = account(A, reserved=Decimal(900))
        assert refusal_problem("cash", rich, need) is not None
        assert refusal_problem("cash", rich, need + 1) is None
        assert refusal_problem("count", account(A, open_positions=4), need) is not None
        assert refusal_problem("halted", account(A), need) is not None
        assert refusal_problem("margin", full, need) is not None
        assert refusal_problem("cash", None, need) is not None

    def test_books_problem(self) -> None:
        """A read adds up or not, to the unit."""
        ok = Ledger().books[A]
        assert books_problem(ok) is None
        assert books_problem(ok._replace(cash=ok.cash + UNIT)) is not None
        assert books_problem(ok._replace(withdrawals=ok.withdrawals - UNIT)) is not None
        assert books_problem(ok._replace(reserved=Decimal(0))) is not None   # open, none reserved
        assert books_problem(ok._replace(open_positions=0)) is not None      # reserved, none open

    def test_bar(self) -> None:
        """The bar factor: met when every client op's p99 is under the bar, 0 when one is not."""
        lat = {op: {"samples": 10, "p99_us": 50.0} for op in CLIENT_OPS}
        bar = bar_factor(150_000.0, 20_000.0, lat)
        assert bar["p99_met"] and bar["factor"] == 150 and bar["booked_factor"] == 20
        lat["close"]["p99_us"] = 10_000.0
        assert bar_factor(150_000.0, 20_000.0, lat)["factor"] == 0.0


class TestVerifyBooks:
    def test_clean(self) -> None:
        """Consistent books verify with no violation and the expected counts."""
        led = Ledger()
        rep = verify_books(led.books, led.rows, dict.fromkeys(led.books, OPENING), led.journals,
                           led.held)
        assert rep.by_category == {}, rep.messages
        assert rep.accounts == 2 and rep.positions == 4 and rep.open_positions == 3
        assert [c.want_reserved for c in rep.checks] == [led.books[A].reserved,
                                                         led.books[B].reserved]

    @pytest.mark.parametrize("field, category", [
        ("cash", "cash"), ("reserved", "reserved"), ("realized_pnl", "realized"),
        ("deposits", "money_moved"), ("withdrawals", "money_moved"),
        ("opening_cash", "opening_cash")])
    @pytest.mark.parametrize("delta", [UNIT, -UNIT])
    def test_books_one_unit_off(self, field: str, category: str, delta: Decimal) -> None:
        """Any of the engine's figures one unit off is caught under its category."""
        led = Ledger()
        led.books[A] = led.books[A]._replace(**{field: getattr(led.books[A], field) + delta})
        got = led.verify()
        assert got.get(category, 0) == 1, got

    @pytest.mark.parametrize("what, category", [
        ("deposits", "cash"), ("withdrawals", "cash"), ("realized", "cash")])
    def test_journal_one_unit_off(self, what: str, category: str) -> None:
        """A journal one unit off breaks cash and its own figure.

        A journal one unit off (a movement the engine made that nobody
        journaled, or the other way round) breaks cash and its own figure.
        """
        led = Ledger()
        setattr(led.journals[B], what, getattr(led.journals[B], what) + 1)
        got = led.verify()
        assert got.get(category) == 1
        assert got.get("realized" if what == "realized" else "money_moved") == 1

    def test_position_one_unit_off(self) -> None:
        """An open position's notional one unit off its reservation is caught.

        An open position whose notional is one unit more than reserved: the
        entry price moved by the smallest step that changes the rounded notional.
        """
        led = Ledger()
        r = led.rows[2]
        base = money_of(r["entry_price"], r["amount"])
        entry = r["entry_price"]
        while money_of(entry, r["amount"]) == base:
            entry = float(np.nextafter(entry, np.inf))
        assert money_of(entry, r["amount"]) == base + 1
        r["entry_price"] = entry
        assert led.verify() == {"reserved": 1}

    def test_counts_and_states(self) -> None:
        """Miscounted or missing open positions are caught, and so is the count.

        A closed position counted as open (or the reverse), a missing open
        position, and the count.
        """
        led = Ledger()
        led.rows[3]["state"] = int(State.EXITING)        # still reserving
        assert led.verify() == {"reserved": 1, "open_positions": 1}
        led = Ledger()
        led.rows[0]["state"] = int(State.CLOSED)
        assert led.verify() == {"reserved": 1, "open_positions": 1}
        led = Ledger()
        led.books[B] = led.books[B]._replace(open_positions=2)
        assert led.verify() == {"open_positions": 1}

    def test_positions_and_owners(self) -> None:
        """Orphans, lost positions, another account, an unknown account, latches."""
        led = Ledger()
        del led.held[0x10]
        assert led.verify() == {"orphan_position": 1}
        assert led.verify(complete=False) == {}
        led = Ledger()
        led.held[0x99] = A
        assert led.verify() == {"lost_position": 1}
        led = Ledger()
        led.held[0x12] = A
        assert led.verify() == {"wrong_account": 1}
        led = Ledger()
        led.rows.append(row(0x20, 0x7000001, 100.0, 1.0))
        led.held[0x20] = 0x7000001
        assert led.verify() == {"unknown_account": 1}
        led = Ledger()
        assert led.verify(latched={A: 0, B: 7}) == {"latched": 1}

    def test_snapshot_rows_too(self, make_engine: Any) -> None:
        """The checker reads a real engine's rows and catches its books one unit off."""
        eng = make_engine(capacity=8)
        acct = eng.open_account(1000, 1000, 10, 100)
        eng.open_position(100.1, 0.3, 1, 0, account=acct)
        eng.open_position(99.97, 7.77, -1, 0, account=acct)
        books = {acct: eng.account(acct)}
        rows = eng.snapshot()
        assert isinstance(rows[0], np.void)
        rep = verify_books(books, rows, {acct: 1000 * SCALE}, {acct: Journal()})
        assert rep.by_category == {} and rep.open_positions == 2, rep.messages
        books[acct] = books[acct]._replace(reserved=books[acct].reserved - UNIT)
        assert verify_books(books, rows, {acct: 1000 * SCALE},
                            {acct: Journal()}).by_category == {"reserved": 1}


class TestAccountRuns:
    def test_clean_run(self) -> None:
        """A short account run on shared accounts leaves the books exact and the chains clean.

        Four workers for five seconds on three shared accounts: positions open
        (some refused by a limit), close with booked PnL, are released; money
        moves; the books come out exact and the chains verify.
        """
        res = run_stress(StressConfig(workers=4, seconds=5.0, mix="accounts"))
        assert res.violations == 0, res.violation_messages
        a = res.accounts
        assert a is not None
        assert a["violations"] == dict.fromkeys(VIOLATIONS, 0)
        o, c = a["opens"], a["closes"]
        assert o["opened"] > 100 and c["closed"] > 100 and c["released"] > 100
        assert 0 < o["refused"] < o["attempts"] / 2            # sometimes, not mostly
        assert a["money"]["n_deposits"] > 0 and a["money"]["n_withdrawals"] > 0
        assert a["updates"]["applied"] > 0
        assert a["final_scan"]["accounts"] == 3 and len(a["books"]) == 3
        for b in a["books"]:
            assert b["cash"] == b["want_cash"] and b["reserved"] == b["want_reserved"]
            assert b["realized"] == b["want_realized"]
            assert b["open_positions"] == b["want_open_positions"]
        assert Decimal(a["money"]["realized"]) != 0                # prices moved
        assert all(a["latency"][op]["samples"] > 0 for op in ("open", "close"))
        bar = a["bar"]
        assert bar["ops_per_s"] == res.ops_per_s and bar["ops_per_s"] > 0
        v = res.verification
        assert v["links"] == v["applied"] == v["counters_total"] == v["engine_applied"] > 0
        assert_gone(res)

    def test_leak_is_caught(self) -> None:
        """The planted withdrawal leak is reported as cash and withdrawals off.

        With the planted bug (one withdrawal in eight takes one more unit that
        nobody journals), the books check reports cash and withdrawals off.
        """
        res = run_stress(StressConfig(workers=2, seconds=2.0, mix="accounts", fault="leak"))
        assert res.violations > 0
        a = res.accounts
        assert a is not None and a["money"]["leaked"] > 0
        assert a["violations"]["cash"] > 0 and a["violations"]["money_moved"] > 0
        assert a["violations"]["reserved"] == 0 and a["violations"]["realized"] == 0
        assert any("cash" in m for m in res.violation_messages)
        assert_gone(res)


class TestAccountCommandLine:
    def test_json(self, tmp_path: pathlib.Path) -> None:
        """``stress --mix accounts --json`` writes the account figures and exits 0 when clean."""
        code, data = run_cli(tmp_path, ["--mix", "accounts", "--accounts", "2", "--workers", "2",
                                        "--seconds", "1"])
        assert code == 0
        assert data["violations"] == 0 and data["config"]["accounts"] == 2
        a = data["accounts"]
        assert set(a["latency"]) == set(CLIENT_OPS)
        assert set(a["refused"]["open"]) == set(LIMITS)
        assert {"factor", "p99_open_us", "p99_close_us", "p99_met"} <= a["bar"].keys()
        assert len(a["books"]) == 2
        assert "orders" not in data

    def test_fault_exits_nonzero(self, tmp_path: pathlib.Path) -> None:
        """stress --fault leak: cash violations are found and the exit code is 1."""
        code, data = run_cli(tmp_path, ["--mix", "accounts", "--workers", "2", "--seconds", "1",
                                        "--fault", "leak"])
        assert code == 1
        assert data["accounts"]["violations"]["cash"] > 0
