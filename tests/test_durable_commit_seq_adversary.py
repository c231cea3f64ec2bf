"""Adversary of ``eng.durable_seq`` (the segment's durable_commit_seq, native/durable.c):
every change <= it survives a power cut, and it ends a commit.

Forbidden outcomes, each named by its test: a durable_seq inside a commit (a
keyed, booked open writes three records), one that goes back, one below what
a flush() in any process returned, one above what was fdatasynced (a restored
engine claiming files nobody synced), a durable_seq that stops short of the
journal seq with commits stopped (a holder killed or stopped between its
written_seq and its written_commit_seq), and an engine failed for good by a
flusher whose fdatasync found its file pruned by checkpoints meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from durable_helpers import (  # noqa: F401
    Made,
    copy_dir,
    fill,
    journal_files,
    made_engines,
    power_cut,
    riders_by_seq,
    valid_records,
)
from journal_audit import compiled_shim, preloaded, stop_shim, wait_stopped
from procs import until
from test_durable_adversary import durable_fault, writer_info
from test_restore_commits_adversary import gone

from engine import ClosedError, Engine, EngineError, Trigger
from engine._native import lib

FILE_RECORDS = lib.ENG_DJ_FILE_RECORDS
#: a bound for the idle writer to bring durable_seq to the journal seq (many sync periods)
IDLE_BOUND_S = 10.0

def sync_shim() -> str:
    """A preload library that logs the path of every successful fsync and
    fdatasync to $ENG_TEST_SYNC_LOG (tests/sync_shim.c)."""
    return compiled_shim("sync_shim.c")


@contextlib.contextmanager
def env(**kv: str) -> Iterator[None]:
    """Children started inside get these environment variables."""
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def inside_commits(src: pathlib.Path, values: set[int]) -> list[int]:
    """The values that stop inside a commit of the journal in ``src``: a
    slot's record at s with r riders spans s .. s + r (r <= MAX_FILL - 1)."""
    riders = riders_by_seq(src)
    return sorted(d for d in values if any(s + riders.get(s, 0) > d for s in
                                           range(d - lib.ENG_JOURNAL_MAX_FILL + 2, d + 1)))


def keyed_opens(eng: Engine, a: int, tag: str, n: int) -> None:
    """``n`` keyed, booked opens (three records each) released again, so the
    capacity lasts."""
    for i in range(n):
        p = eng.open_position(100.0, 1.0, side=1, account=a, key=f"{tag}-{i}")
        eng.transition(p, Trigger.POSITION_OPENED)
        eng.transition(p, Trigger.EXIT_CONDITION_MET, exit_reason=1)
        eng.transition(p, Trigger.EXIT_STARTED)
        eng.transition(p, Trigger.EXIT_COMPLETED, exit_price=100.0)
        eng.release_position(p)


def booked(made: Made, **kw: Any) -> tuple[Engine, int]:
    kw.setdefault("journal_prices", False)
    eng = made.create(capacity=64, max_accounts=4, **kw)
    return eng, eng.open_account(10**9, 10**9, 60, 10**8, key="acct")


# -- children ---------------------------------------------------------------------------------
def holder(name: str, d: str, q: Any, cmd: Any, sync_ms: float | None = None) -> None:
    """Create a durable engine (its writer holds the lease), then on "fault F":
    set durable fault F and commit keyed, booked opens; on "stop": close."""
    try:
        kw = {} if sync_ms is None else {"journal_sync_ms": sync_ms}
        eng = Engine.create(64, name=name, journal=d, journal_prices=False, max_accounts=4,
                            **kw)
        a = eng.open_account(10**9, 10**9, 60, 10**8, key="acct")
        eng.flush(10.0)   # written by this process's writer: it holds the lease
        q.put(("ready", eng.handle, a))
        n = 0
        while True:
            what = cmd.get()
            if what == "stop":
                eng.close()
                q.put(("stopped", 0))
                return
            durable_fault(eng, int(what.split()[1]))
            n += 1
            keyed_opens(eng, a, f"h{n}", 3)
            q.put(("committed", eng.journal_seq))
    except Exception as e:
        q.put(("error", repr(e)))


