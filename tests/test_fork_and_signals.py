"""Fork and signals: an Engine inherited by a fork child is closed there,
and a signal handler's calls (or its exception) never leave a lock, latch,
snapshot or registry entry half done.

Forbidden: a child's exit or a handler releasing or corrupting what the
parent or the interrupted call holds."""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from owners_helpers import (
    ANSWER_BOUND,
    BRIEF_GUARD_SPEC,
    CTX,
    ERROR_FLAG,
    LOCK,
    LONG_SLEEP,
    SECONDS,
    assert_own_entry,
    engine_env,
    get_from,
    latch_owner,
    monitoring,
    proc_state,
    registry,
    sw_owner,
)
from procs import JOIN_TIMEOUT, READY_TIMEOUT, readable, timed, until

from engine import (
    BusyError,
    CapacityError,
    ClosedError,
    Engine,
    NotOpenError,
    Outcome,
    State,
    Trigger,
    WaitTimeout,
)
from engine._native import lib

JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)

FORK_CTX = mp.get_context("fork")
PARENT_PAUSE_NS = 1_000_000_000   # the parent's slow path holds its lock this long


def contender_worker(handle: Any, pos: int, q: Any) -> None:
    """While another process holds pos's lock: try PAUSE over and over, and
    recover() once; report every outcome."""
    eng = Engine.attach(handle)
    slot = eng.slot_of(pos)
    q.put("ready")
    deadline = time.monotonic() + READY_TIMEOUT
    while not eng.state_word(slot) & LOCK:
        if time.monotonic() > deadline:
            q.put({"saw_lock": False})
            return
        time.sleep(0.0005)
    outcomes: list[str] = []
    recovered = None
    end = time.monotonic() + 5.0
    while eng.state_word(slot) & LOCK and time.monotonic() < end:
        outcomes.append(eng.transition(pos, Trigger.PAUSE).name)
        if recovered is None:
            r = eng.recover()
            recovered = [r.rolled_forward, r.rolled_back, r.price_latches, list(r.removed_pids)]
    q.put({"saw_lock": True, "outcomes": outcomes, "recover": recovered})


def inherited_calls(eng: Engine, pos: int) -> list[tuple[str, Callable[[], Any]]]:
    """Every call a user could make on an Engine (each must refuse in a fork child)."""
    slot = pos & lib.ENG_ID_SLOT_MASK
    ids, prices = np.array([pos], dtype=np.uint64), np.array([101.0])
    return [
        ("state", lambda: eng.state(pos)),
        ("state_word", lambda: eng.state_word(slot)),
        ("id_of", lambda: eng.id_of(slot)),
        ("transition", lambda: eng.transition(pos, Trigger.PAUSE)),
        ("transition ctx", lambda: eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=1)),
        ("price", lambda: eng.price(pos)),
        ("context", lambda: eng.context(pos)),
        ("update_price", lambda: eng.update_price(pos, 101.0)),
        ("update_prices", lambda: eng.update_prices(ids, prices)),
        ("update_token_price", lambda: eng.update_token_price(3, 101.0)),
        ("wait_for_change", lambda: eng.wait_for_change(pos, timeout=0.01)),
        ("snapshot", lambda: eng.snapshot()),
        ("open_position", lambda: eng.open_position(100.0, 1.0)),
        ("release_position", lambda: eng.release_position(pos)),
        ("recover", lambda: eng.recover()),
        ("metrics", lambda: eng.metrics()),
        ("set_metrics", lambda: eng.set_metrics(True)),
        ("halt", lambda: eng.halt(False)),
    ]


