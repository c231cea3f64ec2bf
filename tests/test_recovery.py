"""recover(): a dead holder's work is rolled forward (its context was
published) or back (same state and generation, error flag set).

Forbidden: a roll forward into a state with a context that is not its own."""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np
import pytest
from api_helpers import opened
from owners_helpers import (
    ANSWER_BOUND,
    CTX,
    CTX_BIT,
    ERROR_FLAG,
    LOCK,
    TOKEN_MASK,
    U64,
    get_from,
    monitoring,
    report,
    sw_gen,
    sw_owner,
    sw_state,
)
from procs import JOIN_TIMEOUT, timed

from engine import Engine, NotOpenError, Outcome, State, Trigger
from engine._native import lib

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)
JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)

OWNER_FIELD = TOKEN_MASK << lib.ENG_SW_OWNER_SHIFT


def spare_commit(eng: Engine, slot: int) -> int:
    """The seal of the unpublished context copy (what a takeover compares)."""
    w = eng.state_word(slot)
    return int(eng._rec_copy(slot, 0 if w & CTX_BIT else 1).commit)


def published_commit(eng: Engine, slot: int) -> int:
    w = eng.state_word(slot)
    return int(eng._rec_copy(slot, 1 if w & CTX_BIT else 0).commit)


def prepare_coincidence(eng: Engine, pos: int) -> int:
    """Make the next EXIT_CONDITION_MET lock word of this Engine on pos equal
    the seal of the unpublished context copy.

    A (slow, exit_reason 7) seals its copy with its lock word W_A and flips C;
    B (slow back, exit_reason 0) flips C back, so W_A's copy is the spare one
    again; PAUSE/RESUME pairs then move the generation round to W_A's.
    Returns W_A."""
    slot = eng.slot_of(pos)
    gen0 = sw_gen(eng.state_word(slot))
    assert eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=7) is Outcome.APPLIED
    w_a = published_commit(eng, slot)
    assert w_a & LOCK and sw_state(w_a) == State.MONITORING and sw_gen(w_a) == gen0, \
        f"A's seal {w_a:#x} is not its locked word (gen {gen0})"
    assert eng.transition(pos, Trigger.EXIT_CANCELLED, exit_reason=0) is Outcome.APPLIED
    ticks = (sw_gen(w_a) - sw_gen(eng.state_word(slot))) % 2**16
    assert ticks % 2 == 0, ticks
    tr = eng.transition
    for _ in range(ticks // 2):
        tr(pos, Trigger.PAUSE)
        tr(pos, Trigger.RESUME)
    w = eng.state_word(slot)
    assert sw_state(w) == State.MONITORING and sw_gen(w) == sw_gen(w_a), (hex(w), hex(w_a))
    assert (w & CTX_BIT) == (w_a & CTX_BIT) and spare_commit(eng, slot) == w_a
    return w_a


def coincidence_worker(handle: Any, pos: int, same_owner: bool, q: Any) -> None:
    """(Optionally prepare the coincidence as this Engine, then) fire
    EXIT_CONDITION_MET(exit_reason 9) with DIE_AFTER_LOCK."""
    eng = Engine.attach(handle)
    slot = eng.slot_of(pos)
    w_a = prepare_coincidence(eng, pos) if same_owner else None
    before = (eng.state_word(slot), tuple(eng.context(pos)))
    report(q, (os.getpid(), int(eng._seg.token), w_a, before))
    eng._set_fault(flags=lib.ENG_FAULT_DIE_AFTER_LOCK)
    eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=9)   # SIGKILL after the lock


def die_opening_worker(handle: Any, q: Any) -> None:
    """open_position with DIE_AFTER_LOCK: killed right after locking a free slot."""
    eng = Engine.attach(handle)
    report(q, (os.getpid(), int(eng._seg.token)))
    eng._set_fault(flags=lib.ENG_FAULT_DIE_AFTER_LOCK)
    eng.open_position(77.5, 3.0, side=-1, token=42)   # SIGKILL after the lock


class TestRecover:
    def test_healthy_engine_reports_nothing(self, engine):
        """recover() on an engine with only live, idle processes changes nothing."""
        pos = opened(engine)
        engine.update_price(pos, 101.0)
        with Engine.attach(engine.name, url=engine.url) as other:
            other.transition(pos, Trigger.PAUSE)
            before = engine.snapshot()
            report = engine.recover()
        assert report.changed is False
        assert (report.rolled_forward, report.rolled_back, report.price_latches) == (0, 0, 0)
        assert report.removed_pids == ()
        assert np.array_equal(engine.snapshot(), before)


