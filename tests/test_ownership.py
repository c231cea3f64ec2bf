"""Ownership you can trust (issue 7): fencing-token owners, proven-dead
liveness, stale-proof ids, fork- and signal-safe calls.

One class per confirmed case of issue 7, plus stale ids.  Each test says the
property it proves and the outcome it forbids; each one failed on the engine
before issue 7 (bare-pid lock owners, "/proc unreadable means dead", an
Engine finalizer that ran in fork children, guarded locks taken outside a
``try``, check-then-latch token prices, a waiter count a dead waiter kept,
slot numbers as ids).

   1 TestPidReuse        a dead owner whose pid was reused is taken over (not CONFLICT forever)
   2 TestUnknownLiveness an owner whose liveness cannot be read is alive (no takeover)
   3 TestFork            an inherited Engine is closed in the child; parent's entry untouched
   4 TestSignalStorm     a handler's exception never leaves a lock, latch or entry held
   5 TestTokenReopenRace a token price never lands in another token's position
   6 TestKilledCommitter a committer killed before its wake costs a waiter one slice
   7 TestGenerationCoincidence  a holder killed after its lock CAS is rolled back
   8 TestKilledWaiter    a killed waiter costs at most one spurious wake
   9 TestSnapshotPairing every snapshot row pairs a state with its own context
  10 TestRawCBoundary    every C entry point refuses bad segments and NULL outs: no crash
  11 TestErrors          one exception class per C code; EngineError never raised itself
  12 TestStaleIds        an id kept across release and reopen is refused everywhere

Second review round (each class failed on afaa4a6, the commit before its fixes):

  13 TestForkInheritedMapping  a fork child's inherited mapping keeps no dead parent's lock alive
  14 TestReplacedDescriptor    a process whose descriptor was replaced takes over nothing
  15 TestHaltDuringGuard       halt() during a guard: HALTED, nothing committed
  16 TestCloseDuringWait       close() from another thread during a wait: ClosedError, no crash
  17 TestHandlerSnapshot       a handler's snapshot never changes the outer snapshot's rows
  18 TestHandlerOpenAbandon    an open undone under a handler's own open is still undone
  19 TestIncarnationWrap       a wrapped incarnation never meets a gone owner's locks
  20 TestLocalEngineLimit      Engines past ENG_MAX_LOCAL_ENGINES in one process are refused

Durations: the timed races run ``OWNERSHIP_SECONDS`` seconds each (default 3;
issue 7 measured 10-15 s runs: ``OWNERSHIP_SECONDS=15 pytest tests/test_ownership.py``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gc
import json
import multiprocessing as mp
import os
import pathlib
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import (
    JOIN_TIMEOUT,
    READY_TIMEOUT,
    exit_guarded_spec,
    readable,
    sigkill,
    timed,
    until,
)

import engine.core
import engine.errors
from engine import (
    ArgumentError,
    BusyError,
    CapacityError,
    ClosedError,
    Engine,
    EngineError,
    EngineTypeError,
    MachineSpec,
    NotOpenError,
    Outcome,
    PriceError,
    Rule,
    SegmentError,
    SlotError,
    SpecMismatchError,
    State,
    Trigger,
    TriggerError,
    WaitTimeout,
)
from engine._native import ffi, lib
from engine.errors import InternalError, StaleIdError
from engine.store import shm as segment

CTX = mp.get_context("spawn")
FORK_CTX = mp.get_context("fork")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = REPO_ROOT / "native" / "engine.h"

SECONDS = float(os.environ.get("OWNERSHIP_SECONDS", "3"))
ANSWER_BOUND = 2.0         # a transition / recover() on a dead owner's lock returns within this
TAKEOVER_WITHIN = 5.0      # "a few seconds": retries allowed until then
LONG_SLEEP = 600.0         # a holder child sleeps this long (it is killed first)
GUARD_SLEEP_S = 60.0
PARENT_PAUSE_NS = 1_000_000_000   # the parent's slow path holds its lock this long

def c_error_codes() -> dict[str, int]:
    """Every ENG_E* error code (an ENG_ERRNO_MIN would be a bound, not a code)."""
    return {n: getattr(lib, n) for n in dir(lib)
            if n.startswith("ENG_E") and n != "ENG_ERRNO_MIN"
            and isinstance(getattr(lib, n), int) and getattr(lib, n) < 0}


ERRNO_MIN = min(c_error_codes().values())   # the lowest C error code
LOCK, ERROR_FLAG, CTX_BIT = lib.ENG_SW_LOCK, lib.ENG_SW_ERROR, lib.ENG_SW_CTX
TOKEN_MASK = lib.ENG_TOKEN_MASK
OWNER_FIELD = TOKEN_MASK << lib.ENG_SW_OWNER_SHIFT
U64 = 2**64 - 1


# -- state word, price word, registry (bit positions from the header) ---------------------
def sw_state(w: int) -> int:
    return w & lib.ENG_SW_STATE_MASK


def sw_gen(w: int) -> int:
    return (w >> lib.ENG_SW_GEN_SHIFT) & lib.ENG_SW_GEN_MASK


def sw_owner(w: int) -> int:
    return (w >> lib.ENG_SW_OWNER_SHIFT) & TOKEN_MASK


def sw_target(w: int) -> int:
    return (w >> lib.ENG_SW_TARGET_SHIFT) & lib.ENG_SW_TARGET_MASK


def pword(eng: Engine, slot: int) -> int:
    return int(eng._slot(slot).pword)


def latch_owner(eng: Engine, slot: int) -> int:
    """The price latch holder's token (0: unlatched)."""
    return pword(eng, slot) & TOKEN_MASK


def price_version(eng: Engine, slot: int) -> int:
    return pword(eng, slot) >> lib.ENG_PW_SEQ_SHIFT


def spare_commit(eng: Engine, slot: int) -> int:
    """The seal of the unpublished context copy (what a takeover compares)."""
    w = eng.state_word(slot)
    return int(eng._rec_copy(slot, 0 if w & CTX_BIT else 1).commit)


def published_commit(eng: Engine, slot: int) -> int:
    w = eng.state_word(slot)
    return int(eng._rec_copy(slot, 1 if w & CTX_BIT else 0).commit)


def registry(eng: Engine) -> list[tuple[int, int, int, int]]:
    """(index, pid, state, incarnation) of every entry in use."""
    out = []
    for i in range(lib.ENG_MAX_PROCS):
        e = eng._seg.registry[i]
        if e.pid or e.state != lib.ENG_PROC_FREE:
            out.append((i, int(e.pid), int(e.state), int(e.incarnation)))
    return out


def registry_pids(eng: Engine) -> list[int]:
    return [pid for _, pid, _, _ in registry(eng)]


def assert_own_entry(eng: Engine) -> None:
    """This Engine's registry entry still names this process, active, same incarnation."""
    seg = eng._seg
    e = seg.registry[seg.proc_index]
    assert (int(e.pid), int(e.state)) == (os.getpid(), lib.ENG_PROC_ACTIVE), \
        f"entry {seg.proc_index}: pid {e.pid} state {e.state}, expected {os.getpid()} ACTIVE"
    assert int(e.incarnation) == int(seg.token) >> lib.ENG_TOKEN_ENTRY_BITS


# -- small helpers ---------------------------------------------------------------------------



