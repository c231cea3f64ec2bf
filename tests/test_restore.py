"""Engine.restore: a journal directory back into a segment (issue 22, restore side).

The directories are written in the exact on-disk format by the test writer
(tests/restore_helpers.py over engine.durable.format): the ring of a live
engine as journal files, and a checkpoint read from its segment.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from restore_helpers import (
    checkpoint_records,
    ring_records,
    state_of,
    whole_commits,
    write_directory,
    write_journal,
)

from engine import Engine, Outcome, RestoreError, SegmentError, StaleIdError, Trigger
from engine._native import lib
from engine.durable import format as fmt
from engine.errors import StaleAccountError

T = Trigger


def _create(name: str, **kw: Any) -> Engine:
    opts: dict[str, Any] = {"journal": True, "journal_records": 4096, "journal_prices": True,
                            "keys_per_position": 3, "max_accounts": 8}
    opts.update(kw)
    return Engine.create(64, name=name, **opts)


def workload(eng: Engine, rng: random.Random, n: int = 40, tag: str = "") -> dict[str, Any]:
    """Opens (some keyed by bind_key, some booked on accounts), transitions,
    booked closes at an exit price, releases, prices, account changes,
    halts; returns the ids it released and closed."""
    a = eng.open_account(100_000, 100_000, 50, 50_000, key=f"desk-a{tag}")
    b = eng.open_account(5_000, 5_000, 5, 1_000, key=f"desk-b{tag}".encode())
    gone_acct = eng.open_account(10, 10, 1, 10)
    eng.close_account(gone_acct)
    ids, released = [], []
    for i in range(n):
        acct = {"account": a if i % 3 == 0 else b} if i % 5 == 0 else {}
        p = eng.open_position(50.0 + i, 1.0 + (i % 4), side=1 if i % 2 else -1,
                              token=i % 7, **acct)
        ids.append(p)
        if i % 4 == 0:
            eng.bind_key(p, f"order-{i}{tag}")
            if i % 8 == 0:
                eng.bind_key(p, f"alt-{i}{tag}".encode())
    for i, p in enumerate(ids):
        if i % 2 == 0:
            assert eng.transition(p, T.POSITION_OPENED) is Outcome.APPLIED
        if i % 3 == 0:
            eng.update_price(p, 40.0 + rng.random() * 30)
    for i, p in enumerate(ids):
        if i % 2 == 0 and i % 10 in (0, 4):
            for trig in (T.EXIT_CONDITION_MET, T.EXIT_STARTED):
                assert eng.transition(p, trig) is Outcome.APPLIED
            kw = {"exit_price": 61.25} if i % 20 == 0 else {}
            assert eng.transition(p, T.EXIT_COMPLETED, **kw) is Outcome.APPLIED
            if i % 20 == 4:
                assert eng.release_position(p) is Outcome.APPLIED
                released.append(p)
    eng.deposit(a, 123)
    eng.withdraw(b, 7)
    eng.halt_account(b, True)
    eng.halt(True)
    eng.halt(False)
    eng.halt(True)
    # a slot opened again after a release: the old id stays stale, the new one lives
    again = eng.open_position(77.0, 2.0, side=1, token=3)
    eng.bind_key(again, f"again{tag}")
    return {"ids": ids, "released": released, "accounts": (a, b), "gone_acct": gone_acct,
            "again": again}


def _gone(eng: Engine) -> str:
    name = eng.name
    eng.unlink()
    eng.close()
    return name


class TestRestoreEqual:
    def test_everything_equal_after_restore(self, names: Any, tmp_path: Path) -> None:
        """positions, ids, states, records, keys, prices, accounts, halt: all equal."""
        eng = _create(names())
        info = workload(eng, random.Random(1))
        before, seq = state_of(eng), eng.journal_seq
        write_directory(tmp_path, eng)
        name = _gone(eng)
        r = Engine.restore(tmp_path)
        try:
            assert r.name == name
            assert state_of(r) == before
            assert r.restore_report.last_seq == seq and r.restore_report.tail_cut is None
            for p in info["released"]:
                with pytest.raises(StaleIdError):
                    r.state(p)
            a, b = info["accounts"]
            assert r.lookup_account("desk-a") == a and r.lookup_account(b"desk-b") == b
            with pytest.raises(StaleAccountError):
                r.account(info["gone_acct"])
            assert r.lookup("order-12") == info["ids"][12] and r.lookup("again") == info["again"]
            assert r.lookup(b"alt-8") == info["ids"][8]
        finally:
            r.unlink()
            r.close()

    def test_checkpoint_then_tail_equal(self, names: Any, tmp_path: Path) -> None:
        """a checkpoint mid-workload plus the records after it: the same engine."""
        eng = _create(names())
        workload(eng, random.Random(2), n=20)
        ckpt = checkpoint_records(eng)
        eng.halt(False)
        workload(eng, random.Random(3), n=10, tag="-2")
        before = state_of(eng)
        tail = ring_records(eng, after=ckpt[0])
        os.makedirs(tmp_path, exist_ok=True)
        fmt.write_meta(tmp_path, eng)
        fmt.write_checkpoint(tmp_path, ckpt[0], ckpt[1])
        write_journal(tmp_path, tail, per_file=7)
        _gone(eng)
        r = Engine.restore(tmp_path)
        try:
            assert state_of(r) == before
            rep = r.restore_report
            assert rep.checkpoint == fmt.checkpoint_name(ckpt[0])
            assert rep.records_replayed == len(tail)
        finally:
            r.unlink()
            r.close()

    def test_journal_continues_at_the_next_seq(self, names: Any, tmp_path: Path) -> None:
        """the first record after restore has seq last + 1; events() reads the tail."""
        eng = _create(names())
        p = eng.open_position(10.0, 1.0)
        eng.transition(p, T.POSITION_OPENED)
        last = eng.journal_seq
        write_directory(tmp_path, eng)
        _gone(eng)
        r = Engine.restore(tmp_path)
        try:
            assert r.journal_seq == last
            got = [ev.seq for ev in r.events(since=0, timeout=0)]
            assert got == list(range(1, last + 1))
            r.transition(p, T.EXIT_CONDITION_MET)
            ev = next(iter(r.events(since=last, timeout=1.0)))
            assert ev.seq == last + 1 and ev.id == p
        finally:
            r.unlink()
            r.close()

    def test_restore_under_another_name(self, names: Any, tmp_path: Path) -> None:
        """name= restores under that name; the directory's name is left alone."""
        eng = _create(names())
        eng.open_position(10.0, 1.0)
        write_directory(tmp_path, eng)
        before = state_of(eng)
        other = names()
        r = Engine.restore(tmp_path, name=other)
        try:
            assert r.name == other and state_of(r) == before
        finally:
            r.unlink()
            r.close()
            eng.unlink()
            eng.close()


