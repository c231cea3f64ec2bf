"""Chaos for accounts: workers that open with a reservation and close with a
booking are SIGKILLed at random points, and by fault hooks exactly between
the slot commit and the account publish (ENG_FAULT_DIE_IN_BOOKING) and right
after the slot lock (ENG_FAULT_DIE_AFTER_LOCK), many times over.

After every round, recover() and then the books must balance to the last
unit: reserved == the sum of the notionals of the account's open positions,
open_positions == their count, cash == opening + deposits - withdrawals +
realized, and realized == the sum of what the closed positions booked
(side x (money(last price x amount) - money(entry x amount)), read from
their records and prices; the parent alone releases closed positions and
keeps what they booked).  Forbidden: any difference, a latch left held
after recover().

The default run kills at least 60 times; TestManyKills (slow) kills hundreds
of times.
"""

from __future__ import annotations

import os
import random
import signal
import time
from decimal import Decimal
from typing import Any

import pytest
from procs import until

from engine import BusyError, Engine, RiskLimitError, State, Trigger
from engine._native import lib
from engine.accounts import from_units, money_of

ENTRIES = (10.0, 33.3, 99.99, 101.5)
AMOUNTS = (0.5, 1.0, 2.25, 7.0)
STEPS = (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
         Trigger.EXIT_COMPLETED)
OPEN_STATES = (State.CREATED, State.MONITORING, State.EXIT_PENDING, State.EXITING)


def chaos_worker(handle: Any, accts: list[int], seed: int, ready: Any, fault: int,
                 journal: str = "") -> None:
    """Open with reservations, update a price, close with bookings, forever.
    fault != 0: open one position, then switch the fault on and close it
    (DIE_IN_BOOKING dies in that close's booking; with seed odd, the fault
    goes on before the open, so the open's booking dies)."""
    eng = Engine.attach(handle)
    rng = random.Random(seed)
    ready.set()
    if fault:
        if seed % 2:
            eng._set_fault(fault)
        p = eng.open_position(50.0, 1.0, account=accts[seed % len(accts)])
        eng.update_price(p, 55.5)
        eng._set_fault(fault)
        for trig in STEPS:
            eng.transition(p, trig)
        time.sleep(5)   # unreachable: the fault kills first
        return
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    while True:
        a = accts[rng.randrange(len(accts))]
        e, amt, side = rng.choice(ENTRIES), rng.choice(AMOUNTS), rng.choice((1, -1))
        try:
            p = eng.open_position(e, amt, side=side, account=a)
        except (RiskLimitError, BusyError):
            continue
        px = round(rng.uniform(5.0, 120.0), 3)
        eng.update_price(p, px)
        for trig in STEPS:
            eng.transition(p, trig)
        # journal what the close booked (one write: all or nothing), then release
        diff = money_of(px, amt) - money_of(e, amt)
        os.write(fd, f"{p} {a} {diff if side > 0 else -diff}\n".encode())
        eng.release_position(p)
        if rng.random() < 0.2:
            eng.deposit(a, Decimal(rng.randrange(1, 10**6)) / 10**3)


class Books:
    """The parent's side: what released positions booked, per account."""

    def __init__(self, eng: Engine, accts: list[int], journal: str) -> None:
        self.eng = eng
        self.accts = accts
        self.journal = journal
        self.released = dict.fromkeys(accts, Decimal(0))
        self.journaled: set[int] = set()

    def read_journal(self) -> None:
        """Closes the workers booked and journaled (complete lines only); a
        position journaled but not yet released is counted once."""
        if not os.path.exists(self.journal):
            return
        with open(self.journal) as f:
            data = f.read()
        os.unlink(self.journal)
        for line in data.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue
            pid, a, units = (int(x) for x in line.split())
            self.released[a] += from_units(units)
            self.journaled.add(pid)

    def check(self) -> None:
        """The invariant, exactly, from the records, prices and books."""
        eng = self.eng
        rows = eng.snapshot()
        books = {int(b["id"]): b for b in eng.accounts()}
        mult = lib.ENG_BOOK_PRICE_MULT
        for a in self.accts:
            acc = eng.account(a)
            mine = rows[rows["account"] == a]
            reserved, n, realized = Decimal(0), 0, self.released[a]
            gain = loss = 0   # the room the open positions keep (ENG_BOOK_PRICE_MULT)
            for r in mine:
                if int(r["id"]) in self.journaled:
                    continue   # counted from the journal
                st = State(int(r["state"]))
                notional = money_of(float(r["entry_price"]), float(r["amount"]))
                if st in OPEN_STATES:
                    reserved += from_units(notional)
                    n += 1
                    top = money_of(float(r["entry_price"]) * mult, float(r["amount"])) - notional
                    g, lo = (top, notional) if int(r["side"]) > 0 else (notional, top)
                    gain, loss = gain + g, loss + lo
                else:
                    assert st == State.CLOSED, st
                    diff = money_of(float(r["price"]), float(r["amount"])) - notional
                    realized += from_units(diff if int(r["side"]) > 0 else -diff)
            assert (acc.reserved, acc.open_positions) == (reserved, n), (acc, reserved, n)
            assert acc.realized_pnl == realized, (acc.realized_pnl, realized)
            assert (int(books[a]["worst_gain"]), int(books[a]["worst_loss"])) == (gain, loss)
            assert acc.cash == acc.opening_cash + acc.deposits - acc.withdrawals + realized, acc

    def release_closed(self) -> None:
        """Between rounds (quiescent): keep what closed positions booked, free them."""
        eng = self.eng
        for r in eng.snapshot():
            if State(int(r["state"])) != State.CLOSED:
                continue
            if int(r["id"]) in self.journaled:
                eng.release_position(int(r["id"]))
                continue
            notional = money_of(float(r["entry_price"]), float(r["amount"]))
            diff = money_of(float(r["price"]), float(r["amount"])) - notional
            if int(r["account"]):
                self.released[int(r["account"])] += from_units(diff if int(r["side"]) > 0
                                                               else -diff)
                eng.release_position(int(r["id"]))
        self.journaled.clear()

    def close_leftovers(self) -> None:
        """Drive positions the dead left open to CLOSED (each step booked or not)."""
        for r in self.eng.snapshot():
            pid = int(r["id"])
            for trig in STEPS:
                if self.eng.state(pid) in OPEN_STATES:
                    self.eng.transition(pid, trig)


