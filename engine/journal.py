"""The journal's public record and the seam each backend implements.

Every committed change is recorded once, in commit order, and any process
can follow it with ``Engine.events()`` / ``Engine.events_async()``.  This
module holds what both backends share: the ``Event`` a reader gets, the
kinds, and ``JournalSource``, the interface a backend's journal reader
implements (shared memory: the ring in the segment; Redis: a stream per
shard).  ``Engine`` iterates any ``JournalSource`` the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple, Protocol

__all__ = ["EVENT_DTYPE", "KINDS", "Event", "JournalSource", "JournalWaker", "follow",
           "follow_async"]

#: records one ``read`` asks for; a wait sleeps at most this long per C call so
#: that signal handlers (Ctrl-C) run between calls
READ_BATCH = 256
WAIT_SLICE_S = 0.25

#: what a record says happened (``price`` only with ``journal_prices=True``)
KINDS: tuple[str, ...] = ("open", "transition", "release", "key", "account", "halt", "price")


def _event_dtype() -> Any:
    """EVENT_DTYPE: named columns laid over the C record (``eng_jrec``), so a
    read copies records once, into the array the caller gets; ``state``
    takes the place of the record's latch word (which a reader has no use
    for), the C record's state word stays out of view."""
    import numpy as np

    from engine._native import ffi, lib

    cols = [("seq", "seq", "<u8"), ("ts_ns", "ts_ns", "<i8"), ("kind", "kind", "<u4"),
            ("id", "id", "<u8"), ("state", "latch", "<u4"), ("trigger", "trigger", "<u4"),
            ("w", "w", ("<u8", (int(lib.ENG_MAX_FIELD_WORDS),))),
            ("version", "version", "<u8")]
    return np.dtype({"names": [c[0] for c in cols], "formats": [c[2] for c in cols],
                     "offsets": [ffi.offsetof("eng_jrec", c[1]) for c in cols],
                     "itemsize": ffi.sizeof("eng_jrec")})


#: ``Engine.read_events()``'s rows, one per record (a numpy structured dtype):
#: ``seq``, ``ts_ns``, ``id`` as in ``Event``; ``kind`` the index of the kind
#: in ``KINDS``; ``state`` the state's one-hot int after an ``open`` or a
#: ``transition`` (0 for the other kinds); ``trigger`` the trigger's int for a
#: ``transition`` (0 for the others); ``w`` the record's words after the
#: change (``open`` / ``transition`` / ``release``: the spec's fields, as
#: ``Engine.context()`` packs them; ``account``: the books; ``price``: price,
#: timestamp, pnl %, pnl $; ``key``: the key's bytes; ``halt``: ``w[0]`` is
#: the new flag) and ``version`` its version (``key``: the key's length).
EVENT_DTYPE: Any = _event_dtype()


class Event(NamedTuple):
    """One committed change.

    ``seq``: its place in the journal's total order (1, 2, ...; on Redis the
    order holds per id and per account).  ``ts_ns``: the engine clock at the
    commit (never before the previous record's).  ``kind``: one of
    ``KINDS``.  ``id``: the position id (the account id for ``account``, 0
    for ``halt``).  ``state``: the state after
    the change, as ``Engine.state()`` returns it (None where the kind has
    none).  ``trigger``: the trigger fired (a ``transition``; else None).
    ``record``: the record after the change, as ``Engine.context()`` returns
    it (for ``account``, the ``Account``; for ``key``, the key bytes; for
    ``halt``, the new flag as a bool).
    """

    seq: int
    ts_ns: int
    kind: str
    id: int
    state: Any
    trigger: Any
    record: Any


class JournalSource(Protocol):
    """What a backend provides for ``Engine.events()``.

    ``read`` returns up to ``limit`` events with seq > ``after``, in seq
    order, or raises ``JournalLappedError`` (with ``resume_seq``) when a
    record after ``after`` is no longer retained: never a silent gap.
    ``wait`` blocks until the journal holds a seq > ``after`` or ``timeout``
    seconds pass (bounded, interruptible by signals); True when there is
    something to read.
    """

    def seq(self) -> int: ...

    def read(self, after: int, limit: int) -> list[Event]: ...

    def wait(self, after: int, timeout: float) -> bool: ...

    def read_array(self, after: int, limit: int) -> Any: ...


def check_read_max(limit: Any) -> int:
    """``read_events``'s ``max``, checked: an int in [1, ENG_JOURNAL_MAX_RECORDS]."""
    from engine._native import lib
    from engine.errors import ArgumentError, EngineTypeError, shown

    hi = int(lib.ENG_JOURNAL_MAX_RECORDS)
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise EngineTypeError(f"max must be an int, got {shown(limit)}")
    if not 1 <= limit <= hi:
        raise ArgumentError(f"max must be in [1, {hi}], got {shown(limit)}")
    return limit


def read_array(source: JournalSource, since: Any, limit: Any) -> Any:
    """``Engine.read_events``: the arguments checked, then one read."""
    from engine.errors import ArgumentError

    if since is None:
        raise ArgumentError("since must be a seq (records with seq > since are read); "
                            "start from eng.journal_seq for only what comes next")
    _check_since(since)
    return source.read_array(since, check_read_max(limit))


def _check_timeout(timeout: float | None) -> None:
    from engine.errors import ArgumentError, shown

    if timeout is None:
        return
    if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
            or not timeout == timeout or timeout < 0 or timeout == float("inf")):
        raise ArgumentError("timeout must be a finite number of seconds >= 0 or None, "
                            f"got {shown(timeout)}")


def max_seq() -> int:
    """The largest seq a journal can reach (the latch word's seq bits); a
    since past it could never be passed, and does not fit the C call."""
    from engine._native import lib

    return (1 << (64 - int(lib.ENG_TOKEN_BITS))) - 1


