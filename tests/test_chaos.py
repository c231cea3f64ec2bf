"""Crash safety: processes killed with SIGKILL anywhere, including inside the
slow path (transition lock held) and inside a price write (latch held).

Allowed outcomes after a kill: the interrupted transition is fully applied
(rolled forward: its context was published) or not at all (rolled back: same
state, same generation, error flag set); every slot answers a transition or
``recover()`` within a bound; readers keep reading.  Forbidden: a hang, a
state that is not one-hot, a context that disagrees with its state, a torn
price record, a reader that waits for a writer.

The short tests run in ``make test``; ``TestChaosSoak`` (marked slow) runs the
long version: ``pytest -m slow tests/test_chaos.py -s`` prints its figures.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import random
import secrets
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from procs import JOIN_TIMEOUT, READY_TIMEOUT, exit_guarded_spec, timed, until
from procs import sigkill as reap_by_sigkill

from engine import (
    POSITION_SPEC,
    BusyError,
    CapacityError,
    Engine,
    MachineSpec,
    NotOpenError,
    Outcome,
    Rule,
    SegmentNotFoundError,
    State,
    Trigger,
)
from engine._native import lib
from engine.store import shm as segment
from engine.tools.stress.witness import WITNESS_JOURNAL, JournalWitness, assert_clean

JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)

CTX = mp.get_context("spawn")
ANSWER_BOUND = 2.0         # a transition or recover() must return within this
LONG_PAUSE_NS = 60_000_000_000   # a child "paused holding the lock" sleeps this long
GUARD_SLEEP_S = 60.0
MIN_WRITES = 100           # price writes the killed writers must have made (thousands a second)
MIN_OPERATIONS = 250       # calls each chaos hammer slot must have made (thousands a second)

LOCK, ERROR_FLAG = lib.ENG_SW_LOCK, lib.ENG_SW_ERROR


def sigkill(p: Any, errors: Any = None) -> None:
    """SIGKILL a child that must still be running, reap it, and check it died of the kill
    (a worker that ended on an exception fails the test with the traceback it reported)."""
    reap_by_sigkill(p, may_have_exited=True)   # checked below, with the worker's report
    if p.exitcode != -signal.SIGKILL:
        reported = []
        with contextlib.suppress(Exception):
            while errors is not None:
                reported.append(errors.get(timeout=1.0))
        pytest.fail(f"process {p.pid} ended with exit code {p.exitcode} before its SIGKILL\n"
                    + "\n".join(reported))


# -- state word fields (bit positions from the header) -------------------------------
def sw_state(w: int) -> int:
    return w & lib.ENG_SW_STATE_MASK


def sw_gen(w: int) -> int:
    return (w >> lib.ENG_SW_GEN_SHIFT) & lib.ENG_SW_GEN_MASK


def sw_owner(w: int) -> int:
    """The lock holder's fencing token (registry entry | incarnation << 7)."""
    return (w >> lib.ENG_SW_OWNER_SHIFT) & lib.ENG_TOKEN_MASK


def sw_target(w: int) -> int:
    return (w >> lib.ENG_SW_TARGET_SHIFT) & lib.ENG_SW_TARGET_MASK


# -- white-box reads of the shared slot (through the attached cffi view) -------------
def token_pid(eng: Engine, token: int) -> int:
    """The pid of the process a fencing token names: its registry entry's pid
    while the entry is still in the token's incarnation, else 0 (gone)."""
    if not token:
        return 0
    e = eng._seg.registry[token & lib.ENG_TOKEN_ENTRY_MASK]
    if e.pid and int(e.incarnation) == token >> lib.ENG_TOKEN_ENTRY_BITS:
        return int(e.pid)
    return 0


def owner_pid(eng: Engine, w: int) -> int:
    """The pid of the holder of state word ``w``'s lock (0: unlocked or gone)."""
    return token_pid(eng, sw_owner(w)) if w & LOCK else 0


def staged_ctx(eng: Engine, slot: int, w: int) -> Any:
    """The context copy a lock holder of word ``w`` fills: the one the C bit
    does not publish."""
    return eng._rec_copy(slot, 0 if w & lib.ENG_SW_CTX else 1)


def ctx_written_under_lock(eng: Engine, slot: int) -> bool:
    """The slot is locked and its holder has written its context copy (the
    copy's commit is the exact locked word): a takeover would roll forward."""
    w = eng.state_word(slot)
    return bool(w & LOCK) and int(staged_ctx(eng, slot, w).commit) == w


def pwriter(eng: Engine, slot: int) -> int:
    """The pid of the slot's price latch holder (0: unlatched or gone)."""
    return token_pid(eng, int(eng._slot(slot).pword) & lib.ENG_TOKEN_MASK)


def latched(eng: Engine, slot: int) -> bool:
    return bool(int(eng._slot(slot).pword) & lib.ENG_TOKEN_MASK)


def transitions(eng: Engine, slot: int) -> int:
    return int(eng._slot(slot).transitions)


def registry_pids(eng: Engine) -> list[int]:
    return [int(eng._seg.registry[i].pid) for i in range(lib.ENG_MAX_PROCS)
            if eng._seg.registry[i].pid]





# -- guards and specs (module level: spawned workers import them by name) ------------
def sleepy_guard(ctx: Any, price: Any) -> bool:
    """A guard that never answers in time: its process is killed inside it."""
    time.sleep(GUARD_SLEEP_S)
    return True


