"""Adversary of durability (issue 22): the journal on disk and its restore,
attacked as power failures, torn and corrupt files, races and kills leave it.

Forbidden outcomes, each named by its test: a restore that loses what
flush() reported durable, or brings back anything past a valid prefix of
the journal; a torn tail replayed or refused; corruption in the middle
skipped in silence (the error must name the file and offset); a restore
that clobbers an existing engine; a half-restored segment seen by attach;
a commit the engine made but could not journal; files other than 0600 in a
0700 directory; a released id alive again after a restore.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from durable_helpers import (
    FRAME,
    HDR,
    Cutter,
    Made,
    Workload,
    books_invariant,
    check_lookups,
    check_stale,
    checkpoint_files,
    copy_dir,
    diff,
    dump,
    fill,
    first_seq,
    frame_seq,
    frame_valid,
    journal_files,
    locate,
    made_engines,  # noqa: F401 (the made fixture)
    power_cut,
    valid_records,
    whole_after_cut,
    whole_commits,
)
from journal_audit import wait_stopped

from engine import BusyError, Engine, EngineError, SegmentError, SegmentNotFoundError
from engine._native import lib

pytestmark = pytest.mark.skipif(
    not (hasattr(Engine, "restore") and hasattr(Engine, "flush")),
    reason="durability (issue 22: Engine.flush, Engine.restore) is not in this build")

FLUSH_TIMEOUT = 10.0
#: frames per journal file (fixed by the build)
FILE_RECORDS = lib.ENG_DJ_FILE_RECORDS


def same(want: dict[str, Any], got: dict[str, Any]) -> None:
    """Two dumps are equal but for the segment's name."""
    got = {**got, "name": want["name"]}
    assert want == got, "restored engine differs:\n" + diff(want, got)