def proc_state(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def monitoring(eng: Engine, entry_price: float = 100.0, token: int = 3) -> int:
    """Open a position and move it to MONITORING; returns its id."""
    pos = eng.open_position(entry_price=entry_price, amount=2.0, token=token)
    assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return pos


def get_from(q: Any, p: Any, timeout: float = READY_TIMEOUT) -> Any:
    """The next item a child puts; fail at once if the child dies first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=0.2)
        except Exception:   # queue.Empty
            if not p.is_alive():
                try:
                    return q.get(timeout=0.5)
                except Exception:
                    raise AssertionError(f"child {p.pid} exited ({p.exitcode}) "
                                         "without reporting") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"child {p.pid} did not report within {timeout} s") from None


@pytest.fixture
def spawn(spawner: Any) -> Callable[..., Any]:
    """Start a spawn-context child; it never outlives the test."""
    return spawner.start


# -- guards and specs (module level: spawned workers import them by name) ----------------------
def sleepy_guard(*_: Any) -> bool:
    """A guard that never answers in time: its process is killed inside it."""
    time.sleep(GUARD_SLEEP_S)
    return True


def brief_guard(*_: Any) -> bool:
    """A guard that approves after a short sleep (signals land inside it)."""
    time.sleep(0.0005)
    return True


#: ARM fast, FIRE guarded by a guard that sleeps, DISARM undoes ARM.
GUARDED_SPEC = MachineSpec(
    states=["IDLE", "ARMED", "FIRED"],
    triggers=["ARM", "FIRE", "DISARM"],
    rules=[Rule.of("ARM", "IDLE", "ARMED"),
           Rule.of("FIRE", "ARMED", "FIRED", guard=sleepy_guard),
           Rule.of("DISARM", "ARMED", "IDLE")],
    initial="IDLE", name="own_guarded")


BRIEF_GUARD_SPEC = exit_guarded_spec(brief_guard, "own_brief_guard")


# -- workers (module level for spawn) ---------------------------------------------------------
# Each child gets its own queue: a child SIGKILLed while its queue's feeder
# thread holds the queue's write lock would block every later writer of it.
def report(q: Any, item: Any) -> None:
    """Put ``item`` and wait until it is in the pipe (the caller may die next)."""
    q.put(item)
    q.close()
    q.join_thread()


def guard_owner_worker(handle: Any, pos: int, q: Any) -> None:
    """Fire FIRE (exit_reason 9): the guard sleeps holding the lock until killed."""
    eng = Engine.attach(handle)
    report(q, (os.getpid(), int(eng._seg.token), 0))
    eng.transition(pos, "FIRE", exit_reason=9)


def hold_worker(handle: Any, holds: list[tuple[int, int]], q: Any) -> None:
    """Take each (what, id) with eng_test_hold and sleep holding them."""
    eng = Engine.attach(handle)
    rcs = [lib.eng_test_hold(eng._seg, what, pos) for what, pos in holds]
    report(q, (os.getpid(), int(eng._seg.token), rcs))
    time.sleep(LONG_SLEEP)


def impostor_worker(handle: Any, q: Any) -> None:
    """Attach (with a dead owner's pid) and stay alive."""
    eng = Engine.attach(handle)
    report(q, (os.getpid(), int(eng._seg.token), int(eng._seg.proc_index)))
    time.sleep(LONG_SLEEP)


def starve_fds() -> list[int]:
    """Use up this process's file descriptors; returns them (close them to undo)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, hard), hard))
    fds = []
    while True:
        try:
            fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise
            return fds


def proc_unreadable() -> bool:
    """True when this process cannot open /proc/<pid>/stat (EMFILE)."""
    try:
        os.close(os.open("/proc/self/stat", os.O_RDONLY))
    except OSError as e:
        return e.errno == errno.EMFILE
    return False


def starved_checker_worker(handle: Any, pos: int, action: str, q: Any) -> None:
    """Out of file descriptors, try ``action`` on a slot a live owner holds."""
    eng = Engine.attach(handle)
    q.put(("ready", os.getpid()))   # starts the queue's feeder thread while fds remain
    fds = starve_fds()
    starved = proc_unreadable()
    t0 = time.monotonic()
    result: Any
    try:
        if action == "transition":
            result = eng.transition(pos, Trigger.PAUSE).name
        elif action == "price":
            eng.update_price(pos, 123.0)
            result = "written"
        else:
            r = eng.recover()
            result = [r.rolled_forward, r.rolled_back, r.price_latches, list(r.removed_pids)]
    except Exception as e:   # the exception class is the finding
        result = f"{type(e).__name__}: {e}"
    took = time.monotonic() - t0
    for fd in fds:
        os.close(fd)
    q.put(("done", starved, result, took))


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


def waiter_worker(handle: Any, pos: int, q: Any) -> None:
    """Block in wait_for_change; report the state it woke to."""
    eng = Engine.attach(handle)
    q.put("ready")
    try:
        q.put(int(eng.wait_for_change(pos, timeout=60.0)))
    except Exception as e:
        q.put(repr(e))


def die_after_cas_worker(handle: Any, pos: int, q: Any) -> None:
    """Once a waiter sleeps on pos: commit PAUSE with DIE_AFTER_CAS (SIGKILL
    between the state CAS and the counter bump / wake)."""
    eng = Engine.attach(handle)
    slot = eng.slot_of(pos)
    report(q, "ready")
    deadline = time.monotonic() + READY_TIMEOUT
    while not eng._slot(slot).waiting:
        if time.monotonic() > deadline:
            return
        time.sleep(0.0005)
    time.sleep(0.005)   # let the waiter reach its futex sleep
    eng._set_fault(flags=lib.ENG_FAULT_DIE_AFTER_CAS)
    eng.transition(pos, Trigger.PAUSE)   # never returns: SIGKILL after the CAS


def prepare_coincidence(eng: Engine, pos: int) -> int:
    """Make the next EXIT_CONDITION_MET lock word of this Engine on pos equal
    the seal of the unpublished context copy.

    A (slow, exit_reason 7) seals its copy with its lock word W_A and flips C;
    B (slow back, exit_reason 0) flips C back, so W_A's copy is the spare one
    again; PAUSE/RESUME pairs then move the generation round to W_A's.
    Returns W_A."""
    slot = eng.slot_of(pos)
    gen0 = sw_gen(eng.state_word(slot))
    assert eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=7) is Outcome.APPLIED
    w_a = published_commit(eng, slot)
    assert w_a & LOCK and sw_state(w_a) == State.MONITORING and sw_gen(w_a) == gen0, \
        f"A's seal {w_a:#x} is not its locked word (gen {gen0})"
    assert eng.transition(pos, Trigger.EXIT_CANCELLED, exit_reason=0) is Outcome.APPLIED
    ticks = (sw_gen(w_a) - sw_gen(eng.state_word(slot))) % 2**16
    assert ticks % 2 == 0, ticks
    tr = eng.transition
    for _ in range(ticks // 2):
        tr(pos, Trigger.PAUSE)
        tr(pos, Trigger.RESUME)
    w = eng.state_word(slot)
    assert sw_state(w) == State.MONITORING and sw_gen(w) == sw_gen(w_a), (hex(w), hex(w_a))
    assert (w & CTX_BIT) == (w_a & CTX_BIT) and spare_commit(eng, slot) == w_a
    return w_a


def coincidence_worker(handle: Any, pos: int, same_owner: bool, q: Any) -> None:
    """(Optionally prepare the coincidence as this Engine, then) fire
    EXIT_CONDITION_MET(exit_reason 9) with DIE_AFTER_LOCK."""
    eng = Engine.attach(handle)
    slot = eng.slot_of(pos)
    w_a = prepare_coincidence(eng, pos) if same_owner else None
    before = (eng.state_word(slot), tuple(eng.context(pos)))
    report(q, (os.getpid(), int(eng._seg.token), w_a, before))
    eng._set_fault(flags=lib.ENG_FAULT_DIE_AFTER_LOCK)
    eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=9)   # SIGKILL after the lock


def die_opening_worker(handle: Any, q: Any) -> None:
    """open_position with DIE_AFTER_LOCK: killed right after locking a free slot."""
    eng = Engine.attach(handle)
    report(q, (os.getpid(), int(eng._seg.token)))
    eng._set_fault(flags=lib.ENG_FAULT_DIE_AFTER_LOCK)
    eng.open_position(77.5, 3.0, side=-1, token=42)   # SIGKILL after the lock


TOKEN_A, TOKEN_B = 11, 22
PRICE_RANGE = {TOKEN_A: (100.0, 200.0), TOKEN_B: (1000.0, 2000.0)}


def token_feeder_worker(handle: Any, seed: int, ready: Any, stop: Any) -> None:
    """update_token_price on token A (prices in [100, 200)) or B ([1000, 2000))."""
    eng = Engine.attach(handle)
    rng = random.Random(seed)
    ready.set()
    n = 0
    while True:
        n += 1
        if n % 64 == 0 and stop.is_set():
            return
        tok = TOKEN_A if rng.random() < 0.5 else TOKEN_B
        lo, hi = PRICE_RANGE[tok]
        with contextlib.suppress(BusyError):
            eng.update_token_price(tok, rng.uniform(lo, hi - 1.0))


def flipper_worker(handle: Any, pos: int, ready: Any, stop: Any) -> None:
    """MONITORING -> EXIT_PENDING (exit_reason 7) -> MONITORING (exit_reason 0), forever."""
    eng = Engine.attach(handle)
    ready.set()
    while not stop.is_set():
        for _ in range(32):
            eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=7)
            eng.transition(pos, Trigger.EXIT_CANCELLED, exit_reason=0)


# ==============================================================================================
# 1. pid reuse
# ==============================================================================================
NS_LAST_PID = pathlib.Path("/proc/sys/kernel/ns_last_pid")


def start_with_pid(spawn: Callable[..., Any], pid: int, target: Callable[..., Any],
                   make_args: Callable[[], tuple[Any, ...]], tries: int = 8) -> tuple[Any, ...]:
    """Start ``target(*make_args())`` in a process whose pid is ``pid`` (root:
    ns_last_pid); returns the process and its arguments."""
    if os.geteuid() != 0:
        pytest.skip("pid reuse needs root (writes /proc/sys/kernel/ns_last_pid)")
    if not os.access(NS_LAST_PID, os.W_OK):
        pytest.skip(f"{NS_LAST_PID} is not writable here")
    for _ in range(tries):
        try:
            NS_LAST_PID.write_text(str(pid - 1))
        except OSError as e:
            pytest.skip(f"cannot write {NS_LAST_PID}: {e}")
        args = make_args()
        p = spawn(target, *args)
        if p.pid == pid:
            return (p, *args)
        p.kill()
        p.join(JOIN_TIMEOUT)
    pytest.skip(f"pid {pid} was not handed out again in {tries} tries")


class TestPidReuse:
    """A lock names its owner by fencing token: an owner that died is dead even
    when an attached, live process now has its pid."""

    def _dead_owner_then_impostor(self, eng: Engine, spawn: Any, how: str) -> dict[str, Any]:
        pos = eng.open_position(100.0, 1.0)
        assert eng.transition(pos, "ARM") is Outcome.APPLIED
        slot = eng.slot_of(pos)
        w0, ctx0 = eng.state_word(slot), eng.context(pos)
        q = CTX.Queue()
        if how == "guard":
            owner = spawn(guard_owner_worker, eng.handle, pos, q)
        else:
            owner = spawn(hold_worker, eng.handle, [(2, pos)], q)
        pid, token, rcs = get_from(q, owner)
        assert rcs in (0, [0])
        until(lambda: eng.state_word(slot) & LOCK and sw_owner(eng.state_word(slot)) == token,
              "the owner to hold the transition lock")
        if how == "guard":
            time.sleep(0.05)   # inside the guard by now (it sleeps a minute)
        sigkill(owner)
        impostor, _, iq = start_with_pid(spawn, pid, impostor_worker,
                                         lambda: (eng.handle, CTX.Queue()))
        ipid, itoken, index = get_from(iq, impostor)
        assert ipid == pid and itoken != token
        assert registry_pids(eng).count(pid) == 2, \
            f"expected the dead owner's entry and the impostor's, both pid {pid}: {registry(eng)}"
        return {"pos": pos, "slot": slot, "w0": w0, "ctx0": ctx0, "pid": pid, "token": token,
                "impostor": impostor, "index": index, "itoken": itoken}

    @staticmethod
    def _impostor_untouched(eng: Engine, s: dict[str, Any]) -> None:
        assert s["impostor"].is_alive()
        e = eng._seg.registry[s["index"]]
        assert (int(e.pid), int(e.state)) == (s["pid"], lib.ENG_PROC_ACTIVE)
        assert int(e.incarnation) == s["itoken"] >> lib.ENG_TOKEN_ENTRY_BITS

    @pytest.mark.parametrize("how", ["guard", "hold"])
    def test_transition_takes_over_dead_owner_whose_pid_was_reused(self, make_engine, spawn, how):
        """A transition on a slot locked by a dead owner whose pid now belongs to a
        live attached process is APPLIED within seconds; forbidden: CONFLICT forever."""
        eng = make_engine(spec=GUARDED_SPEC)
        s = self._dead_owner_then_impostor(eng, spawn, how)
        pos, slot = s["pos"], s["slot"]
        outcomes: collections.Counter[str] = collections.Counter()
        deadline = time.monotonic() + TAKEOVER_WITHIN
        outcome = None
        while time.monotonic() < deadline:
            outcome = eng.transition(pos, "DISARM")
            outcomes[outcome.name] += 1
            if outcome is Outcome.APPLIED:
                break
        assert outcome is Outcome.APPLIED, \
            f"dead owner (pid {s['pid']}, reused) never taken over: {dict(outcomes)}"
        w = eng.state_word(slot)
        assert eng.state(pos) == GUARDED_SPEC.State["IDLE"] and not w & LOCK
        assert sw_gen(w) == (sw_gen(s["w0"]) + 1) % 2**16, "rolled back, then DISARM"
        assert eng.context(pos) == s["ctx0"], "the dead owner's exit_reason 9 became visible"
        self._impostor_untouched(eng, s)

    @pytest.mark.parametrize("how", ["guard", "hold"])
    def test_recover_rolls_back_dead_owner_whose_pid_was_reused(self, make_engine, spawn, how):
        """recover() rolls back a lock whose dead owner's pid is reused by a live
        attached process, removes only the dead entry; forbidden: skipping it."""
        eng = make_engine(spec=GUARDED_SPEC)
        s = self._dead_owner_then_impostor(eng, spawn, how)
        report, took = timed(eng.recover)
        assert took < ANSWER_BOUND
        assert (report.rolled_forward, report.rolled_back) == (0, 1), report
        assert report.removed_pids == (s["pid"],), report
        w = eng.state_word(s["slot"])
        assert not w & LOCK and w & ERROR_FLAG
        assert (sw_state(w), sw_gen(w)) == (sw_state(s["w0"]), sw_gen(s["w0"]))
        assert eng.context(s["pos"]) == s["ctx0"]
        self._impostor_untouched(eng, s)
        assert eng.transition(s["pos"], "DISARM") is Outcome.APPLIED


# ==============================================================================================
# 2. unknown liveness is not death
# ==============================================================================================
class TestUnknownLiveness:
    """An owner whose liveness cannot be read (the checker is out of file
    descriptors) counts as alive: waiters report CONFLICT / BusyError and
    take nothing over."""

    def _stopped_holder(self, eng: Engine, spawn: Any, holds: list[tuple[int, int]]) -> Any:
        q = CTX.Queue()
        holder = spawn(hold_worker, eng.handle, holds, q)
        pid, token, rcs = get_from(q, holder)
        assert rcs == [0] * len(holds), rcs
        os.kill(pid, signal.SIGSTOP)
        until(lambda: proc_state(pid) == "T", "the holder to stop")
        holder.token = token
        return holder

    def _starved(self, eng: Engine, spawn: Any, pos: int, action: str) -> tuple[Any, float]:
        q = CTX.Queue()
        checker = spawn(starved_checker_worker, eng.handle, pos, action, q)
        assert get_from(q, checker)[0] == "ready"
        tag, starved, result, took = get_from(q, checker)
        assert tag == "done"
        assert starved, "the checker could still open /proc: the test proves nothing"
        return result, took

    def test_starved_checker_gets_conflict_not_the_lock(self, make_engine, spawn):
        """A checker with no free fds transitions a slot whose owner is stopped
        (alive): CONFLICT, the lock stays the owner's; forbidden: APPLIED."""
        eng = make_engine()
        pos = monitoring(eng)
        slot = eng.slot_of(pos)
        holder = self._stopped_holder(eng, spawn, [(2, pos)])
        try:
            held = eng.state_word(slot)
            assert held & LOCK and sw_owner(held) == holder.token
            result, took = self._starved(eng, spawn, pos, "transition")
            assert result == "CONFLICT", f"starved checker got {result!r} after {took:.3f} s"
            assert eng.state_word(slot) == held, "the live owner's lock was taken"
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        sigkill(holder)   # now proven dead: the lock is taken over
        outcome, took = timed(lambda: eng.transition(pos, Trigger.PAUSE))
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND

    def test_starved_price_writer_gets_busy_and_writes_nothing(self, make_engine, spawn):
        """A checker with no free fds updates a price whose latch a stopped (alive)
        writer holds: BusyError, price word and record unchanged; forbidden: a write."""
        eng = make_engine()
        pos = monitoring(eng)
        slot = eng.slot_of(pos)
        holder = self._stopped_holder(eng, spawn, [(1, pos)])
        try:
            pw, before = pword(eng, slot), eng.price(pos)
            assert pw & TOKEN_MASK == holder.token
            result, took = self._starved(eng, spawn, pos, "price")
            assert isinstance(result, str) and result.startswith("BusyError"), \
                f"starved writer got {result!r} after {took:.3f} s"
            assert pword(eng, slot) == pw, "the live writer's latch was taken"
            assert eng.price(pos) == before
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        sigkill(holder)
        eng.update_price(pos, 104.0)
        assert eng.price(pos).price == 104.0 and latch_owner(eng, slot) == 0

    def test_starved_recover_leaves_live_owner_alone(self, make_engine, spawn):
        """recover() from a process with no free fds rolls back no lock and frees
        no latch or entry of a stopped (alive) owner; forbidden: any of them."""
        eng = make_engine()
        locked, latched = monitoring(eng), monitoring(eng)
        holder = self._stopped_holder(eng, spawn, [(2, locked), (1, latched)])
        try:
            w, pw = eng.state_word(eng.slot_of(locked)), pword(eng, eng.slot_of(latched))
            entries = registry(eng)
            result, _ = self._starved(eng, spawn, locked, "recover")
            if not isinstance(result, str):   # a report (an exception is allowed too)
                assert result == [0, 0, 0, []], f"starved recover() did {result}"
            assert eng.state_word(eng.slot_of(locked)) == w
            assert pword(eng, eng.slot_of(latched)) == pw
            assert holder.pid in registry_pids(eng)
            assert [e for e in registry(eng) if e[1] == holder.pid] == \
                [e for e in entries if e[1] == holder.pid]
        finally:
            os.kill(holder.pid, signal.SIGCONT)


# ==============================================================================================
# 3. fork
# ==============================================================================================
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


class TestFork:
    """An Engine inherited through fork() is closed in the child; the child's
    exit, however it happens, never touches the parent's entry or locks."""

    def test_os_fork_child_refuses_inherited_engine_and_close_is_harmless(
            self, make_engine, spawn):
        """os.fork child: every inherited call raises ClosedError naming attach,
        attach works, eng.close() then os._exit; the parent's entry and its paused
        slow path are untouched; forbidden: a takeover of the live parent."""
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
        """multiprocessing 'fork' child that drops (finalizes) the inherited Engine
        and exits normally: the parent's entry and paused slow path are untouched;
        forbidden: the child freeing the parent's entry."""
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
        """A plain interpreter forks; its child exits with sys.exit (atexit hooks
        and finalizers run): the parent's entry stays, and its paused slow path
        is not taken over by this process; forbidden: APPLIED for us, a rollback."""
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


# ==============================================================================================
# 4. signal storm
# ==============================================================================================
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


class TestSignalStorm:
    """A signal handler's exception, wherever it lands in a call, leaves no
    lock, latch, half-open slot, recovery flag or registry entry held by the
    (live) process."""

    def test_handler_exceptions_leak_nothing(self, make_engine):
        """SIGALRM every 0.1-1 ms raising from its handler while one process runs
        guarded/slow/fast transitions, opens, releases, prices, waits, attaches and
        recover(): afterwards nothing is held and every position still answers;
        forbidden: any lock, latch, flag or entry held by this live process."""
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
        """Engine.attach / Engine.close interrupted by a handler's exception at
        every point: afterwards only the test's own entry is in the registry;
        forbidden: an entry held forever by this live process (recover() cannot
        free it: the process is alive)."""
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


# ==============================================================================================
# 5. token price and reopen
# ==============================================================================================
class TestTokenReopenRace:
    """update_token_price writes a token's price only into positions of that
    token, even while the slot is released and reopened on another token."""

    def test_token_price_never_lands_in_other_tokens_position(self, make_engine, spawn):
        """Capacity 1, two feeders pricing tokens A ([100, 200)) and B ([1000, 2000))
        while the slot cycles open(A)/close/release/open(B); forbidden: an A price
        in a B position or vice versa, in reads and snapshot rows."""
        eng = make_engine(capacity=1)
        stop = CTX.Event()
        for seed in (1, 2):
            ready = CTX.Event()
            spawn(token_feeder_worker, eng.handle, seed, ready, stop)
            assert ready.wait(READY_TIMEOUT)
        bad: list[str] = []
        touched = cycles = reads = 0

        def check(pos: int, tok: int, where: str) -> None:
            nonlocal touched, reads
            p = eng.price(pos).price
            lo, hi = PRICE_RANGE[tok]
            reads += 1
            if not lo <= p < hi:
                bad.append(f"token {tok} position {pos:#x} {where}: price {p}")
            touched += p != (150.0 if tok == TOKEN_A else 1500.0)

        end = time.monotonic() + SECONDS
        try:
            while time.monotonic() < end:
                tok = TOKEN_A if cycles % 2 == 0 else TOKEN_B
                pos = eng.open_position(150.0 if tok == TOKEN_A else 1500.0, 1.0, token=tok)
                check(pos, tok, "after open")
                for trig in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET,
                             Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
                    assert eng.transition(pos, trig) is Outcome.APPLIED
                    check(pos, tok, f"after {trig.name}")
                if cycles % 16 == 0:
                    for row in eng.snapshot():
                        lo, hi = PRICE_RANGE[int(row["token"])]
                        if not lo <= row["price"] < hi:
                            bad.append(f"snapshot row token {row['token']}: price {row['price']}")
                assert eng.release_position(pos) is Outcome.APPLIED
                cycles += 1
        finally:
            stop.set()
        print(f"\ntoken race: {cycles} cycles, {reads} reads, {touched} fed prices seen")
        assert not bad, f"{len(bad)} cross-token prices, first: {bad[:5]}"
        assert touched > 0, "the feeders never reached the positions: the test proves nothing"


# ==============================================================================================
# 6. killed committer
# ==============================================================================================
class TestKilledCommitter:
    """A committer killed between its state CAS and its counter bump / wake
    costs a waiter one wait slice, not its timeout."""

    def test_waiter_sees_change_of_committer_killed_before_wake(self, make_engine, spawn):
        """wait_for_change(timeout=5) returns the new state well within the timeout
        after the committer died before bumping the counter; forbidden: sleeping
        until the timeout."""
        eng = make_engine()
        pos = monitoring(eng)
        slot = eng.slot_of(pos)
        count0 = int(eng._slot(slot).transitions)
        q = CTX.Queue()
        committer = spawn(die_after_cas_worker, eng.handle, pos, q)
        assert get_from(q, committer) == "ready"
        try:
            try:
                state, took = timed(lambda: eng.wait_for_change(pos, timeout=5.0))
            except WaitTimeout:
                pytest.fail("the waiter slept its whole timeout after the committer died")
            committer.join(JOIN_TIMEOUT)
        finally:
            eng._set_fault(0, 0)
        assert committer.exitcode == -signal.SIGKILL, "the committer did not die after its CAS"
        assert int(eng._slot(slot).transitions) == count0, "it died before the bump"
        assert state is State.PAUSED
        assert took < 2.0, f"waiter returned after {took:.3f} s (slice {lib.ENG_WAIT_SLICE_NS} ns)"


# ==============================================================================================
# 7. generation coincidence
# ==============================================================================================
class TestGenerationCoincidence:
    """A slow-path holder killed right after its lock CAS is rolled back, even
    when the spare context copy carries a seal equal to its lock word (left
    2^16 commits ago by the same Engine); the open path likewise."""

    @pytest.mark.parametrize("end", ["recover", "takeover"])
    @pytest.mark.parametrize("owner", ["same", "other"])
    def test_killed_after_lock_on_coincident_seal_rolls_back(self, make_engine, spawn,
                                                             owner, end):
        """EXIT_CONDITION_MET(9) killed after the lock CAS whose lock word equals
        the stale seal of A (exit_reason 7): state, generation and context stay,
        E set; forbidden: rolled forward into EXIT_PENDING with the stale context."""
        eng = make_engine(capacity=2)
        pos = monitoring(eng)
        slot = eng.slot_of(pos)
        w_a = prepare_coincidence(eng, pos) if owner == "other" else None
        q = CTX.Queue()
        try:
            child = spawn(coincidence_worker, eng.handle, pos, owner == "same", q)
            pid, token, w_child, (w_before, ctx_before) = get_from(q, child)
            child.join(JOIN_TIMEOUT)
        finally:
            eng._set_fault(0, 0)
        assert child.exitcode == -signal.SIGKILL, "the child did not die after its lock CAS"
        w_a = w_a if w_a is not None else w_child
        w_dead = eng.state_word(slot)
        assert w_dead & LOCK and sw_owner(w_dead) == token
        same = U64 if owner == "same" else U64 & ~OWNER_FIELD
        assert w_dead & same == w_a & same, \
            f"scenario not built: locked word {w_dead:#x} vs A's seal {w_a:#x}"
        if end == "recover":
            report = eng.recover()
            assert (report.rolled_forward, report.rolled_back) == (0, 1), report
            assert report.removed_pids == (pid,)
            w = eng.state_word(slot)
            assert not w & LOCK and w & ERROR_FLAG
            assert (sw_state(w), sw_gen(w)) == (State.MONITORING, sw_gen(w_before))
        else:
            outcome, took = timed(lambda: eng.transition(pos, Trigger.PAUSE))
            assert outcome is Outcome.APPLIED and took < ANSWER_BOUND
            w = eng.state_word(slot)
            assert sw_state(w) == State.PAUSED and sw_gen(w) == (sw_gen(w_before) + 1) % 2**16, \
                "rolled back, then PAUSE"
        assert tuple(eng.context(pos)) == tuple(ctx_before), "a stale context became visible"
        assert eng.context(pos).exit_reason == 0

    def test_opener_killed_after_lock_leaves_slot_free(self, make_engine, spawn):
        """open_position killed right after locking a (previously used) free slot:
        after recover() the slot is free and opens normally; forbidden: a
        half-open slot or one rolled forward with a stale context."""
        eng = make_engine(capacity=1)
        old = eng.open_position(100.0, 1.0, token=5)
        for trig in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
                     Trigger.EXIT_COMPLETED):
            assert eng.transition(old, trig) is Outcome.APPLIED
        assert eng.release_position(old) is Outcome.APPLIED
        q = CTX.Queue()
        try:
            child = spawn(die_opening_worker, eng.handle, q)
            pid, token = get_from(q, child)
            child.join(JOIN_TIMEOUT)
        finally:
            eng._set_fault(0, 0)
        assert child.exitcode == -signal.SIGKILL, "the opener did not die after its lock CAS"
        w = eng.state_word(0)
        assert w & LOCK and sw_owner(w) == token and sw_state(w) == 0
        report = eng.recover()
        assert (report.rolled_forward, report.rolled_back) == (0, 1), report
        assert report.removed_pids == (pid,)
        w = eng.state_word(0)
        assert not w & LOCK and sw_state(w) == 0, f"slot not free: {w:#x}"
        with pytest.raises(NotOpenError):
            eng.id_of(0)
        assert len(eng.snapshot()) == 0
        new = eng.open_position(200.0, 2.0, token=6)
        assert eng.slot_of(new) == 0 and new != old
        ctx = eng.context(new)
        assert (ctx.entry_price, ctx.amount, ctx.token) == (200.0, 2.0, 6)
        assert eng.state(new) is State.CREATED and eng.price(new).price == 200.0


# ==============================================================================================
# 8. killed waiter
# ==============================================================================================
class TestKilledWaiter:
    """A waiter killed inside wait_for_change leaves at most one spurious wake."""

    def test_killed_waiter_flag_cleared_by_next_commit(self, make_engine, spawn):
        """After a waiter is SIGKILLed asleep, the first commit clears the slot's
        waiting flag and 2000 more leave it clear, while a live waiter is still
        woken; forbidden: the flag staying set (a futex syscall per commit)."""
        eng = make_engine()
        pos = monitoring(eng)
        slot = eng.slot_of(pos)
        waiting = lambda: int(eng._slot(slot).waiting)   # noqa: E731
        q, q2 = CTX.Queue(), CTX.Queue()
        first = spawn(waiter_worker, eng.handle, pos, q)
        assert get_from(q, first) == "ready"
        until(lambda: waiting() == 1, "the waiter to sleep")
        time.sleep(0.05)
        sigkill(first)
        assert waiting() == 1, "the dead waiter's flag (the case under test) is not set"
        assert eng.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        assert waiting() == 0, "the first commit after the kill left the flag set"
        seen_set = 0
        for i in range(2000):
            eng.transition(pos, Trigger.RESUME if i % 2 == 0 else Trigger.PAUSE)
            seen_set += waiting()
        assert seen_set == 0, f"waiting flag set after {seen_set} of 2000 commits"
        second = spawn(waiter_worker, eng.handle, pos, q2)
        assert get_from(q2, second) == "ready"
        until(lambda: waiting() == 1, "the live waiter to sleep")
        assert eng.state(pos) is State.PAUSED
        assert eng.transition(pos, Trigger.RESUME) is Outcome.APPLIED
        assert get_from(q2, second, ANSWER_BOUND) == State.MONITORING
        second.join(JOIN_TIMEOUT)
        # a waiter that returned may leave the flag set (one spurious wake); a commit clears it
        assert eng.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        assert waiting() == 0


# ==============================================================================================
# 9. snapshot pairing
# ==============================================================================================
class TestSnapshotPairing:
    """Each snapshot row pairs a state with the context committed with it."""

    def test_rows_pair_state_with_own_context_under_flipping_writer(self, make_engine, spawn):
        """A child flips MONITORING (exit_reason 0) <-> EXIT_PENDING (exit_reason 7)
        while snapshots run: every row, locked ones too, pairs EXIT_PENDING with 7
        and MONITORING with 0; forbidden: a mismatched row."""
        eng = make_engine(capacity=2)
        pos, still = monitoring(eng), monitoring(eng, entry_price=50.0)
        slot = eng.slot_of(pos)
        want = {State.MONITORING: 0, State.EXIT_PENDING: 7}
        ready, stop = CTX.Event(), CTX.Event()
        spawn(flipper_worker, eng.handle, pos, ready, stop)
        assert ready.wait(READY_TIMEOUT)
        counts: collections.Counter[str] = collections.Counter()
        bad: list[str] = []
        end = time.monotonic() + SECONDS
        try:
            while time.monotonic() < end:
                for row in eng.snapshot():
                    rid = int(row["id"])
                    state = State(int(row["state"]))
                    counts["rows"] += 1
                    counts["locked"] += int(row["locked"])
                    if rid == still:
                        ok = state is State.MONITORING and row["entry_price"] == 50.0
                    else:
                        ok = (rid == pos and int(row["slot"]) == slot
                              and row["exit_reason"] == want.get(state, -1))
                        counts[state.name] += 1
                    if not ok:
                        bad.append(f"id {rid:#x} {state.name} exit_reason {row['exit_reason']} "
                                   f"locked {row['locked']}")
        finally:
            stop.set()
        print(f"\nsnapshot pairing: {dict(counts)}")
        assert not bad, f"{len(bad)} of {counts['rows']} rows mismatched, first: {bad[:5]}"
        assert counts["MONITORING"] and counts["EXIT_PENDING"], "the writer never flipped"


# ==============================================================================================
# 10. raw C boundary
# ==============================================================================================
def header_functions() -> set[str]:
    """Every eng_* function declared in the cdef part of native/engine.h."""
    text = HEADER.read_text()
    cdef = text.split("/* cdef-begin */")[1].split("/* cdef-end */")[0]
    return set(re.findall(r"^[A-Za-z_][\w \t]*?\**\s*\b(eng_\w+)\s*\(", cdef, re.M))


INVALID_SEGS = ("null", "zeroed", "detached", "forked")
U64_SPECIAL = [0, 1, 2, 2**24 - 1, 2**24, 2**32 - 1, 2**32, 2**55, 2**56 - 1, 2**56,
               2**63 - 1, 2**63, U64]
I64_SPECIAL = [0, 1, -1, 2, 2**31, -(2**31), 2**62, 2**63 - 1, -(2**63),
               lib.ENG_MAX_TIMEOUT_NS, lib.ENG_MAX_TIMEOUT_NS + 1, 10**18]
U32_SPECIAL = [0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 127, 128, 255, 256, 2**24 - 1, 2**24,
               2**31 - 1, 2**31, 2**32 - 1]
I32_SPECIAL = [0, 1, -1, 2, -2, 2**31 - 1, -(2**31)]
U64S = st.one_of(st.sampled_from(U64_SPECIAL), st.integers(0, U64))
I64S = st.one_of(st.sampled_from(I64_SPECIAL), st.integers(-(2**63), 2**63 - 1))
U32S = st.one_of(st.sampled_from(U32_SPECIAL), st.integers(0, 2**32 - 1))
I32S = st.one_of(st.sampled_from(I32_SPECIAL), st.integers(-(2**31), 2**31 - 1))
DOUBLES = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 100.0, 5e-324, 1.7976931348623157e308,
                                     -1e308, float("nan"), float("inf"), float("-inf")]),
                    st.floats())
