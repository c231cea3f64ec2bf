"""Helpers for the owner, fork/signal, wait, recovery and id tests: state
word fields, registry reads, workers for spawned children (module level, so
spawn can import them), guards and specs."""

from __future__ import annotations

import multiprocessing as mp
import os
import pathlib
import time
from typing import Any

from procs import READY_TIMEOUT, exit_guarded_spec

import engine.errors
from engine import Engine, Outcome, Trigger
from engine._native import lib

CTX = mp.get_context("spawn")
SECONDS = float(os.environ.get("OWNERSHIP_SECONDS", "3"))
ANSWER_BOUND = 2.0         # a transition / recover() on a dead owner's lock returns within this
LONG_SLEEP = 600.0         # a holder child sleeps this long (it is killed first)
LOCK, ERROR_FLAG, CTX_BIT = lib.ENG_SW_LOCK, lib.ENG_SW_ERROR, lib.ENG_SW_CTX
TOKEN_MASK = lib.ENG_TOKEN_MASK
U64 = 2**64 - 1


def sw_state(w: int) -> int:
    return w & lib.ENG_SW_STATE_MASK


def sw_gen(w: int) -> int:
    return (w >> lib.ENG_SW_GEN_SHIFT) & lib.ENG_SW_GEN_MASK


def sw_owner(w: int) -> int:
    return (w >> lib.ENG_SW_OWNER_SHIFT) & TOKEN_MASK


def pword(eng: Engine, slot: int) -> int:
    return int(eng._slot(slot).pword)


def latch_owner(eng: Engine, slot: int) -> int:
    """The price latch holder's token (0: unlatched)."""
    return pword(eng, slot) & TOKEN_MASK


def registry(eng: Engine) -> list[tuple[int, int, int, int]]:
    """(index, pid, state, incarnation) of every entry in use."""
    out = []
    for i in range(lib.ENG_MAX_PROCS):
        e = eng._seg.registry[i]
        if e.pid or e.state != lib.ENG_PROC_FREE:
            out.append((i, int(e.pid), int(e.state), int(e.incarnation)))
    return out


def assert_own_entry(eng: Engine) -> None:
    """This Engine's registry entry still names this process, active, same incarnation."""
    seg = eng._seg
    e = seg.registry[seg.proc_index]
    assert (int(e.pid), int(e.state)) == (os.getpid(), lib.ENG_PROC_ACTIVE), \
        f"entry {seg.proc_index}: pid {e.pid} state {e.state}, expected {os.getpid()} ACTIVE"
    assert int(e.incarnation) == int(seg.token) >> lib.ENG_TOKEN_ENTRY_BITS


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


def brief_guard(*_: Any) -> bool:
    """A guard that approves after a short sleep (signals land inside it)."""
    time.sleep(0.0005)
    return True


BRIEF_GUARD_SPEC = exit_guarded_spec(brief_guard, "own_brief_guard")


# Each child gets its own queue: a child SIGKILLed while its queue's feeder
# thread holds the queue's write lock would block every later writer of it.
def report(q: Any, item: Any) -> None:
    """Put ``item`` and wait until it is in the pipe (the caller may die next)."""
    q.put(item)
    q.close()
    q.join_thread()


def hold_worker(handle: Any, holds: list[tuple[int, int]], q: Any) -> None:
    """Take each (what, id) with eng_test_hold and sleep holding them."""
    eng = Engine.attach(handle)
    rcs = [lib.eng_test_hold(eng._seg, what, pos) for what, pos in holds]
    report(q, (os.getpid(), int(eng._seg.token), rcs))
    time.sleep(LONG_SLEEP)


def engine_env() -> dict[str, str]:
    """Environment for a child interpreter that imports the engine package this
    test process imported (whatever tree it came from)."""
    env = dict(os.environ)
    root = str(pathlib.Path(engine.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
