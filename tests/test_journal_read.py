"""The journal's reading side: ``events()`` builds each Event straight from
one unpacked row (a decoder per kind), and ``Engine.read_events`` gives the
same records as numpy columns (``EVENT_DTYPE``), on shared memory and on
Redis.  Each says exactly what the record-by-record decoder says, checks
every record as strictly (a corrupt kind or trigger is a typed error, a
lapped reader gets JournalLappedError with resume_seq), and never returns a
record twice or skips one."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from engine import Engine, Trigger
from engine._native import ffi, lib
from engine.accounts import account_from_row
from engine.errors import ArgumentError, EngineTypeError, JournalLappedError, SegmentError
from engine.journal import EVENT_DTYPE, KINDS, Event
from engine.records import PriceSnapshot
from engine.store import shm_journal
from engine.store.shm_journal import SegmentJournal
from tests.test_journal_adversary import Segment
from tests.test_redis_journal import _enable

PRICE = struct.Struct("<dqdd")


def _every_kind(eng: Engine) -> None:
    """One record of every kind (prices journaled), two positions' worth."""
    acct = eng.open_account(cash=1000, max_exposure=1000, max_positions=5, max_loss=100)
    pos = eng.open_position(entry_price=100.0, amount=1.0, side=1, token=7, account=acct)
    eng.transition(pos, Trigger.POSITION_OPENED)
    eng.update_price(pos, 101.0)
    eng.bind_key(pos, "K1")
    eng.deposit(acct, 5)
    eng.halt()
    eng.halt(False)
    other = eng.open_position(entry_price=50.0, amount=2.0, side=-1, token=8)
    eng.transition(other, Trigger.POSITION_OPENED)
    eng.transition(other, Trigger.PAUSE)
    eng.transition(other, Trigger.RESUME)
    for t in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
        eng.transition(other, t)
    eng.release_position(other)


def _record_of(eng: Engine, row: Any) -> Any:
    """The Event.record a read_events row stands for (decoded as events() does)."""
    kind = KINDS[int(row["kind"])]
    w = row["w"].tobytes()
    version = int(row["version"])
    if kind == "halt":
        return bool(row["w"][0])
    if kind == "key":
        return w[:version]
    if kind == "price":
        return PriceSnapshot(*PRICE.unpack_from(w), version)
    if kind == "account":
        acct = ffi.new("eng_account_row *")
        acct.id, acct.version = int(row["id"]), version
        acct.index = int(row["id"]) & lib.ENG_ID_SLOT_MASK
        ffi.memmove(ffi.addressof(acct[0], "b"), w, ffi.sizeof("eng_books"))
        return account_from_row(acct)
    return eng._rec.Context(*eng._rec.unpack(memoryview(w + struct.pack("<Q", version))))


def _same(eng: Engine, rows: Any, events: list[Event], records: bool = True) -> None:
    assert len(rows) == len(events)
    for row, ev in zip(rows, events, strict=True):
        assert (int(row["seq"]), int(row["ts_ns"]), KINDS[int(row["kind"])], int(row["id"])) \
            == (ev.seq, ev.ts_ns, ev.kind, ev.id)
        has_state = ev.kind in ("open", "transition") and ev.state is not None
        assert int(row["state"]) == (int(ev.state) if has_state else 0)
        assert int(row["trigger"]) == (int(ev.trigger) if ev.kind == "transition" else 0)
        if records and ev.record is not None:
            assert _record_of(eng, row) == ev.record, ev


