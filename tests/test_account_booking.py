"""Account booking: a booked opening reserves its notional in its account,
its close books the PnL and frees the reservation exactly once, its release
settles what a dead booker left.

Allowed: every accepted opening closes at either end of its band, booked
once; forbidden: a spec whose positions could leave or start in a closed
state, a reservation leaked or released twice, a half-published booking
after a SIGKILL, metrics or halts that disagree with the books.

Every state is reached through the public API, the test-only fault switches
(eng._set_fault) and real SIGKILLs; the only raw access is a READ of an
account's latch word (to know when a worker holds it).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import (
    POSITION_SPEC,
    BusyError,
    Engine,
    MachineSpec,
    MoneyError,
    Outcome,
    RiskLimitError,
    Rule,
    SpecError,
    State,
    Trigger,
)
from engine._native import lib
from engine.accounts import UNITS_MAX, from_units, money_of

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)
JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)

TO_EXITING = (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED)
CLOSE = (*TO_EXITING, Trigger.EXIT_COMPLETED)


def open_books(eng: Engine, acct: int,
               closed: tuple[str, ...] = ("CLOSED",)) -> tuple[Decimal, int]:
    """What the invariant says the account must reserve: the sum of the
    notionals of its open (not closed) positions, and their count."""
    names = eng.spec.states
    total, n = 0, 0
    for r in eng.snapshot():
        if int(r["account"]) != acct:
            continue
        st = names[int(r["state"]).bit_length() - 1]
        if st in closed:
            continue
        total += money_of(float(r["entry_price"]), float(r["amount"]))
        n += 1
    return from_units(total), n


def assert_invariant(eng: Engine, acct: int, closed: tuple[str, ...] = ("CLOSED",)) -> None:
    a = eng.account(acct)
    want_reserved, want_n = open_books(eng, acct, closed)
    assert (a.reserved, a.open_positions) == (want_reserved, want_n), (a, want_reserved, want_n)
    assert a.cash == a.opening_cash + a.deposits - a.withdrawals + a.realized_pnl, a


def latch_holder(eng: Engine, acct: int) -> int:
    """READ ONLY: the token in the account's latch word (0: not latched)."""
    return int(eng._seg.accounts[acct & 0xFFFFFF].word) & 0xFFFFFF


# ---------------------------------------------------------------------------------------
# Defect 1: a custom spec with a rule out of a closed state into an open one
# ---------------------------------------------------------------------------------------

def reopen_spec() -> MachineSpec:
    """The default lifecycle plus REOPEN: CLOSED -> MONITORING (e.g. a fill
    that was busted after the close).  The spec compiles; positions of it
    carry accounts."""
    return MachineSpec(states=POSITION_SPEC.states,
                       triggers=[*POSITION_SPEC.triggers, "REOPEN"],
                       rules=[*POSITION_SPEC.rules, Rule.of("REOPEN", "CLOSED", "MONITORING")],
                       initial=POSITION_SPEC.initial, closed=POSITION_SPEC.closed,
                       name="reopen_hostile")


def parked_spec() -> MachineSpec:
    """Positions that open in a closed state (PARKED) and carry accounts."""
    return MachineSpec(states=["PARKED", "LIVE", "DONE"], triggers=["GO", "STOP"],
                       rules=[Rule.of("GO", "PARKED", "LIVE"), Rule.of("STOP", "LIVE", "DONE")],
                       initial="PARKED", closed=["PARKED", "DONE"], name="parked_hostile")


ARCHIVE_CLOSED = ("CLOSED", "ARCHIVED")


def archive_spec() -> MachineSpec:
    """The default lifecycle plus ARCHIVE: CLOSED -> ARCHIVED, both closed (accepted)."""
    return MachineSpec(states=[*POSITION_SPEC.states, "ARCHIVED"],
                       triggers=[*POSITION_SPEC.triggers, "ARCHIVE"],
                       rules=[*POSITION_SPEC.rules, Rule.of("ARCHIVE", "CLOSED", "ARCHIVED")],
                       initial=POSITION_SPEC.initial, closed=ARCHIVE_CLOSED,
                       name="archive_hostile")


