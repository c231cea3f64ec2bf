"""Shared fixtures: engines on randomly named segments that are always
unlinked, and a spawn-context helper whose children are always terminated."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pathlib
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import posix_ipc
import pytest

from engine import Engine, SegmentNotFoundError

SHM_DIR = pathlib.Path("/dev/shm")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def segment_path(name: str) -> pathlib.Path:
    """Where the kernel keeps a POSIX shm segment."""
    return SHM_DIR / name


def _dispose(eng: Engine) -> None:
    eng.close()
    with contextlib.suppress(SegmentNotFoundError):   # the test may have unlinked it
        eng.unlink()
    assert not segment_path(eng.name).exists(), f"segment {eng.name} outlived its fixture"


@pytest.fixture
def make_engine() -> Iterator[Callable[..., Engine]]:
    """Factory: ``make_engine(capacity=..., spec=..., name=...)``; every engine
    it made is closed and its segment unlinked at teardown."""
    made: list[Engine] = []

    def make(capacity: int = 16, **kwargs: Any) -> Engine:
        eng = Engine.create(capacity=capacity, **kwargs)
        made.append(eng)
        return eng

    try:
        yield make
    finally:
        for eng in made:
            _dispose(eng)


@pytest.fixture
def engine() -> Iterator[Engine]:
    """A fresh 16-slot engine of the default position lifecycle."""
    eng = Engine.create(capacity=16)
    try:
        yield eng
    finally:
        _dispose(eng)


class Spawner:
    """Starts children in a spawn context; ``cleanup`` terminates any left."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []

    def start(self, target: Callable[..., Any], *args: Any) -> multiprocessing.process.BaseProcess:
        p = self.ctx.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def join_all(self, timeout: float) -> None:
        """Join every child; a child still running after ``timeout`` fails the test."""
        for p in self.procs:
            p.join(timeout)
        stuck = [p.pid for p in self.procs if p.is_alive()]
        assert not stuck, f"children {stuck} did not exit within {timeout} s"
        codes = [p.exitcode for p in self.procs]
        assert all(c == 0 for c in codes), f"children exit codes: {codes}"

    def cleanup(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    """A spawn-context helper; its children never outlive the test."""
    s = Spawner()
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for an independent interpreter that imports ``engine``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture
def names() -> Iterator[Callable[[], str]]:
    """Random segment names; whatever exists under them at the end is unlinked."""
    made: list[str] = []

    def new() -> str:
        made.append(f"tseg_{secrets.token_hex(6)}")
        return made[-1]

    yield new
    for n in made:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory("/" + n)