BAD_PRICES = st.sampled_from([0.0, -0.0, -1.0, -1e308, float("nan"), float("inf"),
                              float("-inf")])
SMALL_BUF = 4096


class CFuzz:
    """Raw calls into engine._native.lib with hostile segments and values.

    Segments: NULL, zeroed (never attached), detached, forked (a view whose
    fork count is not this process's), and foreign: a live view of another
    engine that never opened a position, so every id is bad there.  The home
    engine (which owns the ids used as hostile values) is never passed in."""

    def __init__(self, home_handle: Any, foreign_handle: Any, home_pos: int, log_fd: int):
        self.home = Engine.attach(home_handle)
        self.foreign = Engine.attach(foreign_handle)
        self.log_fd = log_fd
        self.calls: collections.Counter[str] = collections.Counter()
        f = self.foreign._seg
        detached = ffi.new("eng_seg *")
        fd = os.open(os.path.join(segment.SHM_DIR, self.foreign.name), os.O_RDWR)
        assert lib.eng_attach(detached, f.base, f.size, 0, fd) == 0   # detach closes fd
        lib.eng_detach(detached)
        self.segs = {"null": ffi.NULL, "zeroed": ffi.new("eng_seg *"), "detached": detached,
                     "forked": self._forked_copy(), "foreign": f}
        cap = int(f.capacity)
        slot = home_pos & lib.ENG_ID_SLOT_MASK
        opening = home_pos >> lib.ENG_ID_SLOT_BITS
        self.ids = st.one_of(st.sampled_from(
            [*U64_SPECIAL, home_pos, slot, (1 << 24) | cap, (1 << 24) | (cap - 1), cap,
             ((opening + 5) << 24) | slot, lib.ENG_ID_MAX, lib.ENG_ID_MAX + 1,
             lib.ENG_ID_SLOT_MASK]), U64S)
        self.slots = st.one_of(st.sampled_from([0, cap - 1, cap, cap + 1, 2**24, 2**32 - 1]),
                               U32S)
        self.buf = ffi.new("uint8_t[]", SMALL_BUF)
        self.table = ffi.new("uint8_t[]", lib.ENG_MAX_STATES * lib.ENG_MAX_TRIGGERS)
        self.guards = [ffi.NULL, ffi.callback("eng_guard_fn", lambda *a: 1),
                       ffi.callback("eng_guard_fn", lambda *a: 0),
                       ffi.callback("eng_guard_fn", lambda *a: -1)]

    def _forked_copy(self) -> Any:
        """A copy of the foreign view as a fork child would hold it (another fork count)."""
        f = self.foreign._seg
        forked = ffi.new("eng_seg *")
        forked[0] = f[0]
        forked.fork_epoch = (int(f.fork_epoch) + 1) & 0xFFFFFFFF
        forked.pid = (int(f.pid) % 4_000_000) + 1
        return forked

    # -- drawing ----------------------------------------------------------------------------
    def seg(self, d: Any, foreign: bool = True) -> tuple[str, Any]:
        kind = d(st.sampled_from(INVALID_SEGS + (("foreign",) if foreign else ())))
        return kind, self.segs[kind]

    @staticmethod
    def out(d: Any, ctype: str) -> Any:
        return ffi.NULL if d(st.booleans()) else ffi.new(ctype)

    def update(self, d: Any) -> Any:
        if d(st.booleans()):
            return ffi.NULL
        words = [d(U64S) for _ in range(lib.ENG_MAX_FIELD_WORDS)]
        return ffi.new("eng_ctx_update *", {"mask": d(U32S), "w": words})

    @staticmethod
    def key(d: Any) -> tuple[Any, int]:
        """(key pointer, length): NULL, or bytes with their length or a hostile one."""
        if d(st.booleans()):
            return ffi.NULL, d(U32S)
        data = d(st.binary(min_size=0, max_size=lib.ENG_KEY_MAX))
        buf = ffi.new("char[]", max(len(data), 1))
        ffi.memmove(buf, data, len(data))
        return buf, d(st.one_of(st.just(len(data)), st.integers(0, len(data)), U32S
                                if not data else st.integers(0, len(data))))

    @staticmethod
    def layout(d: Any) -> Any:
        if d(st.booleans()):
            return ffi.NULL
        return ffi.new("eng_rec_layout *", {
            "n_words": d(U32S), "keys_per_position": d(U32S),
            "word_type": [d(st.integers(0, 255)) for _ in range(lib.ENG_MAX_FIELD_WORDS)],
            "roles": [d(st.integers(0, 255)) for _ in range(lib.ENG_ROLE_COUNT)]})

    def call(self, name: str, kind: str, fn: Callable[..., Any], *args: Any) -> Any:
        shown = ", ".join("NULL" if a is ffi.NULL else ("<cdata>" if isinstance(a, ffi.CData)
                                                        else repr(a)) for a in args)
        os.write(self.log_fd, f"{name}[{kind}]({shown})\n".encode())
        self.calls[name] += 1
        return fn(*args)

    @staticmethod
    def expect(name: str, kind: str, rc: int, foreign_ok: tuple[int, int] | None = None) -> None:
        """Invalid segments: a negative code.  Foreign: a negative code, unless
        ``foreign_ok`` gives the documented range."""
        lo = ERRNO_MIN
        if kind in INVALID_SEGS or foreign_ok is None:
            ok = lo <= rc < 0
        else:
            ok = foreign_ok[0] <= rc <= foreign_ok[1]
        assert ok, f"{name} on a {kind} segment returned {rc}"

    # -- one call per function --------------------------------------------------------------
    def one(self, d: Any, name: str) -> None:   # a table written as code
        x, ids, cap = self.expect, self.ids, int(self.segs["foreign"].capacity)
        if name == "eng_noop":
            assert self.call(name, "-", lib.eng_noop) == 0
        elif name == "eng_strerror":
            p = self.call(name, "-", lib.eng_strerror, d(st.one_of(st.integers(-64, 64), I32S)))
            assert p != ffi.NULL and ffi.string(p)
        elif name == "eng_segment_size":
            self.call(name, "-", lib.eng_segment_size, d(U32S), d(U32S), d(U32S), d(U32S))
        elif name == "eng_format":
            base = d(st.sampled_from(["null", "buf"]))
            size = d(st.integers(0, SMALL_BUF)) if base == "buf" else d(U64S)
            rc = self.call(name, base, lib.eng_format,
                           self.buf if base == "buf" else ffi.NULL, size, d(U32S),
                           d(st.sampled_from([ffi.NULL, self.table])), d(U32S), d(U32S),
                           d(U32S), d(U32S), d(U64S), d(U32S), self.layout(d), d(U32S))
            x(name, base, rc)
        elif name == "eng_validate":
            base = d(st.sampled_from(["null", "buf", "foreign"]))
            fsize = int(self.segs["foreign"].size)
            if base == "foreign":
                size = d(st.one_of(st.integers(0, fsize), st.just(fsize)))
                rc = self.call(name, base, lib.eng_validate, self.segs["foreign"].base, size,
                               d(U64S))
                assert (ERRNO_MIN <= rc <= 0) and (rc < 0 or size == fsize), rc
            else:
                size = d(st.integers(0, SMALL_BUF)) if base == "buf" else d(U64S)
                x(name, base, self.call(name, base, lib.eng_validate,
                                        self.buf if base == "buf" else ffi.NULL, size, d(U64S)))
        elif name == "eng_attach":
            into = d(st.sampled_from(["null", "fresh"]))
            s = ffi.NULL if into == "null" else ffi.new("eng_seg *")
            base = d(st.sampled_from(["null", "buf", "foreign-truncated", "foreign-other-spec"]))
            f = self.segs["foreign"]
            if base == "null":
                args = (ffi.NULL, d(U64S), d(U64S))
            elif base == "buf":
                args = (self.buf, d(st.integers(0, SMALL_BUF)), d(U64S))
            elif base == "foreign-truncated":
                args = (f.base, d(st.integers(0, int(f.size) - 1)), d(U64S))
            else:
                real = int(self.foreign.spec.fingerprint)
                args = (f.base, int(f.size), d(U64S.filter(lambda v: v not in (0, real))))
            fd = d(st.sampled_from([-1, -(2**31), 0, 1, 2, 1023, 2**31 - 1]))
            x(name, f"{into}/{base}",
              self.call(name, f"{into}/{base}", lib.eng_attach, s, *args, fd))
        elif name == "eng_detach":
            kind, s = self.seg(d, foreign=False)
            assert self.call(name, kind, lib.eng_detach, s) is None
            if kind == "forked":   # detach forgot (zeroed) it: keep a forked view for later calls
                self.segs["forked"] = self._forked_copy()
        elif name == "eng_check":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_check, s), (0, 0))
        elif name == "eng_open":
            kind, s = self.seg(d)
            words = ffi.new("uint64_t[]", [d(U64S) for _ in range(lib.ENG_MAX_FIELD_WORDS)])
            if kind == "foreign":   # foreign stays pristine: a bad entry price
                words[0] = struct.unpack("<Q", struct.pack("<d", d(BAD_PRICES)))[0]
            x(name, kind, self.call(name, kind, lib.eng_open, s,
                                    ffi.NULL if d(st.booleans()) else words, *self.key(d),
                                    self.out(d, "uint64_t *"), self.out(d, "uint64_t *")))
        elif name == "eng_bind_key":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_bind_key, s, d(ids), *self.key(d)))
        elif name == "eng_lookup":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_lookup, s, *self.key(d)), (ERRNO_MIN, 0))
        elif name == "eng_keys":
            kind, s = self.seg(d)
            k = d(st.integers(0, 3))
            outs = ffi.NULL if d(st.booleans()) else ffi.new("eng_key[]", max(k, 1))
            x(name, kind, self.call(name, kind, lib.eng_keys, s, d(ids), outs,
                                    d(U32S) if outs == ffi.NULL else k,
                                    self.out(d, "uint32_t *")))
        elif name == "eng_abandon_open":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_abandon_open, s, d(ids), d(U64S)))
        elif name in ("eng_release_position", "eng_state"):
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, getattr(lib, name), s, d(ids)))
        elif name == "eng_transition":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_transition, s, d(ids), d(U32S)))
        elif name == "eng_transition_ctx":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_transition_ctx, s, d(ids), d(U32S),
                                    self.update(d)))
        elif name == "eng_guard_transition":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_guard_transition, s, d(ids), d(U32S),
                                    self.update(d), d(st.sampled_from(self.guards)), ffi.NULL))
        elif name in ("eng_state_word", "eng_id_of"):
            kind, s = self.seg(d)
            slot, out = d(self.slots), self.out(d, "uint64_t *")
            rc = self.call(name, kind, getattr(lib, name), s, slot, out)
            ok_zero = name == "eng_state_word" and slot < cap and out != ffi.NULL
            x(name, kind, rc, (0, 0) if ok_zero else None)
        elif name == "eng_update_price":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_update_price, s, d(ids), d(DOUBLES)))
        elif name == "eng_update_prices":
            kind, s = self.seg(d)
            k = d(st.integers(0, 4))
            id_vals = [d(ids) for _ in range(k)]
            idp = ffi.NULL if d(st.booleans()) else ffi.new("uint64_t[]", id_vals or [0])
            pp = ffi.NULL if d(st.booleans()) else ffi.new(
                "double[]", [d(DOUBLES) for _ in range(k)] or [1.0])
            n = d(U64S) if idp == ffi.NULL and pp == ffi.NULL else d(st.integers(0, k))
            rc = self.call(name, kind, lib.eng_update_prices, s, idp, pp, n,
                           self.out(d, "uint64_t *"), self.out(d, "uint64_t *"))
            x(name, kind, rc, (ERRNO_MIN, 0) if n == 0 else None)
        elif name in ("eng_states", "eng_prices", "eng_transition_many"):
            kind, s = self.seg(d)
            k = d(st.integers(0, 4))
            idp = ffi.NULL if d(st.booleans()) else ffi.new("uint64_t[]", [d(ids) for _ in range(k)]
                                                            or [0])
            ctype = {"eng_states": "uint16_t[]", "eng_prices": "eng_price_out[]",
                     "eng_transition_many": "uint8_t[]"}[name]
            outp = ffi.NULL if d(st.booleans()) else ffi.new(ctype, max(k, 1))
            trig = ffi.NULL if d(st.booleans()) else ffi.new("uint32_t[]", [d(U32S) for _ in
                                                                            range(max(k, 1))])
            n = d(U64S) if idp == ffi.NULL and outp == ffi.NULL else d(st.integers(0, k))
            args = (s, idp, trig, n, outp) if name == "eng_transition_many" else (s, idp, n, outp)
            rc = self.call(name, kind, getattr(lib, name), *args, self.out(d, "uint64_t *"))
            x(name, kind, rc, (ERRNO_MIN, 0) if n == 0 else None)
        elif name == "eng_tindex_check":
            kind, s = self.seg(d)
            outp = ffi.NULL if d(st.booleans()) else ffi.new("uint64_t[4]")
            x(name, kind, self.call(name, kind, lib.eng_tindex_check, s, outp), (ERRNO_MIN, 0))
        elif name == "eng_tindex_slots":
            kind, s = self.seg(d)
            k = d(st.integers(0, 4))
            outp = ffi.NULL if d(st.booleans()) else ffi.new("uint32_t[]", max(k, 1))
            mx = d(U32S) if outp == ffi.NULL else d(st.integers(0, k))
            x(name, kind, self.call(name, kind, lib.eng_tindex_slots, s, d(I64S), outp, mx,
                                    self.out(d, "uint32_t *")), (ERRNO_MIN, 0))
        elif name == "eng_update_token_price":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_update_token_price, s, d(I64S),
                                    d(DOUBLES)), (ERRNO_MIN, 0))
        elif name in ("eng_read_price", "eng_read_context"):
            kind, s = self.seg(d)
            ctype = "eng_price_out *" if name == "eng_read_price" else "eng_ctx_out *"
            x(name, kind, self.call(name, kind, getattr(lib, name), s, d(ids),
                                    self.out(d, ctype)))
        elif name == "eng_wait_change":
            kind, s = self.seg(d)
            timeout = d(I64S) if kind != "foreign" else d(st.integers(-(2**63), 1_000_000))
            x(name, kind, self.call(name, kind, lib.eng_wait_change, s, d(ids), d(I64S),
                                    timeout, self.out(d, "int64_t *")))
        elif name == "eng_snapshot":
            kind, s = self.seg(d)
            k = d(st.integers(0, 4))
            rows = ffi.NULL if d(st.booleans()) else ffi.new("eng_row[]", max(k, 1))
            max_rows = d(U32S) if rows == ffi.NULL else d(st.integers(0, k))
            x(name, kind, self.call(name, kind, lib.eng_snapshot, s, rows, max_rows,
                                    self.out(d, "uint32_t *")), (ERRNO_MIN, 0))
        elif name == "eng_recover":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_recover, s,
                                    self.out(d, "eng_recover_report *")), (ERRNO_MIN, 0))
        elif name == "eng_proc_alive":
            rc = self.call(name, "-", lib.eng_proc_alive, d(U32S), d(U64S))
            assert ERRNO_MIN <= rc <= 1, rc
        elif name == "eng_entry_held":   # a probe through stdin: any answer, no crash
            rc = self.call(name, "-", lib.eng_entry_held, d(st.sampled_from([-1, 0, 2**31 - 1])),
                           d(U64S), d(U32S))
            assert ERRNO_MIN <= rc <= 1, rc
        elif name == "eng_attach_path":   # a path that is not the mapped file: refused
            into = d(st.sampled_from(["null", "fresh"]))
            s = ffi.NULL if into == "null" else ffi.new("eng_seg *")
            f = self.foreign
            fst = os.stat(os.path.join(segment.SHM_DIR, f.name))
            base = d(st.sampled_from(["null", "buf", "foreign"]))
            args = ((ffi.NULL, d(U64S)) if base == "null" else (self.buf, d(U64S))
                    if base == "buf" else (f._seg.base, int(f._seg.size)))
            path = d(st.sampled_from([ffi.NULL, b"", b"/nonexistent/x", b"/dev/null",
                                      os.path.join(segment.SHM_DIR, f.name).encode()]))
            ident = d(st.sampled_from([(fst.st_dev, fst.st_ino), (0, 0), (U64, U64)]))
            rc = self.call(name, f"{into}/{base}", lib.eng_attach_path, s, *args,
                           d(st.sampled_from([0, U64])), path, *ident)
            assert ERRNO_MIN <= rc < 4096, rc   # > 0: an errno (the path)
            if rc == 0:
                lib.eng_detach(s)
        elif name == "eng_test_recover_hook":   # NULL: none (a hook would run in recover)
            assert self.call(name, "-", lib.eng_test_recover_hook, ffi.NULL) is None
        elif name == "eng_owner_alive":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_owner_alive, s, d(U32S)),
              (ERRNO_MIN, 1))
        elif name == "eng_proc_start_time":
            self.call(name, "-", lib.eng_proc_start_time, d(U32S))
        elif name == "eng_set_halt":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_set_halt, s, d(U32S)),
              (ERRNO_MIN, 0))
        elif name == "eng_set_metrics":
            kind, s = self.seg(d)
            x(name, kind, self.call(name, kind, lib.eng_set_metrics, s, d(U32S), d(U32S)),
              (ERRNO_MIN, 0))
        elif name == "eng_set_faults":   # a live segment would really stop or kill us
            kind, s = self.seg(d, foreign=False)
            x(name, kind, self.call(name, kind, lib.eng_set_faults, s, d(U32S), d(U64S)))
        elif name == "eng_test_hold":
            kind, s = self.seg(d)
            what = d(U32S) if kind != "foreign" else d(st.sampled_from([0, 1, 2, 4, 2**32 - 1]))
            x(name, kind, self.call(name, kind, lib.eng_test_hold, s, what, d(ids)))
        elif name in ("eng_open_account", "eng_deposit", "eng_withdraw", "eng_close_account",
                      "eng_halt_account", "eng_update_account", "eng_read_account"):
            self.account_call(d, name)
        elif name == "eng_accounts":
            kind, s = self.seg(d)
            rows = ffi.NULL if d(st.booleans()) else ffi.new("eng_account_row[]", 4)
            max_rows = d(U32S) if rows == ffi.NULL else d(st.integers(0, 4))
            x(name, kind, self.call(name, kind, lib.eng_accounts, s, rows, max_rows,
                                    self.out(d, "uint32_t *")), (ERRNO_MIN, 0))
        elif name == "eng_money_of":
            rc = self.call(name, "-", lib.eng_money_of, d(st.floats()), d(st.floats()))
            assert rc >= 0 or rc == lib.ENG_EBADMONEY, rc
        elif name == "eng_price_clock":   # any int: one of the two modes, never a crash
            mode = self.call(name, "-", lib.eng_price_clock, d(I32S))
            assert mode in (lib.ENG_CLOCK_REALTIME, lib.ENG_CLOCK_TSC), mode
        elif name == "eng_price_clock_ns":
            assert self.call(name, "-", lib.eng_price_clock_ns) > 0
        elif name == "eng_test_faults":   # any int: the switch is 0 or 1; put back after
            was = lib.eng_test_faults(-1)
            assert self.call(name, "-", lib.eng_test_faults, d(I32S)) in (0, 1)
            lib.eng_test_faults(was)
        elif name == "eng_validate_detail":   # eng_validate, with NULL or real outputs
            base = d(st.sampled_from(["null", "buf"]))
            size = d(st.integers(0, SMALL_BUF)) if base == "buf" else d(U64S)
            field = ffi.NULL if d(st.booleans()) else ffi.new("const char **")
            value = ffi.NULL if d(st.booleans()) else ffi.new("uint64_t *")
            x(name, base, self.call(name, base, lib.eng_validate_detail,
                                    self.buf if base == "buf" else ffi.NULL, size, d(U64S),
                                    field, value))
        elif name == "eng_gate_enter":   # entered, then left: the view's gate stays balanced
            kind, s = self.seg(d)
            rc = self.call(name, kind, lib.eng_gate_enter, s)
            assert rc in (0, lib.ENG_ECLOSED) and (rc or s != ffi.NULL), rc
            if rc == 0:
                lib.eng_gate_leave(s)
        elif name == "eng_gate_leave":   # after an enter only, as every caller does
            kind, s = self.seg(d)
            if lib.eng_gate_enter(s) == 0:
                assert self.call(name, kind, lib.eng_gate_leave, s) is None
        elif name == "eng_gate_shut":    # no call in flight here: 0; opened again after
            kind, s = self.seg(d)
            assert self.call(name, kind, lib.eng_gate_shut, s) == 0
            lib.eng_gate_open(s)
        elif name == "eng_gate_open":
            kind, s = self.seg(d)
            assert self.call(name, kind, lib.eng_gate_open, s) is None
        else:
            raise AssertionError(f"{name}: no fuzz plan (add one to CFuzz.one)")

    def account_call(self, d: Any, name: str) -> None:
        """Account calls: hostile segments, ids and money.  The foreign engine
        never opened an account, so every id is bad there, and open_account
        gets negative money (it stays pristine)."""
        kind, s = self.seg(d)
        money = st.integers(-(2**63), 2**63 - 1)
        aid = d(st.one_of(self.ids, st.sampled_from([1 << 24, (1 << 24) | 63, 2 << 24])))
        if name == "eng_open_account":
            cash = d(st.integers(-(2**63), -1)) if kind == "foreign" else d(money)
            args: tuple[Any, ...] = (cash, d(money), d(U32S), d(money),
                                     self.out(d, "uint64_t *"))
        elif name in ("eng_deposit", "eng_withdraw"):
            args = (aid, d(money))
        elif name == "eng_halt_account":
            args = (aid, d(U32S))
        elif name == "eng_close_account":
            args = (aid,)
        elif name == "eng_read_account":
            args = (aid, self.out(d, "eng_account_row *"))
        else:
            args = (aid, d(U64S), d(money), d(U32S), d(money), d(U32S), d(U32S))
        self.expect(name, kind, self.call(name, kind, getattr(lib, name), s, *args))

    def finish(self) -> dict[str, Any]:
        """The foreign engine is still pristine and both entries are intact."""
        f = self.segs["foreign"]
        out = ffi.new("uint64_t *")
        for slot in range(int(f.capacity)):
            assert lib.eng_state_word(f, slot, out) == 0
            assert out[0] & (lib.ENG_SW_STATE_MASK | LOCK) == 0, f"foreign slot {slot} touched"
        for eng in (self.home, self.foreign):
            assert_own_entry(eng)
        for fd in (0, 1, 2):   # a refused attach never closes the descriptor it was given
            os.fstat(fd)
        return {"calls": dict(self.calls)}