def run_rounds(eng: Engine, spawner: Any, rounds: int, per_round: int,
               faults_every: int, journal: str) -> dict[str, int]:
    accts = [eng.open_account(10**7, 10**6, 10**6, 10**9) for _ in range(3)]
    books = Books(eng, accts, journal)
    kills = fault_kills = 0
    stats = {"forward": 0, "back": 0}
    rng = random.Random(7)
    for rnd in range(rounds):
        procs = []
        fault = 0
        if faults_every and rnd % faults_every == faults_every - 1:
            fault = rng.choice((lib.ENG_FAULT_DIE_IN_BOOKING, lib.ENG_FAULT_DIE_IN_BOOKING,
                                lib.ENG_FAULT_DIE_AFTER_LOCK))
        n = 1 if fault else per_round
        for w in range(n):
            ready = spawner.ctx.Event()
            p = spawner.start(chaos_worker, eng.handle, accts, rnd * 100 + w, ready, fault,
                              journal)
            procs.append((p, ready))
        for _, ready in procs:
            assert ready.wait(60), "worker never became ready"
        if fault:
            p = procs[0][0]
            p.join(30)
            assert p.exitcode == -signal.SIGKILL, p.exitcode
            fault_kills += 1
            eng._set_fault(0)
        else:
            for p, _ in procs:
                time.sleep(rng.uniform(0.005, 0.06))
                os.kill(p.pid, signal.SIGKILL)
            for p, _ in procs:
                p.join(30)
                assert p.exitcode == -signal.SIGKILL, p.exitcode
                kills += 1
        rep = eng.recover()
        books.read_journal()
        stats["forward"] += rep.accounts_forward
        stats["back"] += rep.accounts_back
        assert all(int(w) & 0xFFFFFF == 0 for w in (a for a in eng.accounts()["latched"])), \
            "an account latch of a dead process survived recover()"
        books.check()
        books.close_leftovers()
        books.check()
        books.release_closed()
        books.check()
        spawner.procs.clear()
    return {"kills": kills, "fault_kills": fault_kills, **stats}


class TestChaosAccounts:
    def test_books_balance_after_kills(self, make_engine: Any, spawner: Any,
                                       tmp_path: Any) -> None:
        """>= 60 SIGKILLs (random points and fault hooks); books exact after each recover()."""
        eng = make_engine(capacity=256)
        t0 = time.monotonic()
        out = run_rounds(eng, spawner, rounds=26, per_round=3, faults_every=4,
                         journal=str(tmp_path / "journal"))
        print(f"\naccount chaos: {out} in {time.monotonic() - t0:.1f} s")
        assert out["kills"] + out["fault_kills"] >= 60
        assert out["fault_kills"] >= 5

    def test_die_in_booking_is_rolled_forward(self, make_engine: Any, spawner: Any) -> None:
        """A booking killed after the slot commit is rolled forward by recover().

        Killed between the slot commit and the account publish: the state is
        committed, so recover() publishes the books (forward), and a reader saw
        them already before that.
        """
        eng = make_engine(capacity=8)
        a = eng.open_account(1000, 1000, 10, 1000)
        ready = spawner.ctx.Event()
        p = spawner.start(chaos_worker, eng.handle, [a], 0, ready,
                          lib.ENG_FAULT_DIE_IN_BOOKING)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        eng._set_fault(0)
        assert eng.accounts()["latched"][0] == 1          # the dead holder's latch
        acc = eng.account(a)                              # the reader sees committed books
        assert acc.reserved == 0 and acc.realized_pnl == Decimal("5.5")
        rep = eng.recover()
        assert rep.accounts_forward == 1 and rep.accounts_back == 0
        assert eng.account(a) == acc._replace(version=acc.version)
        until(lambda: not eng.accounts()["latched"][0], "latch released")


@pytest.mark.slow
class TestManyKills:
    def test_hundreds_of_kills(self, make_engine: Any, spawner: Any, tmp_path: Any) -> None:
        """Hundreds of SIGKILLs; the books balance to the unit after each round."""
        eng = make_engine(capacity=512)
        out = run_rounds(eng, spawner, rounds=120, per_round=4, faults_every=5,
                         journal=str(tmp_path / "journal"))
        print(f"\naccount chaos (slow): {out}")
        assert out["kills"] + out["fault_kills"] >= 400