def tree(d: pathlib.Path) -> dict[str, str]:
    """Every file of a directory and the hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def run(w: Workload, steps: int) -> None:
    for _ in range(steps):
        w.step()


def flushed(eng: Engine) -> int:
    """flush(), checked against what was committed before the call."""
    before = eng.journal_seq
    d = int(eng.flush(timeout=FLUSH_TIMEOUT))
    assert d >= before, f"flush() returned {d}, below the seq {before} committed before it"
    assert int(eng.durable_seq) >= d
    return d


def segment_exists(name: str) -> bool:
    try:
        Engine.attach(name).close()
        return True
    except SegmentNotFoundError:
        return False


# -- power loss -----------------------------------------------------------------------------
class TestPowerLoss:
    def test_every_flush_point_restores_exactly(self, made: Made) -> None:
        """A power cut right after flush() returned D restores the engine as it was at D."""
        eng = made.create()
        w = Workload(eng, 11)
        cuts = []
        for i in range(8):
            run(w, 60)
            d = flushed(eng)
            assert d == eng.journal_seq
            cut = power_cut(made.jdir(eng), made.dir("cut"), d,
                            drop_files=bool(i % 2))
            cuts.append((cut, dump(eng), set(w.released)))
        for cut, want, released in cuts:
            got = made.restore(cut)
            same(want, dump(got))
            check_lookups(got, want, w.acct_keys)
            check_stale(got, released)

    def test_unflushed_bytes_of_the_last_file(self, made: Made) -> None:
        """Any prefix of the unflushed bytes restores the whole commits in it, no more, no less."""
        eng = made.create(journal_prices=True)
        w = Workload(eng, 12, halts=False)
        run(w, 80)
        d0 = flushed(eng)
        at: dict[int, dict[str, Any]] = {d0: dump(eng)}
        for _ in range(6):
            w.step()
            at[eng.journal_seq] = dump(eng)
        flushed(eng)
        top = eng.journal_seq
        src = made.jdir(eng)
        offsets = sorted({b for k in range(top - d0 + 1)
                          for b in (k * FRAME - 1, k * FRAME, k * FRAME + 1, k * FRAME + 131)
                          if 0 <= b <= (top - d0) * FRAME})
        cutter = Cutter(src, made.dir("cut"), d0)
        for extra in offsets:
            cut = cutter.cut(extra)
            frames = whole_after_cut(src, cut, d0)
            assert d0 + extra // FRAME <= frames <= d0 + (extra + FRAME - 1) // FRAME
            whole = whole_commits(src, frames, d0)
            got = made.restore(cut)
            assert got.restore_report.last_seq == whole, (extra, got.restore_report, whole)
            if whole in at:
                same(at[whole], dump(got))
            got.close()
            got.unlink()

    @pytest.mark.slow
    def test_unflushed_bytes_every_offset(self, made: Made) -> None:
        """Every byte offset of the last three frames: torn frames and commits cut, whole kept."""
        eng = made.create()
        w = Workload(eng, 13, halts=False)
        run(w, 50)
        d0 = flushed(eng)
        at: dict[int, dict[str, Any]] = {d0: dump(eng)}
        while eng.journal_seq < d0 + 3:
            w.step()
            at[eng.journal_seq] = dump(eng)
        flushed(eng)
        src = made.jdir(eng)
        cutter = Cutter(src, made.dir("cut"), d0)
        for extra in range(3 * FRAME + 1):
            cut = cutter.cut(extra)
            got = made.restore(cut)
            whole = whole_commits(src, whole_after_cut(src, cut, d0), d0)
            assert got.restore_report.last_seq == whole, (extra, got.restore_report, whole)
            if whole in at:
                same(at[whole], dump(got))
            got.close()
            got.unlink()

    def test_a_lost_page_among_unflushed_frames(self, made: Made) -> None:
        """A lost page among unflushed frames stops the restore at the hole, never past it.

        Unflushed frames persisted out of order (one lost, later ones whole): the restore stops at
        the hole (cut, or an error naming it), never replays past it.
        """
        eng = made.create()
        w = Workload(eng, 14, halts=False)
        run(w, 60)
        acct = int(eng.accounts()[0]["id"])
        d0 = flushed(eng)
        at = {d0: dump(eng)}
        for _ in range(6):
            eng.deposit(acct, 1)   # one record each
            at[eng.journal_seq] = dump(eng)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        p, off = locate(d, d0 + 3)
        data = bytearray(p.read_bytes())
        data[off: off + FRAME] = bytes(FRAME)
        p.write_bytes(bytes(data))
        try:
            got = made.restore(d)
        except EngineError as e:
            assert names_place(str(e), p, off, off), e
            return
        same(at[d0 + 2], dump(got))

    def test_a_checkpoint_past_the_durable_journal(self, made: Made) -> None:
        """A checkpoint past the durable journal restores the flushed or checkpointed state.

        A checkpoint whose rename reached the disk while the journal's last frames did not: the
        restore is the engine at the flush or at the checkpoint, nothing mixed.
        """
        eng = made.create()
        w = Workload(eng, 15)
        run(w, 100)
        d0 = flushed(eng)
        at_flush = dump(eng)
        run(w, 40)
        eng.checkpoint()
        at_ckpt = dump(eng)
        src = copy_dir(made.jdir(eng), made.dir("copy"))
        cut = made.dir("cut")
        power_cut(src, cut, d0)
        for c in checkpoint_files(src):
            if not (cut / c.name).exists():
                (cut / c.name).write_bytes(c.read_bytes())
                os.chmod(cut / c.name, 0o600)
        got = dump(made.restore(cut))
        got["name"] = at_flush["name"]
        assert got in (at_flush, at_ckpt), "restored neither the flushed state nor the " \
            "checkpoint's:\n" + diff(at_ckpt, got)


# -- torn tails and corruption --------------------------------------------------------------
def frozen(made: Made, seed: int, steps: int = 150, **kw: Any) -> tuple[Engine, pathlib.Path]:
    """An engine after a workload and a flush, and a copy of its directory."""
    eng = made.create(**kw)
    run(Workload(eng, seed, halts=False), steps)
    flushed(eng)
    return eng, copy_dir(made.jdir(eng), made.dir("copy"))


def names_place(msg: str, path: pathlib.Path, frame_off: int, byte_off: int) -> bool:
    """The message names the file and the frame's (or the byte's) offset."""
    offs = {str(frame_off), hex(frame_off), str(byte_off), hex(byte_off)}
    return path.name in msg and any(o in msg for o in offs)


def refused_mid_file(made: Made, d: pathlib.Path, path: pathlib.Path, frame_off: int,
                     byte_off: int) -> None:
    """Restore of ``d`` raises an EngineError naming the place; nothing is created or cut."""
    before = tree(d)
    name = made.names()
    with pytest.raises(EngineError) as exc:
        made.restore(d, name=name)
    assert names_place(str(exc.value), path, frame_off, byte_off), (
        f"the error does not name {path.name} at {frame_off} (frame) / {byte_off} (byte): "
        f"{exc.value}")
    assert not segment_exists(name), "a failed restore left a segment behind"
    assert tree(d) == before, "a failed restore changed the journal directory"


def cut_or_named(made: Made, eng: Engine, d: pathlib.Path, path: pathlib.Path,
                 off: int) -> None:
    """A whole frame of the wrong seq after the tail: cut (the restore equals
    ``eng``) or refused naming the place; never replayed."""
    try:
        got = made.restore(d)
    except EngineError as e:
        assert names_place(str(e), path, off, off), e
        return
    same(dump(eng), dump(got))


class TestTornTail:
    def test_garbage_after_the_last_record_is_cut(self, made: Made) -> None:
        """Random bytes after the last frame are cut, never replayed, and the rest restores."""
        eng, d = frozen(made, 21)
        p, off = locate(d, eng.journal_seq)
        data = bytearray(p.read_bytes())
        data[off + FRAME: off + 3 * FRAME] = os.urandom(2 * FRAME)
        data[off + FRAME] |= 1   # a magic that is not 0
        p.write_bytes(bytes(data))
        same(dump(eng), dump(made.restore(d)))

    def test_a_copy_of_the_last_frame_is_not_replayed(self, made: Made) -> None:
        """A copy of the last frame after the tail is never replayed.

        A whole, checksummed frame repeated after the tail (its seq not the next) is not replayed.
        """
        eng, _ = frozen(made, 22)
        a = eng.accounts()[0]["id"]
        eng.deposit(int(a), 777)    # the last record: applied twice would show in cash
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        p, off = locate(d, eng.journal_seq)
        data = bytearray(p.read_bytes())
        data[off + FRAME: off + 2 * FRAME] = data[off: off + FRAME]
        p.write_bytes(bytes(data))
        cut_or_named(made, eng, d, p, off + FRAME)

    def test_an_old_frame_after_the_tail_is_not_replayed(self, made: Made) -> None:
        """A valid frame of an earlier seq after the tail is never replayed.

        A valid frame of an earlier seq after the tail (a recycled file's leftover) is not replayed.
        """
        eng, d = frozen(made, 23)
        p, off = locate(d, eng.journal_seq)
        q, old = locate(d, eng.journal_seq // 2)
        data = bytearray(p.read_bytes())
        data[off + FRAME: off + 2 * FRAME] = q.read_bytes()[old: old + FRAME]
        p.write_bytes(bytes(data))
        cut_or_named(made, eng, d, p, off + FRAME)

    def test_a_torn_last_frame_is_cut(self, made: Made) -> None:
        """The last frame's checksum failing: it is cut and the engine before it comes back."""
        eng, _ = frozen(made, 24)
        want = dump(eng)
        eng.deposit(int(eng.accounts()[0]["id"]), 5)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        p, off = locate(d, eng.journal_seq)
        data = bytearray(p.read_bytes())
        data[off + FRAME - 3] ^= 0x40
        p.write_bytes(bytes(data))
        same(want, dump(made.restore(d)))


class TestCorruption:
    def test_a_flipped_byte_mid_file_names_file_and_offset(self, made: Made) -> None:
        """A flipped byte mid-file stops the restore with an error naming file and offset.

        A flipped byte in a frame with whole frames after it stops the restore, naming the place.
        """
        eng, d = frozen(made, 31)
        p, off = locate(d, eng.journal_seq // 2)
        data = bytearray(p.read_bytes())
        data[off + 8 + 40] ^= 0x01
        p.write_bytes(bytes(data))
        refused_mid_file(made, d, p, off, off + 8 + 40)

    def test_a_zeroed_frame_mid_file_is_not_an_end(self, made: Made) -> None:
        """A frame of zeros with whole frames after it is corruption, not the end of the records."""
        eng, d = frozen(made, 32)
        p, off = locate(d, eng.journal_seq // 2)
        data = bytearray(p.read_bytes())
        data[off: off + FRAME] = bytes(FRAME)
        p.write_bytes(bytes(data))
        refused_mid_file(made, d, p, off, off)

    def test_a_flipped_magic_mid_file_names_file_and_offset(self, made: Made) -> None:
        """A frame whose magic is wrong, mid-file, stops the restore, naming the place."""
        eng, d = frozen(made, 33)
        p, off = locate(d, eng.journal_seq // 3)
        data = bytearray(p.read_bytes())
        data[off] ^= 0x10
        p.write_bytes(bytes(data))
        refused_mid_file(made, d, p, off, off)

    def test_a_swapped_frame_order_is_refused(self, made: Made) -> None:
        """Two whole frames swapped mid-file are refused, naming the place.

        Two whole frames swapped mid-file (each checksum right, the seqs out of order) are refused.
        """
        eng, d = frozen(made, 34)
        p, off = locate(d, eng.journal_seq // 2)
        data = bytearray(p.read_bytes())
        a, b = data[off: off + FRAME], data[off + FRAME: off + 2 * FRAME]
        data[off: off + 2 * FRAME] = b + a
        p.write_bytes(bytes(data))
        refused_mid_file(made, d, p, off, off)


# -- checkpoints ----------------------------------------------------------------------------
def checkpoint_whole(path: pathlib.Path) -> bool:
    """A checkpoint file is whole: its header's frame count matches its
    frames, each with the magic and a right checksum."""
    data = path.read_bytes()
    magic, _, fb, _, _, n = struct.unpack_from("<IIIIQQ", data, 0)
    if magic != lib.ENG_DJ_CKPT_MAGIC or fb != FRAME or len(data) < HDR + n * FRAME:
        return False
    return all(frame_valid(data[HDR + i * FRAME:HDR + (i + 1) * FRAME]) for i in range(n))


class TestCheckpoint:
    def test_restore_from_a_checkpoint_and_its_tail(self, made: Made) -> None:
        """checkpoint() mid-workload, more changes, flush: the restore equals the engine."""
        eng = made.create()
        w = Workload(eng, 41)
        run(w, 150)
        eng.checkpoint()
        run(w, 150)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        assert checkpoint_files(d), "checkpoint() wrote no checkpoint file"
        assert all(checkpoint_whole(c) for c in checkpoint_files(d))
        want = dump(eng)
        got = made.restore(d)
        same(want, dump(got))
        check_lookups(got, want, w.acct_keys)

    def test_released_ids_stay_stale_across_a_checkpoint(self, made: Made) -> None:
        """Slots released before a checkpoint never reissue an old id after the restore."""
        eng = made.create(capacity=8)
        released = set()
        for _ in range(5):   # every slot opened and released a few times
            ids = [eng.open_position(100.0, 1.0) for _ in range(8)]
            for pid in ids:
                eng.transition(pid, "POSITION_OPENED")
                eng.transition(pid, "EXIT_CONDITION_MET", exit_reason=1)
                eng.transition(pid, "EXIT_STARTED")
                eng.transition(pid, "EXIT_COMPLETED", exit_price=101.0)
                eng.release_position(pid)
                released.add(pid)
        eng.checkpoint()
        keep = eng.open_position(100.0, 2.0)
        flushed(eng)
        want = dump(eng)
        eng.close()
        Engine.attach(want["name"]).unlink()
        got = made.restore(made.jdir(eng), name=want["name"])
        same(want, dump(got))
        assert got.state(keep) is not None
        check_stale(got, released)

    def test_released_accounts_stay_stale_across_a_checkpoint(self, made: Made) -> None:
        """Accounts closed before a checkpoint keep their ids stale after the restore."""
        eng = made.create(max_accounts=4)
        closed = set()
        for _ in range(4):
            accts = [eng.open_account(1000, 1000, 5, 1000) for _ in range(4)]
            for a in accts:
                eng.close_account(a)
                closed.add(a)
        eng.checkpoint()
        flushed(eng)
        got = made.restore(copy_dir(made.jdir(eng), made.dir("copy")))
        fresh = [got.open_account(1000, 1000, 5, 1000) for _ in range(4)]
        assert not set(fresh) & closed, "a restored engine reissued a closed account's id"

    def test_keys_come_back_from_a_checkpoint(self, made: Made) -> None:
        """Bound keys and account keys come back from a checkpoint.

        Position keys (bound) and account keys written before a checkpoint are found after a restore
        from it.
        """
        eng = made.create()
        a = eng.open_account(10**6, 10**6, 10, 10**6, key="desk")
        p = eng.open_position(100.0, 1.0, account=a)
        eng.bind_key(p, "bound")
        eng.checkpoint()
        flushed(eng)
        got = made.restore(copy_dir(made.jdir(eng), made.dir("copy")))
        assert got.restore_report.checkpoint is not None
        assert (got.lookup("bound"), got.lookup_account("desk")) == (p, a), (
            got.lookup("bound"), got.lookup_account("desk"))

    def test_a_truncated_checkpoint_is_refused_or_passed_over(self, made: Made) -> None:
        """A truncated checkpoint is named in an error or passed over, never half-used.

        A checkpoint cut short is named in an error or passed over for an older start; never half-
        used.
        """
        eng = made.create()
        w = Workload(eng, 42)
        run(w, 100)
        eng.checkpoint()
        run(w, 100)
        eng.checkpoint()
        run(w, 50)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        newest = checkpoint_files(d)[-1]
        data = newest.read_bytes()
        newest.write_bytes(data[: HDR + (len(data) - HDR) // FRAME // 2 * FRAME + 100])
        try:
            got = made.restore(d)
        except EngineError as e:
            assert newest.name in str(e), f"the error does not name {newest.name}: {e}"
            return
        same(dump(eng), dump(got))

    def test_a_checkpoint_that_missed_its_rename_is_ignored(self, made: Made) -> None:
        """A checkpoint left as .tmp (killed before its rename) is never read."""
        eng = made.create()
        w = Workload(eng, 43)
        run(w, 100)
        eng.checkpoint()
        run(w, 100)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        real = checkpoint_files(d)[-1]
        bogus = d / f"checkpoint-{eng.journal_seq:020d}.ckpt.tmp"
        bogus.write_bytes(real.read_bytes()[: HDR + FRAME + 17])
        os.chmod(bogus, 0o600)
        same(dump(eng), dump(made.restore(d)))


# -- the directory and its files ------------------------------------------------------------
class TestFiles:
    def test_modes_0600_in_0700_under_umask_0(self, made: Made) -> None:
        """Under umask 0 the directory is 0700 and every file in it 0600."""
        old = os.umask(0)
        try:
            eng = made.create()
            run(Workload(eng, 51), 50)
            eng.checkpoint()
            flushed(eng)
        finally:
            os.umask(old)
        d = made.jdir(eng)
        assert d.stat().st_mode & 0o777 == 0o700, oct(d.stat().st_mode)
        bad = {p.name: oct(p.stat().st_mode & 0o777) for p in d.iterdir()
               if p.stat().st_mode & 0o777 != 0o600}
        assert not bad, f"files not 0600: {bad}"

    def test_create_over_another_engines_journal_is_refused(self, made: Made) -> None:
        """create() over another engine's journal directory is refused; it stays unchanged.

        create(journal=DIR) where DIR holds another engine's journal is refused; DIR unchanged.
        """
        a = made.create()
        run(Workload(a, 52), 60)
        flushed(a)
        want = dump(a)
        a.close()
        d = made.jdir(a)
        before = tree(d)
        with pytest.raises(EngineError):
            made.create(journal=d)
        assert tree(d) == before, "another engine's journal directory was changed"
        Engine.attach(want["name"]).unlink()
        same(want, dump(made.restore(d, name=want["name"])))

    def test_a_missing_middle_file_is_refused(self, made: Made) -> None:
        """A journal file missing between two others stops the restore, naming what is missing."""
        eng = made.create()
        run(Workload(eng, 53, halts=False), 50)
        fill(eng, 3 * FILE_RECORDS)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        files = journal_files(d)
        assert len(files) >= 4, f"{len(files)} journal files: the test needs small files"
        gone = files[len(files) // 2]
        gone.unlink()
        name = made.names()
        with pytest.raises(EngineError) as exc:
            made.restore(d, name=name)
        msg = str(exc.value)
        assert gone.name in msg or str(first_seq(files[len(files) // 2 - 1])) in msg or \
            "missing" in msg or "gap" in msg, msg
        assert not segment_exists(name)

    def test_a_flipped_byte_in_an_earlier_file_names_it(self, made: Made) -> None:
        """Corruption in an earlier journal file stops the restore, naming file and offset.

        Corruption in a file that is not the last one stops the restore, naming file and offset.
        """
        eng = made.create()
        run(Workload(eng, 54, halts=False), 50)
        fill(eng, 2 * FILE_RECORDS)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        recs = valid_records(d)
        files = journal_files(d)
        assert len(files) >= 3
        p = files[1]
        off = next(o for q, o, _ in recs if q == p) + FRAME   # its second frame
        data = bytearray(p.read_bytes())
        data[off + 8 + 100] ^= 0x80
        p.write_bytes(bytes(data))
        refused_mid_file(made, d, p, off, off + 8 + 100)

    def test_a_last_file_cut_at_its_end_is_a_torn_tail(self, made: Made) -> None:
        """A last file truncated mid-frame restores the whole frames before the cut.

        The last file truncated mid-frame (no preallocation left) restores the frames before the
        cut.
        """
        eng = made.create()
        w = Workload(eng, 55, halts=False)
        run(w, 100)
        d0 = flushed(eng)
        want = dump(eng)
        run(w, 30)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        p, off = locate(d, d0)
        with p.open("r+b") as f:
            f.truncate(off + FRAME + FRAME // 2)
        for q in journal_files(d):
            if first_seq(q) > d0:
                q.unlink()
        same(want, dump(made.restore(d)))


# -- restore against other engines and processes --------------------------------------------
def attach_watcher(name: str, want: tuple[int, int, int], go: Any, q: Any,
                   seconds: float) -> None:
    """Attach ``name`` as soon as it can be attached; report what it saw
    first (positions, accounts, halt), or that it never could."""
    go.set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            eng = Engine.attach(name)
        except SegmentError:
            continue
        except Exception as e:   # anything else is a finding
            q.put(("error", f"{type(e).__name__}: {e}"))
            return
        try:
            seen = (len(eng.snapshot()), len(eng.accounts()), int(eng._seg.hdr.halted))
        finally:
            eng.close()
        q.put(("seen", seen))
        return
    q.put(("never", None))


def restorer(d: str, name: str, go: Any, q: Any) -> None:
    """Restore ``d`` as ``name`` when ``go`` is set; report the outcome."""
    go.wait(60)
    try:
        eng = Engine.restore(d, name=name)
    except EngineError as e:
        q.put(("refused", f"{type(e).__name__}: {e}"))
        return
    except Exception as e:
        q.put(("error", f"{type(e).__name__}: {e}"))
        return
    q.put(("restored", (len(eng.snapshot()), len(eng.accounts()))))
    eng.close()


class TestRestoreRaces:
    def test_restore_over_an_existing_name_is_refused(self, made: Made) -> None:
        """Restore into an existing name is refused; that engine and the journal unchanged.

        Restore into a name that exists raises and changes neither that engine nor the journal.
        """
        eng, d = frozen(made, 61)
        other = made.create()
        run(Workload(other, 62), 40)
        flushed(other)
        for target in (eng, other):
            want, files = dump(target), tree(made.jdir(target))
            before_d = tree(d)
            with pytest.raises(EngineError):
                made.restore(d, name=target.name)
            same(want, dump(target))
            assert tree(d) == before_d, "a refused restore changed the directory it read"
            target.update_price(int(target.snapshot()[0]["id"]), 99.5)   # still works
            flushed(target)
            assert set(tree(made.jdir(target))) >= set(files)

    def test_restore_by_its_own_name_while_the_engine_lives_is_refused(self, made: Made) -> None:
        """Engine.restore(DIR) (name from the journal) while that engine is alive is refused."""
        eng, _ = frozen(made, 63)
        want = dump(eng)
        with pytest.raises(EngineError):
            Engine.restore(str(made.jdir(eng)))
        same(want, dump(eng))
        run(Workload(eng, 64), 20)
        flushed(eng)

    def test_attach_never_sees_a_half_restored_segment(self, made: Made, spawner: Any) -> None:
        """A process attaching while restore runs sees nothing, or the whole engine."""
        eng = made.create(capacity=2000, max_accounts=32)
        w = Workload(eng, 65, halts=False)
        for _ in range(1500):
            w.step()
        for _ in range(300):
            eng.open_position(100.0, 1.0, key=None)
        flushed(eng)
        want = dump(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        name = made.names()
        q, go = spawner.ctx.Queue(), spawner.ctx.Event()
        spawner.start(attach_watcher, name, (0, 0, 0), go, q, 120.0)
        assert go.wait(60)
        got = made.restore(d, name=name)
        kind, seen = q.get(timeout=130)
        assert kind == "seen", (kind, seen)
        assert seen == (len(want["positions"]), len(want["accounts"]), want["halted"]), (
            f"attach saw {seen} (positions, accounts, halt) of a restore in progress; "
            f"whole: {(len(want['positions']), len(want['accounts']), want['halted'])}")
        same(want, dump(got))

    def test_two_restores_of_one_name_one_wins(self, made: Made, spawner: Any) -> None:
        """Two processes restoring the same name at once: one wins, the other is refused."""
        eng, d = frozen(made, 66, steps=400)
        want = dump(eng)
        name = made.names()
        q, go = spawner.ctx.Queue(), spawner.ctx.Event()
        for _ in range(2):
            spawner.start(restorer, str(d), name, go, q)
        go.set()
        out = sorted(q.get(timeout=120) for _ in range(2))
        kinds = [k for k, _ in out]
        assert kinds == ["refused", "restored"], out
        with Engine.attach(name) as got:
            same(want, dump(got))
        made.engines.append(Engine.attach(name))

    def test_restore_of_a_dir_twice_with_two_names(self, made: Made) -> None:
        """One directory restored under two names gives two equal engines, each its own."""
        eng, d = frozen(made, 67)
        want = dump(eng)
        a = made.restore(d)
        b = made.restore(copy_dir(made.jdir(eng), made.dir("copy")))
        same(want, dump(a))
        same(want, dump(b))
        a.update_price(int(a.snapshot()[0]["id"]), 77.25)
        same(want, dump(b))


class TestAfterRestore:
    def test_keys_given_at_open_come_back(self, made: Made) -> None:
        """A key given to open_position (not bind_key) is found by lookup after a restore."""
        eng = made.create()
        a = eng.open_account(10**6, 10**6, 10, 10**6, key="desk")
        p = eng.open_position(100.0, 1.0, key="at-open", account=a)
        q = eng.open_position(100.0, 1.0)
        eng.bind_key(q, "bound")
        flushed(eng)
        got = made.restore(copy_dir(made.jdir(eng), made.dir("copy")))
        assert (got.lookup("at-open"), got.lookup("bound"), got.lookup_account("desk")) == (
            p, q, a), f"keys after restore: {got.keys(p)} {got.keys(q)}"

    def test_a_restored_engine_journals_on(self, made: Made) -> None:
        """Restore, change, flush, unlink, restore again: equal to the second engine."""
        _, d = frozen(made, 71)
        first = made.restore(d)
        w = Workload(first, 72)
        run(w, 150)
        flushed(first)
        want = dump(first)
        name = first.name
        first.close()
        Engine.attach(name).unlink()
        got = made.restore(d, name=name)
        same(want, dump(got))
        check_stale(got, w.released)

    def test_a_torn_tail_cut_then_journaled_over(self, made: Made) -> None:
        """A cut torn tail journaled over restores again without a corruption report.

        A restore that cut a torn tail, then new records and a second restore: no corruption
        reported where the old tail was, and the second engine comes back.
        """
        eng = made.create()
        w = Workload(eng, 73, halts=False)
        run(w, 100)
        d0 = flushed(eng)
        run(w, 20)
        flushed(eng)
        d = power_cut(made.jdir(eng), made.dir("cut"), d0, extra=5 * FRAME + 77)
        first = made.restore(d)
        run(Workload(first, 74, halts=False), 3)   # fewer records than the old tail
        flushed(first)
        want = dump(first)
        name = first.name
        first.close()
        Engine.attach(name).unlink()
        same(want, dump(made.restore(d, name=name)))


# -- the writer: its lease, its ring, its disk ----------------------------------------------
def file_first(seq: int, fr: int) -> int:
    return 1 + ((seq - 1) // fr) * fr


def frames_whole(d: pathlib.Path, lo: int, hi: int, fr: int) -> str:
    """'' if the frames of seqs lo..hi are in the files, whole, in order;
    else where the first one is not."""
    cache: dict[int, bytes] = {}
    for seq in range(lo, hi + 1):
        first = file_first(seq, fr)
        if first not in cache:
            p = d / f"journal-{first:020d}.log"
            if not p.exists():
                return f"seq {seq}: {p.name} is missing"
            cache[first] = p.read_bytes()
        off = HDR + (seq - first) * FRAME
        fr_ = cache[first][off: off + FRAME]
        if len(fr_) < FRAME or not frame_valid(fr_):
            return f"seq {seq}: the frame at {off} of journal-{first:020d}.log is not whole"
        if frame_seq(fr_) != seq:
            return f"seq {seq}: the frame at {off} has seq {frame_seq(fr_)}"
    return ""


def writer_info(eng: Engine) -> Any:
    """The durable area as a committer sees it (lease, writer pid, seqs)."""
    from engine._native import ffi, lib
    out = ffi.new("eng_durable_info *")
    rc = lib.eng_durable_info_of(eng._seg, out)
    assert rc == 0, rc
    return out


def durable_fault(eng: Engine, flags: int) -> None:
    from engine._native import lib
    rc = lib.eng_durable_fault(eng._seg, flags)
    assert rc == 0, rc


def flusher(handle: Any, d: str, seed: int, rounds: int, fr: int, go: Any, q: Any) -> None:
    """Commit, flush, and check each flush against the files, ``rounds`` times."""
    try:
        eng = Engine.attach(handle)
        w = Workload(eng, seed, halts=False)
        go.wait(60)
        problems, last = [], 0
        for _ in range(rounds):
            for _ in range(5):
                w.step()
            before = eng.journal_seq
            got = int(eng.flush(timeout=FLUSH_TIMEOUT))
            if got < before:
                problems.append(f"flush() = {got} below the seq {before} committed before it")
            if got < last:
                problems.append(f"flush() went back: {last} then {got}")
            where = frames_whole(pathlib.Path(d), last + 1, got, fr)
            if where:
                problems.append(f"flush() = {got} but {where}")
            last = max(last, got)
        eng.close()
        q.put(("done", problems))
    except Exception as e:
        q.put(("done", [f"{type(e).__name__}: {e}"]))


def lease_holder(name: str, d: str, kw: dict[str, Any], q: Any, cmd: Any) -> None:
    """Create the engine (its writer takes the lease first), then do what
    the parent asks: "commit N", "die-midwrite", "checkpoint-loop", "idle"."""
    eng = Engine.create(64, name=name, journal=d, journal_prices=True, **kw)
    acct = eng.open_account(10**6, 10**6, 64, 10**6)
    eng.flush(timeout=FLUSH_TIMEOUT)   # a record to write: this process takes the lease
    q.put(("ready", eng.handle, acct))
    while True:
        what = cmd.get()
        if what == "die-midwrite":
            durable_fault(eng, lib.ENG_DJ_FAULT_DIE_MIDWRITE)
            for _ in range(lib.ENG_DJ_BATCH * 2):
                eng.deposit(acct, 1)
            time.sleep(60)   # unreachable: the writer kills this process
        elif what == "die-in-checkpoint":
            for _ in range(100):
                eng.deposit(acct, 1)
            durable_fault(eng, lib.ENG_DJ_FAULT_DIE_IN_CKPT)
            eng.checkpoint()
            time.sleep(60)   # unreachable: the checkpoint kills this process
        elif what == "checkpoint-loop":
            while True:
                eng.checkpoint()
        elif what == "stop":
            eng.close()
            return
        else:
            q.put(("idle", None))


class TestLease:
    def test_two_processes_flushing_at_once(self, made: Made, spawner: Any) -> None:
        """Two processes flushing at once: each flush covers its commits, frames whole.

        Two processes committing and flushing at once: every flush covers what was committed before
        it, and those frames are whole in the files when it returns.
        """
        eng = made.create(capacity=64)
        q, go = spawner.ctx.Queue(), spawner.ctx.Event()
        d = made.jdir(eng)
        for seed in (81, 82):
            spawner.start(flusher, eng.handle, str(d), seed, 40,
                          FILE_RECORDS, go, q)
        go.set()
        out = [q.get(timeout=300) for _ in range(2)]
        assert all(not p for _, p in out), out
        flushed(eng)
        same(dump(eng), dump(made.restore(copy_dir(d, made.dir("copy")))))

    def test_the_lease_holder_killed_mid_write(self, made: Made, spawner: Any) -> None:
        """The lease holder killed mid-write is taken over; files whole, restore equal.

        The writer dies with half a batch written: another process takes over, the files end whole,
        and a restore equals the engine.
        """
        name, d = made.names(), made.dir()
        q, cmd = spawner.ctx.Queue(), spawner.ctx.Queue()
        child = spawner.start(lease_holder, name, str(d), {}, q, cmd)
        _, handle, acct = q.get(timeout=60)
        eng = Engine.attach(handle)
        made.engines.append(eng)
        assert writer_info(eng).writer_pid == child.pid
        lib.eng_test_faults(0)   # the switch is in the segment: this process must not honour it
        try:
            cmd.put("die-midwrite")
            child.join(60)
            assert child.exitcode == -9, child.exitcode
            for _ in range(50):
                eng.deposit(acct, 3)
            got = flushed(eng)
            durable_fault(eng, 0)
        finally:
            lib.eng_test_faults(1)
        assert writer_info(eng).writer_pid == os.getpid()
        assert frames_whole(d, 1, got, FILE_RECORDS) == ""
        same(dump(eng), dump(made.restore(copy_dir(d, made.dir("copy")))))

    def test_the_ring_full_behind_a_stopped_lease_holder(self, made: Made,
                                                         spawner: Any) -> None:
        """A full ring behind a stopped lease holder refuses commits typed, losing nothing.

        The lease holder stopped: commits past the ring are refused with a typed error and change
        nothing; after it runs again nothing is lost.
        """
        import signal
        name, d = made.names(), made.dir()
        q, cmd = spawner.ctx.Queue(), spawner.ctx.Queue()
        child = spawner.start(lease_holder, name, str(d), {"journal_records": 16}, q, cmd)
        _, handle, acct = q.get(timeout=60)
        eng = Engine.attach(handle)
        made.engines.append(eng)
        eng.flush(timeout=FLUSH_TIMEOUT)
        assert writer_info(eng).writer_pid == child.pid, "the child does not hold the lease"
        os.kill(child.pid, signal.SIGSTOP)
        try:
            # kill() returns before the stop: the holder's writer thread may write on
            # until its main thread takes the stop (on a loaded host, the whole loop below)
            assert wait_stopped(child.pid, 60), "the lease holder never stopped"
            refused = None
            for _ in range(40):
                cash = eng.account(acct).cash
                seq = eng.journal_seq
                try:
                    eng.deposit(acct, 1)
                except EngineError as e:
                    refused = e
                    assert eng.account(acct).cash == cash, "a refused deposit changed the books"
                    assert eng.journal_seq == seq, "a refused deposit was journaled"
                    break
            assert refused is not None, "40 commits into a ring of 16 behind a stopped writer"
        finally:
            os.kill(child.pid, signal.SIGCONT)
        # a commit waits only ENG_DJ_ROOM_WAIT_NS for room: on a loaded host the continued
        # holder may run later than that, so wait for it to write the whole ring first
        flushed(eng)
        for _ in range(20):
            eng.deposit(acct, 2)
        got = flushed(eng)
        assert frames_whole(d, 1, got, FILE_RECORDS) == ""
        same(dump(eng), dump(made.restore(copy_dir(d, made.dir("copy")))))
        cmd.put("stop")

    def test_the_lease_holder_killed_in_its_checkpoint(self, made: Made,
                                                       spawner: Any) -> None:
        """The lease holder killed inside its checkpoint is taken over; restore equal.

        The lease holder dies in a checkpoint (its .tmp whole, the lock held, not renamed): another
        process writes the next checkpoint and the journal; the restore equals.
        """
        name, d = made.names(), made.dir()
        q, cmd = spawner.ctx.Queue(), spawner.ctx.Queue()
        child = spawner.start(lease_holder, name, str(d), {}, q, cmd)
        _, handle, acct = q.get(timeout=60)
        eng = Engine.attach(handle)
        made.engines.append(eng)
        assert writer_info(eng).writer_pid == child.pid
        lib.eng_test_faults(0)   # the switch is in the segment: this process must not honour it
        try:
            cmd.put("die-in-checkpoint")
            child.join(60)
            assert child.exitcode == -9, child.exitcode
            durable_fault(eng, 0)
        finally:
            lib.eng_test_faults(1)
        for _ in range(30):
            eng.deposit(acct, 2)
        start = eng.checkpoint()
        assert start >= 101
        got = flushed(eng)
        assert frames_whole(d, 1, got, FILE_RECORDS) == ""
        assert all(checkpoint_whole(c) for c in checkpoint_files(d))
        restored = made.restore(copy_dir(d, made.dir("copy")))
        assert restored.restore_report.checkpoint is not None
        same(dump(eng), dump(restored))

    def test_kills_during_checkpoints(self, made: Made, spawner: Any) -> None:
        """Checkpointers SIGKILLed at random leave whole checkpoints; restore equal.

        Checkpointing processes SIGKILLed at random: checkpoints stay whole or absent, the next one
        is written, and a restore equals the engine.
        """
        import random
        import signal
        eng = made.create(capacity=64)
        w = Workload(eng, 91)
        rng = random.Random(91)
        run(w, 100)
        for _ in range(6):
            p = spawner.start(checkpointer, eng.handle)
            for _ in range(rng.randrange(20, 80)):
                w.step()
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            eng.recover()
        eng.checkpoint()
        flushed(eng)
        d = made.jdir(eng)
        bad = [c.name for c in checkpoint_files(d) if not checkpoint_whole(c)]
        assert not bad, f"checkpoint files not whole: {bad}"
        got = made.restore(copy_dir(d, made.dir("copy")))
        same(dump(eng), dump(got))
        check_stale(got, w.released)


def checkpointer(handle: Any) -> None:
    eng = Engine.attach(handle)
    while True:
        eng.checkpoint()


@contextlib.contextmanager
def small_tmpfs(path: pathlib.Path, size: int) -> Iterator[pathlib.Path]:
    """A tmpfs of ``size`` bytes mounted at ``path`` (root only; skips otherwise)."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def commits_until_refused(eng: Engine, most: int) -> EngineError | None:
    """Price writes (one record each) until one is refused; check the
    refusal changed nothing (the price, the journal seq)."""
    pid = eng.open_position(100.0, 1.0)
    for i in range(most):
        px = 100.0 + (i % 1000) / 100
        before, seq = eng.price(pid).price, eng.journal_seq
        try:
            eng.update_price(pid, px)
        except EngineError as e:
            assert eng.price(pid).price == before, "a refused price write changed the price"
            assert eng.journal_seq == seq, "a refused price write was journaled"
            return e
    return None


def files_hold(d: pathlib.Path) -> int:
    """The last seq of the whole frames in the files, in order."""
    recs = valid_records(d)
    return recs[-1][2] if recs else 0


class TestDiskFull:
    def test_a_full_disk_refuses_commits_it_cannot_journal(self, made: Made,
                                                           tmp_path: pathlib.Path) -> None:
        """A full disk refuses commits; every commit that returned is in the files.

        On a full disk a commit is refused with a typed error; every commit that returned is in the
        files (fail-stop: nothing committed that cannot be journaled).
        """
        file_bytes = HDR + FILE_RECORDS * FRAME
        with small_tmpfs(tmp_path / "mnt", 4096 * ((2 * file_bytes + file_bytes // 2) // 4096)
                         ) as mnt:
            eng = made.create(journal=mnt / "j")
            refused = commits_until_refused(eng, 4 * FILE_RECORDS)
            assert refused is not None, "the disk never filled"
            with contextlib.suppress(EngineError):
                eng.flush(timeout=2.0)
            top = files_hold(mnt / "j")
            assert top >= eng.journal_seq, (
                f"commits up to seq {eng.journal_seq} returned, the files hold up to {top}: "
                f"{eng.journal_seq - top} committed changes cannot be restored ({refused})")
            copy = copy_dir(mnt / "j", made.dir("copy"))
            same(dump(eng), dump(made.restore(copy)))

    def test_a_full_disk_by_the_fault_switch(self, made: Made) -> None:
        """The ENOSPC switch refuses commits; nothing committed past the files.

        The writer's ENOSPC switch: commits refused with a typed error, nothing committed past the
        files; space back, commits go on and a restore equals the engine.
        """
        eng = made.create()
        eng.flush(timeout=FLUSH_TIMEOUT)
        durable_fault(eng, lib.ENG_DJ_FAULT_NOSPACE)
        refused = commits_until_refused(eng, 2 * FILE_RECORDS)
        assert refused is not None, "ENOSPC never refused a commit"
        with contextlib.suppress(EngineError):   # the writer writes what has its place
            eng.flush(timeout=2.0)
        top = files_hold(made.jdir(eng))
        assert top >= eng.journal_seq, (
            f"commits up to seq {eng.journal_seq} returned, the files hold up to {top}: "
            f"{eng.journal_seq - top} committed changes cannot be restored ({refused})")
        durable_fault(eng, 0)
        deadline = time.monotonic() + 10
        pid = int(eng.snapshot()[0]["id"])
        while True:
            try:
                eng.update_price(pid, 123.0)
                break
            except EngineError:
                assert time.monotonic() < deadline, "commits never resumed after ENOSPC ended"
                time.sleep(0.05)
        flushed(eng)
        same(dump(eng), dump(made.restore(copy_dir(made.jdir(eng), made.dir("copy")))))


# -- SIGKILL storms -------------------------------------------------------------------------
def storm_worker(handle: Any, seed: int, out: str, ready: Any, checkpoints: bool) -> None:
    """The workload, with flushes and checkpoints, until killed; released ids to ``out``."""
    eng = Engine.attach(handle)
    w = Workload(eng, seed)
    ready.set()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    seen = 0
    while True:
        w.step()
        if len(w.released) > seen:
            os.write(fd, "".join(f"{i}\n" for i in w.released).encode())
            seen = len(w.released)
        if w.rng.random() < 0.02:
            with contextlib.suppress(EngineError):
                eng.flush(timeout=FLUSH_TIMEOUT)
        if checkpoints and w.rng.random() < 0.003:
            with contextlib.suppress(BusyError):   # allowed: another live checkpoint runs
                eng.checkpoint()
        if w.rng.random() < 0.01:
            eng.recover()


def storm(made: Made, spawner: Any, rounds: int, workers: int, seed: int,
          checkpoints: bool = True) -> None:
    import random
    import signal
    rng = random.Random(seed)
    eng = made.create(capacity=48, max_accounts=16,
                      checkpoint_records=500 if checkpoints else 0, checkpoint_s=0)
    w = Workload(eng, seed)
    run(w, 50)
    out = made.tmp / f"released-{seed}"
    for r in range(rounds):
        procs = []
        for k in range(workers):
            ready = spawner.ctx.Event()
            procs.append((spawner.start(storm_worker, eng.handle, seed * 1000 + r * 10 + k,
                                        str(out), ready, checkpoints), ready))
        for _, ready in procs:
            assert ready.wait(60)
        for p, _ in procs:
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            assert p.exitcode == -signal.SIGKILL, p.exitcode
        eng.recover()
        run(w, 5)
    eng.recover()
    flushed(eng)
    want = dump(eng)
    books_invariant(eng)
    released = set(w.released)
    if out.exists():
        released |= {int(x) for x in out.read_text().split()}
    name, d = eng.name, made.jdir(eng)
    eng.close()
    Engine.attach(name).unlink()
    got = made.restore(d, name=name)
    same(want, dump(got))
    check_lookups(got, want, w.acct_keys)
    books_invariant(got)
    check_stale(got, released)


class TestKillStorm:
    def test_sigkill_storm_then_restore_equals(self, made: Made, spawner: Any) -> None:
        """A SIGKILL storm, recover, flush, unlink, restore: equal, books balanced.

        Workers killed at random (keys, accounts, releases, halts, flushes, checkpoints), recover,
        flush, unlink, restore: equal to the lost engine, books balanced.
        """
        storm(made, spawner, rounds=4, workers=3, seed=101)

    def test_sigkill_storm_without_checkpoints(self, made: Made, spawner: Any) -> None:
        """The same with no checkpoint: the restore replays the whole journal."""
        storm(made, spawner, rounds=4, workers=3, seed=103, checkpoints=False)

    @pytest.mark.slow
    @pytest.mark.parametrize("checkpoints", [True, False])
    def test_sigkill_storm_long(self, made: Made, spawner: Any, checkpoints: bool) -> None:
        """The same, 40 rounds of 4 workers, with checkpoints and without."""
        storm(made, spawner, rounds=40, workers=4, seed=102, checkpoints=checkpoints)


def crasher(name: str, d: str, conn: Any) -> None:
    """Create a durable engine, commit, report the state, then SIGKILL itself
    before anything is flushed or closed."""
    import signal
    eng = Engine.create(64, name=name, journal=d, journal_prices=True, journal_sync_ms=10_000)
    w = Workload(eng, 111, halts=False)
    run(w, 300)
    fill(eng, 3000)
    conn.send((dump(eng), eng.journal_seq, int(eng.durable_seq)))   # a pipe: sent when it returns
    os.kill(os.getpid(), signal.SIGKILL)


class TestCrashOfEveryProcess:
    @pytest.mark.parametrize("how", ["attach-flush", "attach-unlink-close", "rm"])
    def test_nothing_committed_is_lost(self, made: Made, spawner: Any, how: str,
                                       child_env: dict[str, str]) -> None:
        """A crash of every process before a flush loses nothing committed.

        Every process killed before a flush: attach and flush, or unlink, or `rm`, then restore:
        every committed change comes back.
        """
        import subprocess
        name, d = made.names(), made.dir()
        mine, theirs = spawner.ctx.Pipe()
        p = spawner.start(crasher, name, str(d), theirs)
        assert mine.poll(120), "the crasher never reported"
        want, seq, durable = mine.recv()
        p.join(30)
        assert p.exitcode == -9
        if how == "attach-flush":
            with Engine.attach(name) as eng:
                assert int(eng.flush(timeout=FLUSH_TIMEOUT)) >= seq
                eng.unlink()
        elif how == "attach-unlink-close":
            eng = Engine.attach(name)
            eng.unlink()
            eng.close()
        else:
            r = subprocess.run([sys.executable, "-m", "engine", "rm", name], env=child_env,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        assert not segment_exists(name)
        top = files_hold(d)
        assert top >= seq, (f"{seq} records committed ({durable} durable at the kill), "
                            f"the files hold {top} after {how}")
        same(want, dump(made.restore(d, name=name)))


class TestPruning:
    def test_a_corrupt_newest_checkpoint_after_pruning(self, made: Made) -> None:
        """A corrupt newest checkpoint after pruning falls back or is named.

        Checkpoints across several files (old files pruned), the newest one corrupt: the restore
        falls back to the one before (its files kept) or names the bad one.
        """
        eng = made.create()
        w = Workload(eng, 121)
        for _ in range(4):
            run(w, 60)
            fill(eng, FILE_RECORDS // 2 + 10)
            eng.checkpoint()
        run(w, 60)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        ckpts = checkpoint_files(d)
        assert len(ckpts) >= 2, [c.name for c in ckpts]
        assert first_seq(journal_files(d)[0]) > 1, "no journal file was pruned"
        newest = ckpts[-1]
        data = bytearray(newest.read_bytes())
        data[HDR + FRAME + 20] ^= 0x04
        newest.write_bytes(bytes(data))
        try:
            got = made.restore(d)
        except EngineError as e:
            assert newest.name in str(e), e
            return
        assert got.restore_report.checkpoint is not None
        assert newest.name not in got.restore_report.checkpoint
        same(dump(eng), dump(got))

    def test_every_checkpoint_corrupt_after_pruning_is_refused(self, made: Made) -> None:
        """Every checkpoint corrupt after pruning: the restore is refused.

        Every checkpoint corrupt and the journal's first files pruned: refused, never a restore from
        the files that are left (records missing).
        """
        eng = made.create()
        w = Workload(eng, 122)
        for _ in range(4):
            run(w, 30)
            fill(eng, FILE_RECORDS // 2 + 10)
            eng.checkpoint()
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        assert first_seq(journal_files(d)[0]) > 1, "no journal file was pruned"
        for c in checkpoint_files(d):
            data = bytearray(c.read_bytes())
            data[HDR + 30] ^= 0x01
            c.write_bytes(bytes(data))
        name = made.names()
        with pytest.raises(EngineError):
            made.restore(d, name=name)
        assert not segment_exists(name)


def committer(handle: Any, seed: int, go: Any, stop: Any) -> None:
    """The workload and fast price writes until ``stop``."""
    eng = Engine.attach(handle)
    w = Workload(eng, seed, halts=False)
    go.set()
    while not stop.is_set():
        run(w, 20)
        fill(eng, 2000)
    eng.close()


class TestLiveDirectory:
    def test_restore_of_a_directory_being_written_is_refused(self, made: Made,
                                                              spawner: Any) -> None:
        """A restore of a directory a live engine writes is refused, typed; the engine goes on.

        Read mid-write, a live directory can show a frame written after one not yet written
        (false corruption) or a file pruned under the reader, and a restored engine would
        write into the same files: the restore names the live engine and changes nothing.
        """
        eng = made.create(capacity=256, journal_sync_ms=1)
        go, stop = spawner.ctx.Event(), spawner.ctx.Event()
        spawner.start(committer, eng.handle, 131, go, stop)
        assert go.wait(60)
        try:
            for _ in range(5):
                with pytest.raises(SegmentError, match=eng.name):
                    Engine.restore(str(made.jdir(eng)), name=f"{eng.name}_x")
            with pytest.raises(SegmentNotFoundError):   # refused before it made anything
                Engine.attach(f"{eng.name}_x")
            seq = eng.journal_seq
            assert eng.flush() >= seq   # the live engine's writer goes on
        finally:
            stop.set()
        spawner.join_all(60)
        eng.close()   # written and fdatasynced: the directory is at rest
        got = made.restore(copy_dir(made.jdir(eng), made.dir("copy")))   # a copy restores
        books_invariant(got)


def engine_cli(env: dict[str, str], *args: str) -> Any:
    import subprocess
    return subprocess.run([sys.executable, "-m", "engine", *args], env=env,
                          capture_output=True, text=True, timeout=120)


class TestCommandLine:
    def test_journal_json_prints_every_record_once_in_order(self, made: Made,
                                                            child_env: dict[str, str]) -> None:
        """`journal DIR --json`: one JSON object a line, seqs 1..journal_seq, each once."""
        import json
        eng = made.create()
        run(Workload(eng, 141), 200)
        flushed(eng)
        r = engine_cli(child_env, "journal", str(made.jdir(eng)), "--json")
        assert r.returncode == 0, r.stderr
        seqs = [json.loads(line)["seq"] for line in r.stdout.splitlines()]
        assert seqs == list(range(1, eng.journal_seq + 1)), (seqs[:5], seqs[-5:])

    def test_journal_stops_at_corruption_naming_it(self, made: Made,
                                                   child_env: dict[str, str]) -> None:
        """`journal DIR` over mid-file corruption fails, naming the place, printing no more.

        `journal DIR` over a flipped byte mid-file: an error naming file and offset, a failing exit
        code, and no record printed from the bad one on.
        """
        import json
        eng, d = frozen(made, 142)
        bad = eng.journal_seq // 2
        p, off = locate(d, bad)
        data = bytearray(p.read_bytes())
        data[off + 8 + 64] ^= 0x20
        p.write_bytes(bytes(data))
        r = engine_cli(child_env, "journal", str(d), "--json")
        seqs = [json.loads(line)["seq"] for line in r.stdout.splitlines() if line.strip()]
        assert r.returncode != 0, f"exit 0 over corruption; stderr: {r.stderr[-300:]}"
        assert not seqs or max(seqs) < bad, f"printed seqs past the corrupt {bad}: {max(seqs)}"
        assert names_place(r.stderr, p, off, off + 8 + 64), r.stderr[-300:]

    def test_restore_over_an_existing_name_fails_cleanly(self, made: Made,
                                                         child_env: dict[str, str]) -> None:
        """`restore DIR --name EXISTING`: a failing exit code, a message, the engine unchanged."""
        eng, d = frozen(made, 143)
        want = dump(eng)
        r = engine_cli(child_env, "restore", str(d), "--name", eng.name)
        assert r.returncode != 0
        assert eng.name in r.stderr and "Traceback" not in r.stderr, r.stderr[-300:]
        same(want, dump(eng))


class TestFileBoundary:
    def test_a_power_cut_at_a_file_boundary(self, made: Made) -> None:
        """A power cut with the durable seq at a file's end restores the engine at it."""
        eng = made.create()
        run(Workload(eng, 151, halts=False), 40)
        fill(eng, FILE_RECORDS - eng.journal_seq)
        assert eng.journal_seq == FILE_RECORDS
        d0 = flushed(eng)
        want = dump(eng)
        acct = eng.open_account(10**6, 10**6, 10, 10**6)
        for _ in range(10):
            eng.deposit(acct, 1)
        flushed(eng)
        src = made.jdir(eng)
        assert len(journal_files(src)) == 2
        for drop in (False, True):
            cut = power_cut(src, made.dir("cut"), d0, drop_files=drop)
            tmp = cut / f"journal-{FILE_RECORDS + 1:020d}.log.tmp"
            tmp.write_bytes(b"\0" * 4096)   # a reservation killed before its rename
            os.chmod(tmp, 0o600)
            got = made.restore(cut)
            assert got.restore_report.last_seq == d0
            same(want, dump(got))


class TestBadDirectories:
    def test_a_bad_meta_json_is_a_typed_error(self, made: Made) -> None:
        """meta.json missing, cut short or of another format: a typed error, no segment."""
        _, d = frozen(made, 161)
        meta = (d / "meta.json").read_bytes()
        for bad in (None, meta[: len(meta) // 2], meta.replace(b'"format": 1', b'"format": 99')):
            if bad is None:
                (d / "meta.json").unlink()
            else:
                (d / "meta.json").write_bytes(bad)
            name = made.names()
            with pytest.raises(EngineError):
                made.restore(d, name=name)
            assert not segment_exists(name)

    def test_no_directory_or_a_file_is_a_typed_error(self, made: Made,
                                                     tmp_path: pathlib.Path) -> None:
        """Restore of a missing directory or of a plain file: a typed error, no segment."""
        f = tmp_path / "plain"
        f.write_bytes(b"x")
        for d in (tmp_path / "absent", f):
            name = made.names()
            with pytest.raises(EngineError):
                made.restore(d, name=name)
            assert not segment_exists(name)

    def test_a_journal_path_too_long_leaves_nothing(self, made: Made,
                                                    tmp_path: pathlib.Path) -> None:
        """create(journal=) with a path past ENG_DJ_PATH_MAX: a typed error, no segment left."""
        long = tmp_path / ("x" * 200) / ("y" * 200) / ("z" * 200) / ("w" * 200) / ("v" * 250)
        assert len(str(long)) >= lib.ENG_DJ_PATH_MAX
        name = made.names()
        with pytest.raises(EngineError):
            Engine.create(16, name=name, journal=str(long))
        assert not segment_exists(name)


class TestRefusedKinds:
    def test_every_kind_of_change_is_refused_whole(self, made: Made) -> None:
        """Once the writer failed, each kind of change is refused typed and changes nothing."""
        from engine import Outcome, Trigger
        eng = made.create()
        a = eng.open_account(10**6, 10**6, 10, 10**6, key="a")
        p = eng.open_position(100.0, 1.0, account=a)
        for trig in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED):
            kw = {"exit_reason": 1} if trig is Trigger.EXIT_CONDITION_MET else {}
            assert eng.transition(p, trig, **kw) is Outcome.APPLIED
        q = eng.open_position(100.0, 1.0)
        eng.flush(timeout=FLUSH_TIMEOUT)
        durable_fault(eng, lib.ENG_DJ_FAULT_NOSPACE)
        assert commits_until_refused(eng, 2 * FILE_RECORDS) is not None
        before, seq = dump(eng), eng.journal_seq
        changes = {
            "open with an account": lambda: eng.open_position(100.0, 1.0, account=a),
            "open with a key": lambda: eng.open_position(100.0, 1.0, key="new"),
            "close with a booking": lambda: eng.transition(p, Trigger.EXIT_COMPLETED,
                                                           exit_price=101.0),
            "transition": lambda: eng.transition(q, Trigger.POSITION_OPENED),
            "bind_key": lambda: eng.bind_key(q, "bound"),
            "deposit": lambda: eng.deposit(a, 5),
            "withdraw": lambda: eng.withdraw(a, 5),
            "halt_account": lambda: eng.halt_account(a),
            "update_account": lambda: eng.update_account(a, lambda x: {"max_positions": 9}),
            "open_account": lambda: eng.open_account(10, 10, 1, 10),
            "update_price": lambda: eng.update_price(q, 101.0),
        }
        applied = []
        for what, change in changes.items():
            try:
                out = change()
            except EngineError:
                pass
            else:
                if not isinstance(out, Outcome) or out is Outcome.APPLIED:
                    applied.append(what)   # an Outcome other than APPLIED is a refusal
            now = dump(eng)
            assert now == before, f"{what} refused but changed:\n" + diff(before, now)
        assert not applied, f"applied while the writer cannot write: {applied}"
        assert eng.journal_seq == seq


class TestBadInput:
    @pytest.mark.parametrize("timeout", [float("nan"), -1.0, True, "1", None])
    def test_flush_refuses_a_bad_timeout_typed(self, made: Made, timeout: Any) -> None:
        """flush(timeout=) not a number >= 0 (NaN too) raises an EngineError, nothing else."""
        eng = made.create()
        with pytest.raises(EngineError):
            eng.flush(timeout=timeout)

    @pytest.mark.parametrize("directory", [123, None, b"/tmp"])
    def test_restore_refuses_a_bad_directory_typed(self, made: Made, directory: Any) -> None:
        """Engine.restore(dir) of the wrong type raises an EngineError, nothing else."""
        with pytest.raises(EngineError):
            Engine.restore(directory)

    def test_restore_refuses_a_bad_name_typed(self, made: Made) -> None:
        """Engine.restore(dir, name=) not a valid name raises an EngineError, no segment."""
        _, d = frozen(made, 171, steps=20)
        for name in (5, "", "a/b", "x" * 300):
            with pytest.raises(EngineError):
                Engine.restore(str(d), name=name)  # type: ignore[arg-type]