def brief_guard(ctx: Any, price: Any) -> bool:
    """A guard that approves after a short sleep (widens the lock window)."""
    time.sleep(0.0005)
    return True


#: ARM is fast, FIRE is guarded by a guard that sleeps, TICK is a fast
#: self-loop (to advance the generation cheaply), DISARM undoes ARM.
GUARDED_SPEC = MachineSpec(
    states=["IDLE", "ARMED", "FIRED"],
    triggers=["ARM", "FIRE", "DISARM", "TICK"],
    rules=[Rule.of("ARM", "IDLE", "ARMED"),
           Rule.of("FIRE", "ARMED", "FIRED", guard=sleepy_guard),
           Rule.of("DISARM", "ARMED", "IDLE"),
           Rule.of("TICK", "ARMED", "ARMED")],
    initial="IDLE", name="guarded")


CHAOS_SPEC = exit_guarded_spec(brief_guard, "chaos")

#: the chaos invariant: a committed state fixes the sign of exit_reason
EXIT_REASON_OK: dict[int, Callable[[int], bool]] = {
    State.MONITORING: lambda r: r == 0,
    State.PAUSED: lambda r: r == 0,
    State.EXIT_PENDING: lambda r: r > 0,
    State.EXITING: lambda r: r > 0,
    State.ERROR: lambda r: r == -1,
}


# -- workers (module level for spawn) -------------------------------------------------
def ctx_transition_worker(handle: Any, pos: int, exit_reason: int) -> None:
    """Slow-path transition that pauses holding the lock (test_pause)."""
    eng = Engine.attach(handle)
    eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=exit_reason)


def guarded_worker(handle: Any, pos: int, trigger: str, exit_reason: int | None) -> None:
    """Guarded transition whose guard sleeps holding the lock."""
    eng = Engine.attach(handle)
    eng.transition(pos, trigger, exit_reason=exit_reason)


def open_worker(handle: Any, entry_price: float) -> None:
    """open_position, which pauses holding the lock of the slot it opens."""
    eng = Engine.attach(handle)
    eng.open_position(entry_price=entry_price, amount=3.0, side=-1, token=42)


def latch_and_die_worker(handle: Any, pos: int) -> None:
    """Take a position's price writer latch the way a price write does (C test
    helper: pword (seq, 0) -> (seq, token)) and die holding it, as a writer
    killed inside write_price would."""
    eng = Engine.attach(handle)
    assert lib.eng_test_hold(eng._seg, 1, pos) == 0
    os.kill(os.getpid(), signal.SIGKILL)


def wrap_then_die_worker(handle: Any, pos: int, ready: Any, go: Any) -> None:
    """Seal a context copy with a slow-path lock, bring that copy back in line
    to be filled next and the generation round to the sealed lock's (2^16
    commits later), then take the very same lock word again (the parent
    switches ENG_FAULT_DIE_AFTER_LOCK on first: killed right after the CAS)."""
    eng = Engine.attach(handle)
    slot = eng.slot_of(pos)
    eng.transition(pos, "TICK", exit_reason=5)   # seals copy A under lock word L1
    eng.transition(pos, "TICK", exit_reason=6)   # seals copy B: A is the next to fill
    w = eng.state_word(slot)
    sealed = int(staged_ctx(eng, slot, w).commit)
    for _ in range((sw_gen(sealed) - sw_gen(w)) % 2**16):
        eng.transition(pos, "TICK")              # fast path: generation + 1, C unchanged
    ready.set()
    go.wait(READY_TIMEOUT)
    eng.transition(pos, "TICK", exit_reason=7)   # locks with L1 again


def waiter_worker(handle: Any, pos: int, out: Any) -> None:
    """Block in wait_for_change; report the state it woke to."""
    eng = Engine.attach(handle)
    out.put(int(eng.wait_for_change(pos, timeout=60.0)))


def recover_and_die_worker(handle: Any) -> None:
    """Take the recovery flag the way eng_recover does (C test helper: 0 ->
    token) and die holding it, as a process killed in the middle of recover() would."""
    eng = Engine.attach(handle)
    assert lib.eng_test_hold(eng._seg, 3, 0) == 0
    os.kill(os.getpid(), signal.SIGKILL)


def fill_registry_and_die_worker(handle: Any) -> None:
    """Attach until the registry is full (every free entry ACTIVE for this
    pid), then die holding them all."""
    engines = []
    while True:
        try:
            engines.append(Engine.attach(handle))
        except CapacityError:
            break
    os.kill(os.getpid(), signal.SIGKILL)


def batch_price_worker(handle: Any, ready: Any) -> None:
    """Publish every position's price in one C call, forever."""
    eng = Engine.attach(handle)
    ids = eng.snapshot()["id"]
    prices = np.full(len(ids), 101.25)
    ready.set()
    while True:
        eng.update_prices(ids, prices)
        prices += 0.25


def creator_worker(name: str, n: int, ready: Any) -> None:
    """Create the segment, open positions, then keep transitioning until killed."""
    eng = Engine.create(capacity=4 * n, name=name)
    ids = [eng.open_position(100.0 + i, 1.0) for i in range(n)]
    for s in ids:
        eng.transition(s, Trigger.POSITION_OPENED)
    ready.set()
    while True:
        for s in ids:
            eng.transition(s, Trigger.PAUSE)
            eng.transition(s, Trigger.RESUME)


