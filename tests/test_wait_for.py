"""wait_for: a state reached is never missed, on both backends.

The README's old pattern ``while eng.state(pos) is not X:
eng.wait_for_change(pos)`` loses a change that lands between its two calls;
``wait_for`` checks, then sleeps on the word it checked.  The interleavings
are forced by committing from another Engine right after each step of the
wait (no timing involved)."""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine import Engine, State, Trigger
from engine.errors import (
    ArgumentError,
    EngineTypeError,
    StaleIdError,
    WaitTimeout,
)
from engine.spec import ORDER_SPEC

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)

BOUND_S = 10.0   # no correct run waits this long; a lost wake does


def _monitoring(eng: Engine) -> int:
    pos = eng.open_position(entry_price=100.0, amount=1.0, side=1, token=7)
    eng.transition(pos, Trigger.POSITION_OPENED)
    return pos


class _Alarm(Exception):
    pass


@pytest.fixture
def watchdog() -> Iterator[Callable[[float], None]]:
    """arm(s): SIGALRM raises _Alarm after s seconds (a hang fails the test)."""
    def ring(*_: Any) -> None:
        raise _Alarm

    old = signal.signal(signal.SIGALRM, ring)
    try:
        yield lambda s: signal.setitimer(signal.ITIMER_REAL, s)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _CommitAfter:
    """A proxy of the C library (shared memory) whose call ``name`` is
    followed, once, by ``commit()``: a change at that exact point."""

    def __init__(self, impl: Any, name: str, commit: Callable[[], None]) -> None:
        self._impl, self._name, self._commit = impl, name, commit

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._impl, name)
        if name != self._name:
            return fn

        def call(*args: Any) -> Any:
            r = fn(*args)
            if self._commit is not None:
                commit, self._commit = self._commit, None
                commit()
            return r
        return call


def _commit_after(eng: Engine, step: str, commit: Callable[[], None]) -> None:
    """Make ``commit()`` run once right after the wait's ``step``."""
    if eng.url is None:
        from engine.core import _wait_for_futex
        eng._wait_for = functools.partial(_wait_for_futex,
                                          _CommitAfter(eng._lib, step, commit))
        return
    store = eng._seg
    real = getattr(store, step)

    def call(*args: Any, **kw: Any) -> Any:
        r = real(*args, **kw)
        store.__dict__.pop(step)
        commit()
        return r
    store.__dict__[step] = call


def _count_empty_blocks(eng: Engine) -> list[Any]:
    """Redis: the blocking reads that ended with nothing (a whole slice slept),
    as they happen (a missed commit costs a slice there, not the timeout)."""
    empty: list[Any] = []
    if eng.url is not None:
        conn = eng._seg.conn
        real = conn.block_read

        def block_read(*args: Any) -> Any:
            got = real(*args)
            if not got:
                empty.append(args)
            return got
        conn.block_read = block_read
    return empty


SHM_STEPS = ("eng_state", "eng_state_word")
REDIS_STEPS = ("wait_probe",)


class TestReadmePattern:
    def test_the_old_pattern_misses_a_change_between_its_check_and_its_wait(self, make_engine):
        """The old check-then-wait pattern misses a change made between its check and its wait.

        Forbidden with wait_for, shown here for the old pattern: the state is
        EXIT_PENDING, yet its wait_for_change times out.
        """
        eng = make_engine()
        pos = _monitoring(eng)
        other = Engine.attach(eng.handle)
        real_state = eng.state

        def state_then_commit(p: int) -> Any:
            st = real_state(p)
            other.transition(p, Trigger.EXIT_CONDITION_MET)   # lands between the calls
            return st

        eng.state = state_then_commit   # type: ignore[method-assign]
        try:
            with pytest.raises(WaitTimeout):
                while eng.state(pos) is not State.EXIT_PENDING:
                    eng.wait_for_change(pos, timeout=0.3)
            assert real_state(pos) is State.EXIT_PENDING
        finally:
            other.close()


