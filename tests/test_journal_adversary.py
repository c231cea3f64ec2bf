"""Adversarial attacks on the shared-memory journal (issue 21).

Forbidden outcomes: an untyped exception or a silent endless wait on bad
input or a corrupt record; a committed change without its record (or with
two) wherever a process dies; a stopped latch holder taken over, or other
committers spinning forever behind it; a torn record, a seq twice or a
silent gap for a reader lapped by fast writers; a signal handler that
commits deadlocking the code it interrupted.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import signal
import struct
import time
from typing import Any

import pytest
from journal_audit import (
    SLOT_MASK,
    TOKEN_MASK,
    Segment,
    churning,
    drain,
    journal_on,  # noqa: F401 (the make_engine fixture, journal on)
)

from engine import ArgumentError, Engine, Outcome, State, Trigger
from engine._native import ffi, lib
from engine.errors import BusyError, ClosedError, EngineError, JournalLappedError
from engine.journal import Event

pytestmark = pytest.mark.shm_only


def assert_record_iff_commit(eng: Engine) -> list[Event]:
    """Seqs run 1.. with no gap; slot records per slot == the slot's commits (generation)."""
    evs = drain(eng)
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1)), "a gap or a duplicate seq"
    assert (evs[-1].seq if evs else 0) == eng.journal_seq
    commits = {}
    for slot in range(eng.capacity):
        gen = (eng.state_word(slot) >> lib.ENG_SW_GEN_SHIFT) & lib.ENG_SW_GEN_MASK
        if gen:
            commits[slot] = gen
    recs: dict[int, int] = {}
    for e in evs:
        if e.kind in ("open", "transition", "release"):
            recs[e.id & SLOT_MASK] = recs.get(e.id & SLOT_MASK, 0) + 1
    assert recs == commits, "a commit without its record, or a record without its commit"
    return evs


