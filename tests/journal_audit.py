"""Helpers for the journal adversary tests (test_journal_adversary2..): the
books a journal must balance against, a segment mapped by the test, and
children that die or stop at a fault site.

``audit`` states the forbidden outcomes of every attack at once: a seq twice,
out of order or skipped silently; a slot commit without its record or a
record without its commit (records per slot == the slot's generation); an
account change, a price write, a bound key or a change of the halt flag
without its record (or with two); a slot whose last record disagrees with
its state now.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import pathlib
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from engine import Engine, Trigger
from engine._native import ffi, lib
from engine.errors import JournalLappedError
from engine.journal import Event

SLOT_MASK = (1 << lib.ENG_ID_SLOT_BITS) - 1
TOKEN_MASK = (1 << lib.ENG_TOKEN_BITS) - 1
SLOT_KINDS = ("open", "transition", "release")
HERE = pathlib.Path(__file__).resolve().parent

#: every fault site that SIGKILLs its process, whatever the append's steps are named
DIE_FAULTS = sorted(n for n in dir(lib) if n.startswith("ENG_FAULT_DIE_"))
#: the short run: the faults a journal append passes on every kind
SHORT = [f for f in DIE_FAULTS if "J" in f.split("ENG_FAULT_DIE_")[1]
         or any(w in f for w in ("CLAIM", "FILL", "DONE", "VOID", "TAIL", "APPEND", "RECORD"))]
#: a child's exit code: SIGKILLed at its fault; its fault never fired (die_at)
KILLED = -signal.SIGKILL
NOT_FIRED = 3


@pytest.fixture(name="make_engine")
def journal_on(make_engine: Any) -> Any:
    """conftest's make_engine with the journal on (a test module imports it to use it)."""
    def make(capacity: int = 16, **kw: Any) -> Any:
        kw.setdefault("journal", True)
        return make_engine(capacity=capacity, **kw)
    return make


def drain(eng: Engine, since: int = 0) -> list[Event]:
    """Every retained record after ``since``, without waiting."""
    return list(eng.events(since=since, timeout=0))


def gen_of(eng: Engine, slot: int) -> int:
    return int((eng.state_word(slot) >> lib.ENG_SW_GEN_SHIFT) & lib.ENG_SW_GEN_MASK)


def locked(eng: Engine, slot: int) -> bool:
    return bool(eng.state_word(slot) & lib.ENG_SW_LOCK)


def void_seqs(eng: Engine, seqs: list[int]) -> set[int]:
    """Of ``seqs``, those whose ring record is an abandoned claim (VOID at its lap).

    Only the per-object append has VOID records (native/journal_append.pml: the
    record's hdr word is lap << 32 | state << 24 | writer token, VOID == 0); with
    main's latch a record is never abandoned and every seq must be delivered.
    """
    if "hdr" not in dict(ffi.typeof("eng_jrec").fields) or not seqs:
        return set()
    seg = Segment(eng)
    try:
        n = eng.journal_records
        out = set()
        for s in seqs:
            if eng.journal_seq - s >= n - 1:
                continue   # overwritten since: nothing to prove either way
            hdr = seg.u64(seg.record(s) + ffi.offsetof("eng_jrec", "hdr"))
            if hdr >> 32 == (s - 1) // n + 1 and (hdr >> 24) & 0xFF == 0:
                out.add(s)
        return out
    finally:
        seg.close()


def check_seqs(evs: list[Event], top: int, first: int = 1, eng: Engine | None = None) -> None:
    """Seqs run first, first + 1, .., top: no repeat, no reorder, no silent gap (a gap is
    allowed only where ``eng``'s ring shows an abandoned claim: VOID)."""
    seqs = [e.seq for e in evs]
    dup = sorted({s for s in seqs if seqs.count(s) > 1})
    assert not dup, f"seq delivered twice: {dup[:5]}"
    assert seqs == sorted(seqs), f"seqs out of order: {seqs[:20]}"
    missing = sorted(set(range(first, top + 1)) - set(seqs))
    if eng is not None:
        missing = sorted(set(missing) - void_seqs(eng, missing))
    assert not missing, f"seqs skipped silently: {missing[:10]} (journal_seq {top})"
    assert (seqs[-1] if seqs else first - 1) == top or top not in missing, (seqs[-3:], top)


