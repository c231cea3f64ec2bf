"""asyncio waits: one waiter thread per Engine, no lost wake, cancellation
and close, on both backends.

A missed commit would only cost the waiter one slice (it probes every wait
once a slice), so the no-lost-wake tests make the slice an hour: a miss is
then a WaitTimeout."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from engine import Engine, State, Trigger, aio
from engine.errors import ArgumentError, ClosedError, StaleIdError, WaitTimeout
from engine.store.redis.store import RedisStore
from tests.test_redis import cluster  # noqa: F401  (the three-node cluster fixture)

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)

BOUND_S = 10.0   # no correct run waits this long
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def _monitoring(eng: Engine) -> int:
    pos = eng.open_position(entry_price=100.0, amount=1.0, side=1, token=7)
    eng.transition(pos, Trigger.POSITION_OPENED)
    return pos


async def _until(cond: Callable[[], bool]) -> None:
    """Yield to the loop until ``cond()`` holds (bounded)."""
    for _ in range(int(BOUND_S / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached within the bound")


def _waiter_threads() -> int:
    return sum(t.name.startswith("engine-waiter-") for t in threading.enumerate())


class TestThreads:
    def test_200_awaiting_waits_use_one_thread(self, make_engine):
        """200 awaiting waits use one waiter thread, not 200, and each gets its state.

        200 tasks awaiting 200 positions: one waiter thread, not 200; each
        gets its state once it commits (forbidden: more than one new thread).
        """
        eng = make_engine(capacity=256)
        ids = [eng.open_position(entry_price=100.0, amount=1.0, side=1, token=1)
               for _ in range(200)]
        before = threading.active_count()

        async def main() -> list[Any]:
            tasks = [asyncio.ensure_future(eng.wait_for_async(i, State.MONITORING,
                                                              timeout=BOUND_S)) for i in ids]
            await _until(lambda: eng._aio_waiter is not None and eng._aio_waiter.held == 200)
            assert threading.active_count() <= before + 1
            for i in ids:
                eng.transition(i, Trigger.POSITION_OPENED)
            return await asyncio.gather(*tasks)

        assert run(main()) == [State.MONITORING] * 200
        assert _waiter_threads() == 1
        eng.close()
        assert _waiter_threads() == 0

    def test_wait_for_change_async_returns_the_new_state(self, make_engine):
        """The commit after the call ends the wait with the state it committed."""
        eng = make_engine()
        pos = _monitoring(eng)

        async def main() -> Any:
            task = asyncio.ensure_future(eng.wait_for_change_async(pos, timeout=BOUND_S))
            await _until(lambda: eng._aio_waiter is not None and eng._aio_waiter.held == 1)
            eng.transition(pos, Trigger.PAUSE)
            return await task

        assert run(main()) is State.PAUSED


def _commit_after_probe_step(monkeypatch: Any, eng: Engine, step: str, nth: int,
                             trigger: Trigger, pos: int) -> None:
    """One commit (from a fresh Engine) right after the ``nth`` call of
    ``step`` in the waiter thread's probe."""
    handle = eng.handle
    calls = [0]

    def commit() -> None:
        with Engine.attach(handle) as other:
            assert other.transition(pos, trigger).name == "APPLIED"

    if eng.url is None:
        real_lib = aio.lib

        class Lib:
            def __getattr__(self, name: str) -> Any:
                fn = getattr(real_lib, name)
                if name != step:
                    return fn

                def call(*args: Any) -> Any:
                    r = fn(*args)
                    calls[0] += 1
                    if calls[0] == nth:
                        commit()
                    return r
                return call
        monkeypatch.setattr(aio, "lib", Lib())
    else:
        real = RedisStore.wait_probe

        def probe(self: Any, *args: Any) -> Any:
            r = real(self, *args)
            calls[0] += 1
            if calls[0] == nth:
                commit()
            return r
        monkeypatch.setattr(RedisStore, "wait_probe", probe)


# (step, which call of it) in the shared-memory probe: the state read, the
# word read, the arming, the word read again
SHM_PROBE_STEPS = [("eng_state", 1), ("eng_state_word", 1), ("eng_wait_change", 1),
                   ("eng_state_word", 2)]
REDIS_PROBE_STEPS = [("wait_probe", 1)]


