"""Owners: fencing-token owners and proven-dead liveness.

Allowed: a lock or latch of a proven-dead owner is taken over; forbidden:
taking over from an owner that may be alive (pid reused, liveness unreadable,
descriptor replaced), or an incarnation that meets a gone owner's locks.
The timed races run ``OWNERSHIP_SECONDS`` seconds each (default 3)."""

from __future__ import annotations

import collections
import errno
import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from owners_helpers import (
    ANSWER_BOUND,
    CTX,
    ERROR_FLAG,
    LOCK,
    LONG_SLEEP,
    TOKEN_MASK,
    engine_env,
    get_from,
    hold_worker,
    latch_owner,
    monitoring,
    proc_state,
    pword,
    registry,
    report,
    sw_gen,
    sw_owner,
    sw_state,
)
from procs import JOIN_TIMEOUT, sigkill, timed, until

from engine import (
    ClosedError,
    Engine,
    MachineSpec,
    Outcome,
    Rule,
    State,
    Trigger,
)
from engine._native import ffi, lib
from engine.store import shm as segment

JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)

TAKEOVER_WITHIN = 5.0      # "a few seconds": retries allowed until then
GUARD_SLEEP_S = 60.0


def registry_pids(eng: Engine) -> list[int]:
    return [pid for _, pid, _, _ in registry(eng)]


def sleepy_guard(*_: Any) -> bool:
    """A guard that never answers in time: its process is killed inside it."""
    time.sleep(GUARD_SLEEP_S)
    return True


#: ARM fast, FIRE guarded by a guard that sleeps, DISARM undoes ARM.
GUARDED_SPEC = MachineSpec(
    states=["IDLE", "ARMED", "FIRED"],
    triggers=["ARM", "FIRE", "DISARM"],
    rules=[Rule.of("ARM", "IDLE", "ARMED"),
           Rule.of("FIRE", "ARMED", "FIRED", guard=sleepy_guard),
           Rule.of("DISARM", "ARMED", "IDLE")],
    initial="IDLE", name="own_guarded")


def guard_owner_worker(handle: Any, pos: int, q: Any) -> None:
    """Fire FIRE (exit_reason 9): the guard sleeps holding the lock until killed."""
    eng = Engine.attach(handle)
    report(q, (os.getpid(), int(eng._seg.token), 0))
    eng.transition(pos, "FIRE", exit_reason=9)


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
        """A dead owner's lock is taken over even when its pid now names a live process.

        A transition on a slot locked by a dead owner whose pid now belongs to a
        live attached process is APPLIED within seconds; forbidden: CONFLICT forever.
        """
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
        """recover() rolls back a dead owner's lock even when its pid was reused.

        recover() rolls back a lock whose dead owner's pid is reused by a live
        attached process, removes only the dead entry; forbidden: skipping it.
        """
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
        """A checker with no free fds gets CONFLICT, never a stopped owner's lock.

        A checker with no free fds transitions a slot whose owner is stopped
        (alive): CONFLICT, the lock stays the owner's; forbidden: APPLIED.
        """
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
        """A price writer with no free fds gets BusyError beside a stopped latch holder.

        A checker with no free fds updates a price whose latch a stopped (alive)
        writer holds: BusyError, price word and record unchanged; forbidden: a write.
        """
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
        """recover() with no free fds leaves a stopped owner's lock, latch and entry alone.

        recover() from a process with no free fds rolls back no lock and frees
        no latch or entry of a stopped (alive) owner; forbidden: any of them.
        """
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


class TestReplacedDescriptor:
    """A process whose liveness descriptor was closed or replaced by code outside
    the engine cannot tell who is alive: it takes nothing over and frees nothing."""

    def test_replaced_fd_takes_no_live_lock_and_frees_no_entry(self, make_engine, spawn):
        """An Engine whose descriptor was replaced takes no live lock and frees no entry.

        /dev/null dup2'd over an Engine's descriptor: its transition on a slot a
        live process holds is CONFLICT, its recover() raises ClosedError, the
        holder's lock and entry stay, and a healthy Engine then also gets CONFLICT;
        forbidden: APPLIED, a rollback, the live holder's entry freed.
        """
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


class TestIncarnationWrap:
    """A gone owner's locks are resolved before its registry entry is claimed
    again: an incarnation that comes round never meets them."""

    @pytest.mark.parametrize("claims", [
        "simulated",   # the freed entry's incarnation set where 2^17 - 3 more claims leave it
        pytest.param("real", marks=pytest.mark.slow),   # those claims, for real (~5-10 s)
    ])
    def test_wrapped_incarnation_does_not_revive_dead_lock(self, make_engine, spawn, claims):
        """A wrapped incarnation carrying a dead owner's token does not revive its lock.

        A dead owner's lock in a slot; its entry is taken over (registry full) and
        claimed until a live Engine carries the dead owner's exact token: a
        transition on the slot is APPLIED within 2 s; forbidden: CONFLICT while
        that Engine stays attached.
        """
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


class TestLocalEngineLimit:
    """More Engines in one process than the fork hook can track are refused."""

    def test_engine_past_local_limit_raises_capacity_error(self, make_engine, names):
        """An attach past ENG_MAX_LOCAL_ENGINES raises CapacityError and leaks no descriptor.

        A process (RLIMIT_NOFILE raised) attaches ENG_MAX_LOCAL_ENGINES Engines;
        the next attach raises CapacityError, leaking no descriptor, and one
        attaches again after a close; forbidden: attaching an Engine whose
        liveness descriptor a fork child would keep (the parent's lock with it).
        """
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
