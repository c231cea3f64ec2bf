"""Shared fixtures: engines on randomly named segments that are always
unlinked, and a spawn-context helper whose children are always terminated.

The public-API test modules run on both backends: a module that sets
``BACKENDS = ("shm", "redis")`` gets every test that uses ``engine``,
``make_engine`` or ``backend`` once per backend, except those marked
``shm_only`` (tests about shared memory itself: mmap, futex, segment files,
C fault hooks).  The Redis runs use a private ``redis-server`` on a free
loopback port with persistence off, started once per session.  A module that
also sets ``JOURNAL_OFF_TOO = True`` runs them once more on shared memory with
``journal=None``: the journal is on by default, and the commit without it (one
CAS on the fast path) keeps its own crash and race tests."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pathlib
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import posix_ipc
import pytest

# The test suite uses the C fault hooks (eng_set_faults): every process of it
# honours them, this one and the children it spawns (they inherit the
# environment).  Set before any engine call: C reads it at its first question.
os.environ["ENGINE_TEST_FAULTS"] = "1"

from engine import Engine, SegmentNotFoundError, ServerError
from engine.tools.redis_server import PrivateRedis

SHM_DIR = pathlib.Path("/dev/shm")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def segment_path(name: str) -> pathlib.Path:
    """Where the kernel keeps a POSIX shm segment."""
    return SHM_DIR / name


def _dispose(eng: Engine) -> None:
    url = eng.url
    eng.close()
    if url is not None:
        with Engine.attach(eng.handle) if _exists(eng) else contextlib.nullcontext() as e:
            if e is not None:
                e.unlink()
        return
    with contextlib.suppress(SegmentNotFoundError):   # the test may have unlinked it
        eng.unlink()
    assert not segment_path(eng.name).exists(), f"segment {eng.name} outlived its fixture"


def _exists(eng: Engine) -> bool:
    try:
        Engine.attach(eng.handle).close()
        return True
    except SegmentNotFoundError:
        return False


# -- the Redis server the "redis" runs use -------------------------------------------------
_server: PrivateRedis | None = None


def redis_url() -> str:
    """The session's Redis server: a private redis-server on a free loopback
    port, persistence off (started on first use)."""
    global _server
    if _server is None:
        _server = PrivateRedis(prefix="engine-test-redis-")
    return _server.url


@pytest.fixture(autouse=True)
def _sigint_is_pythons() -> Iterator[None]:
    """Every test ends with Python's own SIGINT handler in place: a test that
    leaves another one behind (an asyncio runner's, whose main task never
    finished, swallows Ctrl-C) does not change what a later test's Ctrl-C does."""
    yield
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def url() -> str:
    """The session's Redis server's url (the Redis-only test modules)."""
    return redis_url()


@pytest.fixture
def made(url: str) -> Iterator[Any]:
    """Engines made (on the session's server by default); unlinked at teardown."""
    engines: list[Engine] = []

    def make(capacity: int = 16, **kw: Any) -> Engine:
        e = Engine.create(capacity, url=kw.pop("url", url), **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        try:
            e.close()
            with Engine.attach(e.handle) as again:
                again.unlink()
        except (SegmentNotFoundError, ServerError):
            pass


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _server is not None:
        _server.stop()


# -- backends ------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shm_only: about shared memory itself; not run on Redis")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    both = getattr(metafunc.module, "BACKENDS", ("shm",))
    if metafunc.definition.get_closest_marker("shm_only"):
        both = ("shm",)
    if getattr(metafunc.module, "JOURNAL_OFF_TOO", False):
        both = (*both, "shm-nojournal")
    metafunc.parametrize("backend", both)


@pytest.fixture
def backend() -> str:
    """Which store the test's engines live in: "shm", "redis" or "shm-nojournal"
    (parametrized)."""
    return "shm"   # replaced by the parametrization above


def create_args(backend: str) -> dict[str, Any]:
    """Engine.create's arguments for a backend: "shm" (the defaults: the journal
    on), "redis", or "shm-nojournal" (``journal=None``: the bare commit)."""
    if backend == "redis":
        return {"url": redis_url()}
    return {"journal": None} if backend == "shm-nojournal" else {}


@pytest.fixture
def make_engine(backend: str) -> Iterator[Callable[..., Engine]]:
    """Factory: ``make_engine(capacity=..., spec=..., name=...)``; every engine
    it made is closed and its segment unlinked at teardown."""
    made: list[Engine] = []

    def make(capacity: int = 16, **kwargs: Any) -> Engine:
        eng = Engine.create(capacity=capacity, **{**create_args(backend), **kwargs})
        made.append(eng)
        return eng

    try:
        yield make
    finally:
        for eng in made:
            _dispose(eng)


@pytest.fixture
def engine(backend: str) -> Iterator[Engine]:
    """A fresh 16-slot engine of the default position lifecycle."""
    eng = Engine.create(capacity=16, **create_args(backend))
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


@pytest.fixture
def spawn(spawner: Any) -> Callable[..., Any]:
    """Start a spawn-context child; it never outlives the test."""
    return spawner.start