class TestEventsDecoder:
    def test_every_kind_reads_as_the_record_by_record_decoder(self, make_engine: Any) -> None:
        """events() (rows decoded per kind) yields what the one-record decoder builds."""
        eng = make_engine(capacity=8, journal=True, journal_prices=True)
        _every_kind(eng)
        got = list(eng.events(since=0, timeout=0))
        slow = SegmentJournal(eng)
        n = slow.read(0, 256) and slow._out_n[0]
        want = [slow._event(slow._mv, i * slow._size) for i in range(n)]
        assert got == want
        assert {ev.kind for ev in got} == set(KINDS)
        assert [ev.seq for ev in got] == list(range(1, len(got) + 1))

    def test_a_consumer_that_stops_inside_a_batch_resumes_without_a_gap(
            self, make_engine: Any) -> None:
        """Stopping mid-batch and resuming from the last seq seen skips and repeats nothing."""
        eng = make_engine(capacity=8, journal=True, journal_records=1024)
        pos = eng.open_position(entry_price=10.0, amount=1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        for _ in range(150):
            eng.transition(pos, Trigger.PAUSE)
            eng.transition(pos, Trigger.RESUME)
        seen: list[int] = []
        after = 0
        while True:
            it = eng.events(since=after, timeout=0)
            chunk = [ev.seq for _, ev in zip(range(7), it, strict=False)]
            if not chunk:
                break
            seen += chunk
            after = chunk[-1]
        assert seen == list(range(1, eng.journal_seq + 1))


class TestReadEvents:
    def test_rows_say_what_events_say_for_every_kind(self, make_engine: Any) -> None:
        """read_events rows: the same seq, ts, kind, id, state, trigger and record as events()."""
        eng = make_engine(capacity=8, journal=True, journal_prices=True)
        _every_kind(eng)
        rows = eng.read_events(0)
        assert rows.dtype == EVENT_DTYPE
        _same(eng, rows, list(eng.events(since=0, timeout=0)))
        assert len(eng.read_events(eng.journal_seq)) == 0

    def test_reads_past_one_chunk_in_order_once(self, make_engine: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """A read of many C chunks (chunk 3) returns every record once, in seq order, up to max."""
        monkeypatch.setattr(shm_journal, "ARRAY_CHUNK", 3)
        eng = make_engine(capacity=8, journal=True)
        pos = eng.open_position(entry_price=10.0, amount=1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        for _ in range(10):
            eng.transition(pos, Trigger.PAUSE)
            eng.transition(pos, Trigger.RESUME)
        assert list(eng.read_events(0, max=100)["seq"]) == list(range(1, 23))
        assert list(eng.read_events(4, max=8)["seq"]) == list(range(5, 13))
        assert list(eng.read_events(20, max=8)["seq"]) == [21, 22]

    def test_a_lapped_read_raises_with_resume_seq(self, make_engine: Any) -> None:
        """A read whose next record was overwritten: JournalLappedError with resume_seq, no rows."""
        eng = make_engine(capacity=4, journal=True, journal_records=8)
        pos = eng.open_position(entry_price=10.0, amount=1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        for _ in range(10):
            eng.transition(pos, Trigger.PAUSE)
            eng.transition(pos, Trigger.RESUME)
        with pytest.raises(JournalLappedError) as err:
            eng.read_events(0)
        resume = err.value.resume_seq
        assert resume > 1
        rows = eng.read_events(resume - 1)
        assert list(rows["seq"]) == list(range(resume, eng.journal_seq + 1))

    @pytest.mark.parametrize("field,value", [("kind", 99), ("trigger", 77),
                                             ("trigger", 256), ("trigger", 2**32 - 1)])
    def test_a_corrupt_record_is_a_typed_error(self, make_engine: Any, field: str,
                                               value: int) -> None:
        """A record with a kind or trigger off its range: SegmentError naming it; others read."""
        eng = make_engine(capacity=4, journal=True)
        pos = eng.open_position(10.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        eng.transition(pos, Trigger.PAUSE)
        seg = Segment(eng)
        try:
            struct.pack_into("<I", seg.mm, seg.field(2, field), value)
            with pytest.raises(SegmentError, match=str(value)):
                eng.read_events(0)
            assert list(eng.read_events(2)["seq"]) == [3]
        finally:
            seg.close()

    @pytest.mark.parametrize("since,limit,error", [
        (None, 10, ArgumentError), (-1, 10, ArgumentError), (1.5, 10, EngineTypeError),
        (0, 0, ArgumentError), (0, True, EngineTypeError), (0, 1.0, EngineTypeError),
        (0, lib.ENG_JOURNAL_MAX_RECORDS + 1, ArgumentError)])
    def test_bad_arguments_are_typed_errors(self, make_engine: Any, since: Any, limit: Any,
                                            error: type[Exception]) -> None:
        """A since or max off its range or type: a typed error, nothing read."""
        eng = make_engine(capacity=4, journal=True)
        eng.open_position(10.0, 1.0)
        with pytest.raises(error):
            eng.read_events(since, max=limit)

    def test_without_a_journal_it_is_refused(self, make_engine: Any) -> None:
        """read_events on an engine without a journal raises a typed EngineError."""
        from engine.errors import EngineError

        eng = make_engine(capacity=4, journal=None)
        with pytest.raises(EngineError):
            eng.read_events(0)


class TestReadEventsRedis:
    def test_rows_say_what_events_say_on_redis(self, made: Callable[..., Engine]) -> None:
        """On Redis read_events builds the same columns from the stream entries as events()."""
        eng = made(16)
        j = _enable(eng, prices=True)
        _every_kind(eng)
        rows = j.read_array(0, 1000)
        events = j.read(0, 1000)
        assert {ev.kind for ev in events} == set(KINDS)
        _same(eng, rows, events)
        assert rows.dtype == EVENT_DTYPE
        assert len(j.read_array(int(rows["seq"][-1]), 10)) == 0
        assert np.all(np.diff(rows["seq"].astype(np.int64)) == 1)


def _commit_burst(handle: Any, pos: int, n: int, go: Any) -> None:
    """In another process: wait for ``go``, then ``n`` transitions of ``pos``."""
    with Engine.attach(handle) as eng:
        go.wait(30)
        for i in range(n):
            eng.transition(pos, Trigger.PAUSE if i % 2 == 0 else Trigger.RESUME)


class TestSpin:
    @pytest.mark.parametrize("spin", [-1, lib.ENG_JOURNAL_SPIN_MAX_US + 1, float("nan"),
                                      True, "50", float("inf")])
    def test_a_spin_off_its_range_is_refused(self, make_engine: Any, spin: Any) -> None:
        """spin_us off [0, ENG_JOURNAL_SPIN_MAX_US] or not a number: ArgumentError naming it."""
        eng = make_engine(capacity=4, journal=True)
        with pytest.raises(ArgumentError, match="spin_us"):
            eng.events(since=0, timeout=0, spin_us=spin)

    @pytest.mark.parametrize("spin", [0, 50, lib.ENG_JOURNAL_SPIN_MAX_US])
    def test_a_spinning_follower_gets_every_record_once_in_order(
            self, make_engine: Any, spawner: Any, spin: int) -> None:
        """A follower spinning (or not) while another process commits: every seq once, in order."""
        import multiprocessing as mp

        eng = make_engine(capacity=4, journal=True, journal_records=4096)
        pos = eng.open_position(entry_price=10.0, amount=1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        since = eng.journal_seq
        go = mp.get_context("spawn").Event()
        n = 2000
        proc = spawner.start(_commit_burst, eng.handle, pos, n, go)
        go.set()   # the child attaches first: the follower is waiting when commits land
        seen = []
        for ev in eng.events(since=since, timeout=30, spin_us=spin):
            seen.append(ev.seq)
            if len(seen) == n:
                break
        proc.join(30)
        assert seen == list(range(since + 1, since + n + 1))

    def test_a_spinning_follower_still_ends_at_its_timeout(self, make_engine: Any) -> None:
        """With nothing committed, events(timeout=, spin_us=max) ends (the spin is bounded)."""
        eng = make_engine(capacity=4, journal=True)
        assert list(eng.events(timeout=0.01, spin_us=lib.ENG_JOURNAL_SPIN_MAX_US)) == []


class TestRacingTheWrap:
    def test_read_events_racing_a_writer_round_a_small_ring_never_tears(
            self, make_engine: Any, spawner: Any) -> None:
        """Rows read while another process laps a 16-record ring: whole, consecutive, or a lap."""
        import multiprocessing as mp

        from engine import State

        eng = make_engine(capacity=4, journal=True, journal_records=16)
        pos = eng.open_position(entry_price=10.0, amount=1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        go = mp.get_context("spawn").Event()
        n = 20000
        proc = spawner.start(_commit_burst, eng.handle, pos, n, go)
        after, laps, rows_seen = eng.journal_seq, 0, 0
        want = {int(Trigger.PAUSE): int(State.PAUSED), int(Trigger.RESUME): int(State.MONITORING)}
        go.set()
        while proc.is_alive() or after < eng.journal_seq:
            try:
                rows = eng.read_events(after, max=64)
            except JournalLappedError as e:
                laps += 1
                assert e.resume_seq > after + 1
                after = e.resume_seq - 1
                continue
            if not len(rows):
                continue
            seqs = rows["seq"].astype(np.int64)
            assert list(seqs) == list(range(after + 1, after + 1 + len(rows)))
            for trig, state in zip(rows["trigger"], rows["state"], strict=True):
                assert want[int(trig)] == int(state)   # a torn record pairs them wrong
            rows_seen += len(rows)
            after = int(seqs[-1])
        proc.join(30)
        assert after == eng.journal_seq
        assert rows_seen > 0

    def test_events_racing_a_writer_round_a_small_ring_never_tears(
            self, make_engine: Any, spawner: Any) -> None:
        """events() while another process laps a 16-record ring: whole Events in order, or a lap."""
        import multiprocessing as mp

        from engine import State

        eng = make_engine(capacity=4, journal=True, journal_records=16)
        pos = eng.open_position(entry_price=10.0, amount=1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        go = mp.get_context("spawn").Event()
        n = 20000
        proc = spawner.start(_commit_burst, eng.handle, pos, n, go)
        after, seen = eng.journal_seq, 0
        want = {Trigger.PAUSE: State.PAUSED, Trigger.RESUME: State.MONITORING}
        go.set()
        while proc.is_alive() or after < eng.journal_seq:
            try:
                for ev in eng.events(since=after, timeout=0):
                    assert ev.seq == after + 1
                    assert want[ev.trigger] is ev.state
                    assert ev.record.version >= 1
                    after = ev.seq
                    seen += 1
            except JournalLappedError as e:
                assert e.resume_seq > after + 1
                after = e.resume_seq - 1
        proc.join(30)
        assert after == eng.journal_seq and seen > 0