@pytest.mark.shm_only
class TestGenerationCoincidence:
    """A slow-path holder killed right after its lock CAS is rolled back, even
    when the spare context copy carries a seal equal to its lock word (left
    2^16 commits ago by the same Engine); the open path likewise."""

    @pytest.mark.parametrize("end", ["recover", "takeover"])
    @pytest.mark.parametrize("owner", ["same", "other"])
    def test_killed_after_lock_on_coincident_seal_rolls_back(self, make_engine, spawn,
                                                             owner, end):
        """A transition killed after a lock equal to a stale seal is rolled back, not forward.

        EXIT_CONDITION_MET(9) killed after the lock CAS whose lock word equals
        the stale seal of A (exit_reason 7): state, generation and context stay,
        E set; forbidden: rolled forward into EXIT_PENDING with the stale context.
        """
        eng = make_engine(capacity=2)
        pos = monitoring(eng)
        slot = eng.slot_of(pos)
        w_a = prepare_coincidence(eng, pos) if owner == "other" else None
        q = CTX.Queue()
        try:
            child = spawn(coincidence_worker, eng.handle, pos, owner == "same", q)
            pid, token, w_child, (w_before, ctx_before) = get_from(q, child)
            child.join(JOIN_TIMEOUT)
        finally:
            eng._set_fault(0, 0)
        assert child.exitcode == -signal.SIGKILL, "the child did not die after its lock CAS"
        w_a = w_a if w_a is not None else w_child
        w_dead = eng.state_word(slot)
        assert w_dead & LOCK and sw_owner(w_dead) == token
        same = U64 if owner == "same" else U64 & ~OWNER_FIELD
        assert w_dead & same == w_a & same, \
            f"scenario not built: locked word {w_dead:#x} vs A's seal {w_a:#x}"
        if end == "recover":
            report = eng.recover()
            assert (report.rolled_forward, report.rolled_back) == (0, 1), report
            assert report.removed_pids == (pid,)
            w = eng.state_word(slot)
            assert not w & LOCK and w & ERROR_FLAG
            assert (sw_state(w), sw_gen(w)) == (State.MONITORING, sw_gen(w_before))
        else:
            outcome, took = timed(lambda: eng.transition(pos, Trigger.PAUSE))
            assert outcome is Outcome.APPLIED and took < ANSWER_BOUND
            w = eng.state_word(slot)
            assert sw_state(w) == State.PAUSED and sw_gen(w) == (sw_gen(w_before) + 1) % 2**16, \
                "rolled back, then PAUSE"
        assert tuple(eng.context(pos)) == tuple(ctx_before), "a stale context became visible"
        assert eng.context(pos).exit_reason == 0

    def test_opener_killed_after_lock_leaves_slot_free(self, make_engine, spawn):
        """An open killed right after locking a used free slot leaves it free after recover().

        open_position killed right after locking a (previously used) free slot:
        after recover() the slot is free and opens normally; forbidden: a
        half-open slot or one rolled forward with a stale context.
        """
        eng = make_engine(capacity=1)
        old = eng.open_position(100.0, 1.0, token=5)
        for trig in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
                     Trigger.EXIT_COMPLETED):
            assert eng.transition(old, trig) is Outcome.APPLIED
        assert eng.release_position(old) is Outcome.APPLIED
        q = CTX.Queue()
        try:
            child = spawn(die_opening_worker, eng.handle, q)
            pid, token = get_from(q, child)
            child.join(JOIN_TIMEOUT)
        finally:
            eng._set_fault(0, 0)
        assert child.exitcode == -signal.SIGKILL, "the opener did not die after its lock CAS"
        w = eng.state_word(0)
        assert w & LOCK and sw_owner(w) == token and sw_state(w) == 0
        report = eng.recover()
        assert (report.rolled_forward, report.rolled_back) == (0, 1), report
        assert report.removed_pids == (pid,)
        w = eng.state_word(0)
        assert not w & LOCK and sw_state(w) == 0, f"slot not free: {w:#x}"
        with pytest.raises(NotOpenError):
            eng.id_of(0)
        assert len(eng.snapshot()) == 0
        new = eng.open_position(200.0, 2.0, token=6)
        assert eng.slot_of(new) == 0 and new != old
        ctx = eng.context(new)
        assert (ctx.entry_price, ctx.amount, ctx.token) == (200.0, 2.0, 6)
        assert eng.state(new) is State.CREATED and eng.price(new).price == 200.0