def flusher(handle: Any, go: Any, q: Any) -> None:
    """Attach, wait for ``go``, flush once; report what it returned or raised."""
    try:
        eng = Engine.attach(handle)
        q.put(("attached", 0))
        go.wait(60)
        try:
            q.put(("flushed", int(eng.flush(10.0))))
        except Exception as e:
            q.put(("raised", repr(e)))
        eng.close()
    except Exception as e:
        q.put(("error", repr(e)))


def restorer(d: str, name: str, log: str, q: Any) -> None:
    """Restore ``d``, read durable_seq, mark the sync log there, report."""
    try:
        eng = Engine.restore(d, name=name)
        durable = int(eng.durable_seq)
        with open(log, "a") as f:
            f.write("--durable-read--\n")
        q.put(("restored", durable, int(eng.restore_report.last_seq),
               eng.restore_report.checkpoint))
        eng.close()
    except Exception as e:
        q.put(("error", repr(e)))


def committer_flusher(handle: Any, a: int, tag: str, rounds: int, go: Any, q: Any) -> None:
    """Keyed, booked opens and flushes: after each flush() = T, durable_seq >= T
    here; every durable_seq read is reported (with where it went back)."""
    try:
        eng = Engine.attach(handle)
        go.wait(60)
        seen: list[int] = []
        problems: list[str] = []
        for r in range(rounds):
            keyed_opens(eng, a, f"{tag}-{r}", 1)
            seen.append(int(eng.durable_seq))
            t = int(eng.flush(10.0))
            d = int(eng.durable_seq)
            if d < t:
                problems.append(f"flush() returned {t}, then durable_seq {d}")
            seen += [t, d]
        back = [(x, y) for x, y in itertools.pairwise(seen) if y < x and y != 0]
        problems += [f"durable_seq went back: {x} then {y}" for x, y in back[:3]]
        eng.close()
        q.put(("done", sorted(set(seen)), problems))
    except Exception as e:
        q.put(("error", repr(e), []))


# -- tests --------------------------------------------------------------------------------------
class TestRestoredDurableSeq:
    def test_a_restored_engines_durable_seq_is_fdatasynced_before_it_is_reported(
            self, made: Made, spawner: Any, tmp_path: pathlib.Path) -> None:
        """A restore of an unsynced copy: the files its durable_seq claims are fdatasynced first."""
        eng, a = booked(made)
        keyed_opens(eng, a, "x", 8)
        eng.checkpoint()
        keyed_opens(eng, a, "y", 8)
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        copy = copy_dir(src, made.dir("copy"))   # written by shutil: never fsynced
        log = tmp_path / "synced.log"
        q = spawner.ctx.Queue()
        with preloaded(sync_shim()), env(ENG_TEST_SYNC_LOG=str(log)):
            child = spawner.start(restorer, str(copy), made.names(), str(log), q)
        got = q.get(timeout=120)
        child.join(60)
        assert got[0] == "restored", got
        _, durable, last_seq, ckpt = got
        assert durable == last_seq, (durable, last_seq)
        synced = set(log.read_text().split("--durable-read--\n")[0].splitlines())
        need = {str(copy / "meta.json"), str(copy)}
        need |= {str(p) for p in journal_files(copy)
                 if any(s <= durable for q_, _o, s in valid_records(copy) if q_ == p)}
        if ckpt:
            need.add(str(copy / ckpt))
        missing = sorted(need - synced)
        assert not missing, (f"durable_seq {durable} reported by a restored engine before "
                             f"these were fdatasynced: {missing}")