def forked_child_checks(eng: Engine, handle: Any, pos: int) -> list[str]:
    """Run in a fork child: every call on the inherited Engine raises a
    ClosedError naming attach; Engine.attach(handle) works.  Returns problems."""
    problems = []
    for name, call in inherited_calls(eng, pos):
        try:
            call()
        except ClosedError as e:
            if "attach" not in str(e):
                problems.append(f"{name}: ClosedError does not mention attach: {e}")
        except BaseException as e:   # any other outcome is the finding
            problems.append(f"{name}: {type(e).__name__}: {e}")
        else:
            problems.append(f"{name}: no error on the inherited Engine")
    try:
        with Engine.attach(handle) as mine:
            if mine._seg.token == eng._seg.token:
                problems.append("the child's own Engine reuses the parent's token")
            if mine.state(pos) is not State.MONITORING:
                problems.append(f"child's own Engine reads {mine.state(pos)!r}")
            for trig in (Trigger.PAUSE, Trigger.RESUME):
                if mine.transition(pos, trig) is not Outcome.APPLIED:
                    problems.append(f"child's own Engine: {trig.name} not applied")
    except BaseException as e:
        problems.append(f"Engine.attach(handle) in the child: {type(e).__name__}: {e}")
    return problems


def read_all(fd: int, timeout: float) -> bytes:
    out, deadline = b"", time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not readable(fd, left):
            raise AssertionError(f"fork child wrote nothing for {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return out
        out += chunk


def assert_parent_still_owns(eng: Engine, spawn: Any, pos: int) -> None:
    """The parent's entry is intact, and its slow-path transition paused holding
    the lock is taken over by nobody (a contender gets no APPLIED, its
    recover() does nothing), then commits."""
    assert_own_entry(eng)
    slot = eng.slot_of(pos)
    q = CTX.Queue()
    contender = spawn(contender_worker, eng.handle, pos, q)
    assert get_from(q, contender) == "ready"
    eng._set_fault(pause_ns=PARENT_PAUSE_NS)
    try:
        outcome = eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=7)
    finally:
        eng._set_fault(0, 0)
    seen = get_from(q, contender, JOIN_TIMEOUT)
    assert seen["saw_lock"], "the contender never saw the parent's lock"
    assert "APPLIED" not in seen["outcomes"], f"the parent's lock was taken: {seen}"
    assert seen["recover"] in (None, [0, 0, 0, []]), f"recover() touched the parent: {seen}"
    assert outcome is Outcome.APPLIED, f"the parent's own transition: {outcome!r}"
    w = eng.state_word(slot)
    assert eng.state(pos) is State.EXIT_PENDING and not w & (LOCK | ERROR_FLAG)
    assert eng.context(pos).exit_reason == 7
    assert_own_entry(eng)


#: holds the Engine of the multiprocessing-fork test, so that the fork child
#: can drop the last reference to it (and so run its finalizer)
_FORKED: dict[str, Any] = {}


def mp_fork_child_worker(q: Any) -> None:
    """Runs in a multiprocessing 'fork' child: check the inherited Engine, drop
    it (its finalizer runs here), exit the normal way."""
    eng = _FORKED["eng"]
    ref = weakref.ref(eng)
    problems = forked_child_checks(eng, _FORKED["handle"], _FORKED["pos"])
    del eng
    _FORKED.clear()   # the last reference: the inherited Engine is finalized now
    gc.collect()
    q.put({"problems": problems, "finalized": ref() is None})
    sys.exit(0)


FORK_SCRIPT = r"""
import json, os, sys
from engine import ClosedError, Engine, Trigger
name, pos = sys.argv[1], int(sys.argv[2])
eng = Engine.attach(name)
seg = eng._seg
print(json.dumps({"pid": os.getpid(), "token": int(seg.token)}), flush=True)
child = os.fork()
if child == 0:
    try:
        eng.state(pos)
    except ClosedError as e:
        sys.exit(0 if "attach" in str(e) else 4)   # a normal exit: atexit hooks, finalizers
    sys.exit(3)
_, status = os.waitpid(child, 0)
entry = seg.registry[seg.proc_index]
report = {"child": os.waitstatus_to_exitcode(status), "entry_pid": int(entry.pid),
          "entry_state": int(entry.state)}
print(json.dumps(report), flush=True)
sys.stdin.readline()   # the test sets the pause, then says go
print(json.dumps({"outcome": eng.transition(pos, Trigger.EXIT_CONDITION_MET,
                                            exit_reason=7).name}), flush=True)
eng.close()
"""