class TestNoLostWake:
    @pytest.fixture(autouse=True)
    def _slice_an_hour(self, monkeypatch):
        monkeypatch.setattr(aio._FutexSleeper, "slice_s", 3600.0)
        monkeypatch.setattr(RedisStore, "wait_slice_ms", lambda self: 3_600_000)

    def test_a_commit_right_after_any_probe_step_ends_the_wait(self, make_engine, monkeypatch):
        """A commit right after any step of the probe wakes the awaiting waiter.

        A commit after each step of the probe (check, arm, check again) wakes
        the waiter: forbidden, a WaitTimeout with the state reached.
        """
        eng = make_engine()
        steps = SHM_PROBE_STEPS if eng.url is None else REDIS_PROBE_STEPS
        for step, nth in steps:
            pos = _monitoring(eng)
            with monkeypatch.context() as m:
                _commit_after_probe_step(m, eng, step, nth, Trigger.EXIT_CONDITION_MET, pos)

                async def main(pos: int = pos) -> Any:
                    return await eng.wait_for_async(pos, "EXIT_PENDING", timeout=BOUND_S)

                assert run(main()) is State.EXIT_PENDING, (step, nth)
                eng._aio_waiter.close()   # the next round's waiter sees the next patch

    def test_a_change_right_after_any_probe_step_ends_wait_for_change(self, make_engine,
                                                                      monkeypatch):
        """wait_for_change_async: the same, for the commit it waits for."""
        eng = make_engine()
        steps = SHM_PROBE_STEPS if eng.url is None else REDIS_PROBE_STEPS
        for step, nth in steps:
            pos = _monitoring(eng)
            with monkeypatch.context() as m:
                _commit_after_probe_step(m, eng, step, nth, Trigger.PAUSE, pos)

                async def main(pos: int = pos) -> Any:
                    return await eng.wait_for_change_async(pos, timeout=BOUND_S)

                assert run(main()) is State.PAUSED, (step, nth)
                eng._aio_waiter.close()


    def test_commits_while_asleep_wake_every_wait(self, make_engine):
        """Commits made while the waiter thread sleeps wake every wait they satisfy.

        Commits made while the waiter sleeps wake it (the waiting flag was
        armed): forbidden, a wait left asleep with its state reached.
        """
        eng = make_engine(capacity=64)
        ids = [_monitoring(eng) for _ in range(50)]

        async def main() -> list[Any]:
            tasks = [asyncio.ensure_future(eng.wait_for_async(i, State.PAUSED, timeout=BOUND_S))
                     for i in ids]
            await _until(lambda: eng._aio_waiter is not None and eng._aio_waiter.held == 50)
            for i in ids:
                eng.transition(i, Trigger.PAUSE)
            return await asyncio.gather(*tasks)

        assert run(main()) == [State.PAUSED] * 50


def _die_after_cas(handle: Any, pos: int) -> None:
    """Once a waiter is armed on pos: commit PAUSE and be SIGKILLed between
    the state CAS and the counter bump / wake (ENG_FAULT_DIE_AFTER_CAS)."""
    import time

    from engine._native import lib
    eng = Engine.attach(handle)
    deadline = time.monotonic() + BOUND_S
    while not eng._slot(eng.slot_of(pos)).waiting and time.monotonic() < deadline:
        time.sleep(0.0005)
    eng._set_fault(flags=lib.ENG_FAULT_DIE_AFTER_CAS)
    eng.transition(pos, Trigger.PAUSE)   # never returns


class TestCrash:
    @pytest.mark.shm_only
    def test_a_committer_killed_before_its_wake_costs_a_slice(self, make_engine, spawner):
        """A committer SIGKILLed before its wake delays the wait by one slice, never to a timeout.

        The commit lands but its wake never comes (SIGKILL after the CAS): the
        waiter's per-slice probe still ends the wait (forbidden: WaitTimeout).
        """
        eng = make_engine()
        pos = _monitoring(eng)

        async def main() -> Any:
            task = asyncio.ensure_future(eng.wait_for_async(pos, State.PAUSED, timeout=BOUND_S))
            await _until(lambda: eng._aio_waiter is not None and eng._aio_waiter.held == 1)
            p = spawner.start(_die_after_cas, eng.handle, pos)
            got = await task
            await _until(lambda: not p.is_alive())
            assert p.exitcode == -9
            return got

        assert run(main()) is State.PAUSED


    def test_a_dead_server_fails_the_wait_with_server_error(self):
        """A Redis server killed under an awaiting wait fails it with ServerError, not a hang.

        The Redis server killed under an awaiting wait: ServerError (an
        EngineError), not a hang and not a raw redis exception.
        """
        from engine.errors import ServerError
        from engine.tools.redis_server import PrivateRedis
        with PrivateRedis() as server:
            e = Engine.create(16, url=server.url + "?timeout=1")
            pos = _monitoring(e)

            async def main() -> None:
                task = asyncio.ensure_future(e.wait_for_async(pos, State.CLOSED, timeout=BOUND_S))
                await _until(lambda: e._aio_waiter is not None and e._aio_waiter.held == 1)
                assert server.proc is not None
                server.proc.kill()
                server.proc.wait()
                with pytest.raises(ServerError):
                    await task

            run(main())
            e.close()