def flipper_worker(handle: Any, ids: list[int], counter: Any, ready: Any) -> None:
    """PAUSE/RESUME the positions forever, counting calls that returned."""
    eng = Engine.attach(handle)
    ready.set()
    while True:
        for s in ids:
            eng.transition(s, Trigger.PAUSE)
            eng.transition(s, Trigger.RESUME)
            counter.value += 2


def attach_probe_worker(name: str, out: Any) -> None:
    """Attach by name and report every open slot's state."""
    eng = Engine.attach(name)
    out.put(sorted(int(r["state"]) for r in eng.snapshot()))
    eng.close()


def price_writer_worker(handle: Any, seed: int, ready: Any, ops: Any, errors: Any) -> None:
    """Random single and batch price updates, forever; counts the applied ones in
    ops and reports an unexpected exception to errors before it ends the process."""
    try:
        eng = Engine.attach(handle)
        rng = random.Random(seed)
        ids = eng.snapshot()["id"]
        ready.set()
        while True:
            try:
                if rng.random() < 0.5:
                    eng.update_prices(ids, np.array([rng.uniform(50.0, 150.0)] * len(ids)))
                else:
                    eng.update_price(int(rng.choice(ids)), rng.uniform(50.0, 150.0))
                ops.value += 1
            except BusyError:
                pass   # a live writer (descheduled on a busy host) held a latch past the bound
    except Exception:
        errors.put(traceback.format_exc())
        raise


def reader_worker(handle: Any, counter: Any, ready: Any, stop: Any, out: Any) -> None:
    """Read prices, contexts and states of every open position in a loop;
    report reads, the slowest read, errors and torn records (PnL that
    disagrees with the price)."""
    eng = Engine.attach(handle)
    ids = [int(i) for i in eng.snapshot()["id"]]
    entry = {s: eng.context(s) for s in ids}
    reads = errors = torn = 0
    slowest = 0.0
    ready.set()
    while not stop.is_set():
        for s in ids:
            t0 = time.perf_counter()
            try:
                p = eng.price(s)
                eng.context(s)
                eng.state(s)
            except Exception:   # any failure of a read is the finding
                errors += 1
                continue
            dt = time.perf_counter() - t0
            slowest = max(slowest, dt)
            c = entry[s]
            diff = p.price - c.entry_price
            if not (math.isclose(p.pnl_pct, diff / c.entry_price * 100.0 * c.side,
                                 rel_tol=1e-9, abs_tol=1e-9)
                    and math.isclose(p.pnl_usd, diff * c.amount * c.side,
                                     rel_tol=1e-9, abs_tol=1e-9)):
                torn += 1
            reads += 1
        counter.value = reads
    out.put({"reads": reads, "errors": errors, "torn": torn, "slowest_s": slowest})


def hammer_worker(handle: Any, seed: int, ready: Any, stop: Any, ops: Any,
                  errors: Any) -> None:
    """Random transitions (fast, slow with context, guarded), prices and reads
    on shared positions, keeping the exit_reason invariant on every commit;
    counts the calls that returned in ops and reports an unexpected exception
    to errors before it ends the process."""
    try:
        eng = Engine.attach(handle)
        rng = random.Random(seed)
        ids = eng.snapshot()["id"]
        n = len(ids)
        positions = [int(i) for i in ids]
        ready.set()
        while not stop.is_set():
            pos = positions[rng.randrange(n)]
            r = rng.random()
            try:
                if r < 0.40:
                    st = eng.state(pos)
                    if st is State.MONITORING:
                        eng.transition(pos, Trigger.EXIT_CONDITION_MET,
                                       exit_reason=rng.randrange(1, 1000))
                    elif st is State.EXIT_PENDING:
                        if rng.random() < 0.5:
                            eng.transition(pos, Trigger.EXIT_CANCELLED, exit_reason=0)
                        else:
                            eng.transition(pos, Trigger.EXIT_STARTED)   # guarded, no context
                    elif st is State.EXITING:
                        eng.transition(pos, Trigger.EXIT_FAILED)
                    elif st is State.ERROR:
                        eng.transition(pos, Trigger.RECOVER, exit_reason=0)
                    elif st is State.PAUSED:
                        eng.transition(pos, Trigger.RESUME)
                elif r < 0.45:
                    eng.transition(pos, Trigger.ERROR_OCCURRED, exit_reason=-1)
                elif r < 0.60:
                    eng.transition(pos, rng.choice((Trigger.PAUSE, Trigger.RESUME)))
                elif r < 0.80:
                    eng.update_price(pos, rng.uniform(50.0, 150.0))
                elif r < 0.85:
                    eng.update_prices(ids, np.full(n, rng.uniform(50.0, 150.0)))
                else:
                    eng.price(pos)
                    eng.context(pos)
                ops.value += 1
            except BusyError:
                pass   # a live writer held the record past the bound: allowed, nothing changed
    except Exception:
        errors.put(traceback.format_exc())
        raise


# -- fixtures --------------------------------------------------------------------------
@pytest.fixture
def make_engine() -> Iterator[Callable[..., Engine]]:
    """Engines on random segment names; all closed and unlinked afterwards."""
    made: list[Engine] = []

    def make(capacity: int = 16, spec: MachineSpec | None = None, **opts: Any) -> Engine:
        eng = Engine.create(capacity=capacity, name=f"tchaos_{secrets.token_hex(6)}", spec=spec,
                            **opts)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close()
        with contextlib.suppress(SegmentNotFoundError):
            eng.unlink()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Any]]:
    """Start spawn-context processes; any still alive at the end are killed."""
    procs: list[Any] = []

    def start(target: Callable[..., Any], *args: Any) -> Any:
        p = CTX.Process(target=target, args=args, daemon=True)
        p.start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(JOIN_TIMEOUT)