class TestStaleSyncAfterPrune:
    def test_a_flusher_stopped_in_its_sync_while_checkpoints_prune_its_file(
            self, made: Made, spawner: Any) -> None:
        """A flusher stopped before its fdatasync while checkpoints prune that file: no failure."""
        eng, a = booked(made, journal_sync_ms=10_000.0, journal_prices=True)
        keyed_opens(eng, a, "x", 2)
        eng.flush(10.0)
        keyed_opens(eng, a, "y", 2)   # written by the holder, not synced (its period is 10 s)
        go, q = spawner.ctx.Event(), spawner.ctx.Queue()
        with preloaded(stop_shim()), env(ENG_TEST_STOP_NOT_KILL="1"):
            child = spawner.start(flusher, eng.handle, go, q)
        assert q.get(timeout=60)[0] == "attached"
        durable_fault(eng, lib.ENG_DJ_FAULT_DIE_IN_SYNC)
        lib.eng_test_faults(0)   # the switch is in the segment: this process must not honour it
        try:
            go.set()
            assert wait_stopped(child.pid, 60), "the flusher did not stop in its sync"
            durable_fault(eng, 0)
        finally:
            lib.eng_test_faults(1)
        fill(eng, FILE_RECORDS + 100)   # the flusher's file is wholly before ...
        eng.checkpoint()                 # ... this checkpoint's start: the next one prunes it
        keyed_opens(eng, a, "z", 2)
        eng.checkpoint()
        assert not (made.jdir(eng) / "journal-00000000000000000001.log").exists()
        os.kill(child.pid, signal.SIGCONT)
        out = q.get(timeout=60)
        child.join(60)
        assert writer_info(eng).failure == 0, (
            f"a stale flusher failed the engine for good: failure {writer_info(eng).failure}, "
            f"its flush {out}")
        keyed_opens(eng, a, "after", 1)   # commits go on
        assert out[0] == "flushed", out
        assert int(eng.flush(10.0)) == eng.journal_seq


class TestKilledBetweenWrittenAndCommitEnd:
    def _holder(self, made: Made, spawner: Any, stop: bool) -> tuple[Any, Engine, int, Any, Any]:
        name, d = made.names(), made.dir()
        made.dirs[name] = d
        q, cmd = spawner.ctx.Queue(), spawner.ctx.Queue()
        with contextlib.ExitStack() as st:
            if stop:
                st.enter_context(preloaded(stop_shim()))
                st.enter_context(env(ENG_TEST_STOP_NOT_KILL="1"))
            child = spawner.start(holder, name, str(d), q, cmd)
        got = q.get(timeout=60)
        assert got[0] == "ready", got
        eng = Engine.attach(got[1])
        made.engines.append(eng)
        assert writer_info(eng).writer_pid == child.pid
        return child, eng, got[2], q, cmd

    @pytest.mark.parametrize("fault", ["ENG_DJ_FAULT_DIE_BEFORE_COMMIT_END",
                                       "ENG_DJ_FAULT_DIE_IN_SYNC", "ENG_DJ_FAULT_DIE_MIDWRITE"])
    def test_the_holder_killed_before_its_commit_end_then_durable_seq_reaches_the_journal(
            self, made: Made, spawner: Any, fault: str) -> None:
        """Holder SIGKILLed before its commit end, in its sync, mid-write: durable_seq gets on."""
        child, eng, a, _q, cmd = self._holder(made, spawner, stop=False)
        lib.eng_test_faults(0)
        try:
            cmd.put(f"fault {getattr(lib, fault)}")
            child.join(60)
            assert child.exitcode == -signal.SIGKILL, child.exitcode
            durable_fault(eng, 0)
        finally:
            lib.eng_test_faults(1)
        seen = {int(eng.durable_seq)}
        until(lambda: seen.add(int(eng.durable_seq)) or max(seen) == eng.journal_seq,
              f"durable_seq {eng.durable_seq} reaching the journal seq {eng.journal_seq} "
              "after the holder died", IDLE_BOUND_S)
        assert writer_info(eng).writer_pid == os.getpid()
        keyed_opens(eng, a, "after", 2)
        until(lambda: seen.add(int(eng.durable_seq)) or max(seen) == eng.journal_seq,
              "durable_seq reaching the journal seq again", IDLE_BOUND_S)
        src = made.jdir(eng)
        gone(made, eng)
        assert not inside_commits(src, seen), sorted(seen)
        for d in sorted(seen)[-2:]:
            got = made.restore(power_cut(src, made.dir("cut"), d))
            assert got.restore_report.last_seq >= d, d
            gone(made, got)

    def test_the_holder_stopped_before_its_commit_end_while_others_flush(
            self, made: Made, spawner: Any) -> None:
        """Holder SIGSTOPped before written_commit_seq: flushes, durable_seq reads stay right."""
        child, eng, _a, q, cmd = self._holder(made, spawner, stop=True)
        lib.eng_test_faults(0)
        try:
            cmd.put(f"fault {lib.ENG_DJ_FAULT_DIE_BEFORE_COMMIT_END}")
            assert wait_stopped(child.pid, 60), "the holder did not stop at its commit end"
            durable_fault(eng, 0)
        finally:
            lib.eng_test_faults(1)
        seen = [int(eng.durable_seq)]
        t = int(eng.flush(10.0))   # the records are written: no need of the stopped holder
        seen += [t, int(eng.durable_seq)]
        assert seen[-1] >= t, seen
        os.kill(child.pid, signal.SIGCONT)
        assert q.get(timeout=60)[0] == "committed"
        until(lambda: seen.append(int(eng.durable_seq)) or seen[-1] == eng.journal_seq,
              "durable_seq reaching the journal seq after SIGCONT", IDLE_BOUND_S)
        assert all(y >= x for x, y in itertools.pairwise(seen)), f"durable_seq went back: {seen}"
        cmd.put("stop")
        assert q.get(timeout=60)[0] == "stopped"
        child.join(60)
        src = made.jdir(eng)
        gone(made, eng)
        assert not inside_commits(src, set(seen)), sorted(set(seen))