class StormError(Exception):
    """Raised by the SIGALRM handler inside engine calls."""


_ARMED = [False]


STORM_INTERVALS = (0.0001, 0.00031, 0.001)


def _storm_handler(signum: int, frame: Any) -> None:
    if _ARMED[0]:
        _ARMED[0] = False   # one exception per step: the test's own bookkeeping stays sane
        raise StormError


def storm_step(eng: Engine, rng: random.Random, ids: list[int], cur: list[int],
               stats: collections.Counter[str]) -> None:
    """One random engine call, armed: the SIGALRM handler may raise anywhere in it."""
    _ARMED[0] = True
    r = rng.random()
    if r < 0.10 or not ids:
        ids.append(eng.open_position(100.0 + rng.random(), 1.0, side=rng.choice((1, -1)),
                                     token=rng.randrange(3)))
    elif r < 0.18:
        cur[0] = rng.choice(ids)
        eng.update_price(cur[0], rng.uniform(50.0, 150.0))
    elif r < 0.21:
        stats["written"] += eng.update_prices(np.array(ids, dtype=np.uint64),
                                              np.full(len(ids), rng.uniform(50.0, 150.0)))
    elif r < 0.24:
        eng.update_token_price(rng.randrange(3), rng.uniform(50.0, 150.0))
    elif r < 0.27:
        cur[0] = rng.choice(ids)
        eng.wait_for_change(cur[0], timeout=0.0003)
    elif r < 0.29:
        eng.snapshot()
        eng.price(rng.choice(ids))
        eng.context(rng.choice(ids))
    elif r < 0.31:
        Engine.attach(eng.handle).close()
    elif r < 0.32:
        eng.recover()
    else:
        pos = cur[0] = rng.choice(ids)
        st = eng.state(pos)
        if st is State.CLOSED:
            stats["release " + eng.release_position(pos).name] += 1
            ids.remove(pos)
        else:
            if st is State.CREATED:
                out = eng.transition(pos, Trigger.POSITION_OPENED)
            elif st is State.MONITORING:
                out = (eng.transition(pos, Trigger.EXIT_CONDITION_MET,
                                      exit_reason=rng.randrange(1, 10))
                       if rng.random() < 0.7 else eng.transition(pos, Trigger.PAUSE))
            elif st is State.PAUSED:
                out = eng.transition(pos, Trigger.RESUME)
            elif st is State.EXIT_PENDING:   # EXIT_STARTED is guarded (the guard sleeps)
                out = (eng.transition(pos, Trigger.EXIT_STARTED) if rng.random() < 0.7
                       else eng.transition(pos, Trigger.EXIT_CANCELLED, exit_reason=0))
            elif st is State.EXITING:
                out = eng.transition(pos, Trigger.EXIT_COMPLETED if rng.random() < 0.8
                                     else Trigger.EXIT_FAILED)
            else:
                out = eng.transition(pos, Trigger.RECOVER)
            stats[out.name] += 1
    _ARMED[0] = False


@contextlib.contextmanager
def sigalrm_handler(handler: Callable[[int, Any], None]) -> Iterator[float]:
    """Install ``handler`` for SIGALRM for the block (which sets the timer);
    afterwards stop it and put back the previous handler and timer
    (pytest-timeout's, if any).  Yields the start time."""
    old_handler = signal.signal(signal.SIGALRM, handler)
    old_timer = signal.getitimer(signal.ITIMER_REAL)
    t0 = time.monotonic()
    try:
        yield t0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL,
                             max(0.001, old_timer[0] - (time.monotonic() - t0)), old_timer[1])


@contextlib.contextmanager
def sigalrm_storm() -> Iterator[float]:
    """``sigalrm_handler`` with the raising storm handler, disarmed afterwards."""
    try:
        with sigalrm_handler(_storm_handler) as t0:
            yield t0
    finally:
        _ARMED[0] = False