class TestBadArguments:
    @pytest.mark.parametrize("since", [2**64, 2**70, "past"])
    def test_since_past_the_seq_space_is_refused(self, make_engine: Any, since: Any) -> None:
        """A since past the seq space is refused with ArgumentError naming the range, at the call.

        since past the largest seq a journal can reach (2**40 - 1 seq bits, or past 64
        bits): ArgumentError with the range at the call, never an OverflowError from the C
        call nor a wait that can never end.
        """
        eng = make_engine(capacity=4)
        eng.open_position(10.0, 1.0)
        top = (1 << (64 - lib.ENG_TOKEN_BITS)) - 1
        if since == "past":
            since = top + 1
        with pytest.raises(ArgumentError, match=rf"since .*\[0, {top}\]"):
            eng.events(since=since, timeout=0)
        with pytest.raises(ArgumentError, match=rf"since .*\[0, {top}\]"):
            eng.events_async(since=since, timeout=0)
        assert list(eng.events(since=top, timeout=0)) == []

    def test_since_equal_to_journal_seq_is_accepted(self, make_engine: Any) -> None:
        """since == journal_seq (the bound itself): nothing yet, then the next record."""
        eng = make_engine(capacity=4)
        pos = eng.open_position(10.0, 1.0)
        it = eng.events(since=eng.journal_seq, timeout=0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        assert [(e.seq, e.kind) for e in it] == [(2, "transition")]

    def test_events_async_without_journal(self, make_engine: Any) -> None:
        """journal=None: events_async raises ArgumentError too (no thread left waiting)."""
        eng = make_engine(capacity=4, journal=None)

        async def main() -> None:
            async for _ in eng.events_async(timeout=0.1):
                pass

        with pytest.raises(ArgumentError, match="journal"):
            asyncio.run(main())

    def test_close_while_async_iterating(self, make_engine: Any) -> None:
        """close() while a task awaits in events_async(timeout=None): ClosedError, no hang."""
        eng = make_engine(capacity=4)

        async def main() -> None:
            async def sub() -> None:
                async for _ in eng.events_async(timeout=None):
                    pass
            task = asyncio.ensure_future(sub())
            await asyncio.sleep(0.05)
            eng.close()
            await asyncio.wait_for(task, 30)

        with pytest.raises(ClosedError):
            asyncio.run(main())


class TestCorruptRecord:
    @pytest.mark.parametrize("field,value", [("kind", 99), ("kind", 2**32 - 1),
                                             ("trigger", 77)])
    def test_corrupt_record_is_a_typed_error(self, make_engine: Any, field: str,
                                             value: int) -> None:
        """A record with a kind or trigger off its range is a typed EngineError naming the range.

        A whole record with a kind or trigger off its range: a typed EngineError naming the
        value and the range, never an IndexError / KeyError; the other records still read.
        """
        eng = make_engine(capacity=4)
        pos = eng.open_position(10.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        eng.transition(pos, Trigger.PAUSE)
        seg = Segment(eng)
        try:
            struct.pack_into("<I", seg.mm, seg.field(2, field), value)
            with pytest.raises(EngineError, match=str(value)) as err:
                drain(eng)
            assert not isinstance(err.value, (IndexError, KeyError))
            assert [e.seq for e in drain(eng, 2)] == [3]
        finally:
            seg.close()

    def test_corrupt_journal_records_in_header_refuses_attach(self, make_engine: Any) -> None:
        """A header whose journal_records is not a power of two: attach refuses (typed)."""
        eng = make_engine(capacity=4)
        seg = Segment(eng)
        off = ffi.offsetof("eng_header", "journal_records")
        try:
            for bad in (3, 1 << 31, 2):
                old = struct.unpack_from("<I", seg.mm, off)[0]
                struct.pack_into("<I", seg.mm, off, bad)
                try:
                    with pytest.raises(EngineError, match="journal_records"):
                        Engine.attach(eng.handle)
                finally:
                    struct.pack_into("<I", seg.mm, off, old)
        finally:
            seg.close()


# -- kills: halt (the kind the crash tests of test_journal.py leave out) ----------------------

def die_halting(handle: Any, fault: int) -> None:
    """Child: switch ``fault`` on and set the emergency stop; the fault kills it."""
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    eng.halt(True)
    os._exit(3)


JFAULTS = ["ENG_FAULT_DIE_AFTER_JLATCH", "ENG_FAULT_DIE_IN_JFILL", "ENG_FAULT_DIE_AFTER_JFILL",
           "ENG_FAULT_DIE_BEFORE_JPUBLISH"]


class TestHaltKills:
    @pytest.mark.parametrize("fault", JFAULTS)
    def test_halt_record_iff_flag_changed(self, make_engine: Any, fault: str) -> None:
        """A halt SIGKILLed at any step of its append leaves a halt record iff the flag changed.

        SIGKILL at each step of a halt's append: a halt record iff the flag changed; the
        next committer resolves the latch; no gap.
        """
        eng = make_engine(capacity=4)
        p = mp.get_context("spawn").Process(target=die_halting,
                                            args=(eng.handle, getattr(lib, fault)))
        p.start()
        p.join(60)
        eng._set_fault(0)
        assert p.exitcode == -signal.SIGKILL, f"the fault did not fire: exit {p.exitcode}"
        eng.recover()
        halted = eng.transition(eng.open_position(10.0, 1.0), Trigger.POSITION_OPENED)
        evs = drain(eng)
        assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
        halts = [e.record for e in evs if e.kind == "halt"]
        assert halts == ([True] if halted is Outcome.HALTED else []), (halts, halted)


# -- a stopped appender ------------------------------------------------------------------------

def hammer(handle: Any, pos: int, ready: Any, stop: Any) -> None:
    """Child: fast transitions PAUSE/RESUME on ``pos`` until ``stop``."""
    eng = Engine.attach(handle)
    ready.set()
    paused = False
    while not stop.is_set():
        for _ in range(200):
            eng.transition(pos, Trigger.RESUME if paused else Trigger.PAUSE)
            paused = not paused


class TestStoppedAppender:
    def test_stopped_latch_holder_is_never_taken_over(self, make_engine: Any,
                                                      spawner: Any) -> None:
        """A SIGSTOPped holder of the journal latch is never taken over; others get bounded errors.

        SIGSTOP a writer while it holds the journal latch: other committers get bounded
        CONFLICT / BusyError (never spin forever), readers read what was published, recover()
        leaves the latch alone; after SIGCONT every commit has exactly its record.
        """
        eng = make_engine(capacity=4, journal_prices=True, max_accounts=1)
        pos = eng.open_position(10.0, 1.0)
        mine = eng.open_position(10.0, 1.0)
        acct = eng.open_account(cash=100, max_exposure=100, max_positions=1, max_loss=50)
        eng.transition(pos, Trigger.POSITION_OPENED)
        eng.transition(mine, Trigger.POSITION_OPENED)
        v0 = eng.price(mine).version
        ctx = spawner.ctx
        ready, stop = ctx.Event(), ctx.Event()
        child = spawner.start(hammer, eng.handle, pos, ready, stop)
        assert ready.wait(60)
        seg = Segment(eng)
        try:
            held = 0
            for _ in range(5000):   # bounded: stop it until it is caught holding the latch
                os.kill(child.pid, signal.SIGSTOP)
                os.waitid(os.P_PID, child.pid, os.WSTOPPED | os.WNOWAIT)
                held = seg.latch()
                if held & TOKEN_MASK:
                    break
                os.kill(child.pid, signal.SIGCONT)
            assert held & TOKEN_MASK, "never caught the writer holding the latch"
            published = held >> lib.ENG_TOKEN_BITS
            t0 = time.monotonic()
            assert eng.transition(mine, Trigger.PAUSE) is Outcome.CONFLICT
            took = time.monotonic() - t0
            with pytest.raises(BusyError):
                eng.update_price(mine, 11.0)
            with pytest.raises(BusyError):
                eng.halt(True)
            assert eng.transition(mine, Trigger.EXIT_CONDITION_MET,
                                  exit_reason=2) is Outcome.CONFLICT   # the slow path
            for call in (lambda: eng.deposit(acct, 1), lambda: eng.open_position(10.0, 1.0),
                         lambda: eng.bind_key(mine, "K-stopped"), lambda: eng.halt(False)):
                with pytest.raises(BusyError):
                    call()
            evs = drain(eng, published - 1)
            assert [e.seq for e in evs] == [published] == [eng.journal_seq]
            eng.recover()
            assert seg.latch() == held, "a stopped (live) holder's latch was taken over"
            print(f"stopped holder: a committer gave up after {took:.3f} s")
        finally:
            os.kill(child.pid, signal.SIGCONT)
            seg.close()
        stop.set()
        spawner.join_all(60)
        assert child.exitcode == 0
        assert eng.state(mine) is State.MONITORING and eng.lookup("K-stopped") is None
        assert eng.transition(mine, Trigger.PAUSE) is Outcome.APPLIED   # the lock was given up
        assert_record_iff_commit_tail(eng, others=1)   # the open_account
        assert eng.price(mine).version == v0 and eng.account(acct).cash == 100


# -- a reader racing the wrap ------------------------------------------------------------------

def flipper(handle: Any, ids: list[int], n: int, ready: Any, go: Any) -> None:
    """Child: ``n`` fast transitions cycling PAUSE/RESUME over ``ids``."""
    eng = Engine.attach(handle)
    ready.set()
    go.wait(60)
    paused = dict.fromkeys(ids, False)
    for i in range(n):
        pos = ids[i % len(ids)]
        eng.transition(pos, Trigger.RESUME if paused[pos] else Trigger.PAUSE)
        paused[pos] = not paused[pos]


class TestWrapRace:
    def test_lapped_slow_reader_on_the_smallest_ring(self, make_engine: Any,
                                                     spawner: Any) -> None:
        """A slow reader on the smallest ring gets whole records, in order, or a reported lap.

        A ring of ENG_JOURNAL_MIN_RECORDS, three writers, a reader in this process: every
        record it gets is whole (its trigger agrees with its state), seqs run without a
        repeat or a silent gap, per id the states alternate (the commit order), each
        lap's resume_seq is past what it lost.
        """
        eng = make_engine(capacity=8, journal_records=lib.ENG_JOURNAL_MIN_RECORDS)
        ids = [eng.open_position(10.0, 1.0) for _ in range(4)]
        for pos in ids:
            eng.transition(pos, Trigger.POSITION_OPENED)
        ctx = spawner.ctx
        go = ctx.Event()
        readies = [ctx.Event() for _ in range(3)]
        ws = [spawner.start(flipper, eng.handle, [ids[i], ids[3]], 20000, readies[i], go)
              for i in range(3)]
        for r in readies:
            assert r.wait(60)
        after = eng.journal_seq
        go.set()
        got = laps = 0
        last_state: dict[int, State] = {}
        while any(w.is_alive() for w in ws) or after < eng.journal_seq:
            try:
                for ev in eng.events(since=after, timeout=0.05):
                    assert ev.seq == after + 1, f"seq {ev.seq} after {after}"
                    want = {Trigger.PAUSE: State.PAUSED, Trigger.RESUME: State.MONITORING}
                    assert ev.kind == "transition" and want[ev.trigger] is ev.state, ev
                    prev = last_state.get(ev.id)
                    assert prev is not ev.state, f"id {ev.id}: {ev.state} twice in a row"
                    last_state[ev.id] = ev.state
                    after = ev.seq
                    got += 1
            except JournalLappedError as e:
                laps += 1
                assert after + 1 < e.resume_seq <= eng.journal_seq, (after, e.resume_seq)
                after = e.resume_seq - 1
                last_state.clear()
        spawner.join_all(120)
        assert all(w.exitcode == 0 for w in ws)
        assert after == eng.journal_seq
        print(f"wrap race: {got} records read, {laps} laps")
        assert_record_iff_commit_tail(eng)


def assert_record_iff_commit_tail(eng: Engine, others: int = 0) -> None:
    """Past a wrap only the sum can be checked: slot commits + ``others`` == journal_seq
    (modulo the generation's range: a slot's generation wraps)."""
    span = lib.ENG_SW_GEN_MASK + 1
    total = sum((eng.state_word(s) >> lib.ENG_SW_GEN_SHIFT) & lib.ENG_SW_GEN_MASK
                for s in range(eng.capacity))
    assert (total + others - eng.journal_seq) % span == 0, \
        "a commit without its record, or a record without"


# -- signals -----------------------------------------------------------------------------------

class TestSignals:
    def test_handler_that_commits_during_a_wait_is_delivered(self, make_engine: Any) -> None:
        """A signal handler committing during events(timeout=None) is delivered without deadlock.

        A signal handler that commits while events(timeout=None) waits in C (same thread):
        no deadlock, and the iterator yields the handler's record.
        """
        eng = make_engine(capacity=4)
        pos = eng.open_position(10.0, 1.0)

        def handler(signum: int, frame: Any) -> None:
            eng.transition(pos, Trigger.POSITION_OPENED)

        old = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        try:
            it = eng.events(since=eng.journal_seq, timeout=None)
            ev = next(it)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert (ev.seq, ev.kind, ev.state) == (2, "transition", State.MONITORING)


# -- a dead holder and nobody else committing ----------------------------------------------------

def die_before_publish(handle: Any, pos: int) -> None:
    """Child: commit a fast transition and die before J4 (its record never published)."""
    eng = Engine.attach(handle)
    eng._set_fault(lib.ENG_FAULT_DIE_BEFORE_JPUBLISH)
    eng.transition(pos, Trigger.PAUSE)
    os._exit(3)


class TestDeadHolderReader:
    def test_waiting_reader_resolves_a_dead_holders_latch(self, make_engine: Any) -> None:
        """A reader blocked in events() resolves a dead holder's latch and gets its record.

        A holder dies after its commit, before publishing; no committer and no recover()
        follow: a reader blocked in events() still gets the record (it resolves the latch
        itself) instead of waiting forever.
        """
        eng = make_engine(capacity=4)
        pos = eng.open_position(10.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        seq = eng.journal_seq
        p = mp.get_context("spawn").Process(target=die_before_publish, args=(eng.handle, pos))
        p.start()
        p.join(60)
        eng._set_fault(0)
        assert p.exitcode == -signal.SIGKILL, f"the fault did not fire: exit {p.exitcode}"
        assert eng.state(pos) is State.PAUSED   # committed, not yet published
        first = next(eng.events(since=seq, timeout=30), None)   # None: it waited in vain
        assert first is not None, "the reader waited 30 s for a committed record"
        assert (first.seq, first.kind, first.state) == (seq + 1, "transition", State.PAUSED)
        assert eng.journal_seq == seq + 1   # exactly one record: the dead holder's


# -- fork while another thread holds the latch ---------------------------------------------------

class TestForkHoldingLatch:
    def test_fork_while_a_thread_commits(self, make_engine: Any) -> None:
        """A fork while a thread commits leaves nobody waiting forever and records == commits.

        fork() while another thread of the parent is inside journaled commits with the GIL
        released (transition_many: the latch may be held at the fork): the child's inherited
        Engine is refused (typed), a fresh attach commits, nobody waits forever, and
        records == commits (modulo the generation's range).
        """
        eng = make_engine(capacity=8)
        ids = [eng.open_position(10.0, 1.0) for _ in range(3)]
        for pos in ids:
            eng.transition(pos, Trigger.POSITION_OPENED)
        seg = Segment(eng)
        stop_churn = churning(eng, ids[2])
        codes = []
        try:
            for i in range(20):
                pid = os.fork()
                if pid == 0:   # child: never returns into pytest
                    code = 1
                    held = 10 if seg.latch() & TOKEN_MASK else 0   # held at the fork
                    try:
                        try:
                            eng.transition(ids[0], Trigger.PAUSE)
                            code = 2   # the inherited view must be refused
                        except EngineError:
                            child = Engine.attach(eng.handle)
                            out = child.transition(ids[1], Trigger.PAUSE if i % 2 == 0
                                                   else Trigger.RESUME)
                            code = held if out is Outcome.APPLIED else 4
                    finally:
                        os._exit(code)
                _, status = os.waitpid(pid, 0)
                codes.append(os.waitstatus_to_exitcode(status))
        finally:
            stop_churn()
            seg.close()
        assert set(codes) <= {0, 10}, codes   # 10: the parent's thread held the latch
        print(f"fork: {codes.count(10)} of 20 forks with the latch held")
        assert_record_iff_commit_tail(eng)


# -- kills inside the bigger commits: keys, token index, booking ---------------------------------

def die_in_full(handle: Any, fault: int, op: str, pos: int, acct: int) -> None:
    """Child: switch ``fault`` on and run a keyed / booked / indexed ``op``."""
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    if op == "open_full":
        eng.open_position(10.0, 1.0, token=5, key="K-full", account=acct)
    elif op == "close_booked":
        eng.transition(pos, Trigger.EXIT_COMPLETED)
    elif op == "release_full":
        eng.release_position(pos)
    os._exit(3)   # the fault did not fire on this path


FULL = {"open_full": ["ENG_FAULT_DIE_AFTER_LOCK", "ENG_FAULT_DIE_IN_KEY",
                      "ENG_FAULT_DIE_IN_TINDEX_ADD", "ENG_FAULT_DIE_AFTER_CAS", *JFAULTS],
        "close_booked": ["ENG_FAULT_DIE_AFTER_LOCK", "ENG_FAULT_DIE_IN_BOOKING",
                         "ENG_FAULT_DIE_AFTER_CAS", *JFAULTS],
        "release_full": ["ENG_FAULT_DIE_IN_TINDEX_DEL", "ENG_FAULT_DIE_AFTER_CAS", *JFAULTS]}


class TestFullCommitKills:
    @pytest.mark.parametrize("op,fault", [(op, f) for op, fs in FULL.items() for f in fs])
    def test_record_iff_commit_for_keyed_booked_indexed_changes(self, make_engine: Any,
                                                                op: str, fault: str) -> None:
        """A keyed, booked or indexed change SIGKILLed mid-commit has a record iff it committed.

        SIGKILL inside an open with key + token + account, a booked close, a release with
        key + token: after recover(), slot records == slot commits, no gap, the key resolves
        iff the open has its record, and each slot's last record says its state now.
        """
        eng = make_engine(capacity=4, max_accounts=1)
        acct = eng.open_account(cash=1000, max_exposure=500, max_positions=3, max_loss=100)
        pos = eng.open_position(10.0, 1.0, token=5, key="K-pos", account=acct)
        eng.transition(pos, Trigger.POSITION_OPENED)
        if op != "open_full":
            eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=1)
            eng.transition(pos, Trigger.EXIT_STARTED)
        if op == "release_full":
            eng.transition(pos, Trigger.EXIT_COMPLETED)
        p = mp.get_context("spawn").Process(target=die_in_full,
                                            args=(eng.handle, getattr(lib, fault), op, pos, acct))
        p.start()
        p.join(60)
        eng._set_fault(0)
        assert p.exitcode == -signal.SIGKILL, f"the fault did not fire: exit {p.exitcode}"
        eng.recover()
        other = eng.open_position(20.0, 1.0)
        eng.transition(other, Trigger.POSITION_OPENED)
        eng.deposit(acct, 1)
        evs = assert_record_iff_commit(eng)
        opened = {e.id for e in evs if e.kind == "open"}
        bound = eng.lookup("K-full")
        assert bound is None or bound in opened, "a key bound to an open without its record"
        last = {e.id & SLOT_MASK: e for e in evs if e.kind in ("open", "transition", "release")}
        for ev in last.values():
            if ev.kind != "release":
                assert eng.state(ev.id) is ev.state, (ev, eng.state(ev.id))
        accts = [e for e in evs if e.kind == "account"]
        assert accts[-1].record == eng.account(acct)


# -- record time in seq order --------------------------------------------------------------------

def one_transition(handle: Any, pos: int, ready: Any, stop: Any, out: Any) -> None:
    """Child: say it is about to commit, commit one fast transition, set ``stop`` at once
    (so the hammer's later records cannot lap this one out of the ring), send its outcome."""
    eng = Engine.attach(handle)
    ready.set()
    outcome = eng.transition(pos, Trigger.PAUSE)
    stop.set()
    out.send(int(outcome))


class TestRecordTime:
    def test_ts_never_goes_back_in_seq_order(self, make_engine: Any, spawner: Any) -> None:
        """A record's ts_ns never goes back in seq order, even after a wait for the latch.

        A committer that waited for the latch (its holder stopped) must not record a time
        before the record published ahead of it: ts_ns is non-decreasing in seq order.
        """
        eng = make_engine(capacity=4, journal_records=1 << 16)
        pos = eng.open_position(10.0, 1.0)
        late = eng.open_position(10.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        eng.transition(late, Trigger.POSITION_OPENED)
        ctx = spawner.ctx
        ready, stop, b_ready = ctx.Event(), ctx.Event(), ctx.Event()
        child = spawner.start(hammer, eng.handle, pos, ready, stop)
        assert ready.wait(60)
        seg = Segment(eng)
        try:
            for _ in range(5000):   # bounded: stop it holding the latch
                os.kill(child.pid, signal.SIGSTOP)
                os.waitid(os.P_PID, child.pid, os.WSTOPPED | os.WNOWAIT)
                if seg.latch() & TOKEN_MASK:
                    break
                os.kill(child.pid, signal.SIGCONT)
            assert seg.latch() & TOKEN_MASK, "never caught the writer holding the latch"
            rx, tx = ctx.Pipe(duplex=False)
            waiter = spawner.start(one_transition, eng.handle, late, b_ready, stop, tx)
            assert b_ready.wait(60)
            time.sleep(0.05)   # the waiter reads its clock, then waits for the latch
        finally:
            os.kill(child.pid, signal.SIGCONT)
            seg.close()
        assert rx.poll(60)
        assert rx.recv() == int(Outcome.APPLIED)
        spawner.join_all(60)
        assert child.exitcode == 0 and waiter.exitcode == 0
        evs = drain(eng, max(0, eng.journal_seq - eng.journal_records + 2))
        assert any(e.id == late for e in evs)
        back = [(a.seq, a.ts_ns, b.ts_ns) for a, b in itertools.pairwise(evs)
                if b.ts_ns < a.ts_ns]
        assert back == [], f"a record's time before its predecessor's: {back[:3]}"
