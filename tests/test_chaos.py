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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from engine._native import lib

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
    segment,
)

CTX = mp.get_context("spawn")
JOIN_TIMEOUT = 10.0        # seconds to join a process before failing the test
READY_TIMEOUT = 30.0       # a spawned worker imports numpy and cffi: slow on a busy host
ANSWER_BOUND = 2.0         # a transition or recover() must return within this
LONG_PAUSE_NS = 60_000_000_000   # a child "paused holding the lock" sleeps this long
GUARD_SLEEP_S = 60.0

LOCK, ERROR_FLAG = lib.ENG_SW_LOCK, lib.ENG_SW_ERROR


# -- state word fields (bit positions from the header) -------------------------------
def sw_state(w: int) -> int:
    return w & lib.ENG_SW_STATE_MASK


def sw_gen(w: int) -> int:
    return (w >> lib.ENG_SW_GEN_SHIFT) & lib.ENG_SW_GEN_MASK


def sw_owner(w: int) -> int:
    return (w >> lib.ENG_SW_OWNER_SHIFT) & lib.ENG_SW_OWNER_MASK


def sw_target(w: int) -> int:
    return (w >> lib.ENG_SW_TARGET_SHIFT) & lib.ENG_SW_TARGET_MASK


# -- white-box reads of the shared slot (through the attached cffi view) -------------
def published_ctx_gen(eng: Engine, slot: int) -> int:
    """Generation carried by the context copy readers currently use."""
    sl = eng._seg.slots[slot]
    return int(sl.ctx[int(sl.cseq) & 1].gen)


def pwriter(eng: Engine, slot: int) -> int:
    return int(eng._seg.slots[slot].pwriter)


def transitions(eng: Engine, slot: int) -> int:
    return int(eng._seg.slots[slot].transitions)


def registry_pids(eng: Engine) -> list[int]:
    return [int(eng._seg.registry[i].pid) for i in range(lib.ENG_MAX_PROCS)
            if eng._seg.registry[i].pid]


