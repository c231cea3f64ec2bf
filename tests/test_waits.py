"""wait_for_change: a commit wakes its waiters; a killed committer or a
killed waiter costs at most one wait slice or one spurious wake.

Forbidden: a waiter sleeping past a commit until its timeout."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from api_helpers import opened
from owners_helpers import ANSWER_BOUND, CTX, get_from, monitoring, report
from procs import JOIN_TIMEOUT, READY_TIMEOUT, sigkill, timed, until

from engine import Engine, NotOpenError, Outcome, State, Trigger, WaitTimeout
from engine._native import lib

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)
JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)


def waiting(eng: Engine, pos: int) -> int:
    """The slot's waiting flag: 1 once a process in wait_for_change on it may
    sleep on its futex word, cleared by the next commit (read from the shared
    slot record: the only way to know a waiter got as far as sleeping)."""
    return int(eng._slot(eng.slot_of(pos)).waiting)


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.001)
    return pred()


def waiter_worker(handle: Any, pos: int, q: Any) -> None:
    """Block in wait_for_change; report the state it woke to."""
    eng = Engine.attach(handle)
    q.put("ready")
    try:
        q.put(int(eng.wait_for_change(pos, timeout=60.0)))
    except Exception as e:
        q.put(repr(e))


def futex_sleeping(pid: int) -> bool:
    """Whether process pid's main thread sleeps in a futex wait (True where the
    kernel does not say: the waiting flag alone then orders the two)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/wchan") as f:
            wchan = f.read()
    except OSError:
        return True
    return "futex" in wchan or wchan in ("", "0")


def die_after_cas_worker(handle: Any, pos: int, q: Any) -> None:
    """Once a waiter sleeps on pos: commit PAUSE with DIE_AFTER_CAS (SIGKILL
    between the state CAS and the counter bump / wake)."""
    eng = Engine.attach(handle)
    slot = eng.slot_of(pos)
    report(q, "ready")
    deadline = time.monotonic() + READY_TIMEOUT
    while not eng._slot(slot).waiting or not futex_sleeping(os.getppid()):
        if time.monotonic() > deadline:
            return
        time.sleep(0.0005)
    eng._set_fault(flags=lib.ENG_FAULT_DIE_AFTER_CAS)
    eng.transition(pos, Trigger.PAUSE)   # never returns: SIGKILL after the CAS


class TestWaitForChange:
    def test_timeout_raises_wait_timeout(self, engine):
        """With no transition, wait_for_change raises WaitTimeout, a TimeoutError."""
        pos = opened(engine)
        with pytest.raises(WaitTimeout) as info:
            engine.wait_for_change(pos, timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        assert engine.state(pos) is State.MONITORING

    def test_zero_timeout_returns_at_once(self, engine):
        """timeout=0 polls: it raises WaitTimeout when nothing changed."""
        pos = opened(engine)
        with pytest.raises(TimeoutError):
            engine.wait_for_change(pos, timeout=0)

    @pytest.mark.shm_only
    def test_returns_new_state_after_transition(self, engine):
        """A waiter blocked on a slot wakes with the state another Engine committed."""
        pos = opened(engine)
        seen: list[object] = []

        def wait() -> None:
            with Engine.attach(engine.name, url=engine.url) as mine:
                try:
                    seen.append(mine.wait_for_change(pos, timeout=10))
                except BaseException as e:  # reported to the main thread
                    seen.append(e)

        t = threading.Thread(target=wait, daemon=True)
        t.start()
        try:
            assert wait_until(lambda: waiting(engine, pos) == 1), "waiter never blocked"
            assert engine.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        finally:
            t.join(15)
        assert not t.is_alive()
        assert seen == [State.PAUSED]
        # a waiter that returned leaves at most one spurious wake behind: the
        # next commit clears the flag
        assert engine.transition(pos, Trigger.RESUME) is Outcome.APPLIED
        assert waiting(engine, pos) == 0

    @pytest.mark.shm_only
    def test_invalid_transition_does_not_wake(self, engine):
        """An INVALID transition is not a change: the waiter times out."""
        pos = opened(engine)
        result: list[object] = []

        def wait() -> None:
            with Engine.attach(engine.name, url=engine.url) as mine:
                try:
                    result.append(mine.wait_for_change(pos, timeout=0.5))
                except WaitTimeout as e:
                    result.append(e)

        t = threading.Thread(target=wait, daemon=True)
        t.start()
        try:
            assert wait_until(lambda: waiting(engine, pos) == 1)
            assert engine.transition(pos, Trigger.RESUME) is Outcome.INVALID
        finally:
            t.join(15)
        assert len(result) == 1 and isinstance(result[0], WaitTimeout)

    def test_wait_on_free_slot_raises_not_open(self, engine):
        """Waiting on a never-opened slot (an id never issued) is bad input."""
        with pytest.raises(NotOpenError):
            engine.wait_for_change(3, timeout=0.01)


@pytest.mark.shm_only
class TestKilledCommitter:
    """A committer killed between its state CAS and its counter bump / wake
    costs a waiter one wait slice, not its timeout."""

    def test_waiter_sees_change_of_committer_killed_before_wake(self, make_engine, spawn):
        """A waiter sees the change of a committer killed before its wake, well before timeout.

        wait_for_change(timeout=5) returns the new state well within the timeout
        after the committer died before bumping the counter; forbidden: sleeping
        until the timeout.
        """
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


@pytest.mark.shm_only
class TestKilledWaiter:
    """A waiter killed inside wait_for_change leaves at most one spurious wake."""

    def test_killed_waiter_flag_cleared_by_next_commit(self, make_engine, spawn):
        """A killed waiter's flag is cleared by the next commit and stays clear.

        After a waiter is SIGKILLed asleep, the first commit clears the slot's
        waiting flag and 2000 more leave it clear, while a live waiter is still
        woken; forbidden: the flag staying set (a futex syscall per commit).
        """
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
