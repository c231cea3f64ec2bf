"""The journal in the segment (issue 21): every committed change recorded once,
in one order, followed by any process (sync and asyncio).

Forbidden outcomes: a committed change with no record or with two; a record
of a change that did not commit (a refused call, a rolled-back transition);
a seq delivered twice or skipped without JournalLappedError; a record out of
commit order for its id; a subscriber per thread.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import pytest
from journal_audit import follow_to_file, journal_on  # noqa: F401 (make_engine: journal on)

from engine import (
    ArgumentError,
    Engine,
    EngineTypeError,
    KeyExistsError,
    Outcome,
    RiskLimitError,
    State,
    Trigger,
)
from engine._native import lib
from engine.errors import ClosedError, JournalLappedError, PriceError
from engine.journal import Event

SLOT_MASK = (1 << lib.ENG_ID_SLOT_BITS) - 1


def drain(eng: Engine, since: int = 0) -> list[Event]:
    """Every retained record after ``since``, without waiting."""
    return list(eng.events(since=since, timeout=0))


def commits_per_slot(eng: Engine) -> dict[int, int]:
    """Commits each slot has seen: its generation (every commit moves it by one)."""
    out = {}
    for slot in range(eng.capacity):
        w = eng.state_word(slot)
        out[slot] = (w >> lib.ENG_SW_GEN_SHIFT) & lib.ENG_SW_GEN_MASK
    return out


def records_per_slot(events: list[Event]) -> dict[int, int]:
    """Records of slot changes (open, transition, release) per slot."""
    c: Counter[int] = Counter()
    for ev in events:
        if ev.kind in ("open", "transition", "release"):
            c[ev.id & SLOT_MASK] += 1
    return dict(c)


def assert_record_iff_commit(eng: Engine) -> list[Event]:
    """Records per slot equal the slot's commits, seqs run 1, 2, ... with no gap."""
    evs = drain(eng)
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1)), "a gap or a duplicate seq"
    assert evs[-1].seq == eng.journal_seq if evs else eng.journal_seq == 0
    commits = {s: n for s, n in commits_per_slot(eng).items() if n}
    assert records_per_slot(evs) == commits, "a commit without its record, or a record without"
    return evs