class TestEnds:
    def test_cancelling_a_task_removes_its_wait(self, make_engine):
        """A cancelled task's wait leaves the waiter thread (it holds none after)."""
        eng = make_engine()
        pos = _monitoring(eng)

        async def main() -> None:
            task = asyncio.ensure_future(eng.wait_for_async(pos, State.CLOSED, timeout=None))
            await _until(lambda: eng._aio_waiter is not None and eng._aio_waiter.held == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _until(lambda: eng._aio_waiter.held == 0)

        run(main())

    def test_close_ends_pending_waits_with_closed_error(self, make_engine):
        """close() fails every awaiting wait, and later ones, with ClosedError; its thread ends.

        close() fails every awaiting wait with ClosedError; later ones too;
        its thread ends.
        """
        eng = make_engine()
        pos = _monitoring(eng)

        async def main() -> None:
            tasks = [asyncio.ensure_future(eng.wait_for_async(pos, State.CLOSED, timeout=None)),
                     asyncio.ensure_future(eng.wait_for_change_async(pos, timeout=BOUND_S))]
            await _until(lambda: eng._aio_waiter is not None and eng._aio_waiter.held == 2)
            eng.close()
            for t in tasks:
                with pytest.raises(ClosedError):
                    await t
            with pytest.raises(ClosedError):
                await eng.wait_for_async(pos, State.CLOSED, timeout=1.0)

        run(main())
        assert _waiter_threads() == 0

    def test_timeout_raises_wait_timeout(self, engine):
        """Nothing within the timeout: WaitTimeout (a TimeoutError), both waits."""
        pos = _monitoring(engine)

        async def main() -> None:
            with pytest.raises(WaitTimeout):
                await engine.wait_for_async(pos, State.CLOSED, timeout=0.05)
            with pytest.raises(WaitTimeout):
                await engine.wait_for_change_async(pos, timeout=0.05)

        run(main())

    def test_already_there_needs_no_thread(self, engine):
        """A state already reached returns at once, without starting a waiter."""
        pos = _monitoring(engine)
        assert run(engine.wait_for_async(pos, "MONITORING", timeout=0)) is State.MONITORING
        assert engine._aio_waiter is None

    def test_a_released_id_raises_stale(self, make_engine):
        """A position released while awaited raises StaleIdError, never the next opening's state.

        The position released while awaited: StaleIdError, never the next
        opening's state.
        """
        eng = make_engine()
        pos = _monitoring(eng)

        async def main() -> None:
            task = asyncio.ensure_future(eng.wait_for_async(pos, State.PAUSED, timeout=BOUND_S))
            await _until(lambda: eng._aio_waiter is not None and eng._aio_waiter.held == 1)
            for t in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
                eng.transition(pos, t)
            eng.release_position(pos)
            again = _monitoring(eng)
            eng.transition(again, Trigger.PAUSE)
            with pytest.raises(StaleIdError):
                await task

        run(main())

    def test_bad_arguments_are_refused_before_any_wait(self, engine):
        """A bad state or timeout: a typed error; no waiter is started."""
        pos = _monitoring(engine)

        async def main() -> None:
            with pytest.raises(ArgumentError):
                await engine.wait_for_async(pos, "NOPE")
            with pytest.raises(ArgumentError):
                await engine.wait_for_change_async(pos, timeout=None)  # type: ignore[arg-type]
            with pytest.raises(ArgumentError):
                await engine.wait_for_async(pos, State.CLOSED, timeout=-1)

        run(main())
        assert engine._aio_waiter is None


class TestCluster:
    pytestmark = pytest.mark.slow

    def test_waits_on_every_node_of_a_cluster(self, cluster):  # noqa: F811
        """One waiter thread serves awaiting waits on every node of a three-node cluster.

        Awaiting positions on three nodes: one waiter thread blocks on each
        node's streams at once; a wait registered while it is blocked is
        served too (its block is ended with CLIENT UNBLOCK).
        """
        e = Engine.create(64, url=cluster, shards=6)
        try:
            ids = [_monitoring(e) for _ in range(12)]
            nodes = {e._seg.conn.client.get_node_from_key(e._seg.meta_keys[e.slot_of(i) % 6]).name
                     for i in ids}
            assert len(nodes) == 3

            async def main() -> list[Any]:
                first = [asyncio.ensure_future(e.wait_for_async(i, State.PAUSED, timeout=BOUND_S))
                         for i in ids[:6]]
                await _until(lambda: e._aio_waiter is not None and e._aio_waiter.held == 6)
                late = [asyncio.ensure_future(e.wait_for_async(i, State.PAUSED, timeout=BOUND_S))
                        for i in ids[6:]]
                await _until(lambda: e._aio_waiter.held == 12)
                for i in ids:
                    e.transition(i, Trigger.PAUSE)
                return await asyncio.gather(*first, *late)

            assert run(main()) == [State.PAUSED] * 12
        finally:
            e.unlink()
            e.close()