def until(pred: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
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


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = call()
    return out, time.monotonic() - t0


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


def _chaos_spec() -> MachineSpec:
    """The default lifecycle with EXIT_STARTED guarded by ``brief_guard``."""
    rules = [Rule.of(r.trigger, r.sources, r.target,
                     brief_guard if r.trigger == Trigger.EXIT_STARTED.name else None)
             for r in POSITION_SPEC.rules]
    return MachineSpec(states=POSITION_SPEC.states, triggers=POSITION_SPEC.triggers,
                       rules=rules, initial=POSITION_SPEC.initial, closed=POSITION_SPEC.closed,
                       name="chaos")


CHAOS_SPEC = _chaos_spec()

#: the chaos invariant: a committed state fixes the sign of exit_reason
EXIT_REASON_OK: dict[int, Callable[[int], bool]] = {
    State.MONITORING: lambda r: r == 0,
    State.PAUSED: lambda r: r == 0,
    State.EXIT_PENDING: lambda r: r > 0,
    State.EXITING: lambda r: r > 0,
    State.ERROR: lambda r: r == -1,
}


# -- workers (module level for spawn) -------------------------------------------------
def ctx_transition_worker(handle: Any, slot: int, exit_reason: int) -> None:
    """Slow-path transition that pauses holding the lock (test_pause)."""
    eng = Engine.attach(handle)
    eng.transition(slot, Trigger.EXIT_CONDITION_MET, exit_reason=exit_reason)


def guarded_worker(handle: Any, slot: int, trigger: str, exit_reason: int | None) -> None:
    """Guarded transition whose guard sleeps holding the lock."""
    eng = Engine.attach(handle)
    eng.transition(slot, trigger, exit_reason=exit_reason)


def open_worker(handle: Any, entry_price: float) -> None:
    """open_position, which pauses holding the lock of the slot it opens."""
    eng = Engine.attach(handle)
    eng.open_position(entry_price=entry_price, amount=3.0, side=-1, token=42)


def latch_and_die_worker(handle: Any, slot: int) -> None:
    """Take a slot's price writer latch exactly as price_latch does (0 -> pid)
    and die holding it, as a writer killed inside write_price would."""
    eng = Engine.attach(handle)
    eng._seg.slots[slot].pwriter = os.getpid()
    os.kill(os.getpid(), signal.SIGKILL)


def waiter_worker(handle: Any, slot: int, out: Any) -> None:
    """Block in wait_for_change; report the state it woke to."""
    eng = Engine.attach(handle)
    out.put(int(eng.wait_for_change(slot, timeout=60.0)))


def recover_and_die_worker(handle: Any) -> None:
    """Take the recovery flag exactly as eng_recover does (0 -> pid) and die
    holding it, as a process killed in the middle of recover() would."""
    eng = Engine.attach(handle)
    eng._seg.hdr.recovering = os.getpid()
    os.kill(os.getpid(), signal.SIGKILL)


def exit_worker() -> None:
    """Exit at once (its pid then names a dead process)."""


def batch_price_worker(handle: Any, ready: Any) -> None:
    """Publish every slot's price in one C call, forever."""
    eng = Engine.attach(handle)
    slots = np.arange(eng.capacity, dtype=np.uint32)
    prices = np.full(eng.capacity, 101.25)
    ready.set()
    while True:
        eng.update_prices(slots, prices)
        prices += 0.25


def creator_worker(name: str, n: int, ready: Any) -> None:
    """Create the segment, open positions, then keep transitioning until killed."""
    eng = Engine.create(capacity=4 * n, name=name)
    slots = [eng.open_position(100.0 + i, 1.0) for i in range(n)]
    for s in slots:
        eng.transition(s, Trigger.POSITION_OPENED)
    ready.set()
    while True:
        for s in slots:
            eng.transition(s, Trigger.PAUSE)
            eng.transition(s, Trigger.RESUME)


def flipper_worker(handle: Any, slots: list[int], counter: Any, ready: Any) -> None:
    """PAUSE/RESUME the slots forever, counting calls that returned."""
    eng = Engine.attach(handle)
    ready.set()
    while True:
        for s in slots:
            eng.transition(s, Trigger.PAUSE)
            eng.transition(s, Trigger.RESUME)
            counter.value += 2


def attach_probe_worker(name: str, out: Any) -> None:
    """Attach by name and report every open slot's state."""
    eng = Engine.attach(name)
    out.put(sorted(int(r["state"]) for r in eng.snapshot()))
    eng.close()


def price_writer_worker(handle: Any, seed: int, ready: Any) -> None:
    """Random single and batch price updates, forever."""
    eng = Engine.attach(handle)
    rng = random.Random(seed)
    slots = np.arange(eng.capacity, dtype=np.uint32)
    ready.set()
    while True:
        try:
            if rng.random() < 0.5:
                eng.update_prices(slots, np.array([rng.uniform(50.0, 150.0)] * eng.capacity))
            else:
                eng.update_price(rng.randrange(eng.capacity), rng.uniform(50.0, 150.0))
        except BusyError:
            pass   # a live writer (descheduled on a busy host) held a latch past the bound


def reader_worker(handle: Any, n_slots: int, counter: Any, ready: Any, stop: Any,
                  out: Any) -> None:
    """Read prices, contexts and states in a loop; report reads, the slowest
    read, errors and torn records (PnL that disagrees with the price)."""
    eng = Engine.attach(handle)
    entry = {s: eng.context(s) for s in range(n_slots)}
    reads = errors = torn = 0
    slowest = 0.0
    ready.set()
    while not stop.is_set():
        for s in range(n_slots):
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


def hammer_worker(handle: Any, n_slots: int, seed: int, ready: Any, stop: Any) -> None:
    """Random transitions (fast, slow with context, guarded), prices and reads
    on shared slots, keeping the exit_reason invariant on every commit."""
    eng = Engine.attach(handle)
    rng = random.Random(seed)
    slots = np.arange(n_slots, dtype=np.uint32)
    ready.set()
    while not stop.is_set():
        slot = rng.randrange(n_slots)
        r = rng.random()
        try:
            if r < 0.40:
                st = eng.state(slot)
                if st is State.MONITORING:
                    eng.transition(slot, Trigger.EXIT_CONDITION_MET,
                                   exit_reason=rng.randrange(1, 1000))
                elif st is State.EXIT_PENDING:
                    if rng.random() < 0.5:
                        eng.transition(slot, Trigger.EXIT_CANCELLED, exit_reason=0)
                    else:
                        eng.transition(slot, Trigger.EXIT_STARTED)   # guarded, no context
                elif st is State.EXITING:
                    eng.transition(slot, Trigger.EXIT_FAILED)
                elif st is State.ERROR:
                    eng.transition(slot, Trigger.RECOVER, exit_reason=0)
                elif st is State.PAUSED:
                    eng.transition(slot, Trigger.RESUME)
            elif r < 0.45:
                eng.transition(slot, Trigger.ERROR_OCCURRED, exit_reason=-1)
            elif r < 0.60:
                eng.transition(slot, rng.choice((Trigger.PAUSE, Trigger.RESUME)))
            elif r < 0.80:
                eng.update_price(slot, rng.uniform(50.0, 150.0))
            elif r < 0.85:
                eng.update_prices(slots, np.full(n_slots, rng.uniform(50.0, 150.0)))
            else:
                eng.price(slot)
                eng.context(slot)
        except BusyError:
            pass   # a live writer held the record past the bound: allowed, nothing changed


# -- fixtures --------------------------------------------------------------------------
@pytest.fixture
def make_engine() -> Iterator[Callable[..., Engine]]:
    """Engines on random segment names; all closed and unlinked afterwards."""
    made: list[Engine] = []

    def make(capacity: int = 16, spec: MachineSpec | None = None) -> Engine:
        eng = Engine.create(capacity=capacity, name=f"tchaos_{secrets.token_hex(6)}", spec=spec)
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


def monitoring_slot(eng: Engine) -> int:
    """Open a position and move it to MONITORING."""
    slot = eng.open_position(entry_price=100.0, amount=2.0, token=3)
    assert eng.transition(slot, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return slot


# -- the slow path, killed at a chosen point ---------------------------------------------
class TestKillInsideSlowPath:
    """A process killed holding a slot's transition lock: the lock is taken
    over and the transition ends fully applied or not at all."""

    def _pause_in_ctx_transition(self, eng: Engine, spawn: Any, slot: int) -> Any:
        """Child fires EXIT_CONDITION_MET(exit_reason=7) and pauses after
        publishing the context, lock held.  Returns the child."""
        eng._set_fault(pause_ns=LONG_PAUSE_NS)
        p = spawn(ctx_transition_worker, eng.handle, slot, 7)
        until(lambda: published_ctx_gen(eng, slot) == sw_gen(eng.state_word(slot)) + 1,
              "the child to publish its context under the lock")
        w = eng.state_word(slot)
        assert w & LOCK and sw_owner(w) == p.pid
        return p

    def test_takeover_rolls_forward_after_context_published(self, make_engine, spawn):
        """Killed in the pause after publishing its context: another process's
        transition takes the lock over, completes the interrupted one, then applies."""
        eng = make_engine()
        slot = monitoring_slot(eng)
        before, gen0 = eng.context(slot), sw_gen(eng.state_word(slot))
        p = self._pause_in_ctx_transition(eng, spawn, slot)
        sigkill(p)
        eng._set_fault(pause_ns=0)
        assert eng.state(slot) is State.MONITORING   # locked: the new state is not published
        takeovers0 = eng.metrics()["transition"].takeovers
        outcome, took = timed(lambda: eng.transition(slot, Trigger.EXIT_STARTED))
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND
        # rolled forward (EXIT_PENDING, generation + 1), then ours applied on top
        assert eng.state(slot) is State.EXITING
        w = eng.state_word(slot)
        assert sw_gen(w) == gen0 + 2 and not w & (LOCK | ERROR_FLAG)
        ctx = eng.context(slot)
        assert ctx.exit_reason == 7 and ctx.version == before.version + 1
        assert eng.metrics()["transition"].takeovers == takeovers0 + 1

    def test_recover_rolls_forward_and_removes_the_dead(self, make_engine, spawn):
        """recover() completes the interrupted transition and removes the killed
        process's registry entry, and says so."""
        eng = make_engine()
        slot = monitoring_slot(eng)
        gen0 = sw_gen(eng.state_word(slot))
        p = self._pause_in_ctx_transition(eng, spawn, slot)
        sigkill(p)
        eng._set_fault(pause_ns=0)
        report, took = timed(eng.recover)
        assert took < ANSWER_BOUND
        assert (report.rolled_forward, report.rolled_back) == (1, 0)
        assert report.removed_pids == (p.pid,)
        assert p.pid not in registry_pids(eng)
        assert eng.state(slot) is State.EXIT_PENDING
        assert sw_gen(eng.state_word(slot)) == gen0 + 1
        assert eng.context(slot).exit_reason == 7
        assert not eng.recover().changed   # nothing left to do

    def test_live_holder_is_not_taken_over(self, make_engine, spawn):
        """While the holder lives, a contender gets CONFLICT within the bound
        (no hang, no steal) and recover() leaves the lock alone."""
        eng = make_engine()
        slot = monitoring_slot(eng)
        p = self._pause_in_ctx_transition(eng, spawn, slot)
        outcome, took = timed(lambda: eng.transition(slot, Trigger.EXIT_STARTED))
        assert outcome is Outcome.CONFLICT and took < ANSWER_BOUND
        report = eng.recover()
        assert (report.rolled_forward, report.rolled_back, report.removed_pids) == (0, 0, ())
        assert eng.state_word(slot) & LOCK
        sigkill(p)
        eng._set_fault(pause_ns=0)
        assert eng.recover().rolled_forward == 1

    def test_killed_opener_rolls_forward(self, make_engine, spawn):
        """open_position killed in the pause after its records were published:
        recover() completes the open with the opener's context and price."""
        eng = make_engine(capacity=4)
        eng._set_fault(pause_ns=LONG_PAUSE_NS)
        p = spawn(open_worker, eng.handle, 77.5)

        def opener_locked() -> bool:
            return any(sw_owner(eng.state_word(s)) == p.pid and eng.state_word(s) & LOCK
                       and published_ctx_gen(eng, s) == sw_gen(eng.state_word(s)) + 1
                       for s in range(eng.capacity))

        until(opener_locked, "the opener to lock a slot and publish its context")
        slot = next(s for s in range(eng.capacity) if eng.state_word(s) & LOCK)
        with pytest.raises(NotOpenError):
            eng.state(slot)   # not open until the initial state is published
        sigkill(p)
        eng._set_fault(pause_ns=0)
        report = eng.recover()
        assert (report.rolled_forward, report.rolled_back) == (1, 0)
        assert eng.state(slot) is State.CREATED
        ctx = eng.context(slot)
        assert (ctx.entry_price, ctx.amount, ctx.side, ctx.token) == (77.5, 3.0, -1, 42)
        assert eng.price(slot).price == 77.5

    def _kill_inside_guard(self, eng: Engine, spawn: Any, slot: int,
                           exit_reason: int | None) -> Any:
        p = spawn(guarded_worker, eng.handle, slot, "FIRE", exit_reason)
        until(lambda: bool(eng.state_word(slot) & LOCK), "the child to take the lock")
        w = eng.state_word(slot)
        assert sw_owner(w) == p.pid and sw_target(w) == GUARDED_SPEC.state_index["FIRED"]
        time.sleep(0.05)   # well inside the guard by now (it sleeps a minute)
        sigkill(p)
        return p

    def test_killed_in_guard_rolls_back(self, make_engine, spawn):
        """Killed inside a guard (lock held, context not published): recover()
        restores the old state and generation, sets the error flag, and the
        context update never happened."""
        eng = make_engine(spec=GUARDED_SPEC)
        slot = eng.open_position(100.0, 1.0)
        assert eng.transition(slot, "ARM") is Outcome.APPLIED
        w0, ctx0 = eng.state_word(slot), eng.context(slot)
        p = self._kill_inside_guard(eng, spawn, slot, exit_reason=9)
        report = eng.recover()
        assert (report.rolled_forward, report.rolled_back) == (0, 1)
        assert report.removed_pids == (p.pid,)
        w = eng.state_word(slot)
        assert w == w0 | ERROR_FLAG            # same state, same generation, flagged
        assert eng.context(slot) == ctx0       # exit_reason 9 never published
        assert eng.transition(slot, "DISARM") is Outcome.APPLIED
        assert not eng.state_word(slot) & ERROR_FLAG   # cleared by the next commit

    def test_takeover_rolls_back_guard_then_applies(self, make_engine, spawn):
        """Another process's transition finds the guard's owner dead, rolls the
        guarded transition back and applies its own, within the bound."""
        eng = make_engine(spec=GUARDED_SPEC)
        slot = eng.open_position(100.0, 1.0)
        eng.transition(slot, "ARM")
        gen0 = sw_gen(eng.state_word(slot))
        self._kill_inside_guard(eng, spawn, slot, exit_reason=None)
        outcome, took = timed(lambda: eng.transition(slot, "DISARM"))
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND
        assert eng.state(slot) == GUARDED_SPEC.State["IDLE"]
        assert sw_gen(eng.state_word(slot)) == gen0 + 1   # only DISARM committed
        assert eng.context(slot).exit_reason == 0

    def test_killed_in_guard_after_generation_wrap_rolls_back(self, make_engine, spawn):
        """Killed inside a guard when the published context's generation (from
        2^16 commits ago) equals the lock's new generation: still rolled back
        (the locker disowns the stale context right after taking the lock)."""
        eng = make_engine(spec=GUARDED_SPEC)
        slot = eng.open_position(100.0, 1.0)
        eng.transition(slot, "ARM")
        ticks = (published_ctx_gen(eng, slot) - 1 - sw_gen(eng.state_word(slot))) % 2**16
        for _ in range(ticks):   # fast-path self-loops: generation + 1 each, context untouched
            eng.transition(slot, "TICK")
        w0 = eng.state_word(slot)
        assert published_ctx_gen(eng, slot) == (sw_gen(w0) + 1) % 2**16
        self._kill_inside_guard(eng, spawn, slot, exit_reason=None)
        report = eng.recover()
        assert eng.state(slot) == GUARDED_SPEC.State["ARMED"], "guard never approved FIRE"
        assert (report.rolled_forward, report.rolled_back) == (0, 1)


# -- the price latch ------------------------------------------------------------------------
class TestKillInsidePriceWrite:
    """A writer killed holding a slot's price latch: the next writer takes the
    latch over, recover() releases it, readers never notice."""

    def test_next_writer_takes_dead_latch_over(self, make_engine, spawn):
        """update_price on a slot whose latch a dead process holds succeeds
        within the bound and counts a takeover."""
        eng = make_engine()
        slot = monitoring_slot(eng)
        p = spawn(latch_and_die_worker, eng.handle, slot)
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL and pwriter(eng, slot) == p.pid
        v0 = eng.price(slot).version     # readers are not blocked by the dead latch
        _, took = timed(lambda: eng.update_price(slot, 104.0))
        assert took < ANSWER_BOUND
        snap = eng.price(slot)
        assert (snap.price, snap.version) == (104.0, v0 + 1)
        assert pwriter(eng, slot) == 0
        assert eng.metrics()["price"].takeovers == 1

    def test_recover_releases_dead_latch(self, make_engine, spawn):
        """recover() releases a dead writer's latch and reports it."""
        eng = make_engine()
        slot = monitoring_slot(eng)
        p = spawn(latch_and_die_worker, eng.handle, slot)
        p.join(JOIN_TIMEOUT)
        report = eng.recover()
        assert report.price_latches == 1 and report.removed_pids == (p.pid,)
        assert pwriter(eng, slot) == 0

    def test_kill_mid_batch_leaves_latch_that_is_taken_over(self, make_engine, spawn):
        """SIGKILL during a large update_prices batch (most of its time is spent
        holding some slot's latch) leaves a held latch; a single update_price
        on that slot takes it over, recover() finds nothing left."""
        eng = make_engine(capacity=20_000)
        for _ in range(eng.capacity):
            eng.open_position(100.0, 1.0)
        rng = random.Random(1)
        for attempt in range(15):  # noqa: B007 (reported on failure)
            ready = CTX.Event()
            p = spawn(batch_price_worker, eng.handle, ready)
            assert ready.wait(READY_TIMEOUT)
            time.sleep(rng.uniform(0.02, 0.2))
            sigkill(p)
            held = [s for s in range(eng.capacity) if pwriter(eng, s)]
            if held:
                break
            assert eng.recover().removed_pids == (p.pid,)
        else:
            pytest.fail("15 kills mid-batch never left a latch held")
        assert held == [held[0]] and pwriter(eng, held[0]) == p.pid, attempt
        takeovers0 = eng.metrics()["price"].takeovers
        _, took = timed(lambda: eng.update_price(held[0], 99.0))
        assert took < ANSWER_BOUND and eng.price(held[0]).price == 99.0
        assert eng.metrics()["price"].takeovers == takeovers0 + 1
        report = eng.recover()
        assert report.price_latches == 0 and report.removed_pids == (p.pid,)


# -- other places to die ------------------------------------------------------------------------
class TestKillElsewhere:
    """Deaths outside transitions and price writes: waiting, recovering, attaching."""

    def test_killed_waiter_does_not_break_wakeups(self, make_engine, spawn):
        """A process killed inside wait_for_change: other waiters are still
        woken by the next commit, within the bound."""
        eng = make_engine()
        slot = monitoring_slot(eng)
        out = CTX.Queue()
        first = spawn(waiter_worker, eng.handle, slot, out)
        until(lambda: eng._seg.slots[slot].waiters == 1, "the first waiter to block")
        sigkill(first)
        second = spawn(waiter_worker, eng.handle, slot, out)
        until(lambda: eng._seg.slots[slot].waiters == 2, "the second waiter to block")
        assert eng.transition(slot, Trigger.PAUSE) is Outcome.APPLIED
        assert out.get(timeout=ANSWER_BOUND) == State.PAUSED
        second.join(JOIN_TIMEOUT)
        assert second.exitcode == 0
        # the dead waiter's registration is never taken back: every later commit
        # on this slot pays a FUTEX_WAKE (harmless, reported)
        print(f"\nwaiters left registered by the killed waiter: "
              f"{int(eng._seg.slots[slot].waiters)}")

    def test_killed_recoverer_is_taken_over(self, make_engine, spawn):
        """The recovery flag held by a dead process is taken over: recover()
        returns within the bound and removes the dead process."""
        eng = make_engine()
        p = spawn(recover_and_die_worker, eng.handle)
        p.join(JOIN_TIMEOUT)
        assert int(eng._seg.hdr.recovering) == p.pid
        report, took = timed(eng.recover)
        assert took < ANSWER_BOUND and report.removed_pids == (p.pid,)
        assert int(eng._seg.hdr.recovering) == 0

    def test_registry_full_of_dead_entries(self, make_engine, spawn):
        """Every registry entry held by dead processes (ACTIVE, and CLAIMED as a
        process killed mid-attach leaves it): attach says the registry is full,
        recover() removes them all, attach works again."""
        eng = make_engine()
        p = spawn(exit_worker)
        p.join(JOIN_TIMEOUT)
        dead = p.pid
        filled = 0
        for i in range(lib.ENG_MAX_PROCS):
            e = eng._seg.registry[i]
            if e.pid == 0:
                e.state = lib.ENG_PROC_CLAIMED if i % 2 else lib.ENG_PROC_ACTIVE
                e.start_time = 0 if i % 2 else 12345
                e.pid = dead
                filled += 1
        with pytest.raises(CapacityError, match="recover"):
            Engine.attach(eng.handle)
        report = eng.recover()
        assert report.removed_pids == (dead,) * filled
        with Engine.attach(eng.handle) as other:
            assert other.state(monitoring_slot(eng)) is State.MONITORING


# -- the creator dies --------------------------------------------------------------------------
class TestCreatorKilled:
    """The creator is an ordinary process: killing it loses nothing."""

    def test_others_continue_and_new_process_attaches(self, spawn):
        """SIGKILL the creator mid-flight: the segment stays, an attached worker
        keeps transitioning, a new process attaches, recover() removes the creator."""
        name = f"tchaos_{secrets.token_hex(6)}"
        eng = None
        try:
            ready = CTX.Event()
            creator = spawn(creator_worker, name, 8, ready)
            assert ready.wait(READY_TIMEOUT)
            eng = Engine.attach(name)
            slots = [int(r["slot"]) for r in eng.snapshot()]
            counter, ready2 = CTX.Value("Q", 0, lock=False), CTX.Event()
            spawn(flipper_worker, eng.handle, slots[:4], counter, ready2)
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
            for s in slots:
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
        """A reader keeps reading consistent (untorn) prices while price writers
        are SIGKILLed mid-flight over and over."""
        eng = make_engine(capacity=256)
        for i in range(eng.capacity):
            eng.open_position(100.0 + i % 7, 1.0 + i % 3, side=1 if i % 2 else -1)
        counter, ready, stop, out = (CTX.Value("Q", 0, lock=False), CTX.Event(), CTX.Event(),
                                     CTX.Queue())
        reader = spawn(reader_worker, eng.handle, eng.capacity, counter, ready, stop, out)
        assert ready.wait(READY_TIMEOUT)
        rng = random.Random(7)
        writers = []
        for i in range(2):
            ev = CTX.Event()
            writers.append(spawn(price_writer_worker, eng.handle, i, ev))
            assert ev.wait(READY_TIMEOUT)
        kills = held_after_kill = 0
        for k in range(8):
            time.sleep(rng.uniform(0.05, 0.3))
            victim = writers.pop(rng.randrange(len(writers)))
            sigkill(victim)
            kills += 1
            held_after_kill += any(pwriter(eng, s) == victim.pid for s in range(eng.capacity))
            c0 = counter.value
            until(lambda c0=c0: counter.value > c0, "the reader to progress after a kill",
                  timeout=JOIN_TIMEOUT)
            ev = CTX.Event()
            writers.append(spawn(price_writer_worker, eng.handle, 100 + k, ev))
            assert ev.wait(READY_TIMEOUT)
        stop.set()
        result = out.get(timeout=JOIN_TIMEOUT)
        reader.join(JOIN_TIMEOUT)
        print(f"\nreaders: {kills} writer kills ({held_after_kill} left a latch held), "
              f"{result['reads']} reads, slowest {result['slowest_s'] * 1e3:.2f} ms")
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
        eng.open_position(100.0, 1.0 + i % 4, side=1 if i % 2 else -1, token=i % 5)
        eng.transition(i, Trigger.POSITION_OPENED)
    figs = ChaosFigures()
    stop = CTX.Event()
    counter, rready, rstop, rout = (CTX.Value("Q", 0, lock=False), CTX.Event(), CTX.Event(),
                                    CTX.Queue())
    reader = spawn(reader_worker, eng.handle, n, counter, rready, rstop, rout)
    assert rready.wait(READY_TIMEOUT)

    def start_worker() -> Any:
        ready = CTX.Event()
        p = spawn(hammer_worker, eng.handle, n, rng.randrange(2**32), ready, stop)
        assert ready.wait(READY_TIMEOUT), "a worker did not start"
        return p

    pool = [start_worker() for _ in range(workers)]
    eng._set_fault(pause_ns=pause_ns)   # widen the lock-held window of every slow path
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            time.sleep(rng.uniform(0.5 * kill_every, 1.5 * kill_every))
            victim = pool.pop(rng.randrange(len(pool)))
            sigkill(victim)
            figs.kills += 1
            figs.killed.add(victim.pid)
            report, took = timed(eng.recover)
            assert took < ANSWER_BOUND
            assert set(report.removed_pids) <= figs.killed, report
            figs.add(report)
            pool.append(start_worker())
    finally:
        eng._set_fault(pause_ns=0)
    figs.seconds = time.monotonic() - t0
    for p in pool:   # the survivors die by SIGKILL too
        sigkill(p)
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

    # every killed process is removed from the registry, nothing else is
    assert figs.removed == figs.killed
    assert set(registry_pids(eng)) == {os.getpid()}
    # readers were never blocked and never saw a torn record
    assert read["errors"] == 0 and read["torn"] == 0 and read["reads"] > 0
    for s in range(n):
        w = eng.state_word(s)
        st = sw_state(w)
        assert not w & LOCK and pwriter(eng, s) == 0, f"slot {s}: {w:#x}"
        assert st and st & (st - 1) == 0 and st.bit_length() <= len(POSITION_SPEC.states), \
            f"slot {s}: state {st:#x} is not one-hot"
        ctx = eng.context(s)
        assert EXIT_REASON_OK[State(st)](ctx.exit_reason), \
            f"slot {s}: state {State(st).name} with exit_reason {ctx.exit_reason}"
        # every commit adds one to both, except a kill between them can lose a count
        lag = (sw_gen(w) - transitions(eng, s)) % 2**16
        assert lag <= figs.kills, f"slot {s}: generation {sw_gen(w)} vs {transitions(eng, s)}"
        figs.error_flags += bool(w & ERROR_FLAG)
        outcome, took = timed(lambda s=s: eng.transition(s, Trigger.ERROR_OCCURRED,
                                                         exit_reason=-1))
        assert outcome is Outcome.APPLIED and took < ANSWER_BOUND
    print(f"\nchaos: {workers} workers, {figs.seconds:.0f} s, {figs.kills} kills, "
          f"{figs.takeovers} takeovers (metrics), recover: {figs.rolled_forward} rolled "
          f"forward, {figs.rolled_back} rolled back, {figs.price_latches} price latches, "
          f"{len(figs.removed)} dead entries removed; {figs.error_flags} slots flagged; "
          f"reader: {read['reads']} reads, slowest {read['slowest_s'] * 1e3:.2f} ms; "
          f"transitions applied: {m['transition'].applied + m['transition_ctx'].applied}")
    return figs


class TestChaos:
    """Short chaos for ``make test``: random SIGKILLs under load."""

    def test_random_kills_leave_every_slot_consistent(self, make_engine, spawn):
        """4 workers on shared slots, one SIGKILLed about every 0.4 s for 15 s:
        afterwards every slot is unlocked, one-hot, context-consistent and
        answers within the bound; recover() removed exactly the killed."""
        eng = make_engine(capacity=48, spec=CHAOS_SPEC)
        figs = run_chaos(eng, spawn, workers=4, seconds=15, kill_every=0.4,
                         pause_ns=200_000, seed=11)
        assert figs.kills >= 10


@pytest.mark.slow
class TestChaosSoak:
    """Long chaos (deselected by default: ``pytest -m slow``)."""

    def test_oversubscribed_kills_for_two_minutes(self, make_engine, spawn):
        """8 workers on this host, one SIGKILLed about every 0.5 s for 120 s:
        same guarantees as the short run."""
        eng = make_engine(capacity=128, spec=CHAOS_SPEC)
        figs = run_chaos(eng, spawn, workers=8, seconds=120, kill_every=0.5,
                         pause_ns=200_000, seed=23)
        assert figs.kills >= 100

    def test_kills_without_pause(self, make_engine, spawn):
        """Same, at full speed (no test pause): kills land wherever they land."""
        eng = make_engine(capacity=64, spec=CHAOS_SPEC)
        figs = run_chaos(eng, spawn, workers=8, seconds=60, kill_every=0.3,
                         pause_ns=0, seed=29)
        assert figs.kills >= 50
