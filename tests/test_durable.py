"""The journal written to files (issue 22, the writer side): the directory
and its modes, flush and durable_seq, the writer lease across processes,
fail-stop (ring full behind a stopped writer, disk full), power loss,
checkpoints, and ``python -m engine journal``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from journal_audit import wait_stopped

from engine import (
    ArgumentError,
    DurabilityError,
    Engine,
    JournalFullError,
    Outcome,
    SegmentNotFoundError,
    State,
    Trigger,
    WaitTimeout,
)
from engine._native import ffi, lib
from engine.durable import frames
from engine.journal import KINDS
from tests.procs import JOIN_TIMEOUT, READY_TIMEOUT, sigkill, until

FRAME, HDR = frames.FRAME, frames.HDR


@pytest.fixture
def durable(tmp_path: Any) -> Iterator[Callable[..., Engine]]:
    """Factory: a durable engine journaling into a fresh directory under
    tmp_path (``eng.jdir``); closed and unlinked at teardown."""
    made: list[Engine] = []

    def make(capacity: int = 64, **kwargs: Any) -> Engine:
        jdir = str(tmp_path / f"j{len(made)}")
        eng = Engine.create(capacity=capacity, journal=jdir, **kwargs)
        eng.jdir = jdir   # type: ignore[attr-defined]
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close()
        with contextlib.suppress(Exception):
            eng.unlink()


def file_records(jdir: str, since: int = 0) -> tuple[list[frames.Frame], frames.End]:
    end = frames.End()
    return list(frames.read(jdir, since, end)), end


def event_keys(eng: Engine, since: int = 0) -> list[tuple[int, int, int, int | None, int]]:
    return [(ev.seq, KINDS.index(ev.kind), ev.id,
             None if ev.trigger is None else int(ev.trigger), ev.ts_ns)
            for ev in eng.events(since=since, timeout=0)]


def frame_keys(fs: list[frames.Frame]) -> list[tuple[int, int, int, int | None, int]]:
    return [(f.seq, f.kind, f.id, f.trigger if f.kind == lib.ENG_JK_TRANSITION else None,
             f.ts_ns) for f in fs]


def workload(eng: Engine, n: int = 20) -> list[int]:
    """Opens, transitions, a key, a release, an account, a halt and back."""
    ids = [eng.open_position(100.0 + i, 1.0) for i in range(n)]
    for p in ids[: n // 2]:
        assert eng.transition(p, "POSITION_OPENED") is Outcome.APPLIED
    eng.bind_key(ids[-1], "k-last")
    close(eng, ids[0])
    eng.release_position(ids[0])
    eng.open_account(1000.0, 500.0, 10, 100.0, key="acct")
    eng.halt(True)
    eng.halt(False)
    return ids


def close(eng: Engine, pos: int) -> None:
    """Walk pos from MONITORING (or CREATED) to CLOSED."""
    trigs = ["EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"]
    if eng.state(pos) is State.CREATED:
        trigs.insert(0, "POSITION_OPENED")
    for trig in trigs:
        assert eng.transition(pos, trig) is Outcome.APPLIED


def durable_info(eng: Engine) -> Any:
    out = ffi.new("eng_durable_info *")
    assert lib.eng_durable_info_of(eng.seg, out) == 0
    return out


def hand_off_writer(eng: Engine) -> None:
    """This Engine stops writing and gives the lease back (another process takes it)."""
    w = eng._durable
    assert w is not None
    w.stop()
    w.release()


# -- children (spawned: module level) ----------------------------------------------------------
def child_writer(handle: Any, ready: Any, go: Any, fault: int) -> None:
    """Attach (its writer thread takes the free lease), set ``fault``, report, wait."""
    eng = Engine.attach(handle)
    deadline = time.monotonic() + READY_TIMEOUT
    while durable_info(eng).holder != 1:
        assert time.monotonic() < deadline, "the child never got the lease"
        time.sleep(0.001)
    if fault:
        assert lib.eng_durable_fault(eng.seg, fault) == 0
    ready.set()
    go.wait(READY_TIMEOUT)
    time.sleep(READY_TIMEOUT)   # killed or stopped by the test


def child_flusher(handle: Any, start: Any, out: Any, n: int) -> None:
    """Commit n opens, then flush; report (last seq committed, flushed seq)."""
    eng = Engine.attach(handle)
    start.wait(READY_TIMEOUT)
    for _ in range(n):
        eng.open_position(1.0, 1.0)
    last = eng.journal_seq
    out.put((last, eng.flush(timeout=30)))
    eng.close()


# -- tests ---------------------------------------------------------------------------------------
class TestDirectory:
    def test_dir_is_0700_and_every_file_0600(self, durable: Any) -> None:
        """The directory is made 0700 and meta.json, journal and checkpoint files are 0600."""
        eng = durable()
        workload(eng)
        eng.flush()
        eng.checkpoint()
        assert os.stat(eng.jdir).st_mode & 0o777 == 0o700
        names = os.listdir(eng.jdir)
        assert {"meta.json"} < set(names) and any(n.startswith("journal-") for n in names)
        assert any(n.startswith("checkpoint-") for n in names)
        for n in names:
            assert os.stat(os.path.join(eng.jdir, n)).st_mode & 0o777 == 0o600, n

    def test_meta_names_the_engine(self, durable: Any) -> None:
        """meta.json holds format, name, capacity, spec and every other create option."""
        eng = durable(capacity=48, keys_per_position=3)
        with open(os.path.join(eng.jdir, "meta.json")) as f:
            meta = json.load(f)
        assert meta["format"] == lib.ENG_DJ_FORMAT and meta["name"] == eng.name
        assert meta["capacity"] == 48 and meta["options"]["keys_per_position"] == 3
        assert {"spec", "spec_name"} <= set(meta)

    def test_a_dir_holding_another_engines_journal_is_refused(self, durable: Any,
                                                              tmp_path: Any) -> None:
        """create refuses a directory with another engine's meta.json, naming that engine."""
        first = durable()
        with pytest.raises(ArgumentError, match=first.name):
            Engine.create(capacity=8, journal=first.jdir)

    def test_bad_sync_period_is_refused(self, tmp_path: Any) -> None:
        """journal_sync_ms outside its range: ArgumentError with the range; nothing made."""
        with pytest.raises(ArgumentError, match="journal_sync_ms"):
            Engine.create(capacity=8, journal=str(tmp_path / "x"), journal_sync_ms=0)
        assert not (tmp_path / "x").exists()

    def test_redis_is_refused(self, tmp_path: Any) -> None:
        """journal=DIR on Redis is refused: durability there is the server's."""
        with pytest.raises(ArgumentError, match="Redis"):
            Engine.create(capacity=8, journal=str(tmp_path / "r"), url="redis://127.0.0.1:1")


