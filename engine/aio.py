"""asyncio waits without a thread per awaiting task.

One ``Waiter`` per Engine (started at its first awaiting wait) runs one
thread that serves every task awaiting that Engine: ``wait_for_async``,
``wait_for_change_async`` and, through the same interface, the journal's
``events_async``.  A wait is a *probe*: a function the waiter thread calls
with its own attached Engine (an Engine belongs to one thread) that answers
either ``(True, value)``, done: the task's future gets ``value``; or
``(False, sleep_on)``: not yet, and what to sleep on until it is worth
probing again.  A probe that raises fails its future with that exception.
The waiter probes a wait when it is registered and after every wake, so a
probe must check, then arm what wakes it, then check again (the order
``eng_wait_change`` keeps in C): then no commit between the check and the
sleep is missed.

    sleep_on (shared memory): ``(address, value)`` of a 32-bit futex word in
        the segment: the thread sleeps while the word holds ``value``
        (``futex_waitv``: all the waits' words at once, and a doorbell that
        a new registration, a cancellation or ``close`` rings).
    sleep_on (Redis): ``(stream key, last id)``: the thread blocks in one
        ``XREAD BLOCK`` per node over every wait's stream (and a new
        registration ends it with ``CLIENT UNBLOCK``).

Futures are resolved with ``loop.call_soon_threadsafe``; a cancelled task's
wait is dropped at the next pass (its cancellation rings the doorbell);
``Waiter.close()`` (``Engine.close()`` calls it) fails every wait still
pending with ``ClosedError``.

Does not guarantee: the waiter sleeps at most ``ENG_WAIT_SLICE_NS`` between
probes (a committer killed between its commit and its wake costs a slice,
as in ``wait_for_change``); past ``FUTEX_WAITV_MAX - 1`` distinct words, the
rest are probed once per slice, not woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from engine._native import ffi, lib
from engine.errors import ClosedError, InternalError, ServerError

__all__ = ["Waiter", "changed", "committed_of", "reaches", "start"]

#: Probe: called on the waiter thread with its Engine
Probe = Callable[[Any], tuple[bool, Any]]

_SLICE_S = lib.ENG_WAIT_SLICE_NS / 1e9
_COMMITTED = (lib.ENG_SW_STATE_MASK | lib.ENG_SW_CTX
              | (lib.ENG_SW_GEN_MASK << lib.ENG_SW_GEN_SHIFT))
_PROBE_TRIES = 8          # a probe's check/arm/check rounds before it sleeps a slice
_UNBLOCK_TRIES = 1000     # Redis: CLIENT UNBLOCK tries while the XREAD is on its way ...
_UNBLOCK_PAUSE_S = 0.001  # ... this long apart (about a second at most)
_JOIN_S = lib.ENG_CLOSE_WAIT_NS / 1e9

# Linux futex ABI (include/uapi/linux/futex.h, arch syscall tables): kernel
# numbers, not the engine's; futex_waitv is in Linux >= 5.16
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
_SYS_FUTEX_WAITV = 449    # the same on x86_64 and aarch64
_FUTEX_WAKE = 1
_FUTEX_WAIT = 0
_FUTEX2_SIZE_U32 = 2      # shared (no FUTEX2_PRIVATE): the segment is shared
FUTEX_WAITV_MAX = 128
_CLOCK_MONOTONIC = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _FutexWaitv(ctypes.Structure):
    _fields_ = [("val", ctypes.c_uint64), ("uaddr", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)   # CDLL: the GIL is released around each call
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Wait:
    __slots__ = ("fut", "loop", "probe", "sleep_on")

    def __init__(self, probe: Probe, fut: asyncio.Future[Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.probe, self.fut, self.loop = probe, fut, loop
        self.sleep_on: Any = None   # what its last probe said to sleep on


def _post(w: _Wait, ok: bool, value: Any) -> None:
    """From the waiter thread: settle the wait's future on its loop (a loop
    closed meanwhile has no one left to tell)."""
    with contextlib.suppress(RuntimeError):   # the loop is closed
        w.loop.call_soon_threadsafe(_settle, w.fut, ok, value)


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """On the loop's thread: the result, unless the task gave up meanwhile."""
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class Waiter:
    """One thread serving every awaiting wait of one Engine.

    ``await waiter.wait(probe, timeout, timeout_error)``: see the module
    docstring for probes.  ``timeout`` is counted on the event loop;
    ``timeout_error()`` makes the exception it raises."""

    def __init__(self, attach: Callable[[], Any], name: str, redis: bool) -> None:
        self._attach = attach
        self._lock = threading.Lock()
        self._new: list[_Wait] = []
        self.closed = False
        self._redis = redis
        self._bell = _Doorbell()
        self._started = threading.Event()
        self._failed: BaseException | None = None   # attaching failed (raised by __init__)
        self._died: BaseException | None = None     # the thread ended on this error
        #: waits the thread holds after its last pass (tests, tools)
        self.held = 0
        self._thread = threading.Thread(target=self._run, name=f"engine-waiter-{name}",
                                         daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failed is not None:
            raise self._failed

    async def wait(self, probe: Probe, timeout: float,
                   timeout_error: Callable[[], BaseException]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self.closed:
                if self._died is not None:   # the thread died of it: say so
                    raise self._died
                raise ClosedError("the engine was closed")
            self._new.append(_Wait(probe, fut, loop))
        self._bell.ring()
        fut.add_done_callback(self._gone)   # a cancelled task: its wait goes at once
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise timeout_error() from None

    def _gone(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self._bell.ring()

    def close(self) -> None:
        """Fail every pending wait with ClosedError and end the thread (bounded)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._bell.ring()
        if threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_S)

    # -- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            eng = self._attach()
            sleeper = _RedisSleeper(eng, self._bell) if self._redis else _FutexSleeper(self._bell)
        except BaseException as e:   # reported to the first waiter's caller
            self._failed = e
            self.closed = True
            self._bell.close()
            self._started.set()
            return
        self._started.set()
        waits: list[_Wait] = []
        fired: set[Any] | None = None
        last_full = time.monotonic()
        try:
            while True:
                # the doorbell is read before the new waits are taken: a ring
                # after this moves it, so the sleep below does not miss it
                bell = sleeper.arm()
                with self._lock:
                    new, self._new = self._new, []
                    closing = self.closed
                if closing:
                    waits += new
                    break
                now = time.monotonic()
                if now - last_full >= sleeper.slice_s:   # every wait, once a slice
                    fired, last_full = None, now
                waits = self._probe_all(eng, waits, fired) + self._probe_all(eng, new, None)
                self.held = len(waits)
                fired = sleeper.sleep([w.sleep_on for w in waits if w.sleep_on is not None],
                                      bell)
        except BaseException as e:   # the engine failed under us: every wait learns it
            with self._lock:
                self._died = e   # and every later one (Waiter.wait)
                self.closed = True
                new, self._new = self._new, []
            for w in waits + new:
                _post(w, False, e)
            waits = []
        finally:
            with self._lock:
                self.closed = True
                pending, self._new = waits + self._new, []
            self.held = 0
            for w in pending:
                _post(w, False, ClosedError("the engine was closed while this task waited"))
            sleeper.close()
            with contextlib.suppress(Exception):   # the view is gone either way
                eng.close()

    @staticmethod
    def _probe_all(eng: Any, waits: list[_Wait], fired: set[Any] | None) -> list[_Wait]:
        """Probe the waits (those whose sleep_on fired, those with none, or
        all when ``fired`` is None); the ones not done stay."""
        keep = []
        for w in waits:
            if w.fut.done():   # cancelled or timed out: dropped
                continue
            if fired is not None and w.sleep_on is not None and w.sleep_on not in fired:
                keep.append(w)   # its word did not move: still asleep on it
                continue
            try:
                done, value = w.probe(eng)
            except Exception as e:
                _post(w, False, e)
                continue
            if done:
                _post(w, True, value)
                continue
            w.sleep_on = value
            keep.append(w)
        return keep


def _poll(fds: list[int], timeout_s: float) -> set[int]:
    """The descriptors among ``fds`` readable (or at their end) within
    ``timeout_s`` seconds.  poll, not select: a busy process's descriptors
    are numbered past select()'s FD_SETSIZE (1024), where select raises."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return {fd for fd, _ in p.poll(max(0, int(timeout_s * 1000)))}


class _Doorbell:
    """A process-local futex word and a pipe: ringing wakes the waiter
    thread wherever it sleeps (a futex wait, or select on a socket)."""

    def __init__(self) -> None:
        self.word = ctypes.c_uint32(0)
        self.addr = ctypes.addressof(self.word)
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self._lock = threading.Lock()   # ring vs close: never a descriptor reused meanwhile
        self.closed = False

    def ring(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.word.value = (self.word.value + 1) & 0xFFFFFFFF
            if _SYS_FUTEX is not None:
                _syscall(_SYS_FUTEX, ctypes.c_void_p(self.addr), _FUTEX_WAKE, 1, None, None, 0)
            with contextlib.suppress(BlockingIOError):   # already rung
                os.write(self.w, b"x")

    def drain(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self.r)
                os.close(self.w)


class _FutexSleeper:
    """Sleeps on every wait's futex word and the doorbell at once."""

    def __init__(self, bell: _Doorbell) -> None:
        self.bell = bell
        self.waitv = (_FutexWaitv * FUTEX_WAITV_MAX)()
        self.have_waitv = True

    slice_s = _SLICE_S

    def arm(self) -> int:
        self.bell.drain()   # (the pipe is for the Redis sleeper's select)
        return int(self.bell.word.value)

    def sleep(self, words: list[tuple[int, int]], bell: int) -> set[Any] | None:
        """Sleep until a word moves, the doorbell rings or a slice passes;
        the words that moved (None: probe every wait)."""
        limit_s = self.slice_s
        words = list(dict.fromkeys(words))
        entries = [(self.bell.addr, bell), *words[:FUTEX_WAITV_MAX - 1]]
        if self.have_waitv:
            for i, (addr, val) in enumerate(entries):
                e = self.waitv[i]
                e.val, e.uaddr, e.flags, e.reserved = val, addr, _FUTEX2_SIZE_U32, 0
            end = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(limit_s * 1e9)
            ts = _Timespec(end // 1_000_000_000, end % 1_000_000_000)
            r = _syscall(_SYS_FUTEX_WAITV, self.waitv, len(entries), 0, ctypes.byref(ts),
                         _CLOCK_MONOTONIC)
            if r >= 0 or ctypes.get_errno() != errno.ENOSYS:
                # woken, a word moved (EAGAIN), timed out or a signal
                if len(words) >= FUTEX_WAITV_MAX:
                    return None   # some were not slept on: probe them all
                return {(a, v) for a, v in words if ffi.cast("uint32_t *", a)[0] != v}
            self.have_waitv = False
        # no futex_waitv (Linux < 5.16): the doorbell only, a slice at most
        # (a commit is seen within a slice, not at once)
        ts = _Timespec(0, int(min(limit_s, _SLICE_S / 20) * 1e9))
        if _SYS_FUTEX is not None:
            _syscall(_SYS_FUTEX, ctypes.c_void_p(self.bell.addr), _FUTEX_WAIT, bell,
                     ctypes.byref(ts), None, 0)
        else:   # pragma: no cover
            time.sleep(ts.tv_nsec / 1e9)
        return None

    def close(self) -> None:
        self.bell.close()


class _RedisSleeper:
    """Blocks in one XREAD BLOCK per node over every wait's stream, on
    connections of its own; a ring ends the blocks with CLIENT UNBLOCK."""

    def __init__(self, eng: Any, bell: _Doorbell) -> None:
        self.bell = bell
        self.store = eng._seg
        #: node name -> (connection, its client id); ours alone, for XREAD BLOCK
        self.conns: dict[str, tuple[Any, int]] = {}
        #: as wait_for_change: a slice well inside the url's socket timeout
        self.slice_s = self.store.wait_slice_ms() / 1000

    def arm(self) -> int:
        self.bell.drain()   # a ring after this leaves a byte in the pipe: select sees it
        return 0

    def sleep(self, streams: list[tuple[str, bytes]], bell: int) -> set[Any] | None:
        """Block until a stream has an entry past its id, the doorbell rings
        or a slice passes; the (stream, id) pairs that got entries."""
        limit_s = self.slice_s
        if not streams:
            _poll([self.bell.r], limit_s)
            return set()
        by_node: dict[str, tuple[Any, int, dict[str, bytes]]] = {}
        for stream, last in streams:
            name, conn, cid = self.store.conn.blocking_connection(stream, self.conns)
            by_node.setdefault(name, (conn, cid, {}))[2][stream] = last
        ms = max(1, int(limit_s * 1000))
        sent = []
        for name, (conn, cid, want) in by_node.items():
            try:
                conn.send_command("XREAD", "BLOCK", ms, "STREAMS", *want.keys(), *want.values())
            except self.store.conn.errors as e:
                conn.disconnect()
                self.conns.pop(name, None)
                raise ServerError(f"{self.store.url}: wait failed: {e}") from None
            sent.append((name, conn, cid))
        # the socket wait is a little longer than the server's block
        ready = _poll([*(conn._sock.fileno() for _, conn, _ in sent), self.bell.r],
                      limit_s + 1.0)
        fired: set[Any] = set()
        for name, conn, cid in sent:
            want = by_node[name][2]
            try:
                if conn._sock.fileno() not in ready:   # ends its block at once (a nil reply)
                    self._unblock(conn, cid, next(iter(want)))
                got = conn.read_response()
            except BaseException as e:
                conn.disconnect()
                self.conns.pop(name, None)
                if isinstance(e, self.store.conn.errors):
                    raise ServerError(f"{self.store.url}: wait failed: {e}") from None
                raise
            if isinstance(got, dict):   # RESP3 answers a map
                got = list(got.items())
            for stream, _entries in got or ():
                key = stream.decode() if isinstance(stream, bytes) else stream
                fired.add((key, want[key]))
        return fired

    def _unblock(self, conn: Any, cid: int, key: str) -> None:
        """CLIENT UNBLOCK the read on ``conn``; while its XREAD has not reached
        the server yet (UNBLOCK finds nothing to end), again, until it is
        ended or answers (bounded: past it, the read ends with its block)."""
        for _ in range(_UNBLOCK_TRIES):
            if self.store.conn.unblock(cid, key):
                return
            if _poll([conn._sock.fileno()], _UNBLOCK_PAUSE_S):
                return

    def close(self) -> None:
        for conn, _ in self.conns.values():
            with contextlib.suppress(Exception):
                conn.disconnect()
        self.bell.close()


def start(attach: Callable[[], Any], name: str, redis: bool) -> Waiter:
    """A new Waiter whose thread attaches its own Engine with ``attach()``."""
    return Waiter(attach, name, redis)


# -- probes -------------------------------------------------------------------------------
def committed_of(eng: Any, pos: int) -> int | None:
    """The committed bits of the position's state word now (shared memory;
    None on Redis, where the first probe takes the generation)."""
    if eng.url is not None:
        return None
    return int(eng.state_word(pos & lib.ENG_ID_SLOT_MASK) & _COMMITTED)


def _futex_probe(eng: Any, pos: int, done: Callable[[int, int], bool]) -> tuple[bool, Any]:
    """Shared memory: check, arm, check again (as eng_wait_change does).

    ``done(state, committed word)`` says whether the wait is over.  Arming
    is ``eng_wait_change(pos, word, 0)``: C sets the slot's waiting flag
    (so the next commit wakes the futex word), then the futex word's value
    is read, then the state word again: a commit after that last look moves
    the futex word off the value slept on, so the sleep ends at once."""
    seg = eng._seg
    slot = pos & lib.ENG_ID_SLOT_MASK
    out = ffi.new("int64_t *")
    w = ffi.new("uint64_t *")
    for _ in range(_PROBE_TRIES):
        st = lib.eng_state(seg, pos)
        if st < 0:
            eng._fail(st, pos)
        if lib.eng_state_word(seg, slot, w):
            raise InternalError(f"id {pos}: its slot's state word could not be read")
        word = int(w[0]) & _COMMITTED
        if word & lib.ENG_SW_STATE_MASK != st:
            continue   # it moved between the two looks: look again
        if done(st, word):
            return True, eng._states[st]
        rc = lib.eng_wait_change(seg, pos, word, 0, out)   # arms the waiting flag
        if rc == lib.ENG_APPLIED or rc == lib.ENG_EINTR:
            continue
        if rc != lib.ENG_ETIMEDOUT:
            eng._fail(rc, pos)
        sl = eng._slot(slot)
        addr = int(ffi.cast("uintptr_t", ffi.addressof(sl, "transitions")))   # futex word
        seen = int(ffi.cast("uint32_t *", addr)[0])
        if lib.eng_state_word(seg, slot, w) == 0 and int(w[0]) & _COMMITTED == word:
            return False, (addr, seen)
    return False, None   # moving fast: probed again after a slice at most


def _redis_probe(eng: Any, pos: int, mask: int,
                 since: list[int | None] | None) -> tuple[bool, Any]:
    """Redis: one call (wprep) arms the slot's waiting flag for a few slices
    and reads its state, generation and stream's last id together.
    ``since``: None (only the state counts), or [generation] (None: take
    the one seen now)."""
    rc, st, gen, stream, last = eng._seg.wait_probe(pos)
    if rc:
        eng._fail(rc, pos)
    if st & mask:
        return True, eng._states[st]
    if since is not None:
        if since[0] is None:
            since[0] = gen
        elif gen != since[0]:
            return True, eng._states[st]
    return False, (stream, last)


def changed(pos: int, since: int | None) -> Probe:
    """Done at the first commit on ``pos`` after ``since`` (its committed
    state-word bits; None on Redis: the generation at the first probe)."""
    first: list[int | None] = [None]

    def probe(eng: Any) -> tuple[bool, Any]:
        if eng.url is not None:
            return _redis_probe(eng, pos, 0, first)
        return _futex_probe(eng, pos, lambda st, word: word != since)
    return probe


def reaches(pos: int, mask: int) -> Probe:
    """Done as soon as the state of ``pos`` is in ``mask`` (one-hot bits)."""
    def probe(eng: Any) -> tuple[bool, Any]:
        if eng.url is not None:
            return _redis_probe(eng, pos, mask, None)
        return _futex_probe(eng, pos, lambda st, word: bool(st & mask))
    return probe