def monitoring_slot(eng: Engine) -> tuple[int, int]:
    """Open a position and move it to MONITORING; (id, slot index)."""
    pos = eng.open_position(entry_price=100.0, amount=2.0, token=3)
    assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return pos, eng.slot_of(pos)


# -- the slow path, killed at a chosen point ---------------------------------------------
class TestKillInsideSlowPath:
    """A process killed holding a slot's transition lock: the lock is taken
    over and the transition ends fully applied or not at all."""

    def _pause_in_ctx_transition(self, eng: Engine, spawn: Any, pos: int) -> Any:
        """Child fires EXIT_CONDITION_MET(exit_reason=7) and pauses after
        writing its context copy, lock held.  Returns the child."""
        slot = eng.slot_of(pos)
        eng._set_fault(pause_ns=LONG_PAUSE_NS)
        p = spawn(ctx_transition_worker, eng.handle, pos, 7)
        until(lambda: ctx_written_under_lock(eng, slot),
              "the child to write its context under the lock")
        w = eng.state_word(slot)
        assert w & LOCK and owner_pid(eng, w) == p.pid
        return p

    def test_takeover_rolls_forward_after_context_published(self, make_engine, spawn):
        """A transition takes over a lock killed after its context was written and rolls forward."""
        eng = make_engine()
        pos, slot = monitoring_slot(eng)
        before, gen0 = eng.context(pos), sw_gen(eng.state_word(slot))
        p = self._pause_in_ctx_transition(eng, spawn, pos)
        sigkill(p)
        eng._set_fault(pause_ns=0)
        assert eng.state(pos) is State.MONITORING   # locked: the new state is not published
        takeovers0 = eng.metrics()["transition"].takeovers
        outcome, took = timed(lambda: eng.transition(pos, Trigger.EXIT_STARTED))
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND
        # rolled forward (EXIT_PENDING, generation + 1), then ours applied on top
        assert eng.state(pos) is State.EXITING
        w = eng.state_word(slot)
        assert sw_gen(w) == gen0 + 2 and not w & (LOCK | ERROR_FLAG)
        ctx = eng.context(pos)
        assert ctx.exit_reason == 7 and ctx.version == before.version + 1
        assert eng.metrics()["transition"].takeovers == takeovers0 + 1

    def test_recover_rolls_forward_and_removes_the_dead(self, make_engine, spawn):
        """recover() rolls a killed transition forward and removes its process's entry."""
        eng = make_engine()
        pos, slot = monitoring_slot(eng)
        gen0 = sw_gen(eng.state_word(slot))
        p = self._pause_in_ctx_transition(eng, spawn, pos)
        sigkill(p)
        eng._set_fault(pause_ns=0)
        report, took = timed(eng.recover)
        assert took < ANSWER_BOUND
        assert (report.rolled_forward, report.rolled_back) == (1, 0)
        assert report.removed_pids == (p.pid,)
        assert p.pid not in registry_pids(eng)
        assert eng.state(pos) is State.EXIT_PENDING
        assert sw_gen(eng.state_word(slot)) == gen0 + 1
        assert eng.context(pos).exit_reason == 7
        assert not eng.recover().changed   # nothing left to do

    def test_live_holder_is_not_taken_over(self, make_engine, spawn):
        """A live holder's lock is never taken over: others get CONFLICT within the bound."""
        eng = make_engine()
        pos, slot = monitoring_slot(eng)
        p = self._pause_in_ctx_transition(eng, spawn, pos)
        outcome, took = timed(lambda: eng.transition(pos, Trigger.EXIT_STARTED))
        assert outcome is Outcome.CONFLICT and took < ANSWER_BOUND
        report = eng.recover()
        assert (report.rolled_forward, report.rolled_back, report.removed_pids) == (0, 0, ())
        assert eng.state_word(slot) & LOCK
        sigkill(p)
        eng._set_fault(pause_ns=0)
        assert eng.recover().rolled_forward == 1

    def test_killed_opener_rolls_forward(self, make_engine, spawn):
        """recover() completes an open killed after its records were written."""
        eng = make_engine(capacity=4)
        eng._set_fault(pause_ns=LONG_PAUSE_NS)
        p = spawn(open_worker, eng.handle, 77.5)

        def opener_locked() -> bool:
            return any(owner_pid(eng, eng.state_word(s)) == p.pid
                       and ctx_written_under_lock(eng, s) for s in range(eng.capacity))

        until(opener_locked, "the opener to lock a slot and write its context")
        slot = next(s for s in range(eng.capacity) if eng.state_word(s) & LOCK)
        with pytest.raises(NotOpenError):
            eng.id_of(slot)   # not open until the initial state is published
        sigkill(p)
        eng._set_fault(pause_ns=0)
        report = eng.recover()
        assert (report.rolled_forward, report.rolled_back) == (1, 0)
        pos = eng.id_of(slot)
        assert eng.state(pos) is State.CREATED
        ctx = eng.context(pos)
        assert (ctx.entry_price, ctx.amount, ctx.side, ctx.token) == (77.5, 3.0, -1, 42)
        assert eng.price(pos).price == 77.5

    def _kill_inside_guard(self, eng: Engine, spawn: Any, pos: int,
                           exit_reason: int | None) -> Any:
        slot = eng.slot_of(pos)
        p = spawn(guarded_worker, eng.handle, pos, "FIRE", exit_reason)
        until(lambda: bool(eng.state_word(slot) & LOCK), "the child to take the lock")
        w = eng.state_word(slot)
        assert owner_pid(eng, w) == p.pid and sw_target(w) == GUARDED_SPEC.state_index["FIRED"]
        time.sleep(0.05)   # well inside the guard by now (it sleeps a minute)
        sigkill(p)
        return p

    def test_killed_in_guard_rolls_back(self, make_engine, spawn):
        """recover() rolls back a transition killed inside its guard and sets the error flag."""
        eng = make_engine(spec=GUARDED_SPEC)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        assert eng.transition(pos, "ARM") is Outcome.APPLIED
        w0, ctx0 = eng.state_word(slot), eng.context(pos)
        p = self._kill_inside_guard(eng, spawn, pos, exit_reason=9)
        report = eng.recover()
        assert (report.rolled_forward, report.rolled_back) == (0, 1)
        assert report.removed_pids == (p.pid,)
        w = eng.state_word(slot)
        assert w == w0 | ERROR_FLAG            # same state, same generation, flagged
        assert eng.context(pos) == ctx0        # exit_reason 9 never published
        assert eng.transition(pos, "DISARM") is Outcome.APPLIED
        assert not eng.state_word(slot) & ERROR_FLAG   # cleared by the next commit

    def test_takeover_rolls_back_guard_then_applies(self, make_engine, spawn):
        """A transition rolls back a dead guard owner's transition, then applies its own."""
        eng = make_engine(spec=GUARDED_SPEC)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        eng.transition(pos, "ARM")
        gen0 = sw_gen(eng.state_word(slot))
        self._kill_inside_guard(eng, spawn, pos, exit_reason=None)
        outcome, took = timed(lambda: eng.transition(pos, "DISARM"))
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND
        assert eng.state(pos) == GUARDED_SPEC.State["IDLE"]
        assert sw_gen(eng.state_word(slot)) == gen0 + 1   # only DISARM committed
        assert eng.context(pos).exit_reason == 0

    def test_killed_after_lock_matching_a_wrapped_seal_rolls_back(self, make_engine, spawn):
        """A kill right after a lock that matches a wrapped seal is rolled back, never forward.

        Killed right after taking a lock whose exact word (state, target,
        generation, C bit, owner token) sealed the context copy it is about to
        fill 2^16 commits ago: still rolled back, never forward with that stale
        copy (the locker clears a seal equal to its lock word before the CAS).
        """
        eng = make_engine(spec=GUARDED_SPEC)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        eng.transition(pos, "ARM")
        ready, go = CTX.Event(), CTX.Event()
        p = spawn(wrap_then_die_worker, eng.handle, pos, ready, go)
        assert ready.wait(READY_TIMEOUT * 4), "the child never wrapped the generation"
        w0 = eng.state_word(slot)
        token = next(int(e.incarnation) << lib.ENG_TOKEN_ENTRY_BITS | i
                     for i, e in ((i, eng._seg.registry[i]) for i in range(lib.ENG_MAX_PROCS))
                     if e.pid == p.pid)
        next_lock = (w0 | LOCK | (GUARDED_SPEC.state_index["ARMED"] << lib.ENG_SW_TARGET_SHIFT)
                     | (token << lib.ENG_SW_OWNER_SHIFT))
        assert int(staged_ctx(eng, slot, w0).commit) == next_lock   # the stale seal matches
        ctx0 = eng.context(pos)
        eng._set_fault(lib.ENG_FAULT_DIE_AFTER_LOCK)
        try:
            go.set()
            p.join(JOIN_TIMEOUT)
            assert p.exitcode == -signal.SIGKILL
        finally:
            eng._set_fault(0)
        report = eng.recover()
        assert (report.rolled_forward, report.rolled_back) == (0, 1)
        assert report.removed_pids == (p.pid,)
        assert eng.state_word(slot) == w0 | ERROR_FLAG   # same word, flagged
        assert eng.context(pos) == ctx0                  # the stale copy was not published