class TestStoppedHolderLiveness:
    def test_a_stopped_then_continued_holder_brings_durable_seq_to_the_journal(
            self, made: Made, spawner: Any) -> None:
        """Holder SIGSTOPped with records unsynced, SIGCONTed: durable_seq reaches the journal."""
        child, eng, a, q, cmd = TestKilledBetweenWrittenAndCommitEnd()._holder(
            made, spawner, stop=False)
        cmd.put("fault 0")
        assert q.get(timeout=60)[0] == "committed"
        os.kill(child.pid, signal.SIGSTOP)
        try:
            keyed_opens(eng, a, "while-stopped", 2)   # room in the ring: commits go on
            assert int(eng.durable_seq) < eng.journal_seq
        finally:
            os.kill(child.pid, signal.SIGCONT)
        until(lambda: int(eng.durable_seq) == eng.journal_seq,
              f"durable_seq {eng.durable_seq} reaching the journal seq {eng.journal_seq}",
              IDLE_BOUND_S)
        cmd.put("stop")
        assert q.get(timeout=60)[0] == "stopped"


class TestManyFlushers:
    def test_four_processes_committing_and_flushing_on_two_cores(
            self, made: Made, spawner: Any) -> None:
        """Four processes commit and flush: durable_seq ends commits, never back, >= each flush."""
        eng, a = booked(made)
        go, q = spawner.ctx.Event(), spawner.ctx.Queue()
        for i in range(4):
            spawner.start(committer_flusher, eng.handle, a, f"w{i}", 40, go, q)
        go.set()
        out = [q.get(timeout=300) for _ in range(4)]
        assert all(o[0] == "done" and not o[2] for o in out), out
        seen = set().union(*(set(o[1]) for o in out))
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        assert not inside_commits(src, seen), sorted(seen)


