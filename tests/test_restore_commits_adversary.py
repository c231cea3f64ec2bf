"""Adversary of "a commit is restored whole or not at all" (docs/durability.md):
the slot's record of a keyed open or a booked change counts its riders
(eng_jrec.riders), and restore (engine/durable/restore.py, _split_commit) cuts a
last commit missing riders as a torn tail, calls riders missing or foreign in
the middle corruption, and flush() returns a seq that ends a commit.

Forbidden outcomes: a restore that keeps part of a commit (an open without its
key, a change without the books it moved), a cut that drops a whole commit, a
crash or an untyped error on crafted riders counts, a restored engine whose
journal does not restore again after it wrote on.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
from durable_helpers import (  # noqa: F401
    FRAME,
    HDR,
    Cutter,
    Made,
    books_invariant,
    crc32c,
    dump,
    fill,
    journal_files,
    locate,
    made_engines,
    power_cut,
    riders_by_seq,
    whole_after_cut,
    whole_commits,
)
from procs import until
from test_journal_riders_adversary import KEY, booked_engine, die_in
from test_tools import run

from engine import Engine
from engine._native import ffi, lib
from engine.errors import RestoreError

RIDERS_AT = int(ffi.offsetof("eng_jrec", "riders"))
FILE_RECORDS = lib.ENG_DJ_FILE_RECORDS


def state(eng: Engine) -> dict[str, Any]:
    """dump() without the engine's name (a restore is named anew)."""
    d = dump(eng)
    del d["name"]
    return d


def gone(made: Made, eng: Engine) -> None:
    """Close ``eng`` and remove its segment (its directory may be restored again)."""
    name = eng.name
    eng.close()
    with Engine.attach(name) as e:
        e.unlink()
    made.engines.remove(eng)


def keyed_booked_open(eng: Engine, a: int, key: str) -> tuple[int, int]:
    """A keyed, booked open (three records: the slot's, its key's, the account's):
    (position, the slot record's seq)."""
    seq = eng.journal_seq + 1
    p = eng.open_position(100.0, 2.0, side=1, account=a, key=key)
    assert eng.journal_seq == seq + 2
    return p, seq


