"""Adversary of the journal's append: who resolves a dead writer's record, and whose it is.

A writer is SIGKILLed at each journal step; then recover(), two readers and
a committer are released at the same instant to resolve the same dead
record; or the dead writer's registry entry is taken by a new process (its
token's entry now names a live one) before anybody resolved it; or the
process forks while another of its threads is mid-append.

Forbidden outcomes: two outcomes for one record (a reader that got it while
the books say its change never happened, or one reader with it and one
without at the same seq); a record judged live because its writer's entry
was re-claimed (commits elsewhere refused, a reader stuck before it); a fork
child that cannot read through a record its parent's thread was appending;
and, after all, a commit without its record or a record without its commit.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from journal_audit import (
    DIE_FAULTS,
    KILLED,
    KINDS,
    SHORT,
    Segment,
    World,
    check_seqs,
    churning,
    die_at,
    drain,
    faults_on,
    forked,
    journal_on,  # noqa: F401 (the make_engine fixture, journal on)
)

from engine import Engine, Outcome, State, Trigger
from engine._native import lib
from engine.errors import EngineError

pytestmark = pytest.mark.shm_only


def racer(handle: str, role: str, since: int, gate: int, out: str, other: int) -> int:
    """Forked child: wait at the gate, then resolve by its role; write what it saw."""
    faults_on()
    eng = Engine.attach(handle)
    os.read(gate, 1)
    res: dict[str, Any] = {"role": role}
    try:
        if role == "recover":
            res["report"] = str(eng.recover())
        elif role == "commit":
            res["out"] = eng.transition(other, Trigger.PAUSE if eng.state(other)
                                        is State.MONITORING else Trigger.RESUME).name
        else:
            res["events"] = [[e.seq, e.kind, e.id, e.state.name if e.state else None]
                             for e in eng.events(since=since, timeout=1.0)]
    except EngineError as e:
        res["error"] = f"{type(e).__name__}: {e}"
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


def race_round(make_engine: Any, tmp_path: Any, kind: str, name: str) -> None:
    eng = make_engine(capacity=8, max_accounts=2, journal_prices=kind in ("price", "exit_fire"))
    world = World(eng)
    other = eng.open_position(20.0, 1.0)
    eng.transition(other, Trigger.POSITION_OPENED)
    seg = Segment(eng)
    since = eng.journal_seq
    try:
        code = forked(die_at, eng.handle, getattr(lib, name), world, kind)
        eng._set_fault(0)
        if code != KILLED:
            return
        r, w = os.pipe()
        pids = []
        outs = []
        for i, role in enumerate(("recover", "read", "read", "commit")):
            outs.append(str(tmp_path / f"{role}{i}.json"))
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(w)
                    code = racer(eng.handle, role, since, r, outs[-1], other)
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(r)
        os.write(w, b"gogo")   # all four at once
        os.close(w)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        seen = []
        for out in outs:
            with open(out) as f:
                seen.append(json.load(f))
        eng.recover()
        final = {e.seq: [e.seq, e.kind, e.id, e.state.name if e.state else None]
                 for e in drain(eng, since)}
        check_seqs(list(drain(eng, since)), eng.journal_seq, first=since + 1)
        for res in seen:
            assert "error" not in res or res["role"] == "commit", res
            for ev in res.get("events", []):
                assert final.get(ev[0]) == ev, \
                    f"a reader got {ev}, the journal says {final.get(ev[0])}: two outcomes"
        world.check(eng, seg)
    except AssertionError as e:
        raise AssertionError(f"{kind} killed at {name}: {e}") from e
    finally:
        seg.close()


class TestResolveRace:
    @pytest.mark.parametrize("kind", ["fast", "slow", "account", "booked_open"])
    def test_recover_and_readers_resolve_one_dead_record_once(self, make_engine: Any,
                                                              tmp_path: Any, kind: str) -> None:
        """recover(), two readers and a committer racing on one dead record: one outcome."""
        for name in SHORT:
            race_round(make_engine, tmp_path, kind, name)

    @pytest.mark.slow
    @pytest.mark.parametrize("kind", KINDS)
    def test_resolution_race_every_kind_many_rounds(self, make_engine: Any, tmp_path: Any,
                                                    kind: str) -> None:
        """The same for every kind and fault site, 10 rounds each."""
        for _ in range(10):
            for name in DIE_FAULTS:
                race_round(make_engine, tmp_path, kind, name)


class TestTokenReuse:
    @pytest.mark.parametrize("kind", ["fast", "slow", "account", "open"])
    def test_dead_writers_entry_reclaimed_before_resolution(self, make_engine: Any,
                                                            tmp_path: Any, kind: str) -> None:
        """A dead writer's registry entry taken by a live process: its record still judged dead."""
        for name in SHORT:
            eng = make_engine(capacity=8, max_accounts=2)
            world = World(eng)
            other = eng.open_position(20.0, 1.0)
            eng.transition(other, Trigger.POSITION_OPENED)
            seg = Segment(eng)
            hold: list[Engine] = []
            try:
                code = forked(die_at, eng.handle, getattr(lib, name), world, kind)
                eng._set_fault(0)
                if code != KILLED:
                    continue
                # fill the registry: the free entries first, then the last attach takes
                # the dead writer's entry (a new incarnation of it) -- before anybody
                # but that attach resolved the dead writer's record
                while True:
                    try:
                        hold.append(Engine.attach(eng.handle))
                    except EngineError:
                        break
                    assert len(hold) <= lib.ENG_MAX_PROCS, "more attaches than entries"
                heir = hold[-1]
                out = heir.transition(other, Trigger.PAUSE if heir.state(other)
                                      is State.MONITORING else Trigger.RESUME)
                assert out is Outcome.APPLIED, f"the heir's commit elsewhere got {out}"
                flip_ok = eng.transition(other, Trigger.PAUSE if eng.state(other)
                                         is State.MONITORING else Trigger.RESUME)
                assert flip_ok is Outcome.APPLIED, f"a commit elsewhere got {flip_ok}"
                check_seqs(drain(heir), heir.journal_seq)
                check_seqs(drain(eng), eng.journal_seq)
            except AssertionError as e:
                raise AssertionError(f"{kind} killed at {name}: {e}") from e
            finally:
                for h in hold:
                    h.close()
                seg.close()
            eng.recover()
            world.check(eng, Segment(eng))