class TestRestoreRefused:
    def test_existing_name_refused_and_unchanged(self, names: Any, tmp_path: Path) -> None:
        """restore over an existing name raises; the engine and the directory are unchanged."""
        eng = _create(names())
        workload(eng, random.Random(4), n=10)
        write_directory(tmp_path, eng)
        p = eng.open_position(99.0, 1.0)   # after the directory: the live engine differs
        before = state_of(eng)
        files = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
        try:
            with pytest.raises(SegmentError, match="already exists"):
                Engine.restore(tmp_path)
            assert state_of(eng) == before and eng.state(p) is not None
            assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == files
        finally:
            eng.unlink()
            eng.close()

    def test_crafted_record_is_an_error_not_a_crash(self, names: Any, tmp_path: Path) -> None:
        """a crafted record (slot past capacity): RestoreError at its file/offset, no segment."""
        eng = _create(names())
        eng.open_position(10.0, 1.0)
        recs = ring_records(eng)
        recs["id"][0] = (1 << lib.ENG_ID_SLOT_BITS) | 10_000
        os.makedirs(tmp_path, exist_ok=True)
        fmt.write_meta(tmp_path, eng)
        path = write_journal(tmp_path, recs)[0]
        name = _gone(eng)
        with pytest.raises(RestoreError) as ei:
            Engine.restore(tmp_path)
        assert ei.value.path == str(path) and ei.value.offset == fmt.FILE_HDR
        assert not os.path.exists(f"/dev/shm/{name}")

    def test_missing_records_are_an_error(self, names: Any, tmp_path: Path) -> None:
        """a gap between journal files (one lost) stops the restore, naming the file."""
        eng = _create(names())
        for _ in range(6):
            eng.open_position(10.0, 1.0)
        os.makedirs(tmp_path, exist_ok=True)
        fmt.write_meta(tmp_path, eng)
        files = write_journal(tmp_path, ring_records(eng), per_file=2)
        files[1].unlink()
        _gone(eng)
        with pytest.raises(RestoreError, match="missing"):
            Engine.restore(tmp_path)

    def test_gap_before_the_checkpoint_is_not_needed(self, names: Any, tmp_path: Path) -> None:
        """a file missing before the checkpoint's start seq is not needed: restored, equal."""
        eng = _create(names())
        for _ in range(4):
            eng.open_position(10.0, 1.0)
        ckpt = checkpoint_records(eng)
        for _ in range(4):
            eng.open_position(11.0, 1.0)
        before = state_of(eng)
        os.makedirs(tmp_path, exist_ok=True)
        fmt.write_meta(tmp_path, eng)
        fmt.write_checkpoint(tmp_path, ckpt[0], ckpt[1])
        files = write_journal(tmp_path, ring_records(eng), per_file=2)
        files[1].unlink()   # seqs 3-4: covered by the checkpoint
        _gone(eng)
        r = Engine.restore(tmp_path)
        try:
            assert state_of(r) == before and r.restore_report.records_replayed == 4
        finally:
            r.unlink()
            r.close()

    def test_overlapping_files_are_an_error(self, names: Any, tmp_path: Path) -> None:
        """two files holding the same seqs stop the restore (never a record applied twice)."""
        eng = _create(names())
        for _ in range(4):
            eng.open_position(10.0, 1.0)
        recs = ring_records(eng)
        os.makedirs(tmp_path, exist_ok=True)
        fmt.write_meta(tmp_path, eng)
        write_journal(tmp_path, recs[:3])
        write_journal(tmp_path, recs[1:])
        _gone(eng)
        with pytest.raises(RestoreError, match="repeated"):
            Engine.restore(tmp_path)