# -- the price latch ------------------------------------------------------------------------
class TestKillInsidePriceWrite:
    """A writer killed holding a slot's price latch: the next writer takes the
    latch over, recover() releases it, readers never notice."""

    def test_next_writer_takes_dead_latch_over(self, make_engine, spawn):
        """update_price takes over a dead process's latch within the bound and counts it."""
        eng = make_engine()
        pos, slot = monitoring_slot(eng)
        p = spawn(latch_and_die_worker, eng.handle, pos)
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL and pwriter(eng, slot) == p.pid
        v0 = eng.price(pos).version      # readers are not blocked by the dead latch
        _, took = timed(lambda: eng.update_price(pos, 104.0))
        assert took < ANSWER_BOUND
        snap = eng.price(pos)
        assert (snap.price, snap.version) == (104.0, v0 + 1)
        assert not latched(eng, slot)
        assert eng.metrics()["price"].takeovers == 1

    def test_recover_releases_dead_latch(self, make_engine, spawn):
        """recover() releases a dead writer's latch and reports it."""
        eng = make_engine()
        pos, slot = monitoring_slot(eng)
        p = spawn(latch_and_die_worker, eng.handle, pos)
        p.join(JOIN_TIMEOUT)
        report = eng.recover()
        assert report.price_latches == 1 and report.removed_pids == (p.pid,)
        assert not latched(eng, slot)

    def test_kill_mid_batch_leaves_latch_that_is_taken_over(self, make_engine, spawn):
        """A latch left by a batch killed mid-flight is taken over by the next update_price."""
        eng = make_engine(capacity=20_000)
        for _ in range(eng.capacity):
            eng.open_position(100.0, 1.0)
        rng = random.Random(1)
        for attempt in range(50):  # noqa: B007 (reported on failure)
            ready = CTX.Event()
            p = spawn(batch_price_worker, eng.handle, ready)
            assert ready.wait(READY_TIMEOUT)
            time.sleep(rng.uniform(0.02, 0.2))
            sigkill(p)
            held = [s for s in range(eng.capacity) if latched(eng, s)]
            if held:
                break
            assert eng.recover().removed_pids == (p.pid,)
        else:
            pytest.fail("50 kills mid-batch never left a latch held")
        assert held == [held[0]] and pwriter(eng, held[0]) == p.pid, attempt
        takeovers0 = eng.metrics()["price"].takeovers
        pos = eng.id_of(held[0])
        _, took = timed(lambda: eng.update_price(pos, 99.0))
        assert took < ANSWER_BOUND and eng.price(pos).price == 99.0
        assert eng.metrics()["price"].takeovers == takeovers0 + 1
        report = eng.recover()
        assert report.price_latches == 0 and report.removed_pids == (p.pid,)