def audit(eng: Engine, accounts: tuple[int, ...] = (), prices: dict[int, int] | None = None,
          keys: tuple[str, ...] = (), halt: bool | None = None) -> list[Event]:
    """Every retained record against the books (see the module docstring).

    ``prices``: id -> its price version when the journal began counting
    (writes since then must each have one price record); ``keys``: keys whose
    binding must have exactly one record (open's key or bind_key) iff bound;
    ``halt``: the halt flag's records must say its state now.
    """
    evs = drain(eng)
    check_seqs(evs, eng.journal_seq, eng=eng)
    per_slot: dict[int, int] = {}
    for e in evs:
        if e.kind in SLOT_KINDS:
            per_slot[e.id & SLOT_MASK] = per_slot.get(e.id & SLOT_MASK, 0) + 1
    gens = {s: g for s in range(eng.capacity) if (g := gen_of(eng, s))}
    assert per_slot == gens, \
        f"slot records {per_slot} != slot commits {gens}: a commit without its record or a " \
        f"record without its commit"
    last = {e.id & SLOT_MASK: e for e in evs if e.kind in SLOT_KINDS}
    for slot, ev in last.items():
        if ev.kind != "release" and not locked(eng, slot):
            assert eng.state(ev.id) == ev.state, f"slot {slot}: last record {ev}, now " \
                                                 f"{eng.state(ev.id)}"
    for a in accounts:
        # every publish of the books has its record: the account's own changes,
        # and the books a booked open or close moved (riding on its record)
        mine = [e for e in evs if e.kind == "account" and e.id == a]
        acc = eng.account(a)
        assert len(mine) == acc.version, \
            f"account {a}: {len(mine)} account records, version {acc.version}"
        if mine:
            assert mine[-1].record == acc, (mine[-1].record, acc)
    for pid, v0 in (prices or {}).items():
        recs = [e for e in evs if e.kind == "price" and e.id == pid]
        v = eng.price(pid).version
        assert len(recs) == v - v0, f"id {pid}: {len(recs)} price records, {v - v0} writes"
        if recs:
            assert recs[-1].record == eng.price(pid)
    for k in keys:
        bound = eng.lookup(k)
        kr = [e for e in evs if e.kind == "key" and e.record == k.encode()]
        if bound is None:   # recorded only for an opening released since
            gone = {e.id for e in evs if e.kind == "release"}
            assert all(e.id in gone for e in kr), f"key {k} is not bound, yet recorded: {kr}"
        else:
            assert len(kr) == 1 and kr[0].id == bound, \
                f"key {k} bound to {bound}: records {kr}"   # an open's key has its own too
    if halt is not None:
        flags = [e.record for e in evs if e.kind == "halt"]
        assert (flags[-1] if flags else False) == halt, f"halt is {halt}, records say {flags}"
    return evs


class Segment:
    """The segment's bytes, mapped by the test itself (to read words, to corrupt records)."""

    def __init__(self, eng: Engine) -> None:
        fd = os.open("/dev/shm/" + eng.name.lstrip("/"), os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self.joff = struct.unpack_from("<Q", self.mm, ffi.offsetof("eng_header", "journal_off"))[0]
        self.records = eng.journal_records
        self.ring = self.joff + ffi.sizeof("eng_journal")

    def u64(self, off: int) -> int:
        return int(struct.unpack_from("<Q", self.mm, off)[0])

    def put_u64(self, off: int, v: int) -> None:
        struct.pack_into("<Q", self.mm, off, v)

    def record(self, seq: int) -> int:
        """Offset of the ring record that holds ``seq``."""
        return int(self.ring + (seq & (self.records - 1)) * ffi.sizeof("eng_jrec"))

    def field(self, seq: int, name: str) -> int:
        """Offset of field ``name`` of the ring record that holds ``seq``."""
        return self.record(seq) + int(ffi.offsetof("eng_jrec", name))

    def latch(self) -> int:
        """The journal's latch word."""
        return self.u64(self.joff)

    def halted(self) -> bool:
        return bool(struct.unpack_from("<I", self.mm, ffi.offsetof("eng_header", "halted"))[0])

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.mm.close()


def churning(eng: Engine, pos: int) -> Callable[[], None]:
    """A thread that flips ``pos`` (PAUSE, RESUME: 100 commits in one C call, the GIL
    released) until the stop() returned is called."""
    stop = threading.Event()
    many = np.array([pos] * 100, dtype=np.uint64)
    flips = np.array([int(Trigger.PAUSE), int(Trigger.RESUME)] * 50, dtype=np.uint32)

    def churn() -> None:
        while not stop.is_set():
            eng.transition_many(many, flips)   # one C call, the GIL released

    th = threading.Thread(target=churn)
    th.start()

    def stop_churn() -> None:
        stop.set()
        th.join(60)
    return stop_churn


# -- children that die or stop at a fault site ---------------------------------------------

def die_at(handle: str, fault: int, world: World, kind: str) -> int:
    """A child: attach, set ``fault``, run the ``kind`` commit (SIGKILLed at the fault);
    NOT_FIRED if the fault is not on its path."""
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    world.run(kind, eng)
    return NOT_FIRED


def forked(fn: Callable[..., int], *args: Any, timeout: float = 60.0) -> int:
    """Run ``fn(*args)`` in a forked child (it attaches on its own); its wait status as
    ``os.waitstatus_to_exitcode`` gives it (-9: it SIGKILLed itself at a fault)."""
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        code = 1
        try:
            code = int(fn(*args))
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} still running after {timeout} s (a hang)")
        time.sleep(0.002)