def _frames_bytes(path: Path) -> tuple[bytes, int]:
    data = path.read_bytes()
    n = 0
    while True:
        off = fmt.FILE_HDR + n * fmt.FRAME_BYTES
        if off + 4 > len(data) or data[off:off + 4] == b"\0\0\0\0":
            return data, n
        n += 1


class TestTornAndCorrupt:
    @pytest.mark.parametrize("seed", range(6))
    def test_torn_tail_at_random_offset_is_cut(self, names: Any, tmp_path: Path,
                                               seed: int) -> None:
        """a file cut at a random byte: the whole commits before the cut, the cut reported."""
        rng = random.Random(seed)
        eng = _create(names())
        workload(eng, rng, n=12)
        recs = ring_records(eng)
        os.makedirs(tmp_path, exist_ok=True)
        fmt.write_meta(tmp_path, eng)
        path = write_journal(tmp_path, recs, spare_frames=0)[0]
        _gone(eng)
        data = path.read_bytes()
        cut = rng.randrange(fmt.FILE_HDR + fmt.FRAME_BYTES, len(data))
        if seed % 2:   # garbage after the cut instead of nothing
            data = data[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600)))
        else:
            data = data[:cut]
        path.write_bytes(data)
        whole = whole_commits(recs["riders"], (cut - fmt.FILE_HDR) // fmt.FRAME_BYTES)
        # what the first `whole` records alone restore to
        ref_dir = tmp_path / "ref"
        ref_dir.mkdir()
        (ref_dir / fmt.META_NAME).write_bytes((tmp_path / fmt.META_NAME).read_bytes())
        write_journal(ref_dir, recs[:whole])
        ref = Engine.restore(ref_dir, name=names())
        want = state_of(ref)
        ref.unlink()
        ref.close()
        r = Engine.restore(tmp_path)
        try:
            assert state_of(r) == want
            rep = r.restore_report
            assert rep.last_seq == whole
            at = fmt.FILE_HDR + whole * fmt.FRAME_BYTES
            assert rep.tail_cut == ((str(path), at) if len(data) > at else None)
        finally:
            r.unlink()
            r.close()

    def test_flipped_byte_mid_file_stops_with_file_and_offset(self, names: Any,
                                                              tmp_path: Path) -> None:
        """a flipped byte mid-file: RestoreError naming file and frame offset, no segment."""
        eng = _create(names())
        workload(eng, random.Random(5), n=10)
        os.makedirs(tmp_path, exist_ok=True)
        fmt.write_meta(tmp_path, eng)
        path = write_journal(tmp_path, ring_records(eng))[0]
        name = _gone(eng)
        data = bytearray(path.read_bytes())
        frame = 5
        data[fmt.FILE_HDR + frame * fmt.FRAME_BYTES + 8 + 40] ^= 0x10
        path.write_bytes(bytes(data))
        with pytest.raises(RestoreError) as ei:
            Engine.restore(tmp_path)
        assert ei.value.path == str(path)
        assert ei.value.offset == fmt.FILE_HDR + frame * fmt.FRAME_BYTES
        assert not os.path.exists(f"/dev/shm/{name}")

    def test_bad_newest_checkpoint_falls_back(self, names: Any, tmp_path: Path) -> None:
        """a checkpoint with a flipped byte is skipped (reported): the journal from seq 1."""
        eng = _create(names())
        workload(eng, random.Random(6), n=10)
        before = state_of(eng)
        write_directory(tmp_path, eng, checkpoint=True)
        ck = next(tmp_path.glob("checkpoint-*"))
        data = bytearray(ck.read_bytes())
        data[fmt.FILE_HDR + 8 + 3] ^= 1
        ck.write_bytes(bytes(data))
        _gone(eng)
        r = Engine.restore(tmp_path)
        try:
            assert state_of(r) == before
            assert r.restore_report.checkpoint is None
            assert r.restore_report.skipped_checkpoints == (ck.name,)
        finally:
            r.unlink()
            r.close()


class TestCli:
    def test_cli_restore_prints_the_report(self, names: Any, tmp_path: Path,
                                           child_env: dict[str, str]) -> None:
        """`restore DIR --name N` prints the report; again: refused, exit 1."""
        eng = _create(names())
        eng.open_position(10.0, 1.0)
        write_directory(tmp_path, eng)
        _gone(eng)
        n = names()
        cmd = [sys.executable, "-m", "engine", "restore", str(tmp_path), "--name", n]
        out = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"restored {n!r}" in out.stdout and "records replayed" in out.stdout
        again = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already exists" in again.stderr
        r = Engine.attach(n)
        assert len(r.snapshot()) == 1
        r.unlink()
        r.close()


def test_crc32c_known_value() -> None:
    """the frames' checksum is CRC-32C (the Castagnoli check value of "123456789")."""
    assert fmt.crc32c(b"123456789") == 0xE3069283
    assert np.dtype(fmt.FRAME_DTYPE).itemsize == lib.ENG_DJ_FRAME_BYTES


class TestBookedCloses:
    @pytest.mark.parametrize("with_ckpt", [False, True])
    def test_closes_after_the_accounts_last_record_are_booked(
            self, names: Any, tmp_path: Path, with_ckpt: bool) -> None:
        """booked closes after the account's last record (exit / journaled price): same books."""
        eng = _create(names())
        a = eng.open_account(100_000, 100_000, 50, 50_000, key="acct")
        ps = [eng.open_position(100.0 + i, 2.0, side=1 if i % 2 else -1, account=a)
              for i in range(6)]
        for p in ps:
            eng.transition(p, T.POSITION_OPENED)
        eng.deposit(a, 1000)   # the account's last record
        ckpt = checkpoint_records(eng) if with_ckpt else None
        for i, p in enumerate(ps[:4]):
            eng.update_price(p, 90.0 + 7 * i)
            for trig in (T.EXIT_CONDITION_MET, T.EXIT_STARTED):
                eng.transition(p, trig)
            kw = {"exit_price": 130.5} if i % 2 else {}
            assert eng.transition(p, T.EXIT_COMPLETED, **kw) is Outcome.APPLIED
        eng.release_position(ps[0])
        before = state_of(eng)
        assert before["accounts"][0] != state_of(eng)["accounts"][0] or True
        write_directory(tmp_path, eng, ckpt=ckpt)
        _gone(eng)
        r = Engine.restore(tmp_path)
        try:
            assert state_of(r) == before
            acct = r.account(a)
            assert acct.open_positions == 2
        finally:
            r.unlink()
            r.close()

    def test_a_close_at_an_unjournaled_price_restores_its_books_exactly(
            self, names: Any, tmp_path: Path) -> None:
        """Without journaled prices a booked close's account record gives the books exactly."""
        eng = _create(names(), journal_prices=False)
        a = eng.open_account(100_000, 100_000, 50, 50_000)
        p = eng.open_position(100.0, 2.0, side=1, account=a)
        for trig in (T.POSITION_OPENED, T.EXIT_CONDITION_MET, T.EXIT_STARTED):
            eng.transition(p, trig)
        eng.update_price(p, 110.0)
        eng.transition(p, T.EXIT_COMPLETED)
        lost = eng.account(a)
        assert lost.realized_pnl == 20
        write_directory(tmp_path, eng)
        _gone(eng)
        r = Engine.restore(tmp_path)
        try:
            assert r.account(a) == lost
        finally:
            r.unlink()
            r.close()


# ---- restore racing an attach -------------------------------------------------------
def _attacher(name: str, ready: Any, out: Any, deadline_s: float) -> None:
    """Attach to name over and over until it works; report every refusal's
    type and what the first successful attach saw."""
    try:
        refused: dict[str, int] = {}
        ready.set()
        stop = time.monotonic() + deadline_s
        while time.monotonic() < stop:
            try:
                eng = Engine.attach(name)
            except SegmentError as e:   # not there yet, not ready yet, or empty: clean
                key = f"{type(e).__name__}: {str(e)[:60]}"
                refused[key] = refused.get(key, 0) + 1
                continue
            with eng:
                seen = (len(eng.snapshot()), len(eng.accounts()), int(eng.seg.hdr.halted),
                        eng.journal_seq)
            out.put(("ok", seen, refused))
            return
        out.put(("timeout", None, refused))
    except BaseException:
        out.put(("error", traceback.format_exc(), None))


class TestRestoreRacingAttach:
    def test_attach_never_sees_half_a_restore(self, names: Any, tmp_path: Path,
                                              spawner: Any) -> None:
        """an attach racing a restore fails cleanly or sees all of it, never part."""
        name = names()
        eng = Engine.create(40_000, name=name, journal=True, journal_records=1 << 16,
                            max_accounts=4)
        acct = eng.open_account(10**9, 10**9, 30_000, 10**9)
        for i in range(20_000):
            eng.open_position(10.0 + i % 50, 1.0, token=i % 100,
                              **({"account": acct} if i % 2 else {}))
        eng.halt(True)
        want = (20_000, 1, 1, eng.journal_seq)
        write_directory(tmp_path, eng)
        _gone(eng)
        for _ in range(3):
            ready, out = spawner.ctx.Event(), spawner.ctx.Queue()
            spawner.start(_attacher, name, ready, out, 60.0)
            assert ready.wait(30), "the attacher never started"
            r = Engine.restore(tmp_path)
            try:
                status, seen, refused = out.get(timeout=90)
                assert status == "ok", (status, seen)
                assert seen == want, (seen, want, refused)
            finally:
                r.unlink()
                r.close()


# ---- SIGKILLed workers, recover(), restore ----------------------------------------------
def _booking_worker(name: str, acct: int, seed: int, ready: Any) -> None:
    """Open booked positions, move them, price them, close some at an exit
    price, release some, bind keys, deposit: until killed."""
    rng = random.Random(seed)
    with Engine.attach(name) as eng:
        ready.set()
        n = 0
        while True:
            n += 1
            try:
                p = eng.open_position(20.0 + rng.random() * 10, 1.0 + rng.random(),
                                      side=rng.choice((1, -1)), token=rng.randrange(9),
                                      account=acct)
            except Exception:   # the account's limits or capacity: close some first
                p = None
            if p is not None:
                eng.transition(p, T.POSITION_OPENED)
                eng.update_price(p, 15.0 + rng.random() * 20)
                if rng.random() < 0.3:
                    with contextlib.suppress(Exception):
                        eng.bind_key(p, f"w{seed}-{n}")
            for pos in eng.snapshot()["id"][:3] if rng.random() < 0.5 else ():
                pos = int(pos)
                for trig in (T.EXIT_CONDITION_MET, T.EXIT_STARTED):
                    eng.transition(pos, trig)
                kw = {"exit_price": 25.0 + rng.random()} if rng.random() < 0.5 else {}
                if eng.transition(pos, T.EXIT_COMPLETED, **kw) is Outcome.APPLIED and \
                        rng.random() < 0.5:
                    eng.release_position(pos)
            if rng.random() < 0.1:
                eng.deposit(acct, 1)


def _books_invariant(eng: Engine) -> None:
    """every open account reserves exactly its open booked positions' notionals."""
    snap = eng.snapshot()
    closed = int(eng.spec.closed_mask)
    for a in eng.accounts():
        mine = snap[(snap["account"] == a["id"]) & ((snap["state"] & closed) == 0)]
        notional = sum(int(lib.eng_money_of(float(r["entry_price"]), float(r["amount"])))
                       for r in mine)
        assert int(a["reserved"]) == notional and int(a["open_positions"]) == len(mine)


class TestRestoreAfterKills:
    def test_sigkilled_workers_recover_then_restore_equal(self, names: Any, tmp_path: Path,
                                                          spawner: Any) -> None:
        """SIGKILLed workers, recover(): the restore equals the lost engine; books hold."""
        from procs import sigkill
        name = names()
        eng = Engine.create(256, name=name, journal=True, journal_records=1 << 18,
                            journal_prices=True, keys_per_position=2, max_accounts=4)
        acct = eng.open_account(10**7, 10**7, 200, 10**7, key="book")
        rng = random.Random(7)
        for rnd in range(3):
            procs = []
            for w in range(3):
                ready = spawner.ctx.Event()
                procs.append(spawner.start(_booking_worker, name, acct, rnd * 10 + w, ready))
                assert ready.wait(60), "worker never attached"
            start = eng.journal_seq
            deadline = time.monotonic() + 30
            while eng.journal_seq < start + 200 + rng.randrange(400):
                assert time.monotonic() < deadline, "workers made no progress"
                time.sleep(0.002)
            for p in procs:
                sigkill(p)
            eng.recover()
        _books_invariant(eng)
        before = state_of(eng)
        write_directory(tmp_path, eng)
        _gone(eng)
        r = Engine.restore(tmp_path)
        try:
            assert state_of(r) == before
            _books_invariant(r)
        finally:
            r.unlink()
            r.close()


class TestCraftedFiles:
    def test_mutated_sealed_records_never_crash(self, names: Any, tmp_path: Path) -> None:
        """records with random fields (CRC resealed): restored or a typed error, no segment left."""
        from engine.errors import EngineError
        eng = _create(names())
        workload(eng, random.Random(8), n=16)
        recs = ring_records(eng)
        os.makedirs(tmp_path, exist_ok=True)
        fmt.write_meta(tmp_path, eng)
        _gone(eng)
        rng = random.Random(9)
        fields = ["kind", "id", "word", "trigger", "version", "w", "seq"]
        outcomes = {"ok": 0, "refused": 0}
        for _ in range(150):
            bad = recs.copy()
            for _ in range(rng.randrange(1, 4)):
                i, f = rng.randrange(len(bad)), rng.choice(fields)
                if f == "w":
                    bad["w"][i][rng.randrange(lib.ENG_MAX_FIELD_WORDS)] = rng.getrandbits(64)
                elif f in ("kind", "trigger"):
                    bad[f][i] = rng.choice((rng.getrandbits(32), rng.randrange(8)))
                else:
                    bad[f][i] = rng.choice((rng.getrandbits(64), rng.getrandbits(8),
                                            int(bad[f][i]) ^ (1 << rng.randrange(64))))
            for old in tmp_path.glob("journal-*"):
                old.unlink()
            write_journal(tmp_path, bad)
            n = names()
            try:
                r = Engine.restore(tmp_path, name=n)
            except EngineError:
                outcomes["refused"] += 1
                assert not os.path.exists(f"/dev/shm/{n}"), "a refused restore left a segment"
                continue
            outcomes["ok"] += 1
            r.snapshot()
            r.accounts()
            r.unlink()
            r.close()
        assert outcomes["refused"] > 0


def _restorer(directory: str, name: str) -> None:
    Engine.restore(directory, name=name).close()


class TestRestoreKilled:
    def test_restore_killed_midway_leaves_nothing_attachable(self, names: Any, tmp_path: Path,
                                                             spawner: Any) -> None:
        """a restore SIGKILLed mid-way: attach refuses the segment; rm, restore again: equal."""
        from procs import sigkill, until
        name = names()
        eng = Engine.create(60_000, name=name, journal=True, journal_records=1 << 16)
        for i in range(30_000):
            eng.open_position(10.0 + i % 50, 1.0, token=i % 100)
        before = state_of(eng)
        write_directory(tmp_path, eng)
        _gone(eng)
        shm_path = Path("/dev/shm") / name
        p = spawner.start(_restorer, str(tmp_path), name)
        until(lambda: shm_path.exists() or p.exitcode is not None, "the restore to create")
        sigkill(p, may_have_exited=True)
        try:
            r = Engine.attach(name)
        except SegmentError:   # killed before ready: never attachable, and refused again
            with pytest.raises(SegmentError, match="already exists"):
                Engine.restore(tmp_path)
            # as after a create killed mid-way: a segment not ready (or not yet
            # sized: not an engine segment) is removed by rm (--force)
            out = subprocess.run([sys.executable, "-m", "engine", "rm", "--force", name],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            r = Engine.restore(tmp_path)
        try:
            assert state_of(r) == before
        finally:
            r.unlink()
            r.close()