class TestForkMidAppend:
    def test_fork_child_reads_through_the_parents_append(self, make_engine: Any) -> None:
        """fork() while a thread appends: the child reads every record through journal_seq."""
        eng = make_engine(capacity=8, journal_records=16)
        ids = [eng.open_position(10.0, 1.0) for _ in range(3)]
        for pos in ids:
            eng.transition(pos, Trigger.POSITION_OPENED)
        stop_churn = churning(eng, ids[2])
        codes = []
        try:
            for i in range(30):
                pid = os.fork()
                if pid == 0:   # never returns into pytest
                    code = 1
                    try:
                        child = Engine.attach(eng.handle)
                        out = child.transition(ids[i % 2], Trigger.PAUSE
                                               if child.state(ids[i % 2]) is State.MONITORING
                                               else Trigger.RESUME)
                        top = child.journal_seq
                        after, got = max(0, top - 8), 0
                        from engine.errors import JournalLappedError
                        while after < top:
                            try:
                                for ev in child.events(since=after, timeout=5):
                                    if ev.seq != after + 1:
                                        os._exit(5)
                                    after = ev.seq
                                    got += 1
                                    if after >= top:
                                        break
                                else:
                                    break
                            except JournalLappedError as e:
                                after = e.resume_seq - 1
                        code = 0 if out is Outcome.APPLIED and after >= top else 4
                    finally:
                        os._exit(code)
                _, status = os.waitpid(pid, 0)
                codes.append(os.waitstatus_to_exitcode(status))
        finally:
            stop_churn()
        assert set(codes) == {0}, codes


def spinning_reader(handle: str, since: int, stopfile: str, out: str) -> int:
    """Forked child: read from ``since`` in a tight loop (resolving what it finds) until
    ``stopfile`` exists; write every record it ever got."""
    faults_on()
    eng = Engine.attach(handle)
    seen: dict[int, list[Any]] = {}
    while not os.path.exists(stopfile):
        for e in eng.events(since=since, timeout=0):
            seen.setdefault(e.seq, [e.seq, e.kind, e.id, e.state.name if e.state else None])
    with open(out, "w") as f:
        json.dump(list(seen.values()), f)
    return 0