class TestFork:
    def test_a_forked_child_reads_durable_seq_typed_and_flushes_through_its_own_attach(
            self, made: Made) -> None:
        """A fork child: its inherited Engine refuses typed; its own attach flushes for all."""
        eng, a = booked(made)
        keyed_opens(eng, a, "x", 2)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: report through the pipe, never return into pytest
            code = 1
            try:
                try:
                    eng.durable_seq   # noqa: B018
                    msg = "inherited: no error"
                except ClosedError:
                    own = Engine.attach(eng.name)
                    keyed_opens(own, a, "child", 1)
                    msg = f"ok {int(own.flush(10.0))}"
                    own.close()
                os.write(w, msg.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        msg = os.read(r, 200).decode()
        os.close(r)
        assert os.waitstatus_to_exitcode(status) == 0 and msg.startswith("ok "), msg
        assert int(eng.durable_seq) >= int(msg.split()[1])


class TestDiskFull:
    def test_a_full_disk_with_the_journal_at_its_last_reserved_seq_still_syncs(
            self, made: Made) -> None:
        """Disk full, every reserved place used: what is written still becomes durable, no flush."""
        eng, a = booked(made, journal_records=1 << 17)
        eng.flush(10.0)
        eng._durable.stop()   # the only writer: the ring fills ahead of it
        R = int(eng._seg.durable.reserved_seq)
        assert R == FILE_RECORDS, R
        while eng.journal_seq < R - lib.ENG_JOURNAL_MAX_FILL:
            eng.deposit(a, 1)
        eng.open_position(100.0, 1.0, side=1, account=a, key="last")   # three records: up to R
        assert eng.journal_seq == R
        durable_fault(eng, lib.ENG_DJ_FAULT_NOSPACE)
        try:
            eng._durable.start()   # writes every record to R, then the next reservation fails
            until(lambda: writer_info(eng).written_seq == R and writer_info(eng).failure != 0,
                  "the writer writing to R and failing its reservation", IDLE_BOUND_S)
            until(lambda: int(eng.durable_seq) == eng.journal_seq,
                  f"durable_seq {eng.durable_seq} reaching the journal seq {eng.journal_seq} "
                  "(every record written) on a full disk", IDLE_BOUND_S)
        finally:
            durable_fault(eng, 0)
        until(lambda: writer_info(eng).failure == 0, "the reservation retried", IDLE_BOUND_S)
        eng.deposit(a, 1)   # commits go on
        assert int(eng.flush(10.0)) == eng.journal_seq


    def test_a_failed_fdatasync_while_a_reservation_fails_stops_the_engine(
            self, made: Made, spawner: Any, tmp_path: pathlib.Path) -> None:
        """An fdatasync failing while the disk is full: fail-stop, durable_seq never passes it."""
        name, d = made.names(), made.dir()
        made.dirs[name] = d
        bad, log = tmp_path / "disk-drops-writes", tmp_path / "synced.log"
        q, cmd = spawner.ctx.Queue(), spawner.ctx.Queue()
        with preloaded(sync_shim()), env(ENG_TEST_SYNC_LOG=str(log),
                                         ENG_TEST_SYNC_FAIL=str(bad)):
            spawner.start(holder, name, str(d), q, cmd, 10_000.0)   # syncs every 10 s
        got = q.get(timeout=60)
        assert got[0] == "ready", got
        eng = Engine.attach(got[1])
        made.engines.append(eng)
        before = int(eng.durable_seq)
        bad.touch()   # from now the holder's fdatasync fails
        durable_fault(eng, lib.ENG_DJ_FAULT_NOSPACE)
        refused = None
        for _ in range(FILE_RECORDS):   # half a file in, the next reservation fails
            try:
                eng.deposit(got[2], 1)
            except EngineError as e:
                refused = e
                break
        assert refused is not None
        until(lambda: "EIO " in log.read_text(), "an fdatasync failing", IDLE_BOUND_S)
        bad.unlink()   # the disk answers again, and has room
        durable_fault(eng, 0)
        with contextlib.suppress(AssertionError):   # what the writer does next, bounded
            until(lambda: writer_info(eng).failure == 0, "", 1.0)
        info = writer_info(eng)
        assert info.failure < 0 and int(info.durable_seq) == before, (
            f"after a failed fdatasync: failure {info.failure}, durable_seq {info.durable_seq} "
            f"(was {before}): what the kernel dropped is reported durable")

def sampler(handle: Any, go: Any, stop: Any, q: Any) -> None:
    """Read durable_seq in a loop until ``stop``; report the values and any step back."""
    try:
        eng = Engine.attach(handle)
        go.set()
        seen: list[int] = []
        while not stop.is_set():
            for _ in range(200):
                v = int(eng.durable_seq)
                if not seen or v != seen[-1]:
                    seen.append(v)
        back = [(x, y) for x, y in itertools.pairwise(seen) if y < x]
        eng.close()
        q.put(("done", sorted(set(seen)), back[:3]))
    except Exception as e:
        q.put(("error", repr(e), []))


class TestFilesAndCheckpoints:
    def test_durable_seq_read_across_a_file_boundary_and_checkpoints(
            self, made: Made, spawner: Any) -> None:
        """Commits with riders across a file end and checkpoints: durable_seq ends commits."""
        eng, a = booked(made, journal_prices=True, checkpoint_records=64)
        fill(eng, FILE_RECORDS - 200 - eng.journal_seq)
        go, stop, q = spawner.ctx.Event(), spawner.ctx.Event(), spawner.ctx.Queue()
        spawner.start(sampler, eng.handle, go, stop, q)
        assert go.wait(60)
        seen: set[int] = set()
        try:
            for i in range(150):   # 450+ records: past the file's end, checkpoints on the way
                keyed_opens(eng, a, f"b{i}", 1)
                seen.add(int(eng.durable_seq))
                if i % 7 == 0:
                    seen.add(int(eng.flush(10.0)))
                if i % 40 == 0:
                    eng.checkpoint()
        finally:
            stop.set()
        out = q.get(timeout=60)
        assert out[0] == "done" and not out[2], out[:1] + out[2:]
        seen |= set(out[1])
        until(lambda: int(eng.durable_seq) == eng.journal_seq, "the idle writer", IDLE_BOUND_S)
        seen.add(int(eng.durable_seq))
        assert eng.journal_seq > FILE_RECORDS and int(writer_info(eng).checkpoints) > 3
        src = made.jdir(eng)
        gone(made, eng)
        assert not inside_commits(src, seen), sorted(seen)
        for d in sorted(x for x in seen if x > FILE_RECORDS - 200)[-3:]:
            got = made.restore(power_cut(src, made.dir("cut"), d, drop_files=True))
            assert got.restore_report.last_seq >= d, d
            gone(made, got)


class TestAfterARestore:
    def test_durable_seq_of_a_restore_of_a_cut_commit_then_more_commits(
            self, made: Made, spawner: Any) -> None:
        """Restored over a cut commit: durable_seq read at once ends a commit, and after more."""
        eng, a = booked(made)
        keyed_opens(eng, a, "x", 5)
        eng.flush(10.0)
        head = eng.journal_seq + 1
        eng.open_position(100.0, 1.0, side=1, account=a, key="split")   # head .. head + 2
        eng.flush(10.0)
        src = made.jdir(eng)
        gone(made, eng)
        cut = power_cut(src, made.dir("cut"), head + 1)   # one rider lost: the commit cut
        got = made.restore(cut)   # journals on in ``cut``
        first = int(got.durable_seq)
        assert first == got.restore_report.last_seq == head - 1, (first, head)
        go, stop, q = spawner.ctx.Event(), spawner.ctx.Event(), spawner.ctx.Queue()
        spawner.start(sampler, got.handle, go, stop, q)
        assert go.wait(60)
        a2 = int(got.accounts()[0]["id"])
        try:
            keyed_opens(got, a2, "y", 30)
        finally:
            stop.set()
        out = q.get(timeout=60)
        assert out[0] == "done" and not out[2], out[:1] + out[2:]
        until(lambda: int(got.durable_seq) == got.journal_seq, "the idle writer", IDLE_BOUND_S)
        seen = {first, int(got.durable_seq), *out[1]}
        assert min(seen) >= first
        gone(made, got)
        assert not inside_commits(cut, seen), sorted(seen)


@pytest.mark.slow
class TestRounds:
    """The attacks above, many rounds each (``-m slow``)."""

    @pytest.mark.parametrize("round_", range(5))
    @pytest.mark.parametrize("fault", ["ENG_DJ_FAULT_DIE_BEFORE_COMMIT_END",
                                       "ENG_DJ_FAULT_DIE_IN_SYNC", "ENG_DJ_FAULT_DIE_MIDWRITE"])
    def test_killed_before_the_commit_end_rounds(self, made: Made, spawner: Any, fault: str,
                                                 round_: int) -> None:
        """Round of: holder SIGKILLed before its commit end, in its sync, mid-write."""
        TestKilledBetweenWrittenAndCommitEnd(
        ).test_the_holder_killed_before_its_commit_end_then_durable_seq_reaches_the_journal(
            made, spawner, fault)

    @pytest.mark.parametrize("round_", range(8))
    def test_stopped_before_the_commit_end_rounds(self, made: Made, spawner: Any,
                                                  round_: int) -> None:
        """Round of: holder SIGSTOPped before written_commit_seq while others flush."""
        TestKilledBetweenWrittenAndCommitEnd(
        ).test_the_holder_stopped_before_its_commit_end_while_others_flush(made, spawner)

    @pytest.mark.parametrize("round_", range(5))
    def test_many_flushers_rounds(self, made: Made, spawner: Any, round_: int) -> None:
        """Round of: four processes committing and flushing on two cores."""
        TestManyFlushers().test_four_processes_committing_and_flushing_on_two_cores(
            made, spawner)

    @pytest.mark.parametrize("round_", range(5))
    def test_stale_sync_after_prune_rounds(self, made: Made, spawner: Any, round_: int) -> None:
        """Round of: a flusher stopped in its sync while checkpoints prune its file."""
        TestStaleSyncAfterPrune().test_a_flusher_stopped_in_its_sync_while_checkpoints_prune_its_file(
            made, spawner)

    @pytest.mark.parametrize("round_", range(3))
    def test_files_and_checkpoints_rounds(self, made: Made, spawner: Any, round_: int) -> None:
        """Round of: durable_seq across a file end and checkpoints."""
        TestFilesAndCheckpoints().test_durable_seq_read_across_a_file_boundary_and_checkpoints(
            made, spawner)


def early_flusher(name: str, q: Any, go: Any) -> None:
    """On ``go``: attach ``name`` (made, its journal directory not set yet) and
    flush at once; report what the flush returned or raised."""
    try:
        go.wait(60)
        eng = Engine.attach(name)
        try:
            q.put(("flushed", int(eng.flush(0.3))))
        except Exception as e:
            q.put(("raised", type(e).__name__))
        eng.close()
    except Exception as e:
        q.put(("error", repr(e)))


class TestBeforeSetup:
    def test_a_flush_between_create_and_its_journal_setup_does_not_fail_the_engine(
            self, made: Made, spawner: Any, monkeypatch: Any) -> None:
        """An attach flushing before the creator set the journal directory: the engine goes on."""
        import engine.core as core
        q, go = spawner.ctx.Queue(), spawner.ctx.Event()
        name = made.names()
        spawner.start(early_flusher, name, q, go)
        real = core.write_meta
        early: list[Any] = []

        def meta_after_a_flush(*args: Any, **kw: Any) -> None:
            go.set()   # the segment exists; eng_durable_setup has not run
            early.append(q.get(timeout=60))
            real(*args, **kw)

        monkeypatch.setattr(core, "write_meta", meta_after_a_flush)
        eng = Engine.create(64, name=name, journal=str(made.dir()), max_accounts=2)
        made.engines.append(eng)
        assert early and early[0][0] != "error", early
        assert early[0][1] != "DurabilityError", f"the early flush failed the engine: {early}"
        assert writer_info(eng).failure == 0
        a = eng.open_account(1000, 1000, 5, 1000, key="acct")
        eng.open_position(100.0, 1.0, side=1, account=a, key="k")
        assert int(eng.flush(10.0)) == eng.journal_seq