# -- other places to die ------------------------------------------------------------------------
class TestKillElsewhere:
    """Deaths outside transitions and price writes: waiting, recovering, attaching."""

    def test_killed_waiter_does_not_break_wakeups(self, make_engine, spawn):
        """A waiter killed in wait_for_change costs one spurious wake; later waiters still wake."""
        eng = make_engine()
        pos, slot = monitoring_slot(eng)
        rec = eng._slot(slot)
        out = CTX.Queue()
        first = spawn(waiter_worker, eng.handle, pos, out)
        until(lambda: rec.waiting == 1, "the first waiter to block")
        sigkill(first)
        assert rec.waiting == 1            # the dead waiter's flag outlives it ...
        assert eng.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        assert rec.waiting == 0            # ... until the next commit clears it
        second = spawn(waiter_worker, eng.handle, pos, out)
        until(lambda: rec.waiting == 1, "the second waiter to block")
        assert eng.transition(pos, Trigger.RESUME) is Outcome.APPLIED
        assert out.get(timeout=ANSWER_BOUND) == State.MONITORING
        second.join(JOIN_TIMEOUT)
        assert second.exitcode == 0
        assert eng.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        assert rec.waiting == 0            # whatever the woken waiter left, cleared

    def test_killed_recoverer_is_taken_over(self, make_engine, spawn):
        """A dead process's recovery flag is taken over by recover() within the bound."""
        eng = make_engine()
        p = spawn(recover_and_die_worker, eng.handle)
        p.join(JOIN_TIMEOUT)
        assert token_pid(eng, int(eng._seg.hdr.recovering)) == p.pid
        report, took = timed(eng.recover)
        assert took < ANSWER_BOUND and report.removed_pids == (p.pid,)
        assert int(eng._seg.hdr.recovering) == 0

    def test_registry_full_of_dead_entries(self, make_engine, spawn):
        """A registry full of dead entries still lets a process attach; recover() frees them.

        Every registry entry but ours held by a dead process (one process
        attached until the registry was full, then was SIGKILLed): attach
        still works, taking one dead entry over in a new incarnation (the dead
        holder's token stays dead); recover() removes the other dead entries.
        """
        eng = make_engine()
        p = spawn(fill_registry_and_die_worker, eng.handle)
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL
        dead = p.pid
        reg = eng._seg.registry
        dead_tokens = {i: int(reg[i].incarnation) << lib.ENG_TOKEN_ENTRY_BITS | i
                       for i in range(lib.ENG_MAX_PROCS) if reg[i].pid == dead}
        filled = len(dead_tokens)
        assert filled == lib.ENG_MAX_PROCS - 1     # every entry but ours
        with Engine.attach(eng.handle) as other:
            i = other._seg.token & lib.ENG_TOKEN_ENTRY_MASK
            assert i in dead_tokens and other._seg.token != dead_tokens[i]
            assert int(reg[i].pid) == os.getpid()
            assert not lib.eng_owner_alive(eng._seg, dead_tokens[i])
            assert registry_pids(eng).count(dead) == filled - 1
            report = eng.recover()
            assert report.removed_pids == (dead,) * (filled - 1)
            assert set(registry_pids(eng)) == {os.getpid()}
            assert other.state(monitoring_slot(eng)[0]) is State.MONITORING


# -- the creator dies --------------------------------------------------------------------------
class TestCreatorKilled:
    """The creator is an ordinary process: killing it loses nothing."""

    def test_others_continue_and_new_process_attaches(self, spawn):
        """Killing the creator leaves the segment working for attached and new processes."""
        name = f"tchaos_{secrets.token_hex(6)}"
        eng = None
        try:
            ready = CTX.Event()
            creator = spawn(creator_worker, name, 8, ready)
            assert ready.wait(READY_TIMEOUT)
            eng = Engine.attach(name)
            ids = [int(r["id"]) for r in eng.snapshot()]
            counter, ready2 = CTX.Value("Q", 0, lock=False), CTX.Event()
            spawn(flipper_worker, eng.handle, ids[:4], counter, ready2)
            assert ready2.wait(READY_TIMEOUT)
            time.sleep(0.1)
            sigkill(creator)
            assert os.path.exists(f"/dev/shm/{name}")
            c0 = counter.value
            until(lambda: counter.value > c0 + 100, "the worker to go on after the kill",
                  timeout=JOIN_TIMEOUT)
            out = CTX.Queue()
            probe = spawn(attach_probe_worker, name, out)
            states = out.get(timeout=READY_TIMEOUT)
            probe.join(JOIN_TIMEOUT)
            assert probe.exitcode == 0 and len(states) == 8
            assert all(s in (State.MONITORING, State.PAUSED) for s in states)
            report = eng.recover()
            assert creator.pid in report.removed_pids
            for s in ids:
                outcome, took = timed(lambda s=s: eng.transition(s, Trigger.ERROR_OCCURRED))
                assert outcome in (Outcome.APPLIED, Outcome.CONFLICT) and took < ANSWER_BOUND
        finally:
            if eng is not None:
                eng.close()
            with contextlib.suppress(SegmentNotFoundError):
                segment.unlink(name)