def start_forked(fn: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn(*args)
        finally:
            os._exit(code)
    return pid


def during_round(make_engine: Any, tmp_path: Any, kind: str, name: str) -> None:
    eng = make_engine(capacity=8, max_accounts=2, journal_prices=kind in ("price", "exit_fire"))
    world = World(eng)
    seg = Segment(eng)
    since = eng.journal_seq
    stopfile = str(tmp_path / "stop")
    if os.path.exists(stopfile):
        os.unlink(stopfile)
    outs = [str(tmp_path / f"spin{i}.json") for i in range(2)]
    readers = [start_forked(spinning_reader, eng.handle, since, stopfile, o) for o in outs]
    try:
        forked(die_at, eng.handle, getattr(lib, name), world, kind)
        eng._set_fault(0)
        world.again(kind, eng)
    finally:
        open(stopfile, "w").close()
        for pid in readers:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    eng.recover()
    final = {e.seq: [e.seq, e.kind, e.id, e.state.name if e.state else None]
             for e in drain(eng, since)}
    try:
        for out in outs:
            with open(out) as f:
                for ev in json.load(f):
                    assert final.get(ev[0]) == ev, \
                        f"a spinning reader got {ev}, the journal says {final.get(ev[0])}"
        world.check(eng, seg)
    except AssertionError as e:
        raise AssertionError(f"{kind} killed at {name}: {e}") from e
    finally:
        seg.close()


class TestResolveDuringDeath:
    @pytest.mark.parametrize("kind", ["fast", "slow", "account", "halt"])
    def test_readers_resolving_while_the_writer_dies(self, make_engine: Any, tmp_path: Any,
                                                     kind: str) -> None:
        """Readers spinning on a record while its writer commits and dies: one outcome."""
        for _ in range(2):
            for name in SHORT:
                during_round(make_engine, tmp_path, kind, name)

    @pytest.mark.slow
    @pytest.mark.parametrize("kind", KINDS)
    def test_readers_resolving_while_the_writer_dies_many(self, make_engine: Any,
                                                          tmp_path: Any, kind: str) -> None:
        """The same, every kind and fault site, 30 rounds."""
        for _ in range(30):
            for name in DIE_FAULTS:
                during_round(make_engine, tmp_path, kind, name)


PID_WRITER = """
import os, pickle, sys
from engine import Engine
from engine._native import lib
world, kind, fault, handle = pickle.loads(bytes.fromhex(sys.argv[1]))
print(os.getpid(), flush=True)
eng = Engine.attach(handle)
eng._set_fault(getattr(lib, fault))
world.run(kind, eng)
sys.exit(3)
"""

PID_HEIR = """
import os, pickle, sys
from engine import Engine, State, Trigger
world, kind, fault, handle = pickle.loads(bytes.fromhex(sys.argv[1]))
eng = Engine.attach(handle)
print(os.getpid(), flush=True)
sys.stdin.readline()   # alive, with the dead writer's pid, until the test is done
"""


def in_new_pidns(code: str, arg: str, child_env: dict[str, str], **kw: Any) -> Any:
    """``code`` as pid 2 of a new pid namespace (sh is its pid 1: pid 1 ignores SIGKILL
    sent by itself)."""
    import pathlib
    import subprocess
    import sys
    env = dict(child_env)
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).parent),
                                         env.get("PYTHONPATH", "")])
    return subprocess.Popen(["unshare", "--pid", "--fork", "sh", "-c",
                             '"$0" -c "$1" "$2"; exit $?', sys.executable, code, arg],
                            env=env, text=True, stdout=subprocess.PIPE, **kw)


class TestPidReuse:
    @pytest.mark.parametrize("kind", ["fast", pytest.param("slow", marks=pytest.mark.slow),
                                      pytest.param("account", marks=pytest.mark.slow)])
    def test_dead_writers_pid_reused_by_a_live_process(self, make_engine: Any, tmp_path: Any,
                                                       child_env: dict[str, str],
                                                       kind: str) -> None:
        """A live process with the dead writer's very pid: the dead writer's record still resolves.

        Each in a new pid namespace, so both have pid 2: the writer dies at each
        journal step, the heir attaches and stays alive; commits elsewhere go on,
        a reader gets past the dead record, and records == commits.
        """
        import pickle
        import shutil
        import subprocess
        if shutil.which("unshare") is None or \
                subprocess.run(["unshare", "--pid", "--fork", "true"]).returncode != 0:
            pytest.skip("no pid namespaces here")
        for name in SHORT:
            eng = make_engine(capacity=8, max_accounts=2)
            world = World(eng)
            other = eng.open_position(20.0, 1.0)
            eng.transition(other, Trigger.POSITION_OPENED)
            arg = pickle.dumps((world, kind, name, eng.handle)).hex()
            w = in_new_pidns(PID_WRITER, arg, child_env)
            out, _ = w.communicate(timeout=120)
            eng._set_fault(0)
            if w.returncode == 3:
                continue   # the fault is not on this path
            assert w.returncode == 128 + 9, f"{name}: the writer ended with {w.returncode}"
            dead_pid = int(out.split()[0])
            heir = in_new_pidns(PID_HEIR, arg, child_env, stdin=subprocess.PIPE)
            try:
                assert heir.stdout is not None and heir.stdin is not None
                heir_pid = int(heir.stdout.readline())
                assert heir_pid == dead_pid, (heir_pid, dead_pid)
                flip = eng.transition(other, Trigger.PAUSE if eng.state(other)
                                      is State.MONITORING else Trigger.RESUME)
                assert flip is Outcome.APPLIED, f"{name}: a commit elsewhere got {flip}"
                world.again(kind, eng)
                check_seqs(drain(eng), eng.journal_seq)
            except AssertionError as e:
                raise AssertionError(f"{kind} killed at {name}: {e}") from e
            finally:
                assert heir.stdin is not None
                heir.stdin.write("\n")
                heir.stdin.close()
                heir.wait(60)
            eng.recover()
            world.check(eng, Segment(eng))