def parked_open_spec() -> MachineSpec:
    """parked_spec with PARKED open (accepted): positions open before they close."""
    return MachineSpec(states=["PARKED", "LIVE", "DONE"], triggers=["GO", "STOP"],
                       rules=[Rule.of("GO", "PARKED", "LIVE"), Rule.of("STOP", "LIVE", "DONE")],
                       initial="PARKED", closed=["DONE"], name="parked_open")


@pytest.mark.shm_only
class TestOutOfClosedStates:
    def test_such_specs_refuse_booking_at_open(self, make_engine: Any) -> None:
        """A spec that leaves a closed state (or starts in one) builds; booking on it is refused.

        The fix of issue 20: opening one on an account raises SpecError naming
        the rule and reserves nothing.
        """
        for build, rule in ((reopen_spec, "REOPEN"), (parked_spec, "PARKED")):
            eng = make_engine(capacity=4, spec=build())
            a = eng.open_account(1000, 1000, 10, 1000)
            with pytest.raises(SpecError, match=rule):
                eng.open_position(100.0, 1.0, account=a)
            assert (eng.account(a).reserved, eng.snapshot().size) == (0, 0)

    def test_closed_to_closed_books_once(
            self, make_engine: Any) -> None:
        """CLOSED -> ARCHIVED (closed to closed) books nothing a second time."""
        eng = make_engine(capacity=8, spec=archive_spec())
        a = eng.open_account(10_000, 10_000, 10, 10_000)
        p1 = eng.open_position(100.0, 1.0, account=a)
        eng.open_position(100.0, 1.0, account=a)    # p2: stays open
        for trig in CLOSE:
            assert eng.transition(p1, trig) == Outcome.APPLIED
        assert_invariant(eng, a, closed=ARCHIVE_CLOSED)   # 100 reserved: p2
        before = eng.account(a)
        assert eng.transition(p1, "ARCHIVE") == Outcome.APPLIED
        assert eng.state(p1).name == "ARCHIVED"
        assert eng.account(a) == before                   # not booked a second time
        assert (before.reserved, before.open_positions) == (Decimal(100), 1)
        assert_invariant(eng, a, closed=ARCHIVE_CLOSED)

    def test_second_closed_state_leaves_the_open_positions_reservation(
            self, make_engine: Any) -> None:
        """After a closed-to-closed move, p2's reservation stays until p2's own close frees it."""
        eng = make_engine(capacity=8, spec=archive_spec())
        a = eng.open_account(10_000, 10_000, 10, 10_000)
        p1 = eng.open_position(100.0, 1.0, account=a)
        p2 = eng.open_position(100.0, 1.0, account=a)
        for trig in CLOSE:
            eng.transition(p1, trig)
        assert eng.transition(p1, "ARCHIVE") == Outcome.APPLIED
        assert eng.state(p2) == State.CREATED
        acct = eng.account(a)
        assert (acct.reserved, acct.open_positions) == (Decimal(100), 1)
        assert_invariant(eng, a, closed=ARCHIVE_CLOSED)   # p2 open: 100 reserved, 1 open
        for trig in CLOSE:
            assert eng.transition(p2, trig) == Outcome.APPLIED
        acct = eng.account(a)
        assert (acct.reserved, acct.open_positions) == (Decimal(0), 0)
        assert_invariant(eng, a, closed=ARCHIVE_CLOSED)

    def test_open_release_is_invalid(
            self, make_engine: Any) -> None:
        """An open booked position's release is INVALID."""
        eng = make_engine(capacity=4, spec=parked_open_spec())
        a = eng.open_account(1000, 1000, 10, 1000)
        p = eng.open_position(100.0, 2.0, account=a)
        assert eng.release_position(p) == Outcome.INVALID     # open: its booking is pending
        assert eng.snapshot().size == 1
        assert eng.account(a).reserved == Decimal(200)
        assert_invariant(eng, a, closed=("DONE",))
        for trig in ("GO", "STOP"):
            assert eng.transition(p, trig) == Outcome.APPLIED
        assert eng.release_position(p) == Outcome.APPLIED
        assert eng.snapshot().size == 0
        assert_invariant(eng, a, closed=("DONE",))       # nothing open: 0 reserved


