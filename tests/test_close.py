"""close(): from one thread while another thread is inside a call that cffi
runs with the GIL released (native/build_native.py, RELEASED), during a
wait, or interrupted by a signal handler's exception.

Using one Engine from two threads is documented as wrong, but the answer is
never a crash: close() waits for the calls in flight (a wait_for_change in
flight ends with ClosedError within one wait slice) and later calls raise
ClosedError.  Each case runs in a subprocess, so a segfault fails the test
instead of killing pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from owners_helpers import engine_env
from procs import READY_TIMEOUT

import engine.core as core
from engine import ClosedError, Engine, MachineSpec, Rule

# One round: a fresh engine, a thread calling NAME in a loop, the main
# thread closing the engine while the thread is in its calls.  The thread
# stops at the first EngineError (ClosedError after the close); any other
# exception is reported as forbidden.  Prints one JSON line per round.
SCRIPT = r'''
import json, sys, threading, time
import numpy as np
from engine import ClosedError, Engine, EngineError, MachineSpec, Rule

NAME, ROUNDS = sys.argv[1], int(sys.argv[2])
N = 2048

def quick_guard(ctx, price):
    return True

SPEC = MachineSpec(states=["IDLE", "ARMED"], triggers=["ARM", "TICK"],
                   rules=[Rule.of("ARM", "IDLE", "ARMED"),
                          Rule.of("TICK", "ARMED", "ARMED", guard=quick_guard)],
                   initial="IDLE", name="close_in_flight")

def make():
    if NAME == "guarded_transition":
        eng = Engine.create(4, spec=SPEC)
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, "ARM")
        return eng, [lambda: eng.transition(pos, "TICK")]
    eng = Engine.create(N, max_accounts=N if NAME in ("accounts", "all") else 0)
    ids = np.array([eng.open_position(100.0, 1.0, token=i % 16) for i in range(N)],
                   dtype=np.uint64)
    prices = np.full(N, 101.0)
    for _ in range(eng.max_accounts):
        eng.open_account(1000, 1000, 10, 1000)
    calls = {
        "update_prices": lambda: eng.update_prices(ids, prices),
        "prices": lambda: eng.prices(ids),
        "transition_many": lambda: eng.transition_many(ids, "PAUSE"),
        "update_token_price": lambda: eng.update_token_price(3, 101.0),
        "snapshot": eng.snapshot,
        "accounts": eng.accounts,
        "recover": eng.recover,
        "wait_for_change": lambda: eng.wait_for_change(int(ids[0]), 30.0),
    }
    if NAME == "all":   # one thread per call, all at once
        return eng, [c for k, c in calls.items() if k != "wait_for_change"]
    return eng, [calls[NAME]]

def hammer(call, started, stop, seen):
    # stop is set once close() returned: one more call after seeing it, so a
    # thread that finished its call just before the close still makes the next
    try:
        while True:
            started.set()
            last = stop.is_set()
            call()
            seen["calls"] += 1
            if last:
                break
        seen["thread"] = "stopped"
    except ClosedError:
        seen["thread"] = "closed"
    except EngineError as e:
        seen["thread"] = "EngineError " + type(e).__name__
    except BaseException as e:
        seen["thread"] = "FORBIDDEN " + repr(e)[:200]

for r in range(ROUNDS):
    eng, calls = make()
    name, stop = eng.name, threading.Event()
    runs = [(threading.Event(), {"thread": "running", "calls": 0}) for _ in calls]
    threads = [threading.Thread(target=hammer, args=(c, st, stop, sn))
               for c, (st, sn) in zip(calls, runs)]
    for t in threads:
        t.start()
    for (st, sn), t in zip(runs, threads):
        assert st.wait(30), "a thread never started"
        if NAME == "wait_for_change":
            time.sleep(0.01)    # let it reach the futex; a close before that is fine too
        else:
            while sn["calls"] < 2 and t.is_alive():
                time.sleep(0)   # let a call or two through, then close mid-flight
    try:
        eng.close()
        close = "ok"
    except ClosedError as e:
        close = "refused: " + str(e)[:100]
    except BaseException as e:
        close = "FORBIDDEN " + repr(e)[:200]
    stop.set()
    for (st, sn), t in zip(runs, threads):
        t.join(60)
        if t.is_alive():
            sn["thread"] = "FORBIDDEN hang"
    eng.close()
    Engine.attach(name, spec=SPEC if NAME == "guarded_transition" else None).unlink()
    for st, sn in runs:
        sn["close"] = close
        print(json.dumps(sn), flush=True)
    if any(t.is_alive() for t in threads):
        break
'''

RELEASED_CALLS = ["update_prices", "prices", "transition_many", "update_token_price", "snapshot",
                  "accounts", "recover", "wait_for_change", "guarded_transition", "all"]


def run_rounds(name: str, rounds: int) -> list[dict[str, object]]:
    """Run SCRIPT in a subprocess; fail on a signal death or a hang."""
    p = subprocess.run([sys.executable, "-c", SCRIPT, name, str(rounds)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, (f"{name}: exit {p.returncode} (negative: killed by that signal)"
                               f"\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}")
    return [json.loads(line) for line in p.stdout.splitlines()]


class TestCloseWhileInFlight:
    @pytest.mark.parametrize("name", RELEASED_CALLS)
    def test_close_during_a_gil_releasing_call_never_crashes(self, name):
        """Forbidden: a signal death, a hang, or a non-EngineError in either thread."""
        rounds = run_rounds(name, 3 if name == "wait_for_change" else 30)
        assert rounds
        for r in rounds:
            assert not str(r["thread"]).startswith("FORBIDDEN"), r
            assert not str(r["close"]).startswith("FORBIDDEN"), r

    @pytest.mark.parametrize("name", RELEASED_CALLS)
    def test_close_waits_for_the_call_then_refuses_the_next(self, name):
        """close() waits for the call in flight, then the thread's next call raises ClosedError."""
        for r in run_rounds(name, 3):
            assert r["close"] == "ok", r
            assert r["thread"] == "closed", r