class TestFlush:
    def test_every_committed_record_is_in_the_files_after_flush(self, durable: Any) -> None:
        """After flush, the files hold exactly the journal's records (as events() gives them)."""
        eng = durable()
        workload(eng)
        seq = eng.flush()
        assert seq == eng.journal_seq == eng.durable_seq
        got, end = file_records(eng.jdir)
        assert end.torn is None
        assert frame_keys(got) == event_keys(eng)

    def test_crc_is_crc32c(self) -> None:
        """The frame checksum is CRC-32C (the known vector of "123456789")."""
        assert lib.eng_crc32c(0, b"123456789", 9) == 0xE3069283

    def test_close_writes_what_is_left(self, durable: Any) -> None:
        """The last close writes and fdatasyncs every committed record."""
        eng = durable()
        workload(eng, 50)
        last = eng.journal_seq
        eng.close()
        got, end = file_records(eng.jdir)
        assert end.torn is None and got[-1].seq == last and len(got) == last

    def test_two_processes_flushing_at_once(self, durable: Any, spawner: Any) -> None:
        """Two processes flushing at once each get a durable seq covering their commits."""
        eng = durable(capacity=1024)
        ctx = spawner.ctx
        start, out = ctx.Event(), ctx.Queue()
        for _ in range(2):
            spawner.start(child_flusher, eng.handle, start, out, 300)
        start.set()
        results = [out.get(timeout=READY_TIMEOUT * 2) for _ in range(2)]
        spawner.join_all(JOIN_TIMEOUT)
        for last, flushed in results:
            assert flushed >= last
        eng.flush()
        got, end = file_records(eng.jdir)
        assert end.torn is None and [f.seq for f in got] == list(range(1, eng.journal_seq + 1))