class TestCommitAcrossTwoFiles:
    """The slot's record is the last frame of one journal file, its riders the
    first two of the next."""

    @pytest.fixture(name="straddle")
    def _straddle(self, made: Made) -> tuple[Path, dict[str, Any], dict[str, Any], int]:
        eng = made.create(max_accounts=4)
        a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
        fill(eng, FILE_RECORDS - 1 - eng.journal_seq)
        assert eng.journal_seq == FILE_RECORDS - 1
        before = state(eng)
        _p, seq = keyed_booked_open(eng, a, "k1")
        assert seq == FILE_RECORDS   # the file's last frame; its riders in the next file
        after = state(eng)
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        files = journal_files(src)
        assert [int(f.name[8:28]) for f in files[:2]] == [1, FILE_RECORDS + 1]
        return src, before, after, seq

    @pytest.mark.parametrize("drop", [False, True])
    def test_a_power_cut_at_every_byte_around_the_boundary(
            self, made: Made, straddle: tuple[Path, dict[str, Any], dict[str, Any], int],
            drop: bool) -> None:
        """A cut at any frame and byte of the straddling commit: it is restored whole or not."""
        src, before, after, seq = straddle
        work = power_cut(src, made.dir("cut"), seq - 1)
        f1, f2 = journal_files(src)[:2]
        orig1, orig2 = f1.read_bytes(), f2.read_bytes()
        head_off = HDR + (FILE_RECORDS - 1) * FRAME
        assert len(orig1) == head_off + FRAME
        stream = orig1[head_off:] + orig2[HDR:HDR + 2 * FRAME]
        cuts = sorted({k * FRAME + b for k in range(3)
                       for b in (0, 1, 4, 7, 8, 9, 16, FRAME // 2, FRAME - 1)} |
                      {3 * FRAME})
        for n in cuts:
            kept = stream[:n] + bytes(3 * FRAME - n)
            for extra in set(os.listdir(work)) - set(os.listdir(src)):
                os.unlink(work / extra)
            with (work / f1.name).open("r+b") as f:
                f.seek(head_off)
                f.write(kept[:FRAME])
            if drop and n <= FRAME:   # the next file's creation never reached the disk
                (work / f2.name).unlink()
            else:
                data = bytearray(orig2)
                data[HDR:HDR + 2 * FRAME] = kept[FRAME:]
                (work / f2.name).write_bytes(bytes(data))
            whole = whole_after_cut(src, work, seq - 1)
            got = made.restore(work)
            want = after if whole >= seq + 2 else before
            assert state(got) == want, (n, drop, whole)
            assert got.restore_report.last_seq == (seq + 2 if whole >= seq + 2 else seq - 1)
            gone(made, got)

    @pytest.mark.parametrize(("frames_kept", "drop"), [(1, False), (1, True), (2, False)])
    def test_the_journal_goes_on_over_a_cut_straddling_commit(
            self, made: Made, straddle: tuple[Path, dict[str, Any], dict[str, Any], int],
            drop: bool, frames_kept: int) -> None:
        """Restored over a cut straddling commit, written on and restored again: the new state."""
        src, before, _after, seq = straddle
        cut = power_cut(src, made.dir("cut"), seq - 1 + frames_kept)
        if drop:   # the riders' file never reached the disk
            journal_files(cut)[1].unlink()
        got = made.restore(cut)
        assert state(got) == before
        assert got.restore_report.last_seq == seq - 1
        a = next(iter(before["accounts"]))
        for i in range(3):
            keyed_booked_open(got, a, f"k2-{i}")
        got.flush(10.0)
        want = state(got)
        gone(made, got)
        again = made.restore(cut)
        assert state(again) == want
        assert again.lookup("k1") is None and again.lookup("k2-2") is not None
        assert again.restore_report.tail_cut is None

    @pytest.mark.parametrize("extra", [1, FRAME // 2, FRAME - 1, FRAME + 9])
    def test_the_journal_goes_on_over_a_torn_next_file(
            self, made: Made, straddle: tuple[Path, dict[str, Any], dict[str, Any], int],
            extra: int) -> None:
        """The riders' file torn, one record written on, then a straddling one: each restores."""
        src, before, _after, seq = straddle
        cut = power_cut(src, made.dir("cut"), seq, extra=extra)
        got = made.restore(cut)
        assert state(got) == before
        x = next(iter(before["positions"]))
        got.update_price(x, 77.0)   # one record: the first file's last frame
        got.flush(10.0)
        want = state(got)
        gone(made, got)
        again = made.restore(cut)
        assert state(again) == want and again.restore_report.last_seq == seq
        a = next(iter(before["accounts"]))
        keyed_booked_open(again, a, "k3")   # in the next file, over the torn bytes
        again.flush(10.0)
        want = state(again)
        gone(made, again)
        third = made.restore(cut)
        assert state(third) == want and third.restore_report.tail_cut is None


def set_riders(d: Path, seq: int, riders: int) -> tuple[Path, int]:
    """Rewrite the riders count of seq's record, its frame's CRC made valid again:
    (file, the frame's offset)."""
    path, off = locate(d, seq)
    data = bytearray(path.read_bytes())
    rec = off + FRAME - lib.ENG_JREC_SIZE
    data[rec + RIDERS_AT:rec + RIDERS_AT + 4] = riders.to_bytes(4, "little")
    data[off + 4:off + 8] = crc32c(bytes(data[rec:rec + lib.ENG_JREC_SIZE])).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path, off


def riders_of(d: Path, seq: int) -> int:
    path, off = locate(d, seq)
    with path.open("rb") as f:
        f.seek(off + FRAME - lib.ENG_JREC_SIZE + RIDERS_AT)
        return int.from_bytes(f.read(4), "little")


class TestCraftedRidersCounts:
    """Riders counts rewritten with valid CRCs: a typed RestoreError naming the
    file and offset, or a cut of the last commit; never a crash, never a split
    commit restored."""

    @pytest.fixture(name="journal")
    def _journal(self, made: Made) -> tuple[Path, dict[str, int], dict[str, Any]]:
        eng = made.create(max_accounts=4)
        a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
        seqs = {}
        _p, seqs["head"] = keyed_booked_open(eng, a, "k1")   # riders 2
        seqs["price"] = eng.journal_seq + 1
        eng.update_price(_p, 101.0)
        seqs["plain"] = eng.journal_seq + 1
        eng.open_position(100.0, 1.0)   # riders 0, a price record after it
        eng.update_price(_p, 102.0)
        _q, seqs["last_head"] = keyed_booked_open(eng, a, "k2")
        eng.update_price(_q, 99.0)   # riders 0, the last record
        seqs["end"] = eng.journal_seq
        live = state(eng)
        eng.flush(10.0)
        d = made.jdir(eng)
        gone(made, eng)
        assert riders_of(d, seqs["head"]) == 2 and riders_of(d, seqs["plain"]) == 0
        return d, seqs, live

    @pytest.mark.parametrize("riders", [3, 255, 2**31, 2**32 - 1])
    @pytest.mark.parametrize("where", ["head", "plain", "end"])
    def test_a_count_past_the_largest_commit_is_corruption(
            self, made: Made, journal: tuple[Path, dict[str, int], dict[str, Any]],
            riders: int, where: str) -> None:
        """A count above ENG_JOURNAL_MAX_FILL - 1, middle or end: RestoreError at or after it."""
        d, seqs, _live = journal
        path, off = set_riders(d, seqs[where], riders)
        with pytest.raises(RestoreError, match=f"counts {riders} riders|should ride") as err:
            made.restore(d)
        assert err.value.path == str(path)  # type: ignore[attr-defined]
        assert off <= err.value.offset < off + lib.ENG_JOURNAL_MAX_FILL * FRAME  # type: ignore[attr-defined]

    @pytest.mark.parametrize(("where", "riders"), [("plain", 1), ("plain", 2), ("price", 2)])
    def test_a_count_over_foreign_records_in_the_middle_is_corruption(
            self, made: Made, journal: tuple[Path, dict[str, int], dict[str, Any]],
            where: str, riders: int) -> None:
        """A count that takes in another commit's records, in the middle: RestoreError."""
        d, seqs, _live = journal
        set_riders(d, seqs[where], riders)
        with pytest.raises(RestoreError, match="should ride on the commit") as err:
            made.restore(d)
        path, off = err.value.path, err.value.offset  # type: ignore[attr-defined]
        assert path is not None and off is not None and Path(path).parent == d

    @pytest.mark.parametrize("riders", [1, 2])
    def test_a_count_larger_than_what_follows_at_the_end_cuts_that_commit(
            self, made: Made, journal: tuple[Path, dict[str, int], dict[str, Any]],
            riders: int) -> None:
        """The last record counting riders that never came: cut as a torn tail."""
        d, seqs, _live = journal
        set_riders(d, seqs["end"], riders)
        got = made.restore(d)
        assert got.restore_report.last_seq == seqs["end"] - 1
        assert got.restore_report.tail_cut is not None

    def test_a_last_head_counting_more_than_written_cuts_it_whole(
            self, made: Made, journal: tuple[Path, dict[str, int], dict[str, Any]]) -> None:
        """The last commit's head counting 2, its second rider's frame on zeroed: cut whole."""
        d, seqs, _live = journal
        path, off = locate(d, seqs["last_head"] + 2)
        data = bytearray(path.read_bytes())
        data[off:off + 2 * FRAME] = bytes(2 * FRAME)
        path.write_bytes(bytes(data))
        got = made.restore(d)
        assert got.restore_report.last_seq == seqs["last_head"] - 1
        assert got.lookup("k2") is None and got.lookup("k1") is not None

    def test_a_count_below_the_riders_restores_every_record(
            self, made: Made, journal: tuple[Path, dict[str, int], dict[str, Any]]) -> None:
        """Heads counting 1 or 0 of their 2 riders (the rest read as their own): all restored."""
        d, seqs, live = journal
        set_riders(d, seqs["head"], 1)
        set_riders(d, seqs["last_head"], 0)
        got = made.restore(d)
        assert state(got) == live and got.restore_report.tail_cut is None


class TestTornTails:
    def test_a_torn_tail_at_any_byte_of_a_commit_and_after_it(self, made: Made) -> None:
        """Cut at any byte of a 3-record commit or the record after: whole commits kept, no part."""
        eng = made.create(max_accounts=4)
        a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
        x = eng.open_position(100.0, 1.0)
        durable = eng.journal_seq
        states = [state(eng)]
        p, head = keyed_booked_open(eng, a, "k1")
        states.append(state(eng))
        eng.update_price(x, 101.5)
        states.append(state(eng))
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        cutter = Cutter(src, made.dir("cut"), durable)
        for extra in sorted({k * FRAME + b for k in range(5)
                             for b in (0, 1, 8, 9, 100, FRAME - 2, FRAME - 1)}):
            d = cutter.cut(extra)
            whole = whole_after_cut(src, d, durable)
            want = 2 if whole >= head + 3 else 1 if whole >= head + 2 else 0
            got = made.restore(d)
            assert state(got) == states[want], (extra, whole)
            assert got.restore_report.last_seq == [durable, head + 2, head + 3][want]
            assert (got.lookup("k1") == p) == (want > 0)
            gone(made, got)


class TestCheckpointAroundACommit:
    @pytest.mark.parametrize("kept", [0, 1, 2])
    def test_a_checkpoint_right_before_a_split_commit(self, made: Made, kept: int) -> None:
        """Checkpoint right before a commit that lost riders: its state; the journal goes on."""
        eng = made.create(max_accounts=4)
        a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
        eng.open_position(100.0, 1.0, key="k0", account=a)
        start = eng.checkpoint()
        before = state(eng)
        _p, head = keyed_booked_open(eng, a, "k1")
        assert head == start + 1
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        cut = power_cut(src, made.dir("cut"), head - 1 + kept)
        got = made.restore(cut)
        rep = got.restore_report
        assert rep.checkpoint_seq == start and rep.last_seq == (start if kept < 3 else head + 2)
        assert state(got) == before
        q, _ = keyed_booked_open(got, a, "k2")
        got.flush(10.0)
        want = state(got)
        gone(made, got)
        again = made.restore(cut)
        assert state(again) == want and again.lookup("k1") is None and again.lookup("k2") == q

    @pytest.mark.parametrize("kept", [0, 1, 2, 3])
    def test_a_checkpoint_right_after_a_commit_then_a_split_one(self, made: Made,
                                                                kept: int) -> None:
        """Checkpoint at a commit's end, the next commit cut at each record: whole or not."""
        eng = made.create(max_accounts=4)
        a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
        _p, head = keyed_booked_open(eng, a, "k1")
        start = eng.checkpoint()
        assert start == head + 2
        before = state(eng)
        keyed_booked_open(eng, a, "k2")
        after = state(eng)
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        got = made.restore(power_cut(src, made.dir("cut"), start + kept))
        assert got.restore_report.checkpoint_seq == start
        assert state(got) == (after if kept == 3 else before)
        assert got.restore_report.last_seq == (start + 3 if kept == 3 else start)


def exit_with(body: Callable[[], None]) -> NoReturn:
    """A child's end: os._exit(0) after ``body``, or 2 with its traceback printed."""
    try:
        body()
    except BaseException:
        import traceback
        traceback.print_exc()
        os._exit(2)
    os._exit(0)


def commit_loop(handle: Any, acct: int, ready: Any, stop: Any) -> None:
    """Child: keyed booked opens, their booked closes and releases, until ``stop``."""
    from engine import Trigger as T
    eng = Engine.attach(handle)

    def body() -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            if i == 1:
                ready.set()
            p = eng.open_position(100.0, 1.0, side=1, account=acct, key=f"c-{i}")
            for trig in (T.POSITION_OPENED, T.EXIT_CONDITION_MET, T.EXIT_STARTED):
                eng.transition(p, trig)
            eng.transition(p, T.EXIT_COMPLETED, exit_price=100.5)
            eng.release_position(p)
    exit_with(body)


class TestFlushEndsACommit:
    def test_a_power_cut_at_what_flush_returned_keeps_every_change(
            self, made: Made, spawner: Any) -> None:
        """flush() racing another process's commits with riders: a cut at its seq loses nothing."""
        eng = made.create(capacity=64, max_accounts=4, journal_prices=False)
        a = eng.open_account(10**9, 10**9, 50, 10**8, key="acct")
        ready, stop = spawner.ctx.Event(), spawner.ctx.Event()
        child = spawner.start(commit_loop, eng.handle, a, ready, stop)
        assert ready.wait(60)
        got_seqs: list[int] = []
        try:   # until 50 flushes returned different seqs (bounded)
            while len(got_seqs) < 20_000 and len(set(got_seqs)) < 50:
                got_seqs.append(eng.flush(10.0))
        finally:
            stop.set()
            child.join(60)
        assert child.exitcode == 0, f"the committer failed (exit {child.exitcode})"
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        ends = sorted(set(got_seqs))
        assert len(ends) > 10, "the child committed too little to race flush"
        split = [d for d in ends if whole_commits(src, d) != d]
        assert not split, f"flush returned seqs inside a commit: {split[:5]}"
        for d in (ends[0], ends[len(ends) // 2], ends[-1]):
            for extra in (0, FRAME + 9):
                got = made.restore(power_cut(src, made.dir("cut"), d, extra=extra))
                assert got.restore_report.last_seq >= d, (d, extra)
                gone(made, got)


def flush_loop(handle: Any, ready: Any, stop: Any) -> None:
    """Child: flush() in a loop until ``stop`` (its fdatasync lands anywhere in the writing)."""
    eng = Engine.attach(handle)

    def body() -> None:
        ready.set()
        while not stop.is_set():
            eng.flush(10.0)
    exit_with(body)


class TestDurableSeqEndsACommit:
    def test_durable_seq_read_racing_flushes_never_stops_inside_a_commit(
            self, made: Made, spawner: Any) -> None:
        """durable_seq, read while commits with riders race flushes, never stops inside a commit."""
        eng = made.create(capacity=64, max_accounts=4, journal_prices=False)
        a = eng.open_account(10**9, 10**9, 50, 10**8, key="acct")
        ready, flushing, stop = (spawner.ctx.Event() for _ in range(3))
        committer = spawner.start(commit_loop, eng.handle, a, ready, stop)
        flusher = spawner.start(flush_loop, eng.handle, flushing, stop)
        assert ready.wait(60) and flushing.wait(60)
        seen: set[int] = set()
        try:   # until 300 different values were read (bounded)
            for _ in range(2_000_000):
                seen.add(eng.durable_seq)
                if len(seen) >= 300:
                    break
        finally:
            stop.set()
            committer.join(60)
            flusher.join(60)
        assert committer.exitcode == 0 and flusher.exitcode == 0
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        ends = sorted(seen)
        assert len(ends) > 10, "durable_seq moved too little to race the flushes"
        riders = riders_by_seq(src)   # a commit ending past d has its slot's record near d
        split = [d for d in ends if any(s + riders.get(s, 0) > d for s in
                                        range(d - lib.ENG_JOURNAL_MAX_FILL + 2, d + 1))]
        assert not split, f"durable_seq stopped inside a commit: {split[:5]} (of {len(ends)})"
        for d in (ends[len(ends) // 2], ends[-1]):
            got = made.restore(power_cut(src, made.dir("cut"), d))
            assert got.restore_report.last_seq >= d, d
            gone(made, got)


    def test_an_idle_writer_brings_durable_seq_to_the_journal_seq(self, made: Made) -> None:
        """With no flush() called, durable_seq reaches the journal seq once commits stop."""
        eng = made.create(capacity=64, max_accounts=2, journal_prices=False)
        a = eng.open_account(10**9, 10**9, 50, 10**8, key="acct")
        for i in range(40):   # keyed booked opens: 3 records a commit
            eng.open_position(100.0, 1.0, side=1, account=a, key=f"idle-{i}")
        until(lambda: eng.durable_seq == eng.journal_seq,
              f"durable_seq {eng.durable_seq} reaching the journal seq {eng.journal_seq}", 10)


class TestKilledMidRiders:
    @pytest.mark.parametrize("then", ["recover", "rm"])
    @pytest.mark.parametrize("fault", ["ENG_FAULT_DIE_IN_RIDER", "ENG_FAULT_DIE_AFTER_RIDER"])
    @pytest.mark.parametrize("op", ["keyed booked open", "keyed open", "booked close"])
    def test_a_committer_killed_in_its_riders_then_recover_or_rm_restores_equal(
            self, made: Made, spawner: Any, capsys: Any, op: str, fault: str,
            then: str) -> None:
        """SIGKILL in a commit's riders, files on, recover() or rm: restore equals the engine."""
        eng, pos, acct = booked_engine(lambda **kw: made.create(journal_prices=False, **kw))
        before = state(eng)
        child = spawner.start(die_in, eng.handle, op, pos, acct, getattr(lib, fault))
        child.join(60)
        eng._set_fault(0)
        assert child.exitcode == -signal.SIGKILL, f"the fault did not fire: {child.exitcode}"
        d = made.jdir(eng)
        if then == "recover":
            eng.recover()
            want = state(eng)
            eng.flush(10.0)
            gone(made, eng)
        else:   # the unpublished commit rolls back: the engine as before it
            name = eng.name
            eng.close()
            made.engines.remove(eng)
            code, _out, err = run(capsys, "rm", name)
            assert code == 0, err
            want = before
        got = made.restore(d)
        assert state(got) == want
        assert got.restore_report.tail_cut is None
        got.open_position(10.0, 1.0, key="after", account=acct)   # the journal goes on
        want = state(got)
        gone(made, got)
        assert state(made.restore(d)) == want

    @pytest.mark.parametrize("fault", ["ENG_FAULT_DIE_BEFORE_JPUBLISH", "ENG_FAULT_DIE_AFTER_CAS"])
    def test_a_committer_killed_after_its_commit_then_rm_restores_it_whole(
            self, made: Made, spawner: Any, capsys: Any, fault: str) -> None:
        """SIGKILL after the commit CAS, unpublished, then close and rm: restored with riders."""
        eng, pos, acct = booked_engine(lambda **kw: made.create(journal_prices=False, **kw))
        child = spawner.start(die_in, eng.handle, "keyed booked open", pos, acct,
                              getattr(lib, fault))
        child.join(60)
        eng._set_fault(0)
        assert child.exitcode == -signal.SIGKILL, f"the fault did not fire: {child.exitcode}"
        d, name = made.jdir(eng), eng.name
        eng.close()
        made.engines.remove(eng)
        code, _out, err = run(capsys, "rm", name)
        assert code == 0, err
        got = made.restore(d)
        p = got.lookup(KEY)
        assert p is not None, "a committed open lost by rm"
        assert int(next(iter(got.accounts()))["open_positions"]) == 2
        books_invariant(got)


class TestMissingRecordsBeforeACutCommit:
    @pytest.mark.parametrize("riders_kept", [0, 1, 2])
    def test_a_lost_first_file_before_a_cut_commit_is_records_missing(
            self, made: Made, riders_kept: int) -> None:
        """The first file gone, the next holding only a commit that lost riders: RestoreError."""
        eng = made.create(max_accounts=4)
        a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
        fill(eng, FILE_RECORDS - eng.journal_seq)
        _p, head = keyed_booked_open(eng, a, "k1")
        assert head == FILE_RECORDS + 1   # the next file's first record
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        cut = power_cut(src, made.dir("cut"), head + riders_kept)   # 2: the commit whole
        first = journal_files(cut)[0]
        first.unlink()
        with pytest.raises(RestoreError, match="records missing") as err:
            made.restore(cut)
        assert err.value.path == str(journal_files(cut)[0])  # type: ignore[attr-defined]
