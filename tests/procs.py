"""Helpers for tests that drive child processes: poll, kill, time."""

from __future__ import annotations

import os
import queue
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from engine import POSITION_SPEC, MachineSpec, Rule

READY_TIMEOUT = 30.0       # a spawned worker imports numpy and cffi: slow on a busy host
JOIN_TIMEOUT = 10.0        # seconds to join a process before failing the test


def readable(fd: Any, timeout: float) -> bool:
    """``fd`` (a descriptor or an object with ``fileno()``) has something to
    read within ``timeout`` seconds.  poll, not select: the suite's process
    may hold descriptors past 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def until(pred: Callable[[], Any], what: str, timeout: float = READY_TIMEOUT) -> None:
    """Poll ``pred`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def sigkill(p: Any, may_have_exited: bool = False) -> None:
    """SIGKILL a child, reap it, and check it died of the kill.

    Reaping matters: a zombie would still count as dead.  A child that ended
    before the kill (an exception, a crash, an early return) fails the check
    unless the caller passes ``may_have_exited=True``.
    """
    if p.exitcode is None:   # polls; a reaped child's pid may be reused: never signal it
        os.kill(p.pid, signal.SIGKILL)
    p.join(JOIN_TIMEOUT)
    assert not p.is_alive(), f"process {p.pid} survived SIGKILL"
    if not may_have_exited:
        assert p.exitcode == -signal.SIGKILL, (
            f"process {p.pid} ended with exit code {p.exitcode} before its SIGKILL "
            f"(expected {-signal.SIGKILL})")


def exit_guarded_spec(guard: Callable[[Any, Any], bool], name: str) -> MachineSpec:
    """The default position lifecycle with EXIT_STARTED guarded by ``guard``
    (a module-level function: spawned workers import it by name)."""
    rules = [Rule.of(r.trigger, r.sources, r.target,
                     guard if r.trigger == "EXIT_STARTED" else None)
             for r in POSITION_SPEC.rules]
    return MachineSpec(states=POSITION_SPEC.states, triggers=POSITION_SPEC.triggers,
                       rules=rules, initial=POSITION_SPEC.initial, closed=POSITION_SPEC.closed,
                       name=name)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """``call()`` and the seconds it took."""
    t0 = time.monotonic()
    out = call()
    return out, time.monotonic() - t0


RESULT_TIMEOUT = 60.0      # seconds for every child of a test to report


def collect(q: Any, n: int, spawner: Any, timeout: float = RESULT_TIMEOUT) -> list[Any]:
    """n results from the children; a child's exception (an ("error", text)
    item) fails the test, and so does silence (with the children's exit
    codes: a crash shows as < 0)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            item = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            codes = [(p.pid, p.exitcode) for p in spawner.procs]
            pytest.fail(f"only {len(got)} of {n} children reported within {timeout} s; "
                        f"(pid, exit code) of the children: {codes}")
        if item[0] == "error":
            pytest.fail(f"child failed:\n{item[1]}")
        got.append(item)
    return got