class TestLease:
    def test_a_writer_killed_mid_write_is_taken_over(self, durable: Any, spawner: Any) -> None:
        """A writer SIGKILLed mid-pwrite is taken over and its torn frame written over."""
        eng = durable()
        hand_off_writer(eng)
        ctx = spawner.ctx
        ready, go = ctx.Event(), ctx.Event()
        p = spawner.start(child_writer, eng.handle, ready, go,
                          lib.ENG_DJ_FAULT_DIE_MIDWRITE)
        assert ready.wait(READY_TIMEOUT)
        ids = [eng.open_position(1.0, 1.0) for _ in range(40)]
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL, p.exitcode   # died in its own write
        _, end = file_records(eng.jdir)
        assert end.torn is not None   # the torn batch it left
        assert lib.eng_durable_fault(eng.seg, 0) == 0
        assert eng.flush(timeout=10) == eng.journal_seq   # the lease taken over: written
        got, end = file_records(eng.jdir)
        assert end.torn is None and frame_keys(got) == event_keys(eng)
        assert [f.id for f in got if f.kind == lib.ENG_JK_OPEN] == ids

    def test_records_of_a_killed_process_are_written_by_the_next(self, durable: Any,
                                                                 spawner: Any) -> None:
        """Records left unwritten by a killed writer are written by the next process."""
        eng = durable()
        hand_off_writer(eng)
        ctx = spawner.ctx
        ready, go = ctx.Event(), ctx.Event()
        p = spawner.start(child_writer, eng.handle, ready, go, 0)
        assert ready.wait(READY_TIMEOUT)
        os.kill(p.pid, signal.SIGSTOP)   # the holder cannot write ...
        try:
            for _ in range(10):
                eng.open_position(1.0, 1.0)
        finally:
            sigkill(p)                       # ... and dies with the records unwritten
        other = Engine.attach(eng.handle)   # its thread takes the dead holder's lease
        try:
            until(lambda: durable_info(other).written_seq == eng.journal_seq,
                  "the new process to write the dead writer's records")
        finally:
            other.close()
        got, end = file_records(eng.jdir)
        assert end.torn is None and frame_keys(got) == event_keys(eng)