# -- readers while writers die -------------------------------------------------------------------
class TestReadersNeverBlocked:
    """Readers never wait for writers, not even writers killed mid-write."""

    def test_reader_progresses_through_writer_kills(self, make_engine, spawn):
        """A reader keeps reading untorn prices while price writers are killed over and over."""
        eng = make_engine(capacity=256)
        for i in range(eng.capacity):
            eng.open_position(100.0 + i % 7, 1.0 + i % 3, side=1 if i % 2 else -1)
        counter, ready, stop, out = (CTX.Value("Q", 0, lock=False), CTX.Event(), CTX.Event(),
                                     CTX.Queue())
        reader = spawn(reader_worker, eng.handle, counter, ready, stop, out)
        assert ready.wait(READY_TIMEOUT)
        rng = random.Random(7)
        writers = []
        ops, errors = [], CTX.Queue()
        for i in range(2):
            ev = CTX.Event()
            ops.append(CTX.Value("Q", 0, lock=False))
            writers.append(spawn(price_writer_worker, eng.handle, i, ev, ops[-1], errors))
            assert ev.wait(READY_TIMEOUT)
        kills = held_after_kill = 0
        for k in range(8):
            time.sleep(rng.uniform(0.05, 0.3))
            victim = writers.pop(rng.randrange(len(writers)))
            sigkill(victim, errors)
            kills += 1
            held_after_kill += any(pwriter(eng, s) == victim.pid for s in range(eng.capacity))
            c0 = counter.value
            until(lambda c0=c0: counter.value > c0, "the reader to progress after a kill",
                  timeout=JOIN_TIMEOUT)
            ev = CTX.Event()
            ops.append(CTX.Value("Q", 0, lock=False))
            writers.append(spawn(price_writer_worker, eng.handle, 100 + k, ev, ops[-1], errors))
            assert ev.wait(READY_TIMEOUT)
        for w in writers:
            sigkill(w, errors)
        stop.set()
        result = out.get(timeout=JOIN_TIMEOUT)
        reader.join(JOIN_TIMEOUT)
        writes = sum(v.value for v in ops)
        print(f"\nreaders: {kills} writer kills ({held_after_kill} left a latch held), "
              f"{writes} price writes, {result['reads']} reads, "
              f"slowest {result['slowest_s'] * 1e3:.2f} ms")
        assert writes >= MIN_WRITES, f"only {writes} price writes: the kills hit idle writers"
        assert result["errors"] == 0 and result["torn"] == 0
        assert result["reads"] > 0
        assert result["slowest_s"] < ANSWER_BOUND


# -- random kills under load -----------------------------------------------------------------------
@dataclass
class ChaosFigures:
    """What a chaos run did and found."""

    kills: int = 0
    killed: set[int] = field(default_factory=set)
    removed: set[int] = field(default_factory=set)
    rolled_forward: int = 0
    rolled_back: int = 0
    price_latches: int = 0
    takeovers: int = 0
    error_flags: int = 0
    operations: int = 0
    seconds: float = 0.0

    def add(self, report: Any) -> None:
        self.rolled_forward += report.rolled_forward
        self.rolled_back += report.rolled_back
        self.price_latches += report.price_latches
        self.removed.update(report.removed_pids)