FUZZ_PLANNED = sorted(header_functions())


def c_fuzz_worker(home_handle: Any, foreign_handle: Any, home_pos: int, log_path: str,
                  examples: int, q: Any) -> None:
    """Run the raw-call fuzz (hypothesis) in a child: a crash kills only it."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    fz = CFuzz(home_handle, foreign_handle, home_pos, log_fd)

    def plan(n_examples: int, name: str | None) -> Callable[[], None]:
        @settings(max_examples=n_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def fuzz(data: Any) -> None:
            fz.one(data.draw, name or data.draw(st.sampled_from(FUZZ_PLANNED)))
        return fuzz

    for name in FUZZ_PLANNED:   # every function a few times, whatever the mix below draws
        plan(10, name)()
    plan(examples, None)()
    q.put(fz.finish())


class TestRawCBoundary:
    """Every exported C function, called directly, refuses hostile segments,
    NULL out-pointers and hostile values with a code: never a crash."""

    def test_every_header_function_has_a_fuzz_plan(self):
        """The fuzz covers every eng_* function the header declares."""
        assert len(FUZZ_PLANNED) >= 30, FUZZ_PLANNED
        missing = [n for n in FUZZ_PLANNED if not hasattr(lib, n)]
        assert not missing, f"declared but not in lib: {missing}"

    def test_hostile_raw_calls_return_codes(self, make_engine, spawn, tmp_path):
        """Raw lib calls with NULL / zeroed / detached / forked / foreign segments,
        NULL outs and hostile ids and values return a negative code (or a
        documented value); forbidden: a crash, a change to the home engine."""
        home, foreign = make_engine(capacity=4), make_engine(capacity=3)
        pos = monitoring(home)
        slot = home.slot_of(pos)
        before = (home.state_word(slot), home.price(pos), home.context(pos), registry(home))
        log = tmp_path / "calls.log"
        q = CTX.Queue()
        p = spawn(c_fuzz_worker, home.handle, foreign.handle, pos, str(log), 1500, q)
        try:
            result = get_from(q, p, timeout=240.0)
        except AssertionError:
            p.join(JOIN_TIMEOUT)
            lines = log.read_text().splitlines() if log.exists() else []
            why = (f"killed by signal {-p.exitcode}" if p.exitcode and p.exitcode < 0
                   else f"exit code {p.exitcode}")
            pytest.fail(f"fuzz child {why} after {len(lines)} calls; last: "
                        f"{lines[-1] if lines else None}")
        p.join(JOIN_TIMEOUT)
        print(f"\nraw C fuzz: {sum(result['calls'].values())} calls over "
              f"{len(result['calls'])} functions")
        assert set(result["calls"]) == set(FUZZ_PLANNED)
        after_registry = [e for e in registry(home) if e[1] != p.pid]
        assert (home.state_word(slot), home.price(pos), home.context(pos), after_registry) == \
            before


# ==============================================================================================
# 11. errors
# ==============================================================================================
def _exception_class(v: Any) -> type:
    if isinstance(v, type):
        return v
    if isinstance(v, (tuple, list)):
        for item in v:
            if isinstance(item, type):
                return item
    for attr in ("cls", "exc", "error", "exception", "type"):
        if isinstance(getattr(v, attr, None), type):
            return getattr(v, attr)
    raise AssertionError(f"cannot find the exception class in table value {v!r}")


def error_table() -> dict[int, type]:
    """The one code -> exception table (engine.errors.ERRORS or the like)."""
    for name in ("ERRORS", "ERROR_TABLE", "CODE_ERRORS", "ERRORS_BY_CODE", "_ERRORS"):
        t = getattr(engine.errors, name, None)
        if isinstance(t, Mapping):
            break
    else:
        found = [v for mod in (engine.errors, engine.core) for v in vars(mod).values()
                 if isinstance(v, Mapping) and lib.ENG_ESTALE in v]
        assert found, "no code -> exception table in engine.errors (expected ERRORS)"
        t = found[0]
    return {int(code): _exception_class(v) for code, v in t.items()}


#: what the contract and DESIGN name for these codes
EXPECTED_CLASSES = {
    "ENG_ESTALE": StaleIdError, "ENG_ENOTOPEN": NotOpenError, "ENG_EBADSLOT": SlotError,
    "ENG_EBADTRIGGER": TriggerError, "ENG_EBADPRICE": PriceError, "ENG_EBADARG": ArgumentError,
    "ENG_EFULL": CapacityError, "ENG_ENOPROC": CapacityError, "ENG_EBUSY": BusyError,
    "ENG_ERECOVERING": BusyError, "ENG_ECLOSED": ClosedError, "ENG_EFORKED": ClosedError,
    "ENG_ETIMEDOUT": TimeoutError, "ENG_EMAGIC": SegmentError, "ENG_ELAYOUT": SegmentError,
    "ENG_ESIZE": SegmentError, "ENG_ENOTREADY": SegmentError, "ENG_ECORRUPT": SegmentError,
    "ENG_ESPEC": SpecMismatchError,
}


class TestErrors:
    """Each C code maps, in one table, to one exception class below
    EngineError; EngineError itself is never raised."""

    def test_codes_are_contiguous_and_each_has_words(self):
        """Every code from -1 down to ENG_ERRNO_MIN has a name and its own
        non-empty eng_strerror text."""
        codes = c_error_codes()
        assert sorted(codes.values()) == list(range(min(codes.values()), 0)), codes
        words = {code: ffi.string(lib.eng_strerror(code)).decode() for code in codes.values()}
        assert all(words.values()), words
        assert len(set(words.values())) == len(words), f"two codes share their words: {words}"

    def test_every_code_maps_to_a_proper_subclass(self):
        """The table maps every ENG_E* code to a subclass of EngineError (never
        EngineError itself), the named ones to their documented class."""
        table = error_table()
        for name, code in c_error_codes().items():
            assert code in table, f"{name} ({code}) has no exception class"
            cls = table[code]
            assert issubclass(cls, EngineError) and cls is not EngineError, (name, cls)
            if name in EXPECTED_CLASSES:
                assert issubclass(cls, EXPECTED_CLASSES[name]), (name, cls)
        assert table[lib.ENG_ENOTOPEN] is not StaleIdError
        assert not issubclass(table[lib.ENG_ENOTOPEN], StaleIdError)

    def test_raise_for_every_code_raises_a_proper_subclass(self):
        """engine.errors.raise_for, the one function C codes go through, raises a
        subclass of EngineError (never EngineError) with a non-empty message for
        every code, and for a code C never returns."""
        table = error_table()
        for code in [*c_error_codes().values(), -999]:
            with pytest.raises(EngineError) as info:
                engine.errors.raise_for(code)
            assert type(info.value) is not EngineError and str(info.value), (code, info.value)
            if code in table:
                assert type(info.value) is table[code], (code, type(info.value))

    def test_engine_error_is_never_raised_in_the_source(self):
        """No module of the engine package raises EngineError itself."""
        offenders = []
        for path in sorted((REPO_ROOT / "engine").glob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\braise\s+EngineError\b(?!\w)", line):
                    offenders.append(f"{path.name}:{i}: {line.strip()}")
        assert not offenders, offenders

    def test_class_hierarchy(self):
        """StaleIdError is a NotOpenError (so SlotError, IndexError, LookupError);
        InternalError is a RuntimeError; both are EngineErrors."""
        for base in (NotOpenError, SlotError, EngineError, IndexError, LookupError):
            assert issubclass(StaleIdError, base), base
        assert issubclass(InternalError, EngineError) and issubclass(InternalError, RuntimeError)

    def test_busy_recover_says_recovering_not_slot_none(self, make_engine, spawn):
        """recover() while a live process holds the recovery flag raises BusyError
        whose message names no slot; once that process is dead, recover() takes
        the flag over; forbidden: "slot None", a hang."""
        eng = make_engine()
        q = CTX.Queue()
        holder = spawn(hold_worker, eng.handle, [(3, 0)], q)
        pid, token, rcs = get_from(q, holder)
        assert rcs == [0] and int(eng._seg.hdr.recovering) == token
        with pytest.raises(BusyError) as info:
            eng.recover()
        assert "slot None" not in str(info.value) and "None" not in str(info.value), \
            str(info.value)
        sigkill(holder)
        report, took = timed(eng.recover)
        assert took < ANSWER_BOUND and report.removed_pids == (pid,)
        assert int(eng._seg.hdr.recovering) == 0

    @pytest.mark.parametrize("timeout", [1e10, 2.0**62, sys.float_info.max])
    def test_wait_with_huge_timeout_returns_on_change(self, make_engine, timeout):
        """wait_for_change with any huge finite timeout returns the new state when
        the slot changes; forbidden: a type error, an immediate timeout."""
        eng = make_engine()
        pos = monitoring(eng)
        other = Engine.attach(eng.handle)
        timer = threading.Timer(0.2, lambda: other.transition(pos, Trigger.PAUSE))
        try:
            timer.start()
            state, took = timed(lambda: eng.wait_for_change(pos, timeout=timeout))
        finally:
            timer.join()
            other.close()
        assert state is State.PAUSED and 0.1 < took < ANSWER_BOUND, (state, took)

    def test_raw_wait_with_int64_max_timeout_does_not_overflow(self, make_engine):
        """eng_wait_change(timeout INT64_MAX) sleeps until the change; forbidden:
        a deadline that overflowed into the past (immediate ETIMEDOUT)."""
        eng = make_engine()
        pos = monitoring(eng)
        other = Engine.attach(eng.handle)
        out = ffi.new("int64_t *")
        timer = threading.Timer(0.2, lambda: other.transition(pos, Trigger.PAUSE))
        try:
            timer.start()
            rc, took = timed(lambda: lib.eng_wait_change(eng._seg, pos, -1, 2**63 - 1, out))
            while rc == lib.ENG_EINTR:
                rc = lib.eng_wait_change(eng._seg, pos, out[0], 2**63 - 1, out)
        finally:
            timer.join()
            other.close()
        assert rc == lib.ENG_APPLIED and took > 0.1, (rc, took)

    @pytest.mark.parametrize("price", [np.complex128(5 + 7j), 5 + 7j, np.complex64(5 + 0j),
                                       complex(5, 0)], ids=repr)
    def test_complex_price_refused(self, make_engine, price):
        """update_price with a complex number raises EngineTypeError and changes
        nothing; forbidden: storing its real part."""
        eng = make_engine()
        pos = monitoring(eng)
        before = eng.price(pos)
        with pytest.raises(EngineTypeError):
            eng.update_price(pos, price)
        with pytest.raises(EngineTypeError):
            eng.update_prices(np.array([pos]), np.array([price]))
        assert eng.price(pos) == before


# ==============================================================================================
# 12. stale ids
# ==============================================================================================
def id_calls() -> list[tuple[str, Callable[[Engine, int], Any]]]:
    """Every per-position call, as (name, call(eng, id))."""
    return [
        ("transition", lambda e, i: e.transition(i, Trigger.PAUSE)),
        ("transition ctx", lambda e, i: e.transition(i, Trigger.EXIT_CONDITION_MET,
                                                     exit_reason=3)),
        ("transition guarded", lambda e, i: e.transition(i, Trigger.EXIT_STARTED)),
        ("state", lambda e, i: e.state(i)),
        ("price", lambda e, i: e.price(i)),
        ("context", lambda e, i: e.context(i)),
        ("update_price", lambda e, i: e.update_price(i, 150.0)),
        ("wait_for_change", lambda e, i: e.wait_for_change(i, timeout=0.05)),
        ("release_position", lambda e, i: e.release_position(i)),
    ]


def batch_calls() -> list[tuple[str, Callable[[Engine, int], Any]]]:
    """update_prices of one id, as (name, call(eng, id)): an id whose opening
    is not open is skipped (the call returns how many it wrote), not refused."""
    return [
        ("update_prices", lambda e, i: e.update_prices(np.array([i], dtype=np.uint64),
                                                       np.array([150.0]))),
        ("update_prices int64", lambda e, i: e.update_prices(np.array([i], dtype=np.int64),
                                                             np.array([150.0]))),
    ]


ID_CALLS = id_calls()
BATCH_CALLS = batch_calls()
ALL_ID_CALLS = ID_CALLS + BATCH_CALLS


def observe(eng: Engine, pos: int) -> tuple[Any, ...]:
    """Everything a call on pos could change."""
    slot = eng.slot_of(pos)
    return (eng.state_word(slot), pword(eng, slot), eng.price(pos), eng.context(pos),
            int(eng._slot(slot).transitions), int(eng._slot(slot).opening))


def close_and_release(eng: Engine, pos: int) -> None:
    for trig in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
                 Trigger.EXIT_COMPLETED):
        assert eng.transition(pos, trig) is Outcome.APPLIED
    assert eng.release_position(pos) is Outcome.APPLIED


@pytest.fixture
def reopened(make_engine: Any) -> tuple[Engine, int, int]:
    """Capacity 1: a position opened, closed, released; the slot reopened."""
    eng = make_engine(capacity=1, spec=BRIEF_GUARD_SPEC)
    old = eng.open_position(100.0, 1.0, token=5)
    close_and_release(eng, old)
    new = eng.open_position(200.0, 2.0, token=6)
    assert eng.transition(new, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return eng, old, new


class TestStaleIds:
    """An id names one opening: after release (and reopen) it is refused by
    every per-position call, skipped by update_prices, and never reads or
    changes the new position."""

    @pytest.mark.parametrize("name, call", ID_CALLS, ids=[n for n, _ in ID_CALLS])
    def test_old_id_is_refused_and_changes_nothing(self, reopened, name, call):
        """The released opening's id raises StaleIdError and leaves the new
        position's state, price and context as they were; forbidden: reading or
        writing the new position."""
        eng, old, new = reopened
        before = observe(eng, new)
        with pytest.raises(StaleIdError):
            call(eng, old)
        assert observe(eng, new) == before

    @pytest.mark.parametrize("name, call", BATCH_CALLS, ids=[n for n, _ in BATCH_CALLS])
    def test_old_id_in_a_batch_is_skipped_and_changes_nothing(self, reopened, name, call):
        """update_prices skips the released opening's id: it returns 0 (nothing
        written) and leaves the new position as it was; forbidden: a refusal,
        or a price written into the new opening."""
        eng, old, new = reopened
        before = observe(eng, new)
        assert call(eng, old) == 0
        assert observe(eng, new) == before

    @pytest.mark.parametrize("name, call", ALL_ID_CALLS, ids=[n for n, _ in ALL_ID_CALLS])
    def test_new_id_works(self, reopened, name, call):
        """The current opening's id is served (an outcome or a value, no error
        other than a wait timeout; update_prices writes it)."""
        eng, _, new = reopened
        with contextlib.suppress(WaitTimeout):
            out = call(eng, new)
            if name.startswith("update_prices"):
                assert out == 1

    def test_released_slot_refuses_old_id_before_reopen(self, make_engine):
        """An id whose slot was released and is still free raises StaleIdError
        (update_prices skips it: returns 0, changes nothing)."""
        eng = make_engine(capacity=1)
        old = eng.open_position(100.0, 1.0)
        close_and_release(eng, old)
        for _, call in ID_CALLS:
            with pytest.raises(StaleIdError):
                call(eng, old)
        pw = pword(eng, 0)
        for _, call in BATCH_CALLS:
            assert call(eng, old) == 0
        assert pword(eng, 0) == pw

    def test_batches_of_stale_ids_racing_reopens_write_nothing(self, make_engine):
        """A thread hammers update_prices with ids of released openings while the
        main thread closes, releases and reopens the slot: every batch returns 0
        and each new opening keeps its opening price; forbidden: a stale id's
        price in a later opening, or a refusal."""
        eng = make_engine(capacity=1)
        history = [eng.open_position(100.0, 1.0)]
        stop, results, errors = threading.Event(), [], []

        def hammer() -> None:
            try:
                while not stop.is_set():
                    stale = np.array(history[:-1], dtype=np.uint64)
                    if len(stale):
                        results.append(eng.update_prices(stale, np.full(len(stale), 999.0)))
            except BaseException as e:   # the finding
                errors.append(e)

        t = threading.Thread(target=hammer)
        t.start()
        try:
            for _ in range(200):
                close_and_release(eng, history[-1])
                pos = eng.open_position(100.0, 1.0)
                history.append(pos)
                time.sleep(0.0005)
                assert eng.price(pos).price == 100.0
        finally:
            stop.set()
            t.join(10)
        assert not errors, errors
        assert results and set(results) == {0}

    def test_slot_of_and_id_of(self, reopened):
        """Old and new ids name the same slot but differ; id_of and the snapshot
        give the new one."""
        eng, old, new = reopened
        assert old != new and eng.slot_of(old) == eng.slot_of(new) == 0
        assert eng.id_of(0) == new
        rows = eng.snapshot()
        assert [(int(r["id"]), int(r["slot"])) for r in rows] == [(new, 0)]

    @pytest.mark.parametrize("which", ["zero", "future opening"])
    @pytest.mark.parametrize("name, call", ALL_ID_CALLS, ids=[n for n, _ in ALL_ID_CALLS])
    def test_never_issued_id_is_not_open_not_stale(self, reopened, which, name, call):
        """An id never issued (0, a future opening, a bare slot number) raises
        NotOpenError but not StaleIdError, and changes nothing.  update_prices
        refuses opening 0 from its arrays alone and skips a future opening
        (returns 0): it checks openings only under each slot's latch."""
        eng, _, new = reopened
        opening = int(eng._slot(0).opening)
        bad = {"zero": 0, "future opening": ((opening + 5) << lib.ENG_ID_SLOT_BITS) | 0}[which]
        before = observe(eng, new)
        if name.startswith("update_prices") and which == "future opening":
            assert call(eng, bad) == 0
        else:
            with pytest.raises(NotOpenError) as info:
                call(eng, bad)
            assert not isinstance(info.value, StaleIdError), info.value
        assert observe(eng, new) == before

    @pytest.mark.parametrize("name, call", ALL_ID_CALLS, ids=[n for n, _ in ALL_ID_CALLS])
    def test_slot_past_capacity_is_slot_error(self, reopened, name, call):
        """An id whose slot part is >= capacity raises SlotError, not NotOpenError."""
        eng, _, _ = reopened
        bad = (1 << lib.ENG_ID_SLOT_BITS) | eng.capacity
        with pytest.raises(SlotError) as info:
            call(eng, bad)
        assert not isinstance(info.value, NotOpenError), info.value