class TestFailStop:
    def test_ring_full_behind_a_stopped_writer_refuses_commits(self, durable: Any,
                                                               spawner: Any) -> None:
        """A stopped writer's full ring refuses commits (JournalFullError), nothing changed."""
        eng = durable(journal_records=16)
        hand_off_writer(eng)
        ctx = spawner.ctx
        ready, go = ctx.Event(), ctx.Event()
        p = spawner.start(child_writer, eng.handle, ready, go, 0)
        assert ready.wait(READY_TIMEOUT)
        pos = eng.open_position(1.0, 1.0)
        os.kill(p.pid, signal.SIGSTOP)
        try:
            # kill() returns before the stop: the holder's writer thread may write on
            # until its main thread takes the stop (on a loaded host, the whole loop below)
            assert wait_stopped(p.pid, READY_TIMEOUT), "the writer never stopped"
            with pytest.raises(JournalFullError, match=f"pid {p.pid}") as err:
                for _ in range(40):   # at most a ring of 16 records fits
                    eng.open_position(1.0, 1.0)
            seq, state = eng.journal_seq, eng.state(pos)
            assert err.value.writer_pid == p.pid
            with pytest.raises(WaitTimeout):   # flush cannot finish while the holder is stopped
                eng.flush(timeout=0.2)
            with pytest.raises(JournalFullError):
                eng.transition(pos, "POSITION_OPENED")
            assert (eng.journal_seq, eng.state(pos)) == (seq, state)   # nothing changed
        finally:
            os.kill(p.pid, signal.SIGCONT)
        # a commit waits only ENG_DJ_ROOM_WAIT_NS for room: wait for the continued writer
        # itself (on a loaded host it may run later than that), then its drain made room
        until(lambda: durable_info(eng).written_seq == eng.journal_seq,
              "the continued writer to drain the ring")
        eng.open_position(1.0, 1.0)   # the writer drained the ring: room again
        sigkill(p)
        eng.flush(timeout=10)
        got, end = file_records(eng.jdir)
        assert [f.seq for f in got] == list(range(1, eng.journal_seq + 1))
        since = eng.journal_seq - 8   # what the ring of 16 still holds
        assert end.torn is None and frame_keys(got)[since:] == event_keys(eng, since)

    def test_a_failed_reservation_refuses_commits(self, durable: Any) -> None:
        """A failed reservation (disk full) refuses commits until it succeeds; nothing lost."""
        eng = durable()
        pos = eng.open_position(1.0, 1.0)
        hand_off_writer(eng)   # the first file is reserved; the next one will fail
        assert lib.eng_durable_fault(eng.seg, lib.ENG_DJ_FAULT_NOSPACE) == 0
        eng._durable.start()
        with pytest.raises(DurabilityError, match="No space") as err:
            # half a file on, the writer reserves the next: that fails, and from then on
            # every commit is refused (each one before had its place in the first file)
            for i in range(lib.ENG_DJ_FILE_RECORDS):
                eng.transition(pos, "PAUSE" if i % 2 else "POSITION_OPENED" if i == 0
                               else "RESUME")
        seq = eng.journal_seq
        assert seq < lib.ENG_DJ_FILE_RECORDS   # refused before a record lacked its place
        with pytest.raises(DurabilityError):
            eng.open_position(1.0, 1.0)
        assert err.value.failure == 28 and eng.journal_seq == seq
        assert lib.eng_durable_fault(eng.seg, 0) == 0
        until(lambda: durable_info(eng).failure == 0, "the writer to retry its reservation")
        assert eng.transition(pos, "ERROR_OCCURRED") is Outcome.APPLIED
        assert eng.flush() == eng.journal_seq
        got, end = file_records(eng.jdir)
        assert end.torn is None and [f.seq for f in got] == list(range(1, eng.journal_seq + 1))

    def test_a_failed_reservation_of_a_dead_writer_is_retried_by_the_next(
            self, durable: Any, spawner: Any) -> None:
        """A dead writer's failed reservation is retried by the next holder."""
        eng = durable()
        hand_off_writer(eng)
        ctx = spawner.ctx
        ready, go = ctx.Event(), ctx.Event()
        p = spawner.start(child_writer, eng.handle, ready, go, lib.ENG_DJ_FAULT_NOSPACE)
        assert ready.wait(READY_TIMEOUT)
        pos = eng.open_position(1.0, 1.0)
        with pytest.raises(DurabilityError):   # half a file on, the child's reservation fails
            for i in range(lib.ENG_DJ_FILE_RECORDS):
                eng.transition(pos, "PAUSE" if i % 2 else "POSITION_OPENED" if i == 0
                               else "RESUME")
        assert durable_info(eng).failure != 0
        sigkill(p)
        assert lib.eng_durable_fault(eng.seg, 0) == 0
        # every record had its place and may all be written already, so flush() can
        # return at once: the retry is the next holder's writer thread (ours, restarted)
        eng._durable.start()
        assert eng.flush(timeout=10) == eng.journal_seq
        until(lambda: durable_info(eng).failure == 0, "the next holder to retry the reservation")
        eng.open_position(1.0, 1.0)

    def test_a_full_tmpfs_refuses_commits(self, tmp_path: Any) -> None:
        """On a real full disk (a small tmpfs), the reservation fails: DurabilityError."""
        mnt = tmp_path / "small"
        mnt.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                           capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        try:
            name = f"tseg_full_{os.getpid()}"
            with pytest.raises(DurabilityError, match="No space"):   # the first file does not fit
                Engine.create(capacity=8, name=name, journal=str(mnt / "j"))
            with pytest.raises(SegmentNotFoundError):   # nothing left behind
                Engine.attach(name)
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


class TestPowerLoss:
    def test_the_bytes_up_to_the_durable_seq_hold_every_frame(self, durable: Any,
                                                              tmp_path: Any) -> None:
        """Files cut at the durable seq's bytes (a power loss) hold every frame up to it."""
        eng = durable()
        workload(eng, 30)
        d = eng.flush()
        for _ in range(20):   # written, maybe not synced: a power loss may drop these
            eng.open_position(1.0, 1.0)
        cut = tmp_path / "cut"
        cut.mkdir()
        fr = lib.ENG_DJ_FILE_RECORDS
        for first, path in frames.journal_files(eng.jdir):
            keep = HDR + max(0, min(d - first + 1, fr)) * FRAME
            with open(path, "rb") as src, open(cut / os.path.basename(path), "wb") as dst:
                dst.write(src.read(keep))
        got, end = file_records(str(cut))
        assert [f.seq for f in got] == list(range(1, d + 1)) and end.last_seq == d
        assert frame_keys(got) == event_keys(eng)[:d]