def run_chaos(eng: Engine, spawn: Any, workers: int, seconds: float, kill_every: float,
              pause_ns: int, seed: int) -> ChaosFigures:
    """Hammer shared slots with ``workers`` processes, SIGKILL one every
    ``kill_every`` seconds (about), respawn it, recover(); then check every slot."""
    rng = random.Random(seed)
    n = eng.capacity
    for i in range(n):
        pos = eng.open_position(100.0, 1.0 + i % 4, side=1 if i % 2 else -1, token=i % 5)
        eng.transition(pos, Trigger.POSITION_OPENED)
    figs = ChaosFigures()
    witness = JournalWitness(eng) if eng.journal_records else None
    stop = CTX.Event()
    ops, errors = [], CTX.Queue()
    counter, rready, rstop, rout = (CTX.Value("Q", 0, lock=False), CTX.Event(), CTX.Event(),
                                    CTX.Queue())
    reader = spawn(reader_worker, eng.handle, counter, rready, rstop, rout)
    assert rready.wait(READY_TIMEOUT)

    def start_worker() -> Any:
        ready = CTX.Event()
        ops.append(CTX.Value("Q", 0, lock=False))
        p = spawn(hammer_worker, eng.handle, rng.randrange(2**32), ready, stop, ops[-1], errors)
        assert ready.wait(READY_TIMEOUT), "a worker did not start"
        return p

    pool = [start_worker() for _ in range(workers)]
    eng._set_fault(pause_ns=pause_ns)   # widen the lock-held window of every slow path
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            time.sleep(rng.uniform(0.5 * kill_every, 1.5 * kill_every))
            victim = pool.pop(rng.randrange(len(pool)))
            sigkill(victim, errors)
            figs.kills += 1
            figs.killed.add(victim.pid)
            report, took = timed(eng.recover)
            assert took < ANSWER_BOUND
            assert set(report.removed_pids) <= figs.killed, report
            figs.add(report)
            if witness is not None:   # record iff committed: the records so far
                assert_clean(witness.follow(), f"journal after kill {figs.kills}")
            pool.append(start_worker())
    finally:
        eng._set_fault(pause_ns=0)
    figs.seconds = time.monotonic() - t0
    for p in pool:   # the survivors die by SIGKILL too
        sigkill(p, errors)
        figs.kills += 1
        figs.killed.add(p.pid)
    rstop.set()
    read = rout.get(timeout=JOIN_TIMEOUT)
    reader.join(JOIN_TIMEOUT)
    report, took = timed(eng.recover)
    assert took < ANSWER_BOUND
    figs.add(report)
    m = eng.metrics()
    figs.takeovers = sum(op.takeovers for op in m.values())
    figs.operations = sum(v.value for v in ops)
    assert figs.operations >= MIN_OPERATIONS * workers, \
        f"the hammers made only {figs.operations} calls: the kills hit idle workers"

    # every killed process is removed from the registry, nothing else is
    assert figs.removed == figs.killed
    assert set(registry_pids(eng)) == {os.getpid()}
    # readers were never blocked and never saw a torn record
    assert read["errors"] == 0 and read["torn"] == 0 and read["reads"] > 0
    for s in range(n):
        w = eng.state_word(s)
        st = sw_state(w)
        assert not w & LOCK and not latched(eng, s), f"slot {s}: {w:#x}"
        assert st and st & (st - 1) == 0 and st.bit_length() <= len(POSITION_SPEC.states), \
            f"slot {s}: state {st:#x} is not one-hot"
        pos = eng.id_of(s)
        ctx = eng.context(pos)
        assert EXIT_REASON_OK[State(st)](ctx.exit_reason), \
            f"slot {s}: state {State(st).name} with exit_reason {ctx.exit_reason}"
        # every commit adds one to both, except a kill between them can lose a count
        lag = (sw_gen(w) - transitions(eng, s)) % 2**16
        assert lag <= figs.kills, f"slot {s}: generation {sw_gen(w)} vs {transitions(eng, s)}"
        figs.error_flags += bool(w & ERROR_FLAG)
        outcome, took = timed(lambda pos=pos: eng.transition(pos, Trigger.ERROR_OCCURRED,
                                                             exit_reason=-1))
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND
    if witness is not None:   # at rest: every commit has its record, nothing else has one
        assert_clean(witness.check(), "journal at rest")
        print(f"\njournal witness: {witness.records} records, {witness.rounds} rounds")
    print(f"\nchaos: {workers} workers, {figs.seconds:.0f} s, {figs.kills} kills, "
          f"{figs.operations} hammer calls, {figs.takeovers} takeovers (metrics), "
          f"recover: {figs.rolled_forward} rolled forward, {figs.rolled_back} rolled back, "
          f"{figs.price_latches} price latches, "
          f"{len(figs.removed)} dead entries removed; {figs.error_flags} slots flagged; "
          f"reader: {read['reads']} reads, slowest {read['slowest_s'] * 1e3:.2f} ms; "
          f"transitions applied: {m['transition'].applied + m['transition_ctx'].applied}")
    return figs


class TestChaos:
    """Short chaos for ``make test``: random SIGKILLs under load."""

    def test_random_kills_leave_every_slot_consistent(self, make_engine, spawn):
        """Random kills of 4 workers for 15 s leave every slot unlocked and consistent.

        4 workers on shared slots, one SIGKILLed about every 0.4 s for 15 s:
        afterwards every slot is unlocked, one-hot, context-consistent and
        answers within the bound; recover() removed exactly the killed.
        """
        eng = make_engine(capacity=48, spec=CHAOS_SPEC, **WITNESS_JOURNAL)
        figs = run_chaos(eng, spawn, workers=4, seconds=15, kill_every=0.4,
                         pause_ns=200_000, seed=11)
        assert figs.kills >= 5, "too few kills to mean anything (is the host overloaded?)"


@pytest.mark.slow
class TestChaosSoak:
    """Long chaos (deselected by default: ``pytest -m slow``)."""

    def test_oversubscribed_kills_for_two_minutes(self, make_engine, spawn):
        """Random kills of 8 oversubscribed workers for 120 s keep the short run's guarantees."""
        eng = make_engine(capacity=128, spec=CHAOS_SPEC, **WITNESS_JOURNAL)
        figs = run_chaos(eng, spawn, workers=8, seconds=120, kill_every=0.5,
                         pause_ns=200_000, seed=23)
        assert figs.kills >= 100

    def test_kills_without_pause(self, make_engine, spawn):
        """Same, at full speed (no test pause): kills land wherever they land."""
        eng = make_engine(capacity=64, spec=CHAOS_SPEC, **WITNESS_JOURNAL)
        figs = run_chaos(eng, spawn, workers=8, seconds=60, kill_every=0.3,
                         pause_ns=0, seed=29)
        assert figs.kills >= 50