# ---------------------------------------------------------------------------------------
# Defect 2: release_position's settle is not atomic with its release CAS
# ---------------------------------------------------------------------------------------

def race_holder(handle: Any, acct: int, ready: Any, go: Any) -> None:
    """Opens a position on acct; the test pause (set by the parent) parks it
    inside finish_booked holding the account latch.  The parent kills it."""
    eng = Engine.attach(handle)
    ready.set()
    go.wait(60)
    eng.open_position(10.0, 1.0, account=acct)
    time.sleep(60)


def race_closer(handle: Any, pos: int, ready: Any, go: Any) -> None:
    """Closes pos (a booked close) as soon as go flips; DIE_IN_BOOKING kills
    it between its slot commit (B5) and its account publish (B6)."""
    eng = Engine.attach(handle)
    ready.set()
    deadline = time.monotonic() + 60
    while not go.value and time.monotonic() < deadline:
        pass                                   # busy: react within microseconds
    eng.transition(pos, Trigger.EXIT_COMPLETED)
    time.sleep(60)


def race_releaser(handle: Any, pos: int, ready: Any, go: Any, result: Any) -> None:
    """release_position(pos) until it applies (a housekeeper freeing closed
    positions; BusyError and INVALID just mean 'not yet')."""
    eng = Engine.attach(handle)
    ready.set()
    go.wait(60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if eng.release_position(pos) == Outcome.APPLIED:
                result.value = 1
                return
        except BusyError:
            pass
    result.value = 2


def release_race_trial(spawner: Any) -> list[str]:
    """One run of the interleaving; returns the broken properties seen."""
    broken: list[str] = []
    eng = Engine.create(capacity=2, max_accounts=2)
    try:
        a = eng.open_account(10**6, 10**6, 100, 10**6)
        x = eng.open_position(100.0, 1.0, account=a)
        for trig in TO_EXITING:
            eng.transition(x, trig)
        ctx = spawner.ctx
        ready = [ctx.Event() for _ in range(3)]
        go_h, go_q = ctx.Event(), ctx.Event()
        go_p = ctx.Value("i", 0, lock=False)
        result = ctx.Value("i", 0, lock=False)
        h = spawner.start(race_holder, eng.handle, a, ready[0], go_h)
        p = spawner.start(race_closer, eng.handle, x, ready[1], go_p)
        q = spawner.start(race_releaser, eng.handle, x, ready[2], go_q, result)
        for r in ready:
            assert r.wait(60), "worker never became ready"
        # H: a booked open of Y on A, parked after B4 holding A's latch
        eng._set_fault(0, 3_000_000_000)
        go_h.set()
        deadline = time.monotonic() + 20
        while latch_holder(eng, a) == 0:
            assert time.monotonic() < deadline, "holder never latched the account"
        time.sleep(0.02)                       # H is asleep in test_pause now
        eng._set_fault(lib.ENG_FAULT_DIE_IN_BOOKING, 0)
        # Q: release_position(X) sits in acct_settle(A) watching H's latch word
        go_q.set()
        time.sleep(0.01)
        # H dies holding the latch; P starts its booked close of X right away:
        # P resolves H's latch, latches A itself, commits X CLOSED (B5), dies.
        # Q's settle sees "the word I saw is gone" and releases X: the booking
        # about X is still unpublished, and nothing now protects its evidence.
        os.kill(h.pid, signal.SIGKILL)
        h.join(10)
        go_p.value = 1
        p.join(15)
        q.join(20)
        eng._set_fault(0)
        if result.value == 1:
            seen = eng.account(a)              # a reader right after the release
            want = open_books(eng, a)
            if (seen.reserved, seen.open_positions) != want:
                broken.append(f"reader after release: {seen} vs {want}")
            # any opening without this account reuses X's slot and publishes
            # a record copy over the evidence "published commit == L"
            eng.open_position(1.0, 1.0)
            seen = eng.account(a)
            want = open_books(eng, a)
            if (seen.reserved, seen.open_positions) != want:
                broken.append(f"reader after reopen of the slot (no recover yet): "
                              f"reserved {seen.reserved} / {seen.open_positions} open, "
                              f"open positions on A: {want}")
        eng.recover()
        acc = eng.account(a)
        want = open_books(eng, a)
        if (acc.reserved, acc.open_positions) != want:
            broken.append(f"after recover(): reserved {acc.reserved} / {acc.open_positions} "
                          f"open, open positions on A: {want}")
        return broken
    finally:
        eng.close()
        eng.unlink()


@pytest.mark.shm_only
class TestReleaseRace:
    def test_release_racing_a_booked_close_loses_the_booking(self, spawner: Any) -> None:
        """A release racing a booked close (test pause, then SIGKILL) loses no booking.

        Interleaving (each step is real; the timing is arranged with the
        test pause and a SIGKILL, it needs no fault that production lacks):

          Q release_position(X): read_ctx, acct_settle(A) sees word W0 latched
          H (booked open of Y on A) dies holding A's latch
          P booked close of X: lock X (L), latch A (resolving H), B3 pend
            sealed {X, L}, B4, B5 X -> CLOSED, SIGKILL before B6
          Q settle: "the word I saw (W0) is gone" -> returns 0; Q loads X's
            word NOW: CLOSED, unlocked -> CAS to free.  X released while the
            booking about X is unpublished.
          anyone opens on X's slot without account A -> the record copy with
            commit == L is no longer published
          recover(): pend.seal == AL, slot_decision(X, L): published commit
            != L -> BACK.  X's close is lost: reserved keeps X's notional,
            open_positions counts it, X no longer exists.  Readers between
            the reopen and recover (and with P merely preempted, not killed)
            see the old books after having seen the new ones.

        The race hits about half the time; up to 12 trials."""
        for trial in range(12):
            broken = release_race_trial(spawner)
            assert not broken, f"trial {trial}: " + "; ".join(broken)


# ---------------------------------------------------------------------------------------
# Defect 3: update_account counts retries quadratically
# ---------------------------------------------------------------------------------------

@pytest.mark.shm_only
class TestUpdateAccountMetrics:
    def test_retries_are_counted_once_per_retry(self, engine: Engine) -> None:
        """Five version conflicts count five retries, not k(k+1)/2 = 15."""
        a = engine.open_account(100, 100, 1, 10)
        before = engine.metrics()["account"]
        calls: list[int] = []

        def fn(acc: Any) -> dict[str, int]:
            calls.append(acc.version)
            if len(calls) <= 5:
                engine.deposit(a, 1)           # another writer moves the version
            return {"max_positions": 2}

        engine.update_account(a, fn)
        after = engine.metrics()["account"]
        assert len(calls) == 6
        assert after.conflicts - before.conflicts == 5
        assert after.retries - before.retries == 5


# ---------------------------------------------------------------------------------------
# Defect 4: realized losses past max_loss do not halt after a limit change
# ---------------------------------------------------------------------------------------

@pytest.mark.shm_only
class TestMaxLossHalt:
    def test_loss_already_past_a_lowered_max_loss_halts(self, engine: Engine) -> None:
        """Lowering max_loss below losses already realized halts the account at once.

        realized = -80; update_account lowers max_loss to 50: the losses
        have reached max_loss, yet the account stays open for new positions
        (it halts only at the next close, even a profitable one).
        """
        a = engine.open_account(1000, 1000, 10, 500)
        p = engine.open_position(100.0, 1.0, account=a)
        engine.update_price(p, 20.0)
        for trig in CLOSE:
            engine.transition(p, trig)
        assert engine.account(a).realized_pnl == Decimal(-80)
        acc = engine.update_account(a, lambda x: {"max_loss": 50})
        assert acc.halted, acc
        with pytest.raises(RiskLimitError):
            engine.open_position(10.0, 1.0, account=a)


# ---------------------------------------------------------------------------------------
# Attacks that held
# ---------------------------------------------------------------------------------------

def die_in_booking_closer(handle: Any, pos: int, ready: Any) -> None:
    eng = Engine.attach(handle)
    ready.set()
    eng.transition(pos, Trigger.EXIT_COMPLETED)   # DIE_IN_BOOKING: killed after B5
    time.sleep(60)


def parked_opener(handle: Any, acct: int, ready: Any) -> None:
    eng = Engine.attach(handle)
    ready.set()
    eng.open_position(10.0, 1.0, account=acct)    # parked after B4 by the test pause
    time.sleep(60)


@pytest.mark.shm_only
class TestHeld:
    def test_held_readers_see_state_and_books_together_in_a_dead_booking(
            self, engine: Engine, spawner: Any) -> None:
        """Readers of a booking killed between B5 and B6 see CLOSED with the released books.

        held: closer killed between B5 and B6; before any resolution the
        position reads CLOSED and the account reads the released books; a
        deposit resolves the latch forward; books exact.
        """
        a = engine.open_account(1000, 1000, 10, 1000)
        x = engine.open_position(100.0, 1.0, account=a)
        engine.update_price(x, 110.0)
        for trig in TO_EXITING:
            engine.transition(x, trig)
        engine._set_fault(lib.ENG_FAULT_DIE_IN_BOOKING)
        ready = spawner.ctx.Event()
        p = spawner.start(die_in_booking_closer, engine.handle, x, ready)
        p.join(30)
        engine._set_fault(0)
        assert p.exitcode == -signal.SIGKILL
        assert latch_holder(engine, a) != 0
        assert engine.state(x) == State.CLOSED
        acc = engine.account(a)
        assert (acc.reserved, acc.open_positions, acc.realized_pnl) == (0, 0, Decimal(10))
        engine.deposit(a, 1)
        assert latch_holder(engine, a) == 0
        assert_invariant(engine, a)
        assert engine.account(a).realized_pnl == Decimal(10)

    def test_held_stopped_latch_holder_gives_bounded_busy(self, engine: Engine,
                                                          spawner: Any) -> None:
        """A stopped account-latch holder makes writers give up in bound; reads never wait."""
        a = engine.open_account(1000, 1000, 10, 1000)
        engine._set_fault(0, 5_000_000_000)
        ready = spawner.ctx.Event()
        h = spawner.start(parked_opener, engine.handle, a, ready)
        deadline = time.monotonic() + 30
        while latch_holder(engine, a) == 0:
            assert time.monotonic() < deadline
        engine._set_fault(0)
        os.kill(h.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(BusyError):
                engine.deposit(a, 1)
            with pytest.raises(BusyError):
                engine.open_position(10.0, 1.0, account=a)
            assert time.monotonic() - t0 < 5
            engine.account(a)
            rep = engine.recover()
            assert rep.accounts_forward == rep.accounts_back == 0
            assert latch_holder(engine, a) != 0
        finally:
            os.kill(h.pid, signal.SIGKILL)
            os.kill(h.pid, signal.SIGCONT)
            h.join(10)
        engine.recover()
        assert latch_holder(engine, a) == 0
        assert_invariant(engine, a)


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
        """An opening whose close at the band's top could not be booked raises MoneyError."""
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
        """An opening whose worst gain would pass realized's top is refused at the opening."""
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
        """A deposit that would eat an open long's room for its worst gain is refused."""
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
        """Every accepted opening closes APPLIED at either end of its band; books stay exact."""
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
        """A close above the band raises MoneyError and changes nothing; one within it books."""
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
        """A batch element's MoneyError is raised with every element's outcome.

        [closable, close above the band, closable]: MoneyError for index 1
        with .outcomes = [APPLIED, MANY_ERROR | EBADMONEY, APPLIED]; the two
        others applied (before: CONFLICT, and the cause was lost).
        """
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