class TestEvents:
    def test_each_change_has_one_record_in_order(self, make_engine: Any) -> None:
        """open, transitions and release: one record each, seq 1.., state/trigger/record after."""
        eng = make_engine(capacity=4)
        pos = eng.open_position(100.0, 2.0, side=1, token=7)
        eng.transition(pos, Trigger.POSITION_OPENED)
        eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=1)
        eng.transition(pos, Trigger.EXIT_STARTED)
        eng.transition(pos, Trigger.EXIT_COMPLETED)
        closed = eng.context(pos)
        eng.release_position(pos)
        evs = drain(eng)
        assert [(e.seq, e.kind, e.id) for e in evs] == [
            (1, "open", pos), (2, "transition", pos), (3, "transition", pos),
            (4, "transition", pos), (5, "transition", pos), (6, "release", pos)]
        assert [e.state for e in evs] == [State.CREATED, State.MONITORING, State.EXIT_PENDING,
                                          State.EXITING, State.CLOSED, None]
        assert [e.trigger for e in evs] == [None, Trigger.POSITION_OPENED,
                                            Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
                                            Trigger.EXIT_COMPLETED, None]
        assert evs[0].record.entry_price == 100.0 and evs[0].record.token == 7
        assert evs[1].record.exit_reason == 0 and evs[2].record.exit_reason == 1
        assert evs[-2].record == closed == evs[-1].record
        assert all(a.ts_ns <= b.ts_ns for a, b in itertools.pairwise(evs))
        assert eng.journal_seq == 6

    def test_prices_are_recorded_only_when_asked(self, make_engine: Any) -> None:
        """journal_prices=True: one price record per write; the default: none."""
        eng = make_engine(capacity=4, journal_prices=True)
        pos = eng.open_position(100.0, 2.0)
        eng.update_price(pos, 101.5)
        evs = drain(eng)
        assert [(e.kind, e.id) for e in evs] == [("open", pos), ("price", pos)]
        assert evs[1].record == eng.price(pos)
        plain = make_engine(capacity=4)
        other = plain.open_position(100.0, 2.0)
        plain.update_price(other, 101.5)
        assert [e.kind for e in drain(plain)] == ["open"]

    def test_account_changes_are_recorded_with_the_books_after(self, make_engine: Any) -> None:
        """open_account, deposit, withdraw, halt_account: one account record each, books after."""
        eng = make_engine(capacity=4, max_accounts=2)
        acct = eng.open_account(cash=1000, max_exposure=500, max_positions=3, max_loss=100)
        eng.deposit(acct, 10)
        with pytest.raises(RiskLimitError):
            eng.withdraw(acct, 5000)   # refused: no record
        eng.withdraw(acct, 5)
        eng.halt_account(acct)
        evs = drain(eng)
        assert [(e.kind, e.id) for e in evs] == [("account", acct)] * 4
        assert [int(e.record.cash) for e in evs] == [1000, 1010, 1005, 1005]
        assert evs[-1].record == eng.account(acct) and evs[-1].record.halted

    def test_bind_key_is_recorded_with_its_key(self, make_engine: Any) -> None:
        """An open's key and bind_key: a key record each (its bytes); a refused bind, none."""
        eng = make_engine(capacity=4)
        a = eng.open_position(10.0, 1.0, key="A-1")
        b = eng.open_position(10.0, 1.0)
        eng.bind_key(b, "EX-778899")
        with pytest.raises(KeyExistsError):
            eng.bind_key(b, "A-1")
        evs = drain(eng)
        assert [(e.kind, e.id, e.record) for e in evs] == [
            ("open", a, evs[0].record), ("key", a, b"A-1"), ("open", b, evs[2].record),
            ("key", b, b"EX-778899")]

    def test_halt_records_each_change_of_the_flag(self, make_engine: Any) -> None:
        """halt(True), halt(True), halt(False): two records (the second call changes nothing)."""
        eng = make_engine(capacity=4)
        eng.halt(True)
        eng.halt(True)
        eng.halt(False)
        assert [(e.kind, e.id, e.record) for e in drain(eng)] == [("halt", 0, True),
                                                                   ("halt", 0, False)]

    def test_refused_calls_record_nothing(self, make_engine: Any) -> None:
        """INVALID, KeyExistsError, RiskLimitError, bad input: no record, seq unchanged."""
        eng = make_engine(capacity=4, max_accounts=2)
        acct = eng.open_account(cash=100, max_exposure=100, max_positions=1, max_loss=50)
        pos = eng.open_position(10.0, 1.0, key="k1")
        seq = eng.journal_seq
        assert eng.transition(pos, Trigger.EXIT_COMPLETED) is Outcome.INVALID
        with pytest.raises(KeyExistsError):
            eng.open_position(10.0, 1.0, key="k1")
        with pytest.raises(RiskLimitError):
            eng.open_position(1000.0, 1.0, account=acct)
        with pytest.raises(PriceError):
            eng.open_position(-1.0, 1.0)
        assert eng.journal_seq == seq
        assert [e.seq for e in drain(eng, seq)] == []

    def test_since_none_starts_at_the_next_change(self, make_engine: Any) -> None:
        """events() without since skips what committed before it was called."""
        eng = make_engine(capacity=4)
        pos = eng.open_position(10.0, 1.0)
        it = eng.events(timeout=0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        assert [(e.seq, e.kind) for e in it] == [(2, "transition")]

    def test_since_n_yields_every_retained_record_after_n(self, make_engine: Any) -> None:
        """since=N: exactly the records N+1..journal_seq."""
        eng = make_engine(capacity=4)
        pos = eng.open_position(10.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        eng.transition(pos, Trigger.PAUSE)
        assert [e.seq for e in drain(eng, 1)] == [2, 3]
        assert drain(eng, 3) == [] and drain(eng, 99) == []

    def test_timeout_ends_the_iterator(self, make_engine: Any) -> None:
        """An iterator with a timeout ends when nothing new comes (no exception)."""
        eng = make_engine(capacity=4)
        assert list(eng.events(timeout=0.05)) == []

    def test_lapped_reader_gets_an_error_with_resume_seq(self, make_engine: Any) -> None:
        """A reader a whole ring behind: JournalLappedError, never a silent skip."""
        eng = make_engine(capacity=4, journal_records=8)
        pos = eng.open_position(10.0, 1.0)
        for _ in range(10):
            eng.transition(pos, Trigger.POSITION_OPENED)
            eng.transition(pos, Trigger.PAUSE)
            eng.transition(pos, Trigger.RESUME)
            eng.transition(pos, Trigger.ERROR_OCCURRED)
            eng.transition(pos, Trigger.RECOVER)
            eng.transition(pos, Trigger.PAUSE)
            eng.transition(pos, Trigger.RESUME)
            eng.transition(pos, Trigger.EXIT_CONDITION_MET)
            eng.transition(pos, Trigger.EXIT_CANCELLED)
            eng.transition(pos, Trigger.ERROR_OCCURRED)
            eng.transition(pos, Trigger.RECOVER)
        seq = eng.journal_seq
        with pytest.raises(JournalLappedError) as err:
            drain(eng, 0)
        resume = err.value.resume_seq
        assert seq - 8 < resume <= seq
        evs = drain(eng, resume - 1)
        assert [e.seq for e in evs] == list(range(resume, seq + 1))

    def test_journal_off(self, make_engine: Any) -> None:
        """journal=None: no journal; events() says so, commits work as before."""
        eng = make_engine(capacity=4, journal=None)
        pos = eng.open_position(10.0, 1.0)
        assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
        assert eng.journal_seq == 0
        with pytest.raises(ArgumentError, match="journal"):
            drain(eng)

    @pytest.mark.parametrize("kw", [{"journal_records": 3}, {"journal_records": 1 << 40},
                                    {"journal_records": 0}, {"journal": "yes"}])
    def test_bad_journal_arguments(self, make_engine: Any, kw: dict[str, Any]) -> None:
        """journal_records off its range (a power of two) or a bad journal: typed error."""
        with pytest.raises((ArgumentError, EngineTypeError)):
            make_engine(capacity=4, **kw)

    @pytest.mark.parametrize("kw", [{"since": -1}, {"since": 1.5}, {"timeout": -1.0},
                                    {"timeout": float("nan")}])
    def test_bad_events_arguments(self, make_engine: Any, kw: dict[str, Any]) -> None:
        """since / timeout off their range: typed error at the call, before any wait."""
        eng = make_engine(capacity=4)
        with pytest.raises((ArgumentError, EngineTypeError)):
            eng.events(**kw)

    def test_ctrl_c_ends_a_wait(self, make_engine: Any) -> None:
        """A signal handler's exception ends events(timeout=None) (Ctrl-C works)."""
        eng = make_engine(capacity=4)
        fired = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        fired.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                for _ in eng.events():
                    pass
        finally:
            fired.cancel()


    def test_close_ends_a_wait_in_another_thread(self, make_engine: Any) -> None:
        """close() while another thread waits in events(): that thread gets ClosedError."""
        eng = make_engine(capacity=4)
        got: list[BaseException] = []
        started = threading.Event()

        def follow() -> None:
            started.set()
            try:
                for _ in eng.events():
                    pass
            except BaseException as e:   # what ended it is the result
                got.append(e)

        th = threading.Thread(target=follow)
        th.start()
        assert started.wait(10)
        time.sleep(0.05)   # let it reach the C wait (a close before it is refused at entry too)
        eng.close()
        th.join(10)
        assert not th.is_alive() and len(got) == 1 and isinstance(got[0], ClosedError), got


class TestAsync:
    def test_200_subscribers_share_one_thread(self, make_engine: Any) -> None:
        """200 awaiting subscribers all get the change; at most one helper thread exists."""
        eng = make_engine(capacity=4)
        pos = eng.open_position(10.0, 1.0)
        before = threading.active_count()
        peak = 0

        async def sub(start: int) -> Event:
            async for ev in eng.events_async(since=start, timeout=10):
                return ev
            raise AssertionError("no event")

        async def main() -> list[Event]:
            nonlocal peak
            start = eng.journal_seq
            tasks = [asyncio.ensure_future(sub(start)) for _ in range(200)]
            for _ in range(20):
                await asyncio.sleep(0.005)
                peak = max(peak, threading.active_count())
            eng.transition(pos, Trigger.POSITION_OPENED)
            return await asyncio.gather(*tasks)

        got = asyncio.run(main())
        assert peak <= before + 1, f"{peak - before} threads for 200 subscribers"
        assert {(e.seq, e.kind, e.id) for e in got} == {(2, "transition", pos)}

    def test_async_timeout_ends(self, make_engine: Any) -> None:
        """events_async(timeout=) ends quietly when nothing comes."""
        eng = make_engine(capacity=4)

        async def main() -> list[Event]:
            return [ev async for ev in eng.events_async(timeout=0.05)]

        assert asyncio.run(main()) == []


# -- crash safety ----------------------------------------------------------------------------

def die_in(handle: Any, fault: int, op: str, pos: int) -> None:
    """Child: switch ``fault`` on and run ``op`` on ``pos``; the fault kills it."""
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    if op == "fast":
        eng.transition(pos, Trigger.PAUSE)
    elif op == "slow":
        eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=3)
    elif op == "open":
        eng.open_position(50.0, 1.0)
    elif op == "release":
        eng.release_position(pos)
    os._exit(3)   # the fault did not fire


FAULTS = ["ENG_FAULT_DIE_AFTER_LOCK", "ENG_FAULT_DIE_AFTER_JLATCH", "ENG_FAULT_DIE_IN_JFILL",
          "ENG_FAULT_DIE_AFTER_JFILL", "ENG_FAULT_DIE_BEFORE_JPUBLISH",
          "ENG_FAULT_DIE_AFTER_CAS"]


class TestKills:
    @pytest.mark.parametrize("op", ["fast", "slow", "open", "release"])
    @pytest.mark.parametrize("fault", FAULTS)
    def test_record_iff_commit_wherever_a_writer_dies(self, make_engine: Any, fault: str,
                                                      op: str) -> None:
        """SIGKILL at each step of an append: after recovery, records == commits per slot."""
        if fault == "ENG_FAULT_DIE_AFTER_LOCK" and op in ("fast", "release"):
            pytest.skip("takes no transition lock")
        eng = make_engine(capacity=4)
        pos = eng.open_position(10.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        if op == "release":
            eng.transition(pos, Trigger.ERROR_OCCURRED)
            eng.transition(pos, Trigger.RECOVER)
            for t in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
                eng.transition(pos, t)
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=die_in, args=(eng.handle, getattr(lib, fault), op, pos))
        p.start()
        p.join(60)
        eng._set_fault(0)
        assert p.exitcode == -signal.SIGKILL, f"the fault did not fire: exit {p.exitcode}"
        # the next committer (or recover) resolves whatever the dead one held
        eng.recover()
        other = eng.open_position(20.0, 1.0)
        eng.transition(other, Trigger.POSITION_OPENED)
        evs = assert_record_iff_commit(eng)
        last = {e.id & SLOT_MASK: e for e in evs}
        for ev in last.values():   # the last record of each slot says its state now
            if ev.kind != "release":
                assert eng.state(ev.id) == ev.state


def die_pricing(handle: Any, fault: int, pos: int) -> None:
    """Child: switch ``fault`` on and write a price; the fault kills it."""
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    eng.update_price(pos, 123.25)
    os._exit(3)


class TestPriceKills:
    @pytest.mark.parametrize("fault", FAULTS[1:5])
    def test_price_record_iff_published(self, make_engine: Any, fault: str) -> None:
        """journal_prices: SIGKILL at each step of a price append; price records == writes."""
        eng = make_engine(capacity=4, journal_prices=True)
        pos = eng.open_position(10.0, 1.0)
        eng.update_price(pos, 11.0)
        v0 = eng.price(pos).version
        p = mp.get_context("spawn").Process(target=die_pricing,
                                            args=(eng.handle, getattr(lib, fault), pos))
        p.start()
        p.join(60)
        eng._set_fault(0)
        assert p.exitcode == -signal.SIGKILL, f"the fault did not fire: exit {p.exitcode}"
        eng.recover()
        eng.update_price(pos, 12.0)   # takes the dead writer's latches over if still held
        evs = drain(eng)
        assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
        prices = [e for e in evs if e.kind == "price"]
        assert len(prices) - 1 == eng.price(pos).version - v0, "a write without its record"
        assert prices[-1].record == eng.price(pos)


def die_depositing(handle: Any, fault: int, acct: int) -> None:
    """Child: switch ``fault`` on and deposit; the fault kills it."""
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    eng.deposit(acct, 7)
    os._exit(3)


class TestAccountKills:
    @pytest.mark.parametrize("fault", FAULTS[1:5])
    def test_account_record_iff_published(self, make_engine: Any, fault: str) -> None:
        """SIGKILL at each step of an account change's append: records == published versions."""
        eng = make_engine(capacity=4, max_accounts=2)
        acct = eng.open_account(cash=100, max_exposure=100, max_positions=1, max_loss=50)
        p = mp.get_context("spawn").Process(target=die_depositing,
                                            args=(eng.handle, getattr(lib, fault), acct))
        p.start()
        p.join(60)
        eng._set_fault(0)
        assert p.exitcode == -signal.SIGKILL, f"the fault did not fire: exit {p.exitcode}"
        eng.recover()
        eng.deposit(acct, 1)   # resolves the dead writer's latches if still held
        evs = drain(eng)
        assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
        recs = [e for e in evs if e.kind == "account"]
        assert len(recs) == eng.account(acct).version, "a change without its record, or two"
        assert recs[-1].record == eng.account(acct)


def die_binding(handle: Any, fault: int, pos: int) -> None:
    """Child: switch ``fault`` on and bind a key; the fault kills it."""
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    eng.bind_key(pos, "K-dies")
    os._exit(3)


class TestKeyKills:
    @pytest.mark.parametrize("fault", FAULTS[1:5])
    def test_key_record_iff_bound(self, make_engine: Any, fault: str) -> None:
        """SIGKILL at each step of a bind_key's append: a key record iff the key is bound."""
        eng = make_engine(capacity=4)
        pos = eng.open_position(10.0, 1.0)
        p = mp.get_context("spawn").Process(target=die_binding,
                                            args=(eng.handle, getattr(lib, fault), pos))
        p.start()
        p.join(60)
        eng._set_fault(0)
        assert p.exitcode == -signal.SIGKILL, f"the fault did not fire: exit {p.exitcode}"
        eng.recover()
        eng.open_position(11.0, 1.0)   # the next commit resolves the journal latch if held
        recs = [e.record for e in drain(eng) if e.kind == "key"]
        bound = eng.lookup("K-dies") == pos
        assert recs == ([b"K-dies"] if bound else []), (recs, bound)


def racer(handle: Any, ids: list[int], n: int, ready: Any, go: Any) -> None:
    """Child: ``n`` transitions cycling PAUSE/RESUME over its ids."""
    eng = Engine.attach(handle)
    ready.set()
    go.wait(60)
    for i in range(n):
        pos = ids[i % len(ids)]
        eng.transition(pos, Trigger.PAUSE if eng.state(pos) is State.MONITORING
                       else Trigger.RESUME)


class TestRacingWriters:
    def test_no_duplicate_no_silent_gap_across_wraps(self, make_engine: Any, spawner: Any,
                                                     tmp_path: Any) -> None:
        """A follower of a wrapping ring sees every seq once, in order, or a reported lap.

        More writers than cores through a 64-record ring, a follower in another
        process: every seq once, in order, or a reported lap; per id the records
        alternate as committed; records == commits.
        """
        eng = make_engine(capacity=16, journal_records=64)
        ids = [eng.open_position(10.0, 1.0) for _ in range(8)]
        for pos in ids:
            eng.transition(pos, Trigger.POSITION_OPENED)
        ctx = spawner.ctx
        go, stop = ctx.Event(), ctx.Event()
        readies = [ctx.Event() for _ in range(5)]
        out = str(tmp_path / "follow.txt")
        spawner.start(follow_to_file, eng.handle, out, readies[0], stop)
        writers = [spawner.start(racer, eng.handle, ids[i::2] if i < 2 else ids, 3000,
                                 readies[i + 1], go) for i in range(4)]
        for r in readies:
            assert r.wait(60)
        go.set()
        for w in writers:
            w.join(120)
            assert w.exitcode == 0
        stop.set()
        spawner.join_all(60)
        expect = 1
        laps = 0
        last_state: dict[int, str] = {}
        with open(out) as f:
            lines = f.read().split("\n")
        for line in lines:
            if not line:
                continue
            parts = line.split()
            if parts[0] == "LAP":
                laps += 1
                resume = int(parts[2])
                assert resume > expect, "a lap reported where nothing was overwritten"
                expect = resume
                last_state.clear()
                continue
            seq, pid, st = int(parts[0]), int(parts[2]), parts[3]
            assert seq == expect, f"seq {seq} where {expect} was due (duplicate or silent gap)"
            expect += 1
            if pid in last_state and st != "CREATED":
                assert st != last_state[pid], f"id {pid}: {st} twice in a row (order broken)"
            last_state[pid] = st
        assert expect - 1 == eng.journal_seq
        commits = {s: n for s, n in commits_per_slot(eng).items() if n}
        assert sum(commits.values()) == eng.journal_seq