_SHIMS: dict[str, str] = {}


def compiled_shim(source: str) -> str:
    """tests/<source> built once per process as a preload library; its path."""
    if source not in _SHIMS:
        stem = source.removesuffix(".c")
        out = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"eng_{stem}_{os.getpid()}.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(out),
                        str(HERE / source), "-ldl"], check=True)
        _SHIMS[source] = str(out)
    return _SHIMS[source]


def stop_shim() -> str:
    """A preload library that turns a fault site's self-SIGKILL into a SIGSTOP
    (when ENG_TEST_STOP_NOT_KILL is set in the process): the process stops at
    exactly that step and goes on from it after SIGCONT."""
    return compiled_shim("stop_shim.c")


def wait_stopped(pid: int, timeout: float) -> bool:
    """True once ``pid`` (a child) stops (the stop is consumed: a later call waits for
    the next one); False if it exited or ``timeout`` ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)
        if info is not None and info.si_pid == pid:
            return True
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_pid == pid:
            return False
        time.sleep(0.002)
    return False


def continue_until_answer(conn: Any, pid: int, timeout: float) -> bool:
    """SIGCONT ``pid`` (a child) now and each time it stops again until ``conn`` holds
    its answer; False if none came within ``timeout``.  Sequenced by the answer, not by
    a window: a fault site may come again in one commit, and on a loaded host a stop
    may land long after a caller gave up waiting for it."""
    deadline = time.monotonic() + timeout
    os.kill(pid, signal.SIGCONT)
    while not conn.poll(0.002):
        if time.monotonic() > deadline:
            return False
        info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)
        if info is not None and info.si_pid == pid:
            os.kill(pid, signal.SIGCONT)
    return True


@contextlib.contextmanager
def preloaded(path: str) -> Iterator[None]:
    """Children started inside get ``path`` preloaded."""
    old = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["LD_PRELOAD"]
        else:
            os.environ["LD_PRELOAD"] = old


def faults_off() -> None:
    """This process ignores the fault switches from now on (they live in the
    segment: another process may have set them)."""
    lib.eng_test_faults(0)


def faults_on() -> None:
    lib.eng_test_faults(1)


def libc() -> Any:
    return ctypes.CDLL(None)


# -- one object ready for each kind of commit -----------------------------------------------

class World:
    """The ids of an engine with one object ready for each kind of commit (picklable)."""

    def __init__(self, eng: Engine) -> None:
        self.acct = eng.open_account(cash=1000, max_exposure=500, max_positions=16, max_loss=100)
        self.plain = eng.open_position(10.0, 1.0)
        eng.transition(self.plain, Trigger.POSITION_OPENED)
        self.booked = eng.open_position(10.0, 1.0, token=5, key="K-book", account=self.acct)
        eng.transition(self.booked, Trigger.POSITION_OPENED)
        eng.transition(self.booked, Trigger.EXIT_CONDITION_MET, exit_reason=1)
        eng.transition(self.booked, Trigger.EXIT_STARTED)
        self.closed = eng.open_position(10.0, 1.0, token=7, key="K-closed")
        for t in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
                  Trigger.EXIT_COMPLETED):
            eng.transition(self.closed, t, **({"exit_reason": 2}
                                              if t is Trigger.EXIT_CONDITION_MET else {}))
        self.armed = eng.open_position(10.0, 1.0, stop_loss=9.0)
        eng.transition(self.armed, Trigger.POSITION_OPENED)
        self.prices = {p: eng.price(p).version for p in (self.plain, self.armed)}

    def run(self, kind: str, eng: Engine) -> None:
        """The commit of ``kind``, through ``eng`` (a child's own attach)."""
        if kind == "open":
            eng.open_position(50.0, 1.0)
        elif kind == "booked_open":
            eng.open_position(10.0, 1.0, token=9, key="K-new", account=self.acct)
        elif kind == "fast":
            eng.transition(self.plain, Trigger.PAUSE)
        elif kind == "slow":
            eng.transition(self.plain, Trigger.EXIT_CONDITION_MET, exit_reason=3)
        elif kind == "booked_close":
            eng.transition(self.booked, Trigger.EXIT_COMPLETED)
        elif kind == "release":
            eng.release_position(self.closed)
        elif kind == "key":
            eng.bind_key(self.plain, "K-bound")
        elif kind == "account":
            eng.deposit(self.acct, 7)
        elif kind == "halt":
            eng.halt(True)
        elif kind == "price":
            eng.update_price(self.plain, 12.5)
        elif kind == "exit_fire":
            eng.update_price(self.armed, 8.0)
        else:
            raise AssertionError(kind)

    def again(self, kind: str, eng: Engine) -> None:
        """A commit on the object ``run(kind)`` changes, valid whether or not that change
        happened (its next holder: resolves whatever the last one left first)."""
        from engine import State
        from engine.errors import EngineError
        try:
            if kind in ("fast", "slow", "key"):
                st = eng.state(self.plain)
                if st is State.MONITORING:
                    eng.transition(self.plain, Trigger.PAUSE)
                elif st is State.PAUSED:
                    eng.transition(self.plain, Trigger.RESUME)
                else:
                    eng.transition(self.plain, Trigger.EXIT_CANCELLED)
            elif kind in ("booked_open", "account"):
                eng.deposit(self.acct, 5)
            elif kind == "booked_close":
                if eng.state(self.booked) is State.EXITING:
                    eng.transition(self.booked, Trigger.EXIT_COMPLETED)
                eng.deposit(self.acct, 5)
            elif kind == "release":
                eng.release_position(self.closed)
            elif kind == "halt":
                eng.halt(True)
            elif kind == "price":
                eng.update_price(self.plain, 13.5)
            elif kind == "exit_fire":
                eng.update_price(self.armed, 7.5)
            else:
                eng.open_position(60.0, 1.0)
        except EngineError:
            pass   # refused (typed): nothing changed, checked by the audit

    def check(self, eng: Engine, seg: Segment) -> None:
        audit(eng, accounts=(self.acct,), prices=self.prices,
              keys=("K-book", "K-closed", "K-new", "K-bound"), halt=seg.halted())


KINDS = ["open", "booked_open", "fast", "slow", "booked_close", "release", "key", "account",
         "halt", "price", "exit_fire"]


def follow_to_file(handle: Any, out: str, ready: Any, stop: Any) -> None:
    """Child: follow the journal from seq 0 until ``stop`` is set and it has read
    everything; write 'seq kind id state' lines (state '-' for a record of no
    position), and 'LAP after resume' at each lap."""
    eng = Engine.attach(handle)
    ready.set()
    after = 0
    with open(out, "w") as f:
        while True:
            try:
                for ev in eng.events(since=after, timeout=0.05):
                    state = ev.state.name if ev.state is not None else "-"
                    f.write(f"{ev.seq} {ev.kind} {ev.id} {state}\n")
                    after = ev.seq
                if stop.is_set() and after == eng.journal_seq:
                    return
            except JournalLappedError as e:
                f.write(f"LAP {after} {e.resume_seq}\n")
                after = e.resume_seq - 1
