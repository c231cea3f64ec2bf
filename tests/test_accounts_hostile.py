"""Hostile review of the accounts protocol (issue 9): each test below is a
defect that breaks a property of DESIGN "Accounts and risk limits" against
the current engine.c, plus a few attacks that held (marked "held").

Nothing here writes into the segment: every state is reached through the
public API, the test-only fault switches (eng._set_fault) and real SIGKILLs.
The only raw access is a READ of an account's latch word (to know when a
worker holds it).
"""

from __future__ import annotations

import os
import signal
import time
from decimal import Decimal
from typing import Any

import pytest

from engine import (
    POSITION_SPEC,
    BusyError,
    Engine,
    EngineError,
    MachineSpec,
    Outcome,
    RiskLimitError,
    Rule,
    SpecError,
    State,
    Trigger,
)
from engine._native import lib
from engine.accounts import from_units, money_of

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


def create_or_refused(make_engine: Any, **kwargs: Any) -> Engine | None:
    """The engine, or None if create refuses the spec (a fix may refuse specs
    whose booked positions could leave a closed state or start in one)."""
    try:
        if callable(kwargs.get("spec")):
            kwargs["spec"] = kwargs["spec"]()   # the spec itself may be refused
        return make_engine(**kwargs)
    except EngineError:
        return None


def refused_at_open(eng: Engine, acct: int) -> bool:
    """The fix of issue 20: on a spec whose closing may happen twice, an
    opening on an account raises SpecError (checked here): nothing to book."""
    if not eng.spec.reopens:
        return False
    with pytest.raises(SpecError, match="closed"):
        eng.open_position(100.0, 1.0, account=acct)
    return True


def parked_spec() -> MachineSpec:
    """Positions that open in a closed state (PARKED) and carry accounts."""
    return MachineSpec(states=["PARKED", "LIVE", "DONE"], triggers=["GO", "STOP"],
                       rules=[Rule.of("GO", "PARKED", "LIVE"), Rule.of("STOP", "LIVE", "DONE")],
                       initial="PARKED", closed=["PARKED", "DONE"], name="parked_hostile")


class TestOutOfClosedStates:
    def test_such_specs_refuse_booking_at_open(self, make_engine: Any) -> None:
        """The fix (issue 20): a spec whose positions could leave a closed state,
        or start in one, builds; opening one on an account raises SpecError
        naming the rule and reserves nothing."""
        for build, rule in ((reopen_spec, "REOPEN"), (parked_spec, "PARKED")):
            eng = make_engine(capacity=4, spec=build())
            a = eng.open_account(1000, 1000, 10, 1000)
            with pytest.raises(SpecError, match=rule):
                eng.open_position(100.0, 1.0, account=a)
            assert (eng.account(a).reserved, eng.snapshot().size) == (0, 0)

    def test_reopen_from_closed_reserves_nothing_and_closes_twice(self, make_engine: Any) -> None:
        """CLOSED -> MONITORING is neither booked nor refused: the position is
        open again with no reservation (escaping every limit), and its second
        close releases a reservation it does not hold (here p2's), booking
        its PnL twice."""
        eng = create_or_refused(make_engine, capacity=8, spec=reopen_spec)
        if eng is None:
            return
        a = eng.open_account(10_000, 10_000, 10, 10_000)
        if refused_at_open(eng, a):
            return
        p1 = eng.open_position(100.0, 1.0, account=a)
        eng.open_position(100.0, 1.0, account=a)    # p2: stays open
        for trig in CLOSE:
            assert eng.transition(p1, trig) == Outcome.APPLIED
        assert_invariant(eng, a)                       # 100 reserved: p2
        assert eng.transition(p1, "REOPEN") == Outcome.APPLIED
        assert eng.state(p1) == State.MONITORING
        # quiescent: p1 and p2 open, 200 of notional, yet 100 reserved / 1 open
        assert_invariant(eng, a)

    def test_reopened_position_second_close_double_releases(self, make_engine: Any) -> None:
        """The same hole, seen at the next close: with p2 still open the
        account ends with reserved 0 and open_positions 0 (and could then be
        closed under p2, whose close would then fail forever)."""
        eng = create_or_refused(make_engine, capacity=8, spec=reopen_spec)
        if eng is None:
            return
        a = eng.open_account(10_000, 10_000, 10, 10_000)
        if refused_at_open(eng, a):
            return
        p1 = eng.open_position(100.0, 1.0, account=a)
        p2 = eng.open_position(100.0, 1.0, account=a)
        for trig in CLOSE:
            eng.transition(p1, trig)
        eng.transition(p1, "REOPEN")
        for trig in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
            eng.transition(p1, trig)
        assert eng.state(p2) == State.CREATED
        assert_invariant(eng, a)                       # p2 open: 100 reserved, 1 open

    def test_initial_closed_state_release_leaks_the_reservation(self, make_engine: Any) -> None:
        """A spec whose initial state is in `closed`: the opening reserves, the
        position can be released straight from its initial (closed) state,
        nothing books the release, and the reservation is stranded forever
        (the account can never be closed again)."""
        eng = create_or_refused(make_engine, capacity=4, spec=parked_spec)
        if eng is None:
            return
        a = eng.open_account(1000, 1000, 10, 1000)
        if refused_at_open(eng, a):
            return
        p = eng.open_position(100.0, 2.0, account=a)
        assert eng.release_position(p) == Outcome.APPLIED
        assert eng.snapshot().size == 0
        assert_invariant(eng, a, closed=("PARKED", "DONE"))   # nothing open: 0 reserved


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


class TestReleaseRace:
    def test_release_racing_a_booked_close_loses_the_booking(self, spawner: Any) -> None:
        """Interleaving (each step is real; the timing is arranged with the
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

class TestUpdateAccountMetrics:
    def test_retries_are_counted_once_per_retry(self, engine: Engine) -> None:
        """Five version conflicts are five retries.  C adds `attempt` (the
        tries before this one) on every try, so k retries count k(k+1)/2
        (here 15): the contention figure of seed 003 is inflated."""
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

class TestMaxLossHalt:
    def test_loss_already_past_a_lowered_max_loss_halts(self, engine: Engine) -> None:
        """realized = -80; update_account lowers max_loss to 50: the losses
        have reached max_loss, yet the account stays open for new positions
        (it halts only at the next close, even a profitable one)."""
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


class TestHeld:
    def test_held_readers_see_state_and_books_together_in_a_dead_booking(
            self, engine: Engine, spawner: Any) -> None:
        """held: closer killed between B5 and B6; before any resolution the
        position reads CLOSED and the account reads the released books; a
        deposit resolves the latch forward; books exact."""
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
        """held: a SIGSTOPped holder of the account latch makes deposit, an
        opening and recover() give up within the bound (BusyError / no
        resolution of a live holder); reads never wait."""
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