class TestWaitFor:
    def test_returns_at_once_when_already_there(self, engine):
        """A state already reached is returned without a wait, even with timeout 0."""
        pos = _monitoring(engine)
        assert engine.wait_for(pos, State.MONITORING, timeout=0) is State.MONITORING

    def test_a_commit_right_after_any_step_is_not_missed(self, make_engine):
        """A commit right after any step of wait_for ends it; none is missed.

        A commit after each step of the wait (the check, the word read, the
        arming) ends it; forbidden: a WaitTimeout with the state reached.
        """
        eng = make_engine()
        other = Engine.attach(eng.handle)
        try:
            empty = _count_empty_blocks(eng)
            for step in SHM_STEPS if eng.url is None else REDIS_STEPS:
                pos = _monitoring(eng)
                _commit_after(eng, step,
                              lambda p=pos: other.transition(p, Trigger.EXIT_CONDITION_MET))
                assert eng.wait_for(pos, {State.EXIT_PENDING}, timeout=BOUND_S) is \
                    State.EXIT_PENDING, step
            assert empty == [], "a blocking read slept a whole slice past the commit"
        finally:
            other.close()

    def test_a_passing_state_does_not_end_it(self, make_engine):
        """A commit to a state not waited for leaves wait_for waiting until its timeout.

        A commit to a state not waited for, right after a step, leaves it
        waiting: it times out, and the state is the one committed.
        """
        eng = make_engine()
        other = Engine.attach(eng.handle)
        try:
            for step in SHM_STEPS if eng.url is None else REDIS_STEPS:
                pos = _monitoring(eng)
                _commit_after(eng, step, lambda p=pos: other.transition(p, Trigger.PAUSE))
                with pytest.raises(WaitTimeout, match=r"not in \['CLOSED'\] within 0.2 s"):
                    eng.wait_for(pos, State.CLOSED, timeout=0.2)
                assert eng.state(pos) is State.PAUSED
        finally:
            other.close()

    def test_states_by_name_value_and_iterable(self, engine):
        """A state, its int, its name, or any iterable of them name the same mask."""
        pos = _monitoring(engine)
        for states in ("MONITORING", int(State.MONITORING), State.MONITORING,
                       ["CLOSED", State.MONITORING], (s for s in ("MONITORING",)),
                       frozenset({State.MONITORING, State.PAUSED})):
            assert engine.wait_for(pos, states, timeout=0) is State.MONITORING

    def test_a_custom_spec_by_name(self, make_engine):
        """On a custom spec the names are its own; the state comes back as its enum."""
        orders = make_engine(spec=ORDER_SPEC)
        oid = orders.open(qty=10.0, limit_px=101.0, side=1)
        orders.transition(oid, "SUBMIT")
        got = orders.wait_for(oid, {"ACCEPTED", "SUBMITTED"}, timeout=0)
        assert got is orders.spec.State["SUBMITTED"]

    @pytest.mark.parametrize("states, exc", [
        ("NOPE", ArgumentError), ([], ArgumentError), (3, ArgumentError),
        (1 << 15, ArgumentError), ([True], ArgumentError), (2.0, EngineTypeError),
        ([None], ArgumentError)])
    def test_bad_states_are_refused_naming_the_states(self, engine, states, exc):
        """Bad states are refused with a typed error naming the spec's states; nothing waits.

        A state the spec lacks, none, or a wrong type: a typed error naming the
        spec's states; nothing waits.
        """
        pos = _monitoring(engine)
        with pytest.raises(exc) as e:
            engine.wait_for(pos, states, timeout=None)
        if exc is ArgumentError and states != []:
            assert "MONITORING" in str(e.value)

    @pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf"), "1", True])
    def test_bad_timeouts_are_refused(self, engine, timeout):
        """A timeout is None or a finite number >= 0."""
        pos = _monitoring(engine)
        with pytest.raises(ArgumentError, match="or None"):
            engine.wait_for(pos, State.CLOSED, timeout=timeout)

    def test_timeout_raises_wait_timeout(self, engine):
        """Nothing reached within the timeout: WaitTimeout, a TimeoutError."""
        pos = _monitoring(engine)
        with pytest.raises(TimeoutError):
            engine.wait_for(pos, State.CLOSED, timeout=0.05)

    def test_a_released_id_raises_stale(self, make_engine):
        """A position released while waited on raises StaleIdError, never the next opening's state.

        The position released while waited on: StaleIdError, never the next
        opening's state.
        """
        eng = make_engine()
        pos = _monitoring(eng)
        other = Engine.attach(eng.handle)

        def close_release_reopen() -> None:
            for t in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
                other.transition(pos, t)
            other.release_position(pos)
            again = _monitoring(other)   # (the same slot, perhaps: another opening)
            other.transition(again, Trigger.PAUSE)

        try:
            _commit_after(eng, "eng_state" if eng.url is None else "wait_probe",
                          close_release_reopen)
            with pytest.raises(StaleIdError):
                eng.wait_for(pos, {State.PAUSED, State.ERROR}, timeout=BOUND_S)
        finally:
            other.close()

    def test_timeout_none_waits_and_lets_a_signal_through(self, engine, watchdog):
        """wait_for(timeout=None) lets a signal handler's exception through, not a hang.

        timeout=None sleeps until a signal handler raises: the exception comes
        out of wait_for (Ctrl-C works), not a hang or a WaitTimeout.
        """
        pos = _monitoring(engine)
        watchdog(0.3)
        with pytest.raises(_Alarm):
            engine.wait_for(pos, State.CLOSED, timeout=None)
        assert engine.wait_for(pos, State.MONITORING, timeout=0) is State.MONITORING


def _ping(handle: Any, pos: int, rounds: int, mine: str, trigger: str, go: Any) -> None:
    """Each round: wait for ``mine``, then fire ``trigger`` (hands it back)."""
    with Engine.attach(handle) as eng:
        go.wait()
        for _ in range(rounds):
            eng.wait_for(pos, mine, timeout=BOUND_S)
            assert eng.transition(pos, trigger).name == "APPLIED"


class TestAcrossProcesses:
    def test_a_position_handed_back_and_forth_never_stalls(self, make_engine, spawner):
        """A position handed back and forth 300 times between two processes never stalls.

        Two processes hand a position back and forth 300 times, each waiting
        with wait_for: forbidden, a handoff that waits past its bound (WaitTimeout
        in a child: exit code 1).
        """
        eng = make_engine()
        pos = _monitoring(eng)
        go = spawner.ctx.Event()
        rounds = 300
        spawner.start(_ping, eng.handle, pos, rounds, "MONITORING", "PAUSE", go)
        spawner.start(_ping, eng.handle, pos, rounds, "PAUSED", "RESUME", go)
        go.set()
        spawner.join_all(timeout=120)
        assert eng.state(pos) is State.MONITORING
        assert eng.wait_for(pos, "MONITORING", timeout=0) is State.MONITORING