# A guard that blocks until the main thread lets it go: the call stays in
# flight as long as the test wants.  Each step prints one JSON line.
BLOCKED = r'''
import json, os, signal, sys, threading
from engine import ClosedError, Engine, EngineError, MachineSpec, Outcome, Rule
from engine import core

entered, release = threading.Event(), threading.Event()

def blocking_guard(ctx, price):
    entered.set()
    return release.wait(60)

SPEC = MachineSpec(states=["IDLE", "ARMED"], triggers=["ARM", "TICK"],
                   rules=[Rule.of("ARM", "IDLE", "ARMED"),
                          Rule.of("TICK", "ARMED", "ARMED", guard=blocking_guard)],
                   initial="IDLE", name="close_blocked")

def say(**kw):
    print(json.dumps(kw), flush=True)

eng = Engine.create(4, spec=SPEC)
name = eng.name
pos = eng.open_position(100.0, 1.0)
eng.transition(pos, "ARM")
out = {}

def fire():
    try:
        out["first"] = eng.transition(pos, "TICK").name
        out["next"] = eng.transition(pos, "TICK").name
    except ClosedError:
        out["next"] = "ClosedError"
    except BaseException as e:
        out["next"] = "FORBIDDEN " + repr(e)

t = threading.Thread(target=fire)
t.start()
assert entered.wait(30)
step = sys.argv[1]
if step == "bound":
    core._CLOSE_WAIT_S = 0.2          # the test's own bound (ENG_CLOSE_WAIT_NS is 5 s)
    try:
        eng.close()
        say(close="ok")
    except ClosedError as e:
        say(close="ClosedError", message=str(e), closed=eng.closed,
            snapshot=len(eng.snapshot()))   # nothing closed, and the gate is open again
elif step == "signal":
    class Alarm(Exception):
        pass
    def on_alarm(signum, frame):
        raise Alarm()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        eng.close()
        say(close="ok")
    except Alarm:
        say(close="Alarm", closed=eng.closed, snapshot=len(eng.snapshot()))
elif step == "fork":
    pid = os.fork()
    if pid == 0:   # the child: the thread counted in the gate was not copied
        code = 3
        try:
            eng.close()
            code = 0 if eng.closed else 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    say(child=os.waitstatus_to_exitcode(status))
release.set()
eng.close()
t.join(30)
say(thread=out, alive=t.is_alive(), closed=eng.closed)
Engine.attach(name, spec=SPEC).unlink()
'''


