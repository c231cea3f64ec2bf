"""The asyncio waiter thread on Redis with descriptor numbers past select()'s
FD_SETSIZE (1024): a process that holds many files or sockets (a full test
run, a busy service) still gets its awaiting waits served, and a waiter
thread that fails reports why instead of "the engine was closed"."""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Callable, Iterator

import pytest

from engine import Engine, Trigger
from engine.errors import ClosedError

#: select()'s descriptor limit on Linux (FD_SETSIZE)
FD_SETSIZE = 1024


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Descriptors held open so that the next ones are numbered past FD_SETSIZE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FD_SETSIZE + 64:
        pytest.skip(f"RLIMIT_NOFILE is {soft}: descriptors past {FD_SETSIZE} cannot exist")
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(FD_SETSIZE + 16)]
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture
def eng(made: Callable[..., Engine]) -> Engine:
    return made(16, journal=True)


def _opened(e: Engine) -> int:
    return e.open_position(entry_price=100.0, amount=1.0, side=1, token=7)


class TestWaiterPastFdSetsize:
    def test_an_awaiting_wait_is_served_with_descriptors_past_1024(self, many_fds, eng):
        """The waiter thread, its pipe and sockets numbered past 1024, wakes a waiting task."""
        pos = _opened(eng)

        async def main() -> object:
            waiter = eng._waiter()
            task = asyncio.ensure_future(eng.wait_for_change_async(pos, timeout=30.0))
            for _ in range(6000):   # bounded: the thread takes the wait, or fails it
                if waiter.held == 1 or task.done():
                    break
                await asyncio.sleep(0.005)
            assert not task.done(), task.exception()
            assert waiter.held == 1
            eng.transition(pos, Trigger.POSITION_OPENED)
            return await task

        assert str(asyncio.run(main())) == "MONITORING"

    def test_a_failed_waiter_thread_reports_its_error_not_closed(self, eng, monkeypatch):
        """A waiter thread that died of an error: later waits raise that error, not ClosedError."""
        from engine import aio

        def broken(self: object, streams: object, bell: int) -> None:
            raise OSError("the sleeper broke")

        monkeypatch.setattr(aio._RedisSleeper, "sleep", broken)
        pos = _opened(eng)

        async def main() -> None:
            waiter = eng._waiter()
            for _ in range(6000):
                if waiter.closed:
                    break
                await asyncio.sleep(0.005)
            assert waiter.closed
            with pytest.raises(OSError, match="the sleeper broke") as got:
                await waiter.wait(aio.changed(pos, None), 5.0, lambda: TimeoutError("none"))
            assert not isinstance(got.value, ClosedError)

        asyncio.run(main())