class TestCheckpoint:
    def test_a_checkpoint_holds_one_valid_frame_per_object(self, durable: Any) -> None:
        """A checkpoint starts at the seq before its scan and has a valid frame per object."""
        eng = durable(max_accounts=4)
        ids = workload(eng, 10)
        before = eng.journal_seq
        start = eng.checkpoint()
        assert start == before
        path = os.path.join(eng.jdir, f"checkpoint-{start:020d}.ckpt")
        with open(path, "rb") as f:
            data = f.read()
        magic, fmt, fbytes, _, s, n = struct.unpack_from("<IIIIQQ", data)
        assert (magic, fmt, fbytes, s) == (lib.ENG_DJ_CKPT_MAGIC, lib.ENG_DJ_FORMAT, FRAME, start)
        assert len(data) == HDR + n * FRAME
        recs = []
        for i in range(n):
            buf = data[HDR + i * FRAME: HDR + (i + 1) * FRAME]
            assert frames.check_frame(buf) is None
            recs.append(frames.decode(buf[8:]))
        kinds = [KINDS[r["kind"]] for r in recs]
        assert kinds.count("open") == kinds.count("price") == len(ids) - 1   # ids[0] released
        assert kinds.count("release") == 1
        assert kinds.count("key") == 1 and kinds.count("halt") == 1
        acct = [r for r in recs if r["kind"] == lib.ENG_JK_ACCOUNT]
        assert len(acct) == 1 and acct[0]["w"][lib.ENG_DJ_ACCT_KEYLEN_WORD] == len("acct")
        key_words = acct[0]["w"][lib.ENG_DJ_ACCT_KEY_WORD:]
        assert struct.pack("<6Q", *key_words[:6])[:4] == b"acct"
        assert all(r["seq"] == 0 for r in recs)

    def test_released_openings_stay_in_the_checkpoint(self, durable: Any) -> None:
        """A released opening is a frame of kind release (restored ids stay stale)."""
        eng = durable()
        pos = eng.open_position(1.0, 1.0)
        close(eng, pos)
        eng.release_position(pos)
        start = eng.checkpoint()
        with open(os.path.join(eng.jdir, f"checkpoint-{start:020d}.ckpt"), "rb") as f:
            data = f.read()
        rel = [frames.decode(data[HDR + i * FRAME + 8: HDR + (i + 1) * FRAME])
               for i in range((len(data) - HDR) // FRAME)]
        assert [(r["kind"], r["id"]) for r in rel if r["kind"] != lib.ENG_JK_HALT] == [
            (lib.ENG_JK_RELEASE, pos)]


class TestCheckpointSchedule:
    def test_a_checkpoint_is_written_every_n_records(self, durable: Any) -> None:
        """With checkpoint_records=N the writer writes a checkpoint on its own past N records."""
        eng = durable(checkpoint_records=50, checkpoint_s=0)
        for _ in range(60):
            eng.open_position(1.0, 1.0)
        eng.flush()
        until(lambda: any(n.endswith(".ckpt") for n in os.listdir(eng.jdir)),
              "the writer's own checkpoint")

    def test_files_before_the_previous_checkpoint_are_removed(self, durable: Any) -> None:
        """A checkpoint removes files wholly before the previous one's start seq."""
        eng = durable(capacity=1024, checkpoint_records=0, checkpoint_s=0)
        ids = np.array([eng.open_position(1.0, 1.0) for _ in range(1024)], dtype=np.uint64)
        eng.transition_many(ids, int(Trigger.POSITION_OPENED))
        trig = int(Trigger.PAUSE)
        while eng.journal_seq <= lib.ENG_DJ_FILE_RECORDS + 10:
            eng.transition_many(ids, trig)
            trig = int(Trigger.RESUME) if trig == int(Trigger.PAUSE) else int(Trigger.PAUSE)
        a = eng.checkpoint()
        eng.transition_many(ids[:4], trig)
        b = eng.checkpoint()
        first_files = [f for f, _ in frames.journal_files(eng.jdir)]
        assert first_files == [lib.ENG_DJ_FILE_RECORDS + 1]   # [1, 65536] is wholly <= a
        eng.transition_many(ids[:4], int(Trigger.PAUSE) + int(Trigger.RESUME) - trig)
        c = eng.checkpoint()
        ckpts = sorted(n for n in os.listdir(eng.jdir) if n.endswith(".ckpt"))
        assert ckpts == [f"checkpoint-{b:020d}.ckpt", f"checkpoint-{c:020d}.ckpt"]
        assert a < b < c
        got, end = file_records(eng.jdir, since=b)
        assert end.torn is None and [f.seq for f in got] == list(range(b + 1,
                                                                        eng.journal_seq + 1))


class TestJournalCommand:
    def test_json_lines_and_a_torn_tail_reported_not_printed(self, durable: Any,
                                                             tmp_path: Any) -> None:
        """`journal --json` prints a JSON object a line; a corrupt tail is reported only."""
        eng = durable()
        workload(eng, 5)
        last = eng.flush()
        eng.close()
        copy = tmp_path / "copy"
        shutil.copytree(eng.jdir, copy)
        first, path = frames.journal_files(str(copy))[-1]
        with open(path, "r+b") as f:   # flip a byte in the last frame's record
            f.seek(HDR + (last - first) * FRAME + 40)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
        cmd = [sys.executable, "-m", "engine", "journal", str(copy), "--json", "--since", "1"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        assert [row["seq"] for row in rows] == list(range(2, last))
        assert "checksum" in r.stderr and f"after seq {last - 1}" in r.stderr


class TestRm:
    def test_rm_writes_the_journal_before_the_segment_goes(self, durable: Any) -> None:
        """`python -m engine rm` writes and fdatasyncs the records no writer wrote yet."""
        eng = durable()
        hand_off_writer(eng)   # nobody writes: the records stay in the ring
        for _ in range(12):
            eng.open_position(1.0, 1.0)
        last = eng.journal_seq
        assert durable_info(eng).written_seq < last
        r = subprocess.run([sys.executable, "-m", "engine", "rm", "--force", eng.name],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        got, end = file_records(eng.jdir)
        assert end.torn is None and [f.seq for f in got] == list(range(1, last + 1))


def child_checkpointer(handle: Any) -> None:
    """Set the fault that kills a checkpoint before its rename, then checkpoint."""
    eng = Engine.attach(handle)
    assert lib.eng_durable_fault(eng.seg, lib.ENG_DJ_FAULT_DIE_IN_CKPT) == 0
    eng.checkpoint()   # SIGKILLed inside


_DROPPED = """
import gc, sys
from engine import Engine
eng = Engine.create(capacity=16, journal=sys.argv[1])
print(eng.name, flush=True)
for _ in range(10):
    eng.open_position(1.0, 1.0)
del eng
gc.collect()
print("ok", flush=True)
"""


class TestAdversary:
    def test_a_forked_child_neither_hangs_nor_writes(self, durable: Any) -> None:
        """A forked child closes its inherited durable engine at once; the parent goes on."""
        eng = durable()
        eng.open_position(1.0, 1.0)
        pid = os.fork()
        if pid == 0:   # the child: no writer thread here; close must not wait for one
            code = 0
            try:
                eng.close()
            except BaseException:
                code = 1
            os._exit(code)
        deadline = time.monotonic() + JOIN_TIMEOUT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung in close()")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        eng.open_position(1.0, 1.0)
        assert eng.flush() == eng.journal_seq == 2

    def test_an_engine_dropped_without_close_stops_its_writer_first(self,
                                                                    tmp_path: Any) -> None:
        """An Engine dropped without close stops its writer before the unmap and writes."""
        jdir = str(tmp_path / "dropped")
        r = subprocess.run([sys.executable, "-c", _DROPPED, jdir], capture_output=True,
                           text=True, timeout=120)
        name = r.stdout.split()[0] if r.stdout else None
        try:
            assert r.returncode == 0 and r.stdout.split()[-1] == "ok", r.stderr
            got, end = file_records(jdir)
            assert end.torn is None and [f.seq for f in got] == list(range(1, 11))
        finally:
            if name:
                with contextlib.suppress(Exception):
                    Engine.attach(name).unlink()

    def test_a_checkpointer_killed_before_its_rename_leaves_no_checkpoint(
            self, durable: Any, spawner: Any) -> None:
        """A checkpointer killed before its rename leaves no checkpoint; the next works."""
        eng = durable()
        workload(eng, 8)
        p = spawner.start(child_checkpointer, eng.handle)
        p.join(READY_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL, p.exitcode
        names = os.listdir(eng.jdir)
        assert not [n for n in names if n.endswith(".ckpt")]
        assert [n for n in names if n.endswith(".ckpt.tmp")]
        assert lib.eng_durable_fault(eng.seg, 0) == 0
        start = eng.checkpoint()
        assert os.path.exists(os.path.join(eng.jdir, f"checkpoint-{start:020d}.ckpt"))
