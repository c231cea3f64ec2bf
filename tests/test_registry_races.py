"""Registry entries and their liveness locks under hostile timing (issue 18,
items 1 and 2): a fork racing attach and create, and a holder killed while
recover() runs, then its entry's incarnation wrapping round.

   1 TestForkDuringAttach   a child forked during attach / create keeps no liveness lock alive
   2 TestRecoverKilledHolder  recover() frees no entry whose locks it has not resolved
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from procs import JOIN_TIMEOUT, READY_TIMEOUT, timed

import engine
from engine import Engine, Outcome, State, Trigger, segment
from engine._native import ffi, lib

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
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, f"child {p.pid} said nothing within {timeout} s"
    line = p.stdout.readline()
    assert line, f"child {p.pid} exited ({p.wait(JOIN_TIMEOUT)}) without reporting"
    return line


def until_read(fd: int, n: int, what: str, timeout: float = READY_TIMEOUT) -> None:
    """Read ``n`` bytes from ``fd``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while n > 0:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"timed out waiting for {what} ({n} missing)"
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

def forker():   # a thread that forks children that only wait, as a fork worker pool would
    while not stop.is_set():
        pid = os.fork()
        if pid == 0:   # past the fork hook: say so, then wait
            os.write(ran, b"k")
            select.select([r], [], [], hold)
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
select.select([r], [], [], hold)
"""


class TestForkDuringAttach:
    """A descriptor that names a liveness lock is known to the fork handler before
    any child can inherit it: a child forked at any point of Engine.attach or
    Engine.create keeps none of its parent's locks alive."""

    def test_fork_racing_attach_and_create_keeps_no_dead_lock(self, make_engine, names):
        """A thread forks waiting children while the main thread attaches 100 Engines
        (each holding a transition lock) and creates 12; the process is SIGKILLed:
        with every child alive, recover() removes each of its entries and rolls back
        each lock; forbidden: an entry or lock kept by a child (CONFLICT for good)."""
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
