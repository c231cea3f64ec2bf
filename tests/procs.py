"""Helpers for tests that drive child processes: poll, kill, time."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from engine import POSITION_SPEC, MachineSpec, Rule

READY_TIMEOUT = 30.0       # a spawned worker imports numpy and cffi: slow on a busy host
JOIN_TIMEOUT = 10.0        # seconds to join a process before failing the test


def until(pred: Callable[[], Any], what: str, timeout: float = READY_TIMEOUT) -> None:
    """Poll ``pred`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def sigkill(p: Any) -> None:
    """SIGKILL a child and reap it (a zombie would still count as dead)."""
    os.kill(p.pid, signal.SIGKILL)
    p.join(JOIN_TIMEOUT)
    assert not p.is_alive(), f"process {p.pid} survived SIGKILL"


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