def kill_quietly(pid: int) -> None:
    """SIGKILL a process that may be gone already (not our child: init reaps it)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class SignalAfterCall:
    """Stands in for an Engine's ``_lib`` (the C library): forwards everything, and raises
    SIGALRM right after the next armed call of ``name`` returns, so that the
    handler runs exactly where a signal that arrived during the C call would
    (between the C call and the Python code after it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.armed = False
        self.hits = 0

    def __getattr__(self, attr: str) -> Any:
        real = getattr(lib, attr)
        if attr != self.name:
            return real

        def call(*args: Any) -> Any:
            rc = real(*args)
            if self.armed:
                self.armed = False
                self.hits += 1
                signal.raise_signal(signal.SIGALRM)   # the handler runs in here
            return rc
        return call


HOLD_AND_FORK_SCRIPT = r"""
import os, sys, time
from engine import Engine
from engine._native import lib
eng = Engine.attach(sys.argv[1])
rc = lib.eng_test_hold(eng._seg, 2, int(sys.argv[2]))   # the transition lock
kid = os.fork()
if kid == 0:   # a worker that inherits the mapping and never touches the Engine
    time.sleep(float(sys.argv[3]))
    os._exit(0)
print(rc, kid, int(eng._seg.token), flush=True)
time.sleep(float(sys.argv[3]))
"""


class HandlerError(Exception):
    """Raised by a SIGALRM handler after its own engine work."""


class TestFork:
    """An Engine inherited through fork() is closed in the child; the child's
    exit, however it happens, never touches the parent's entry or locks."""

    def test_os_fork_child_refuses_inherited_engine_and_close_is_harmless(
            self, make_engine, spawn):
        """An os.fork child's inherited Engine raises ClosedError; the parent is untouched.

        os.fork child: every inherited call raises ClosedError naming attach,
        attach works, eng.close() then os._exit; the parent's entry and its paused
        slow path are untouched; forbidden: a takeover of the live parent.
        """
        eng = make_engine()
        pos = monitoring(eng)
        handle = eng.handle
        r, w = os.pipe()
        child = os.fork()
        if child == 0:   # never return into pytest from here
            code = 70
            try:
                os.close(r)
                problems = forked_child_checks(eng, handle, pos)
                try:
                    eng.close()   # the inherited Engine's finalizer, run by hand
                except BaseException as e:
                    problems.append(f"close() in the child: {type(e).__name__}: {e}")
                os.write(w, json.dumps(problems).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        try:
            data = read_all(r, READY_TIMEOUT)
        finally:
            os.close(r)
            _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert json.loads(data) == []
        assert_parent_still_owns(eng, spawn, pos)

    def test_multiprocessing_fork_child_exit_keeps_parent_entry(self, spawn):
        """A multiprocessing fork child that drops the inherited Engine keeps the parent's entry.

        multiprocessing 'fork' child that drops (finalizes) the inherited Engine
        and exits normally: the parent's entry and paused slow path are untouched;
        forbidden: the child freeing the parent's entry.
        """
        _FORKED["eng"] = Engine.create(capacity=16)
        try:
            _FORKED["handle"] = _FORKED["eng"].handle
            _FORKED["pos"] = monitoring(_FORKED["eng"])
            q = FORK_CTX.Queue()
            p = FORK_CTX.Process(target=mp_fork_child_worker, args=(q,), daemon=True)
            p.start()
            try:
                out = get_from(q, p)
                p.join(JOIN_TIMEOUT)
            finally:
                if p.is_alive():
                    p.kill()
                    p.join(JOIN_TIMEOUT)
            assert p.exitcode == 0
            assert out["problems"] == []
            assert out["finalized"], ("the inherited Engine was not collected in the child "
                                      "(a strong reference is kept): its finalizer did not run")
            assert_parent_still_owns(_FORKED["eng"], spawn, _FORKED["pos"])
        finally:
            eng = _FORKED.pop("eng")
            _FORKED.clear()
            eng.close()
            eng.unlink()

    def test_fork_child_sys_exit_keeps_parent_entry(self, make_engine, child_env):
        """A fork child's sys.exit keeps the parent's entry and its paused slow path.

        A plain interpreter forks; its child exits with sys.exit (atexit hooks
        and finalizers run): the parent's entry stays, and its paused slow path
        is not taken over by this process; forbidden: APPLIED for us, a rollback.
        """
        eng = make_engine()
        pos = monitoring(eng)
        slot = eng.slot_of(pos)
        proc = subprocess.Popen([sys.executable, "-c", FORK_SCRIPT, eng.name, str(pos)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=child_env)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            me = json.loads(proc.stdout.readline())
            report = json.loads(proc.stdout.readline())
            assert report == {"child": 0, "entry_pid": me["pid"],
                              "entry_state": lib.ENG_PROC_ACTIVE}, report
            eng._set_fault(pause_ns=PARENT_PAUSE_NS)
            try:
                proc.stdin.write("go\n")
                proc.stdin.flush()
                until(lambda: eng.state_word(slot) & LOCK
                      and sw_owner(eng.state_word(slot)) == me["token"],
                      "the forking process to hold its lock", timeout=JOIN_TIMEOUT)
                outcomes = collections.Counter()
                rec = eng.recover()
                while eng.state_word(slot) & LOCK:
                    outcomes[eng.transition(pos, Trigger.PAUSE).name] += 1
            finally:
                eng._set_fault(0, 0)
            final = json.loads(proc.stdout.readline())
            proc.wait(JOIN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(JOIN_TIMEOUT)
        assert (rec.rolled_forward, rec.rolled_back, rec.removed_pids) == (0, 0, ()), rec
        assert outcomes["APPLIED"] == 0, f"the forking process's lock was taken: {outcomes}"
        assert final == {"outcome": "APPLIED"}
        assert proc.returncode == 0
        assert eng.state(pos) is State.EXIT_PENDING and eng.context(pos).exit_reason == 7


class TestSignalStorm:
    """A signal handler's exception, wherever it lands in a call, leaves no
    lock, latch, half-open slot, recovery flag or registry entry held by the
    (live) process."""

    def test_handler_exceptions_leak_nothing(self, make_engine):
        """Exceptions from a signal handler during every call leave nothing held.

        SIGALRM every 0.1-1 ms raising from its handler while one process runs
        guarded/slow/fast transitions, opens, releases, prices, waits, attaches and
        recover(): afterwards nothing is held and every position still answers;
        forbidden: any lock, latch, flag or entry held by this live process.
        """
        eng = make_engine(capacity=8, spec=BRIEF_GUARD_SPEC)
        rng = random.Random(4)
        ids: list[int] = []
        cur = [0]
        stats: collections.Counter[str] = collections.Counter()
        with sigalrm_storm() as t0:
            for k, interval in enumerate(STORM_INTERVALS * max(1, int(SECONDS))):
                signal.setitimer(signal.ITIMER_REAL, interval, interval)
                end = t0 + SECONDS * (k + 1) / (len(STORM_INTERVALS) * max(1, int(SECONDS)))
                while time.monotonic() < end:
                    try:
                        try:
                            storm_step(eng, rng, ids, cur, stats)
                        except NotOpenError:   # released, but the StormError beat ids.remove
                            _ARMED[0] = False
                            stats["stale"] += 1
                            if cur[0] in ids:
                                ids.remove(cur[0])
                        except (CapacityError, WaitTimeout) as e:
                            _ARMED[0] = False
                            stats[type(e).__name__] += 1
                        except BusyError:
                            _ARMED[0] = False
                            stats["BusyError"] += 1
                    except StormError:
                        stats["storm"] += 1
        gc.collect()   # Engines lost to an exception mid-attach are finalized now
        print(f"\nsignal storm: {SECONDS:.0f} s, {dict(stats)}")
        assert stats["storm"] > 100, "the storm hardly interrupted anything: it proves little"
        assert stats["CONFLICT"] == 0 and stats["BusyError"] == 0, \
            f"this process met its own leaked lock or latch: {dict(stats)}"
        for slot in range(eng.capacity):
            w = eng.state_word(slot)
            assert not w & LOCK, f"slot {slot}: lock left held: {w:#x}"
            assert latch_owner(eng, slot) == 0, f"slot {slot}: price latch left held"
        assert int(eng._seg.hdr.recovering) == 0, "recovery flag left held"
        assert [e[0] for e in registry(eng)] == [eng._seg.proc_index], \
            f"registry entries beyond this Engine's: {registry(eng)}"
        rows = eng.snapshot()
        still_open = 0
        for row in rows:
            pos = int(row["id"])
            if row["state"] == State.CLOSED:
                out, took = timed(lambda pos=pos: eng.release_position(pos))
            else:
                still_open += 1
                out, took = timed(lambda pos=pos: eng.transition(pos, Trigger.ERROR_OCCURRED))
            assert out is Outcome.APPLIED and took < ANSWER_BOUND, \
                f"position {pos:#x} ({State(int(row['state'])).name}) refused: {out!r}"
        opened = 0
        while True:
            try:
                eng.open_position(100.0, 1.0)
            except CapacityError:
                break
            opened += 1
        assert opened == eng.capacity - still_open, "a slot is neither open nor free (half-open)"


    @pytest.mark.parametrize("armed_in", ["attach", "close"])
    def test_attach_and_close_under_storm_leave_no_entry(self, make_engine, armed_in):
        """attach and close interrupted at every point leave no registry entry behind.

        Engine.attach / Engine.close interrupted by a handler's exception at
        every point: afterwards only the test's own entry is in the registry;
        forbidden: an entry held forever by this live process (recover() cannot
        free it: the process is alive).
        """
        eng = make_engine(capacity=2)
        stats: collections.Counter[str] = collections.Counter()
        with sigalrm_storm() as t0:
            signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
            while time.monotonic() < t0 + SECONDS / 2:
                other = None
                try:
                    try:
                        _ARMED[0] = armed_in == "attach"
                        other = Engine.attach(eng.handle)
                        _ARMED[0] = True
                        other.close()
                        _ARMED[0] = False
                    except StormError:
                        stats["storm in " + ("close" if other is not None else "attach")] += 1
                        if other is not None:
                            other.close()   # what a careful caller does after an error
                        other = None
                except StormError:
                    stats["storm"] += 1
        gc.collect()
        print(f"\nattach/close storm ({armed_in}): {dict(stats)}")
        assert stats[f"storm in {armed_in}"] > 20, "the storm hardly hit the call under test"
        leaked = [e for e in registry(eng) if e[0] != eng._seg.proc_index]
        assert not leaked, f"{len(leaked)} registry entries left held by this live process"


class TestForkInheritedMapping:
    """A fork child that merely inherits an Engine's mapping does not keep its
    dead parent's liveness lock (so its transition locks) alive."""

    def test_dead_holders_lock_taken_over_while_its_fork_child_lives(self, make_engine):
        """A dead holder's lock is taken over while its fork child still lives.

        The holder of a transition lock forks a sleeping child and is SIGKILLed:
        while the child lives, a transition on that slot is APPLIED within 2 s and
        recover() removes the holder; forbidden: CONFLICT for the child's lifetime.
        """
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_AND_FORK_SCRIPT, eng.name, str(pos), str(LONG_SLEEP)],
            stdout=subprocess.PIPE, text=True, env=engine_env())
        kid = 0
        try:
            assert holder.stdout is not None
            rc, kid, token = map(int, holder.stdout.readline().split())
            assert rc == 0
            w = eng.state_word(slot)
            assert w & LOCK and sw_owner(w) == token
            holder.kill()
            holder.wait(JOIN_TIMEOUT)
            assert proc_state(kid) in "RSD", "the fork child is not alive: the test proves nothing"
            outcome, took = timed(lambda: eng.transition(pos, Trigger.POSITION_OPENED))
            report = eng.recover()
            assert proc_state(kid) in "RSD", "the fork child died during the test"
        finally:
            if kid:
                kill_quietly(kid)
            if holder.poll() is None:
                holder.kill()
                holder.wait(JOIN_TIMEOUT)
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND, \
            f"dead holder's lock kept alive by its fork child: {outcome!r} after {took:.3f} s"
        assert eng.state(pos) is State.MONITORING and not eng.state_word(slot) & LOCK
        assert report.removed_pids == (holder.pid,), report


class TestHandlerSnapshot:
    """snapshot() from a signal handler that lands in another snapshot() of the
    same Engine leaves the outer result whole: its row count is its own."""

    def test_handler_snapshot_does_not_change_outer_rows(self, make_engine, monkeypatch):
        """A snapshot in a signal handler does not change the interrupted snapshot's rows.

        SIGALRM lands while the main loop's snapshot runs in C; the handler opens a
        position and snapshots: the outer snapshot has exactly the rows open before,
        none with id 0; forbidden: the handler's count applied to the outer rows.
        """
        eng = make_engine(capacity=64)
        ids = [eng.open_position(100.0, 1.0) for _ in range(8)]
        spy = SignalAfterCall("eng_snapshot")
        monkeypatch.setattr(eng, "_lib", spy)   # the interface the Engine calls
        seen: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            ids.append(eng.open_position(100.0, 1.0))   # the handler's own work ...
            seen.append(len(eng.snapshot()))           # ... and its own snapshot

        bad = []
        with sigalrm_handler(handler):
            for _ in range(16):
                before = set(ids)
                spy.armed = True
                rows = eng.snapshot()
                got = [int(i) for i in rows["id"]]
                if 0 in got or set(got) != before or len(got) != len(before):
                    bad.append(f"{len(got)} rows ({got.count(0)} with id 0) for "
                               f"{len(before)} open before the handler's")
        assert spy.hits == 16 and seen == list(range(9, 25)), (spy.hits, seen)
        assert not bad, f"{len(bad)} of 16 outer snapshots wrong, first: {bad[:3]}"
        assert sorted(int(i) for i in eng.snapshot()["id"]) == sorted(ids)


class TestHandlerOpenAbandon:
    """An open whose id cannot reach its caller (a handler raised right after
    the C call) is undone even when the handler opened a position first."""

    def test_outer_open_undone_after_handler_opens_and_raises(self, make_engine, monkeypatch):
        """An open interrupted by a raising handler is given back; the handler's stay.

        SIGALRM right after eng_open returns; the handler opens its own
        position and raises: the handler's positions stay, the outer opening is
        given back; forbidden: an open position whose id nobody received.
        """
        eng = make_engine(capacity=64)
        spy = SignalAfterCall("eng_open")
        monkeypatch.setattr(eng, "_lib", spy)   # the interface the Engine calls
        returned: list[int] = []
        by_handler: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            by_handler.append(eng.open_position(1.0, 1.0))   # the handler's own open ...
            raise HandlerError                               # ... then it raises

        with sigalrm_handler(handler):
            for _ in range(16):
                returned.append(eng.open_position(100.0, 1.0))   # unarmed
                spy.armed = True
                with pytest.raises(HandlerError):
                    eng.open_position(200.0, 2.0)
        assert spy.hits == 16 and len(by_handler) == 16
        rows = eng.snapshot()
        known = set(returned) | set(by_handler)
        leaked = [f"{int(r['id']):#x} (entry {r['entry_price']})" for r in rows
                  if int(r["id"]) not in known]
        assert not leaked, f"{len(leaked)} openings nobody received: {leaked[:5]}"
        assert len(rows) == len(known) == 32
