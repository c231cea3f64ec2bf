"""The process registry: entries and their liveness locks under hostile
timing (a fork racing attach and create, a holder killed while recover()
runs, then its entry's incarnation wrapping round).

  TestForkDuringAttach     a child forked during attach / create keeps no liveness lock alive
  TestRecoverKilledHolder  recover() frees no entry whose locks it has not resolved
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from procs import JOIN_TIMEOUT, READY_TIMEOUT, readable, timed

import engine
from engine import Engine, Outcome, State, Trigger
from engine._native import ffi, lib
from engine.store import shm as segment

LOCK = lib.ENG_SW_LOCK
TOKEN_MASK = lib.ENG_TOKEN_MASK
INC_PERIOD = lib.ENG_TOKEN_INC_MASK   # incarnations 1 .. 2^17 - 1
ANSWER_BOUND = 2.0        # a transition on a dead owner's lock returns within this


def engine_env() -> dict[str, str]:
    """Environment for a child interpreter that imports this test's engine package."""
    env = dict(os.environ)
    root = str(pathlib.Path(engine.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def sw_owner(w: int) -> int:
    return (w >> lib.ENG_SW_OWNER_SHIFT) & TOKEN_MASK


def proc_alive(pid: int) -> bool:
    """True while pid runs (not a zombie): /proc/<pid>/stat says R, S or D."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in "RSD"


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def read_line(p: subprocess.Popen[str], timeout: float = READY_TIMEOUT) -> str:
    """The child's next stdout line; fail if it says nothing within ``timeout``."""
    assert p.stdout is not None
    assert readable(p.stdout.fileno(), timeout), f"child {p.pid} said nothing within {timeout} s"
    line = p.stdout.readline()
    assert line, f"child {p.pid} exited ({p.wait(JOIN_TIMEOUT)}) without reporting"
    return line


def until_read(fd: int, n: int, what: str, timeout: float = READY_TIMEOUT) -> None:
    """Read ``n`` bytes from ``fd``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while n > 0:
        assert readable(fd, deadline - time.monotonic()), \
            f"timed out waiting for {what} ({n} missing)"
        got = os.read(fd, n)
        assert got, f"pipe closed waiting for {what} ({n} missing)"
        n -= len(got)


# ==============================================================================================
# 1. a fork during attach and create
# ==============================================================================================
FORK_ROUNDS = int(os.environ.get("FORK_ATTACH_ROUNDS", "3"))
ATTACHES = 100             # Engines one attacher attaches per round (the registry has 128)
CREATES = 12               # and Engines it creates
KID_HOLD_S = 120.0         # a fork child waits at most this long for the test to finish

ATTACHER_SCRIPT = r"""
import json, os, select, sys, threading
from engine import Engine
from engine._native import lib
name, r, ran, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
creates = sys.argv[5:]
ids = json.loads(sys.stdin.readline())
kids, stop = [], threading.Event()

def wait(fd, seconds):   # poll, not select: fd may be past 1024 (pass_fds keeps its number)
    p = select.poll()
    p.register(fd, select.POLLIN)
    p.poll(int(seconds * 1000))

def forker():   # a thread that forks children that only wait, as a fork worker pool would
    while not stop.is_set():
        pid = os.fork()
        if pid == 0:   # past the fork hook: say so, then wait
            os.write(ran, b"k")
            wait(r, hold)
            os._exit(0)
        kids.append(pid)

sys.setswitchinterval(1e-5)   # hand the GIL over often: forks land everywhere in attach
t = threading.Thread(target=forker)
t.start()
engines, holds = [], []
for pos in ids:
    e = Engine.attach(name)
    engines.append(e)
    holds.append(lib.eng_test_hold(e._seg, 2, pos))   # the transition lock: a takeover shows
for n in creates:
    engines.append(Engine.create(capacity=1, name=n))
stop.set()
t.join()
print(json.dumps({"holds": holds, "kids": kids}), flush=True)
wait(r, hold)
"""


class TestForkDuringAttach:
    """A descriptor that names a liveness lock is known to the fork handler before
    any child can inherit it: a child forked at any point of Engine.attach or
    Engine.create keeps none of its parent's locks alive."""

    def test_fork_racing_attach_and_create_keeps_no_dead_lock(self, make_engine, names):
        """Forks racing attach and create leave no entry or lock a child keeps alive.

        A thread forks waiting children while the main thread attaches 100 Engines
        (each holding a transition lock) and creates 12; the process is SIGKILLed:
        with every child alive, recover() removes each of its entries and rolls back
        each lock; forbidden: an entry or lock kept by a child (CONFLICT for good).
        """
        for rnd in range(FORK_ROUNDS):
            eng = make_engine(capacity=ATTACHES)
            ids = [eng.open_position(100.0, 1.0) for _ in range(ATTACHES)]
            created = [names() for _ in range(CREATES)]
            r, w = os.pipe()   # the children wait for its write end to close
            ran_r, ran_w = os.pipe()   # each child writes a byte once it runs
            attacher = subprocess.Popen(
                [sys.executable, "-c", ATTACHER_SCRIPT, eng.name, str(r), str(ran_w),
                 str(KID_HOLD_S), *created], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, pass_fds=(r, ran_w), env=engine_env())
            os.close(r)
            os.close(ran_w)
            kids: list[int] = []
            try:
                assert attacher.stdin is not None
                attacher.stdin.write(json.dumps(ids) + "\n")
                attacher.stdin.flush()
                out = json.loads(read_line(attacher, READY_TIMEOUT + 30.0))
                kids = out["kids"]
                assert out["holds"] == [0] * ATTACHES
                # a child holds copies of every descriptor until its first instructions
                # (the fork hook) run: wait until each has run
                until_read(ran_r, len(kids), "every fork child to run")
                attacher.kill()
                attacher.wait(JOIN_TIMEOUT)
                assert kids and all(proc_alive(k) for k in kids), \
                    "fork children gone: the test proves nothing"
                report = eng.recover()
                kept = []
                for n in created:
                    with Engine.attach(n) as c:
                        if c.recover().removed_pids != (attacher.pid,):
                            kept.append(n)
                assert all(proc_alive(k) for k in kids), "a fork child died during the test"
            finally:
                os.close(w)
                os.close(ran_r)
                for k in kids:
                    kill_quietly(k)
                if attacher.poll() is None:
                    attacher.kill()
                    attacher.wait(JOIN_TIMEOUT)
            assert report.removed_pids == (attacher.pid,) * ATTACHES, \
                (f"round {rnd}: {ATTACHES - len(report.removed_pids)} of {ATTACHES} attached "
                 f"entries kept alive by {len(kids)} fork children")
            assert report.rolled_back == ATTACHES, report
            assert not kept, f"round {rnd}: created segments whose entry a fork child kept: {kept}"
            assert all(eng.transition(p, Trigger.POSITION_OPENED) is Outcome.APPLIED for p in ids)


# ==============================================================================================
# 2. a holder killed while recover() runs, then its entry's incarnation wrapping round
# ==============================================================================================
HOLDER_SCRIPT = r"""
import sys, time
from engine import Engine
from engine._native import lib
eng = Engine.attach(sys.argv[1])
rc = lib.eng_test_hold(eng._seg, 2, int(sys.argv[2]))   # the transition lock
print(rc, int(eng._seg.token), flush=True)
time.sleep(600)
"""


def churn_to_token(eng: Engine, token: int, entry: int) -> tuple[Any, int]:
    """Attach and detach raw views of ``eng``'s mapping (each claims registry
    entry ``entry``, the only free one) until one is handed ``token``; returns
    that view, attached, and the number of claims."""
    path = os.path.join(segment.SHM_DIR, eng.name)
    for n in range(1, INC_PERIOD + 1):
        seg = ffi.new("eng_seg *")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        rc = lib.eng_attach(seg, eng._buf, len(eng._mm), 0, fd)
        assert rc == 0 and int(seg.proc_index) == entry, (n, rc, int(seg.proc_index))
        if int(seg.token) == token:
            return seg, n
        lib.eng_detach(seg)   # closes fd
    raise AssertionError(f"token {token:#x} never came back in {INC_PERIOD} claims")


class TestRecoverKilledHolder:
    """recover() frees a registry entry only after resolving its owner's locks,
    however the owner dies meanwhile: a wrapped incarnation never meets them."""

    @pytest.mark.parametrize("claims", [
        "simulated",   # the free entry's incarnation set where the claims before the wrap leave it
        pytest.param("real", marks=pytest.mark.slow),   # those claims, for real
    ])
    def test_holder_killed_during_recover_never_revives(self, make_engine, claims):
        """A lock holder killed during recover() never has its lock revived.

        A lock holder is SIGKILLed while recover() runs (after its sweep, before
        it frees entries); its entry is then claimed until a live Engine carries the
        holder's exact token: a transition on the slot is APPLIED within 2 s;
        forbidden: a freed entry whose lock stays (CONFLICT while that Engine lives).
        """
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, eng.name, str(pos)],
                                  stdout=subprocess.PIPE, text=True, env=engine_env())
        killed: list[int] = []

        def kill_holder() -> None:   # runs inside recover(), between its sweep and its frees
            holder.kill()
            killed.append(holder.wait(JOIN_TIMEOUT))

        hook = ffi.callback("eng_test_hook_fn", kill_holder)
        fillers: list[Engine] = []
        wrapped = None
        try:
            rc, dead = map(int, read_line(holder).split())
            assert rc == 0 and sw_owner(eng.state_word(slot)) == dead
            lib.eng_test_recover_hook(hook)
            try:
                report = eng.recover()
            finally:
                lib.eng_test_recover_hook(ffi.NULL)
            assert killed == [-signal.SIGKILL], killed
            index, inc = dead & lib.ENG_TOKEN_ENTRY_MASK, dead >> lib.ENG_TOKEN_ENTRY_BITS
            freed = int(eng._seg.registry[index].pid) == 0
            left = eng.state_word(slot)
            # forbidden: the entry freed with its owner's lock still in the slot
            assert not (freed and left & LOCK and sw_owner(left) == dead), \
                f"recover() freed entry {index} and left its lock {left:#x} ({report})"
            if not freed:   # kept: only a takeover claims it, and that sweeps first
                while sum(1 for i in range(lib.ENG_MAX_PROCS)
                          if eng._seg.registry[i].pid) < lib.ENG_MAX_PROCS:
                    fillers.append(Engine.attach(eng.name))
                taker = Engine.attach(eng.name)   # the registry is full: takes the dead entry
                assert int(taker._seg.proc_index) == index
                taker.close()
            if claims == "simulated":
                # the free entry's incarnation where the claims before the holder's
                # token comes round leave it (incarnations skip 0)
                eng._seg.registry[index].incarnation = (inc - 2) % INC_PERIOD + 1
            wrapped, _ = churn_to_token(eng, dead, index)
            outcome, took = timed(lambda: eng.transition(pos, Trigger.POSITION_OPENED))
        finally:
            if wrapped is not None:
                lib.eng_detach(wrapped)
            for f in fillers:
                f.close()
            if holder.poll() is None:
                holder.kill()
                holder.wait(JOIN_TIMEOUT)
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND, \
            f"the killed holder's lock revived by its wrapped token: {outcome!r} after {took:.3f} s"
        assert not eng.state_word(slot) & LOCK and eng.state(pos) is State.MONITORING