def _check_since(since: int | None) -> None:
    from engine.errors import ArgumentError, EngineTypeError, shown

    if since is None:
        return
    if not isinstance(since, int) or isinstance(since, bool):
        raise EngineTypeError(f"since must be an int seq or None, got {shown(since)}")
    if not 0 <= since <= max_seq():
        raise ArgumentError(f"since must be a seq in [0, {max_seq()}] or None, "
                            f"got {shown(since)}")


def _check_spin(spin_us: Any) -> int:
    """``events``'s ``spin_us``, checked; the window in nanoseconds."""
    from engine._native import lib
    from engine.errors import ArgumentError, shown

    hi = int(lib.ENG_JOURNAL_SPIN_MAX_US)
    if (not isinstance(spin_us, (int, float)) or isinstance(spin_us, bool)
            or not 0 <= spin_us <= hi):
        raise ArgumentError(f"spin_us must be a number of microseconds in [0, {hi}], "
                            f"got {shown(spin_us)}")
    return int(spin_us * 1000)


def follow(source: JournalSource, since: int | None, timeout: float | None,
           spin_us: float | None = None) -> Iterator[Event]:
    """The events after ``since`` (None: after the journal's seq now), in seq
    order; ends once ``timeout`` seconds pass with nothing new (None: never).
    With nothing to read it first looks again for ``spin_us`` microseconds
    (None: ``ENG_JOURNAL_SPIN_US``; 0: sleeps at once), then sleeps in
    slices so that a signal handler (Ctrl-C) runs between them.  Arguments
    are checked here, before the first event is asked for."""
    from engine._native import lib

    _check_since(since)
    _check_timeout(timeout)
    spin_ns = _check_spin(lib.ENG_JOURNAL_SPIN_US if spin_us is None else spin_us)
    return _follow(source, source.seq() if since is None else since, timeout, spin_ns)


def _follow(source: JournalSource, after: int, timeout: float | None,
            spin_ns: int = 0) -> Iterator[Event]:
    clock = time.perf_counter_ns
    while True:
        batch = source.read(after, READ_BATCH)
        if batch:
            after = batch[-1].seq   # a consumer that stops inside the batch ends the generator
            yield from batch
            continue
        deadline = None if timeout is None else time.monotonic() + timeout
        if spin_ns:   # bounded: a few tens of microseconds of seq() looks, then the sleep
            seq = source.seq
            end = clock() + spin_ns
            now = seq()
            while now <= after and clock() < end:
                now = seq()
            if now > after:
                continue
        while True:
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S,
                                                             deadline - time.monotonic())
            if left <= 0:
                return
            if source.wait(after, left):
                break


class _Waiter:
    __slots__ = ("after", "fut", "loop")

    def __init__(self, after: int, loop: asyncio.AbstractEventLoop,
                 fut: asyncio.Future[None]) -> None:
        self.after = after
        self.loop = loop
        self.fut = fut


def _wake(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class JournalWaker:
    """One helper thread per journal wakes every asyncio subscriber.

    A subscriber registers the seq it has read up to and awaits a future; the
    thread sleeps in the journal's C wait (GIL released) on the lowest seq any
    subscriber waits past, and when the journal moves it resolves every future
    whose seq was passed, on its own loop (``call_soon_threadsafe``).  The
    thread exists only while someone waits: 200 subscribers, one thread.
    """

    def __init__(self, source: JournalSource) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._waiters: list[_Waiter] = []
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the helper thread is alive now."""
        t = self._thread
        return t is not None and t.is_alive()

    def wait(self, after: int) -> asyncio.Future[None]:
        """A future resolved once the journal holds a seq > ``after``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.append(_Waiter(after, loop, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine-journal-waker",
                                                daemon=True)
                self._thread.start()
        return fut

    def _settle(self, seq: int, exc: BaseException | None) -> bool:
        """Wake the waiters ``seq`` passed (all of them on ``exc``); drop the
        cancelled.  False when nobody is left (the thread then ends)."""
        with self._lock:
            keep: list[_Waiter] = []
            for w in self._waiters:
                if w.fut.done():
                    continue
                if exc is not None or w.after < seq:
                    with contextlib.suppress(RuntimeError):   # its loop closed: nobody to wake
                        w.loop.call_soon_threadsafe(_wake, w.fut, exc)
                else:
                    keep.append(w)
            self._waiters = keep
            if not keep:
                self._thread = None
                return False
            return True

    def _run(self) -> None:
        while True:
            with self._lock:
                low = min((w.after for w in self._waiters), default=None)
            if low is None:
                if not self._settle(0, None):
                    return
                continue
            try:
                seq = self._source.seq()
                if seq <= low:
                    self._source.wait(low, WAIT_SLICE_S)
                    seq = self._source.seq()
            except BaseException as exc:   # closed engine, ...: every waiter gets it
                self._settle(0, exc)
                return
            if not self._settle(seq, None):
                return


def follow_async(source: JournalSource, waker: JournalWaker,
                 since: int | None, timeout: float | None) -> AsyncIterator[Event]:
    """``follow`` for asyncio: reads never block; waits go through ``waker``
    (one helper thread for every subscriber of the journal)."""
    _check_since(since)
    _check_timeout(timeout)
    return _follow_async(source, waker, source.seq() if since is None else since, timeout)


async def _follow_async(source: JournalSource, waker: JournalWaker, after: int,
                        timeout: float | None) -> AsyncIterator[Event]:
    while True:
        batch = source.read(after, READ_BATCH)
        if batch:
            for ev in batch:
                after = ev.seq
                yield ev
            continue
        fut = waker.wait(after)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return