def run_blocked(step: str) -> list[dict[str, object]]:
    p = subprocess.run([sys.executable, "-c", BLOCKED, step], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, (f"{step}: exit {p.returncode}\nstdout: {p.stdout[-2000:]}"
                               f"\nstderr: {p.stderr[-2000:]}")
    return [json.loads(line) for line in p.stdout.splitlines()]


class TestCloseWaitIsBounded:
    """A call that does not return (a guard blocked on an event) against close()."""

    def test_past_the_bound_close_refuses_and_changes_nothing(self):
        """close() past its bound raises ClosedError and leaves the Engine open and usable.

        Forbidden: close returning or hanging while the call is in flight;
        past the bound it raises ClosedError, the Engine stays open and usable,
        and a later close (the call returned) succeeds.
        """
        first, last = run_blocked("bound")
        assert first["close"] == "ClosedError", first
        assert "did not return within" in str(first["message"]), first
        assert first["closed"] is False and first["snapshot"] == 1, first
        assert last["thread"] == {"first": "APPLIED", "next": "ClosedError"}, last
        assert last["alive"] is False and last["closed"] is True, last

    def test_a_signal_during_the_wait_leaves_the_engine_open(self):
        """A signal handler's exception while close() waits leaves the Engine open and usable."""
        first, last = run_blocked("signal")
        assert first == {"close": "Alarm", "closed": False, "snapshot": 1}, first
        assert last["thread"] == {"first": "APPLIED", "next": "ClosedError"}, last

    def test_a_fork_child_closes_without_waiting_for_the_parents_threads(self):
        """A fork child's close() neither waits for the parent's threads nor fails."""
        first, last = run_blocked("fork")
        assert first == {"child": 0}, first
        assert last["thread"] == {"first": "APPLIED", "next": "ClosedError"}, last

    def test_close_from_inside_its_own_guard_refuses(self):
        """close() inside a guard of the same Engine raises ClosedError at once."""
        def closing_guard(ctx, price):
            eng.close()
            return True

        spec = MachineSpec(states=["IDLE", "ARMED"], triggers=["ARM", "TICK"],
                           rules=[Rule.of("ARM", "IDLE", "ARMED"),
                                  Rule.of("TICK", "ARMED", "ARMED", guard=closing_guard)],
                           initial="IDLE", name="close_own_guard")
        eng = Engine.create(4, spec=spec)
        try:
            pos = eng.open_position(100.0, 1.0)
            eng.transition(pos, "ARM")
            w = eng.state_word(eng.slot_of(pos))
            with pytest.raises(ClosedError, match="own guards"):
                eng.transition(pos, "TICK")
            assert not eng.closed and eng.state_word(eng.slot_of(pos)) == w
        finally:
            eng.close()
            eng.unlink()


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


class Interrupt(BaseException):
    """Stands for what a signal handler raises (KeyboardInterrupt & co.)."""


class _FastpathRaisingOnUnbind:
    """engine.core._fastpath whose bind(eng, 0, None) -- the step of close()
    right after the gate is shut -- raises, as a signal handler would there."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def bind(self, eng: Any, addr: int, seg: Any) -> Any:
        if addr == 0:
            raise Interrupt("signal handler during close()")
        return self.real.bind(eng, addr, seg)


class _LibRaisingOnDetach:
    """The engine's C library whose eng_detach raises before detaching."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def eng_detach(self, seg: Any) -> None:
        raise Interrupt("signal handler during close()")


@pytest.fixture
def eng() -> Iterator[Engine]:
    e = Engine.create(8)
    try:
        yield e
    finally:
        e.close()
        e.unlink()


def _usable(e: Engine, pos: int) -> None:
    """Every kind of call answers: a GIL-keeping one, a gated one, the fast path."""
    e.update_price(pos, 11.0)
    assert e.update_prices([pos], [12.0]) == 1
    assert len(e.snapshot()) == 1
    e.recover()
    assert e.price(pos).price == 12.0


class TestCloseDuringWait:
    """close() from another thread never unmaps an Engine under a wait in progress."""

    def test_close_from_other_thread_during_wait_ends_the_wait(self, make_engine):
        """close() from another thread ends a wait_for_change with ClosedError, no crash.

        A thread sleeps in wait_for_change; the main thread's close() ends the
        wait (ClosedError in the waiter, within one wait slice) and then closes
        (in a child interpreter); forbidden: a crash (SIGSEGV), the wait running
        to its timeout under a close.
        """
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


@pytest.mark.skipif(core._fastpath is None, reason="the C fast path is not built")
class TestCloseInterrupted:
    """close() interrupted (a signal handler's exception) between shutting the
    close gate and detaching: nothing is closed, and nothing is half-closed."""

    def test_interrupted_after_the_gate_shut_leaves_the_engine_usable(
            self, eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """A close() interrupted after its gate shut leaves the Engine open and usable.

        Forbidden: an Engine that says it is open while its gated calls
        (update_prices, snapshot, recover) raise ClosedError for good.
        """
        pos = eng.open_position(10.0, 1.0)
        monkeypatch.setattr(core, "_fastpath", _FastpathRaisingOnUnbind(core._fastpath))
        with pytest.raises(Interrupt):
            eng.close()
        monkeypatch.undo()
        assert not eng.closed
        _usable(eng, pos)

    def test_interrupted_just_before_detach_leaves_the_engine_usable(
            self, eng: Engine) -> None:
        """A close() interrupted at detach leaves the Engine usable; a second one closes."""
        pos = eng.open_position(10.0, 1.0)
        real = eng._lib
        eng._lib = _LibRaisingOnDetach(real)
        with pytest.raises(Interrupt):
            eng.close()
        eng._lib = real
        assert not eng.closed
        _usable(eng, pos)
        eng.close()
        assert eng.closed