# ==============================================================================================
# Second review round.  Each class below failed on the engine before it (afaa4a6): a
# liveness lock on the mapped file description, liveness answers read through any
# descriptor, halt read once before a guard, abandon-by-last-open, incarnations reused
# with a gone owner's locks in place, a silent local fd table, close() under a wait, one
# shared snapshot count.
# ==============================================================================================
def engine_env() -> dict[str, str]:
    """Environment for a child interpreter that imports the engine package this
    test process imported (whatever tree it came from)."""
    env = dict(os.environ)
    root = str(pathlib.Path(engine.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


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


# ==============================================================================================
# 13. a fork child's inherited mapping
# ==============================================================================================
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


class TestForkInheritedMapping:
    """A fork child that merely inherits an Engine's mapping does not keep its
    dead parent's liveness lock (so its transition locks) alive."""

    def test_dead_holders_lock_taken_over_while_its_fork_child_lives(self, make_engine):
        """The holder of a transition lock forks a sleeping child and is SIGKILLed:
        while the child lives, a transition on that slot is APPLIED within 2 s and
        recover() removes the holder; forbidden: CONFLICT for the child's lifetime."""
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


# ==============================================================================================
# 14. a replaced engine descriptor
# ==============================================================================================
class TestReplacedDescriptor:
    """A process whose liveness descriptor was closed or replaced by code outside
    the engine cannot tell who is alive: it takes nothing over and frees nothing."""

    def test_replaced_fd_takes_no_live_lock_and_frees_no_entry(self, make_engine, spawn):
        """/dev/null dup2'd over an Engine's descriptor: its transition on a slot a
        live process holds is CONFLICT, its recover() raises ClosedError, the
        holder's lock and entry stay, and a healthy Engine then also gets CONFLICT;
        forbidden: APPLIED, a rollback, the live holder's entry freed."""
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        q = CTX.Queue()
        holder = spawn(hold_worker, eng.handle, [(2, pos)], q)
        pid, token, rcs = get_from(q, holder)
        assert rcs == [0]
        held = eng.state_word(slot)
        assert held & LOCK and sw_owner(held) == token
        entry = [e for e in registry(eng) if e[1] == pid]
        assert entry and entry[0][3] == token >> lib.ENG_TOKEN_ENTRY_BITS
        broken = Engine.attach(eng.handle)
        try:
            devnull = os.open(os.devnull, os.O_RDONLY)
            try:
                os.dup2(devnull, broken._seg.fd)   # e.g. a logger reusing a "free" number
            finally:
                os.close(devnull)
            outcome = broken.transition(pos, Trigger.POSITION_OPENED)
            try:
                recovered: Any = broken.recover()
            except ClosedError as e:
                recovered = e
        finally:
            broken.close()
        assert outcome is Outcome.CONFLICT, f"the live holder's lock was taken: {outcome!r}"
        assert isinstance(recovered, ClosedError), \
            f"recover() through a replaced descriptor ran: {recovered}"
        assert eng.state_word(slot) == held, "the live holder's lock was touched"
        assert [e for e in registry(eng) if e[1] == pid] == entry, \
            f"the live holder's entry changed: {registry(eng)}"
        assert holder.is_alive()
        assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.CONFLICT, \
            "a healthy process took the live holder's lock afterwards"
        assert eng.state_word(slot) == held


# ==============================================================================================
# 15. halt during a guard
# ==============================================================================================
#: the Engine the halting guard calls halt() through (set by the test, taken once)
_HALTER: dict[str, Engine] = {}


def halting_guard(*_: Any) -> bool:
    """Approves, after another Engine turned the emergency stop on (once)."""
    other = _HALTER.pop("eng", None)
    if other is not None:
        other.halt(True)
    return True


HALT_GUARD_SPEC = MachineSpec(
    states=["IDLE", "FIRED"], triggers=["FIRE", "RESET"],
    rules=[Rule.of("FIRE", "IDLE", "FIRED", guard=halting_guard),
           Rule.of("RESET", "FIRED", "IDLE")],
    initial="IDLE", name="own_halt_guard")


class TestHaltDuringGuard:
    """halt() stops a guarded transition whose guard is still running."""

    def test_halt_while_guard_runs_returns_halted(self, make_engine):
        """Another Engine calls halt() while the guard runs (the guard then says
        yes): the transition returns HALTED, state, generation and context are
        unchanged; forbidden: APPLIED after halt() returned."""
        eng = make_engine(capacity=2, spec=HALT_GUARD_SPEC)
        other = Engine.attach(eng.handle)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        w0, ctx0 = eng.state_word(slot), eng.context(pos)
        _HALTER["eng"] = other
        try:
            outcome = eng.transition(pos, "FIRE", exit_reason=5)
            assert "eng" not in _HALTER, "the guard did not run"
            w = eng.state_word(slot)
            assert outcome is Outcome.HALTED, f"halted during the guard, yet {outcome!r}"
            assert not w & LOCK and (sw_state(w), sw_gen(w)) == (sw_state(w0), sw_gen(w0))
            assert eng.state(pos) == HALT_GUARD_SPEC.State["IDLE"]
            assert eng.context(pos) == ctx0
        finally:
            _HALTER.clear()
            other.halt(False)
            other.close()
        assert eng.transition(pos, "FIRE", exit_reason=5) is Outcome.APPLIED
        assert eng.context(pos).exit_reason == 5


# ==============================================================================================
# 16. close() from another thread
# ==============================================================================================
CLOSE_DURING_WAIT_SCRIPT = r"""
import json, sys, threading, time
from engine import ClosedError, Engine
eng = Engine.attach(sys.argv[1])
pos = int(sys.argv[2])
slot = eng.slot_of(pos)
out = {}
def waiter():
    try:
        eng.wait_for_change(pos, timeout=1.0)
        out["waiter"] = "returned"
    except Exception as e:
        out["waiter"] = type(e).__name__
t = threading.Thread(target=waiter)
t.start()
deadline = time.monotonic() + 5.0
while not eng._slot(slot).waiting and time.monotonic() < deadline:
    time.sleep(0.001)
out["asleep"] = bool(eng._slot(slot).waiting)   # the waiter is in C, GIL released
time.sleep(0.05)
try:
    eng.close()   # e.g. a shutdown path on the main thread: waits for the waiter
    out["close"] = "closed"
except ClosedError:
    out["close"] = "ClosedError"
t.join()
eng.close()   # in the owner's own time: allowed
out["closed"] = eng.closed
print(json.dumps(out), flush=True)
"""


class TestCloseDuringWait:
    """close() from another thread never unmaps an Engine under a wait in progress."""

    def test_close_from_other_thread_during_wait_ends_the_wait(self, make_engine):
        """A thread sleeps in wait_for_change; the main thread's close() ends the
        wait (ClosedError in the waiter, within one wait slice) and then closes
        (in a child interpreter); forbidden: a crash (SIGSEGV), the wait running
        to its timeout under a close."""
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 1.0)
        proc = subprocess.run([sys.executable, "-c", CLOSE_DURING_WAIT_SCRIPT, eng.name, str(pos)],
                              capture_output=True, text=True, env=engine_env(),
                              timeout=READY_TIMEOUT)
        assert proc.returncode == 0, \
            f"child exited {proc.returncode} (-11: SIGSEGV): {proc.stderr[-500:]}"
        out = json.loads(proc.stdout)
        assert out["asleep"], f"the waiter never slept: the test proves nothing ({out})"
        assert out == {"asleep": True, "close": "closed", "waiter": "ClosedError",
                       "closed": True}, out


# ==============================================================================================
# 17. a snapshot inside a signal handler
# ==============================================================================================
class TestHandlerSnapshot:
    """snapshot() from a signal handler that lands in another snapshot() of the
    same Engine leaves the outer result whole: its row count is its own."""

    def test_handler_snapshot_does_not_change_outer_rows(self, make_engine, monkeypatch):
        """SIGALRM lands while the main loop's snapshot runs in C; the handler opens a
        position and snapshots: the outer snapshot has exactly the rows open before,
        none with id 0; forbidden: the handler's count applied to the outer rows."""
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


# ==============================================================================================
# 18. an open abandoned under a signal handler's own open
# ==============================================================================================
class HandlerError(Exception):
    """Raised by a SIGALRM handler after its own engine work."""


class TestHandlerOpenAbandon:
    """An open whose id cannot reach its caller (a handler raised right after
    the C call) is undone even when the handler opened a position first."""

    def test_outer_open_undone_after_handler_opens_and_raises(self, make_engine, monkeypatch):
        """SIGALRM right after eng_open returns; the handler opens its own
        position and raises: the handler's positions stay, the outer opening is
        given back; forbidden: an open position whose id nobody received."""
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


# ==============================================================================================
# 19. incarnation wrap
# ==============================================================================================
INC_PERIOD = lib.ENG_TOKEN_INC_MASK   # incarnations 1 .. 2^17 - 1: one claim in so many repeats


def churn_to_token(eng: Engine, token: int) -> tuple[Any, int]:
    """Attach and detach raw views of ``eng``'s mapping until one is handed
    ``token`` (at most two incarnation periods of claims of one free entry);
    returns that view, attached, and the number of claims."""
    path = os.path.join(segment.SHM_DIR, eng.name)
    for n in range(1, 2 * INC_PERIOD + 1):
        seg = ffi.new("eng_seg *")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        rc = lib.eng_attach(seg, eng._buf, len(eng._mm), 0, fd)
        assert rc == 0, f"attach {n}: {rc}"
        if int(seg.token) == token:
            return seg, n
        lib.eng_detach(seg)   # closes fd
    raise AssertionError(f"token {token:#x} never came back in {2 * INC_PERIOD} claims")


class TestIncarnationWrap:
    """A gone owner's locks are resolved before its registry entry is claimed
    again: an incarnation that comes round never meets them."""

    @pytest.mark.parametrize("claims", [
        "simulated",   # the freed entry's incarnation set where 2^17 - 3 more claims leave it
        pytest.param("real", marks=pytest.mark.slow),   # those claims, for real (~5-10 s)
    ])
    def test_wrapped_incarnation_does_not_revive_dead_lock(self, make_engine, spawn, claims):
        """A dead owner's lock in a slot; its entry is taken over (registry full) and
        claimed until a live Engine carries the dead owner's exact token: a
        transition on the slot is APPLIED within 2 s; forbidden: CONFLICT while
        that Engine stays attached."""
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        q = CTX.Queue()
        owner = spawn(hold_worker, eng.handle, [(2, pos)], q)
        _, dead, rcs = get_from(q, owner)
        assert rcs == [0]
        sigkill(owner)
        index, inc = dead & lib.ENG_TOKEN_ENTRY_MASK, dead >> lib.ENG_TOKEN_ENTRY_BITS
        fillers: list[Engine] = []
        wrapped = None
        try:
            while len(registry(eng)) < lib.ENG_MAX_PROCS:   # every other entry live
                fillers.append(Engine.attach(eng.handle))
            taker = Engine.attach(eng.handle)   # the registry is full: takes the dead entry
            fillers.append(taker)
            assert int(taker._seg.proc_index) == index
            w = eng.state_word(slot)
            taker.close()
            if claims == "simulated":
                # after the taker's claim and 2^17 - 3 more, the entry is free at the
                # incarnation before the dead owner's (incarnations skip 0): the next
                # claim hands out the dead owner's token
                eng._seg.registry[index].incarnation = (inc - 2) % INC_PERIOD + 1
                wrapped, n = churn_to_token(eng, dead)
                assert n == 1
            else:
                wrapped, n = churn_to_token(eng, dead)
                assert n == INC_PERIOD - 1, n
            assert int(wrapped.token) == dead
            if w & LOCK:   # the takeover did not resolve the lock: it is the dead owner's
                assert sw_owner(w) == dead
            outcome, took = timed(lambda: eng.transition(pos, Trigger.POSITION_OPENED))
            report = eng.recover()
        finally:
            if wrapped is not None:
                lib.eng_detach(wrapped)
            for f in fillers:
                f.close()
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND, \
            f"dead owner's lock revived by its wrapped token: {outcome!r} after {took:.3f} s"
        assert not eng.state_word(slot) & LOCK and eng.state(pos) is State.MONITORING
        assert report.rolled_back == 0, report


# ==============================================================================================
# 20. Engines per process
# ==============================================================================================
LOCAL_LIMIT_SCRIPT = r"""
import json, os, resource, sys
from engine import CapacityError, Engine
from engine._native import lib
limit, names = int(sys.argv[1]), sys.argv[2:]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
for name in names:
    Engine.create(capacity=1, name=name).close()   # the segment stays
fds = lambda: len(os.listdir("/proc/self/fd"))
engines, refused = [], None
while len(engines) <= limit:   # ENG_MAX_PROCS attachers per segment
    name = names[len(engines) // lib.ENG_MAX_PROCS]
    before = fds()
    try:
        engines.append(Engine.attach(name))
    except CapacityError as e:
        refused = str(e)
        break
out = {"attached": len(engines), "refused": refused}
if refused is not None:   # the refusal left nothing behind and is not sticky
    out["fds_same"] = fds() == before
    engines.pop().close()
    engines.append(Engine.attach(name))
    out["after_close"] = len(engines)
    reg = engines[-1]._seg.registry
    out["entries"] = sum(1 for i in range(lib.ENG_MAX_PROCS) if reg[i].pid)
    out["attached_there"] = sum(1 for e in engines if e.name == name)
for e in engines:
    e.close()
print(json.dumps(out), flush=True)
"""


class TestLocalEngineLimit:
    """More Engines in one process than the fork hook can track are refused."""

    def test_engine_past_local_limit_raises_capacity_error(self, make_engine, names):
        """A process (RLIMIT_NOFILE raised) attaches ENG_MAX_LOCAL_ENGINES Engines;
        the next attach raises CapacityError, leaking no descriptor, and one
        attaches again after a close; forbidden: attaching an Engine whose
        liveness descriptor a fork child would keep (the parent's lock with it)."""
        # builds before the limit had a constant had the same 1024-entry table, unchecked
        limit = int(getattr(lib, "ENG_MAX_LOCAL_ENGINES", 1024))
        segs = [names() for _ in range(limit // lib.ENG_MAX_PROCS + 1)]
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 3 * limit + 256:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} too low for {limit} Engines")
        proc = subprocess.run([sys.executable, "-c", LOCAL_LIMIT_SCRIPT, str(limit), *segs],
                              capture_output=True, text=True, env=engine_env(),
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-1000:]
        out = json.loads(proc.stdout)
        assert out["refused"] is not None, \
            f"{out['attached']} Engines attached in one process, none refused"
        assert out["attached"] == limit, out
        assert out["fds_same"] and out["entries"] == out["attached_there"], out
        assert out["after_close"] == limit, out
