"""Transitions: open and release, the state machine's moves, the state word.

Allowed: a move the spec's table permits applies once (generation + 1);
forbidden: a move it does not permit changing anything."""

from __future__ import annotations

import time

import numpy as np
import pytest
from api_helpers import GEN_MASK, generation, opened, word_of

from engine import CapacityError, Context, NotOpenError, Outcome, PriceSnapshot, State, Trigger
from engine._native import lib

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)
JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)

DEFAULT_WALK = [
    (Trigger.POSITION_OPENED, State.MONITORING),
    (Trigger.PAUSE, State.PAUSED),
    (Trigger.RESUME, State.MONITORING),
    (Trigger.EXIT_CONDITION_MET, State.EXIT_PENDING),
    (Trigger.EXIT_CANCELLED, State.MONITORING),
    (Trigger.EXIT_CONDITION_MET, State.EXIT_PENDING),
    (Trigger.EXIT_STARTED, State.EXITING),
    (Trigger.EXIT_FAILED, State.EXIT_PENDING),
    (Trigger.ERROR_OCCURRED, State.ERROR),
    (Trigger.RECOVER, State.MONITORING),
    (Trigger.EXIT_CONDITION_MET, State.EXIT_PENDING),
    (Trigger.EXIT_STARTED, State.EXITING),
    (Trigger.EXIT_COMPLETED, State.CLOSED),
]


class TestOpenRelease:
    def test_open_starts_created_with_context(self, engine):
        """open_position returns the id of a CREATED position whose context holds its arguments."""
        before = time.time_ns()
        pos = engine.open_position(entry_price=100.0, amount=2.5, side=-1, token=42)
        assert 0 <= engine.slot_of(pos) < engine.capacity
        assert engine.id_of(engine.slot_of(pos)) == pos
        assert engine.state(pos) is State.CREATED
        ctx = engine.context(pos)
        assert isinstance(ctx, Context)
        assert (ctx.entry_price, ctx.amount, ctx.side, ctx.token) == (100.0, 2.5, -1, 42)
        assert (ctx.stop_loss, ctx.take_profit, ctx.exit_reason) == (0.0, 0.0, 0)
        assert ctx.opened_ns >= before - 10**9   # wall clock, allow for a step

    def test_open_publishes_entry_price(self, engine):
        """A new position's price record is its entry price with zero PnL."""
        pos = engine.open_position(entry_price=50.0, amount=1.0)
        p = engine.price(pos)
        assert isinstance(p, PriceSnapshot)
        assert (p.price, p.pnl_pct, p.pnl_usd) == (50.0, 0.0, 0.0)
        assert p.version >= 1

    def test_open_gives_distinct_slots(self, make_engine):
        """Every open position gets its own slot."""
        eng = make_engine(capacity=8)
        ids = [eng.open_position(100.0, 1.0) for _ in range(8)]
        assert sorted(eng.slot_of(p) for p in ids) == list(range(8))
        assert len(set(ids)) == 8

    def test_open_when_full_raises_capacity_error_and_changes_nothing(self, make_engine):
        """open_position on a full engine raises CapacityError; no slot changes."""
        eng = make_engine(capacity=3)
        for _ in range(3):
            eng.open_position(100.0, 1.0)
        before = eng.snapshot()
        with pytest.raises(CapacityError, match="3 slots"):
            eng.open_position(100.0, 1.0)
        assert np.array_equal(eng.snapshot(), before)

    def test_release_closed_frees_slot_for_reuse(self, make_engine):
        """release_position on a CLOSED slot frees it; the next open can reuse it."""
        eng = make_engine(capacity=1)
        pos = opened(eng)
        for trig in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
            assert eng.transition(pos, trig) is Outcome.APPLIED
        gen = generation(word_of(eng, pos))
        assert eng.release_position(pos) is Outcome.APPLIED
        assert generation(word_of(eng, pos)) == (gen + 1) & GEN_MASK
        with pytest.raises(NotOpenError):
            eng.state(pos)
        assert len(eng.snapshot()) == 0
        again = eng.open_position(10.0, 1.0, token=9)
        assert eng.slot_of(again) == eng.slot_of(pos) and again != pos   # same slot, new id
        assert eng.state(again) is State.CREATED
        assert eng.context(again).token == 9
        with pytest.raises(NotOpenError):
            eng.state(pos)          # the released opening's id stays refused

    def test_release_open_position_is_invalid_and_changes_nothing(self, engine):
        """release_position of a position that is not CLOSED returns INVALID."""
        pos = opened(engine)
        word = word_of(engine, pos)
        assert engine.release_position(pos) is Outcome.INVALID
        assert word_of(engine, pos) == word

    def test_release_twice_raises_not_open(self, make_engine):
        """A released slot cannot be released again."""
        eng = make_engine(capacity=1)
        pos = opened(eng)
        eng.transition(pos, Trigger.EXIT_CONDITION_MET)
        eng.transition(pos, Trigger.EXIT_STARTED)
        eng.transition(pos, Trigger.EXIT_COMPLETED)
        eng.release_position(pos)
        with pytest.raises(NotOpenError):
            eng.release_position(pos)


class TestTransition:
    def test_fast_path_walks_the_lifecycle(self, engine):
        """Each rule of the default lifecycle moves the slot to its target."""
        pos = engine.open_position(100.0, 1.0)
        for trig, target in DEFAULT_WALK:
            assert engine.transition(pos, trig) is Outcome.APPLIED, trig
            assert engine.state(pos) is target

    def test_invalid_trigger_from_state_changes_nothing(self, engine):
        """A trigger with no rule from the state returns INVALID; the word is unchanged."""
        pos = opened(engine)
        word = word_of(engine, pos)
        for trig in (Trigger.POSITION_OPENED, Trigger.RESUME, Trigger.EXIT_STARTED,
                     Trigger.EXIT_COMPLETED, Trigger.RECOVER):
            assert engine.transition(pos, trig) is Outcome.INVALID
        assert word_of(engine, pos) == word

    def test_closed_is_final(self, engine):
        """Nothing leaves CLOSED, not even ERROR_OCCURRED."""
        pos = engine.open_position(100.0, 1.0)
        for trig, _ in DEFAULT_WALK:
            engine.transition(pos, trig)
        assert engine.state(pos) is State.CLOSED
        for trig in Trigger:
            assert engine.transition(pos, trig) is Outcome.INVALID
        assert engine.state(pos) is State.CLOSED

    def test_string_trigger_names(self, engine):
        """A trigger may be given by name; it does what its enum does."""
        pos = engine.open_position(100.0, 1.0)
        assert engine.transition(pos, "POSITION_OPENED") is Outcome.APPLIED
        assert engine.transition(pos, "PAUSE") is Outcome.APPLIED
        assert engine.state(pos) is State.PAUSED
        assert engine.transition(pos, "PAUSE") is Outcome.INVALID
        assert engine.transition(pos, "RESUME", exit_reason=4) is Outcome.APPLIED
        assert engine.state(pos) is State.MONITORING
        assert engine.context(pos).exit_reason == 4

    def test_plain_int_triggers(self, engine):
        """A trigger may be given as a plain int index."""
        pos = engine.open_position(100.0, 1.0)
        assert engine.transition(pos, int(Trigger.POSITION_OPENED)) is Outcome.APPLIED
        assert engine.state(pos) is State.MONITORING

    def test_generation_and_counter_step_once_per_applied(self, engine):
        """Generation and counter grow by one per APPLIED transition, none for INVALID."""
        pos = engine.open_position(100.0, 1.0)
        gen = generation(word_of(engine, pos))
        count = int(engine.snapshot()["transitions"][0])
        for trig in (Trigger.POSITION_OPENED, Trigger.RESUME, Trigger.PAUSE, Trigger.PAUSE,
                     Trigger.RESUME):
            outcome = engine.transition(pos, trig)
            step = 1 if outcome is Outcome.APPLIED else 0
            gen, count = (gen + step) & GEN_MASK, count + step
            assert generation(word_of(engine, pos)) == gen
            assert int(engine.snapshot()["transitions"][0]) == count

    def test_context_update_is_applied_with_the_state(self, engine):
        """Context fields given to an APPLIED transition land with the new state."""
        pos = opened(engine)
        before = engine.context(pos)
        out = engine.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=3,
                                stop_loss=95.5, take_profit=120.25)
        assert out is Outcome.APPLIED
        assert engine.state(pos) is State.EXIT_PENDING
        ctx = engine.context(pos)
        assert (ctx.exit_reason, ctx.stop_loss, ctx.take_profit) == (3, 95.5, 120.25)
        assert ctx._replace(exit_reason=0, stop_loss=0.0, take_profit=0.0,
                            version=0) == before._replace(version=0)
        assert ctx.version > before.version

    def test_partial_context_update_keeps_other_fields(self, engine):
        """Setting one context field leaves the others as they were."""
        pos = opened(engine)
        engine.transition(pos, Trigger.PAUSE, stop_loss=90.0)
        engine.transition(pos, Trigger.RESUME, take_profit=110.0)
        engine.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=-2)
        ctx = engine.context(pos)
        assert (ctx.stop_loss, ctx.take_profit, ctx.exit_reason) == (90.0, 110.0, -2)

    def test_context_update_with_invalid_trigger_changes_nothing(self, engine):
        """A context update attached to an INVALID transition is not applied."""
        pos = opened(engine)
        ctx, word = engine.context(pos), word_of(engine, pos)
        out = engine.transition(pos, Trigger.EXIT_COMPLETED, exit_reason=9, stop_loss=1.0)
        assert out is Outcome.INVALID
        assert engine.context(pos) == ctx
        assert word_of(engine, pos) == word

    def test_slow_path_counts_like_fast_path(self, engine):
        """A transition with a context update steps generation and counter by one."""
        pos = opened(engine)
        word = word_of(engine, pos)
        count = int(engine.snapshot()["transitions"][0])
        engine.transition(pos, Trigger.PAUSE, exit_reason=1)
        assert generation(word_of(engine, pos)) == (generation(word) + 1) & GEN_MASK
        assert int(engine.snapshot()["transitions"][0]) == count + 1


class TestStateWord:
    def test_word_fields(self, engine):
        """The word holds the one-hot state, no lock bit, and the generation."""
        pos = engine.open_position(100.0, 1.0)
        word = word_of(engine, pos)
        assert word & lib.ENG_SW_STATE_MASK == State.CREATED
        assert not word & lib.ENG_SW_LOCK
        assert not word & lib.ENG_SW_ERROR
        assert generation(word) == 1   # the open was the slot's first commit
        engine.transition(pos, Trigger.POSITION_OPENED)
        word = word_of(engine, pos)
        assert word & lib.ENG_SW_STATE_MASK == State.MONITORING == engine.state(pos)
        assert generation(word) == 2

    def test_never_opened_slot_word_is_zero(self, engine):
        """A slot never opened has an all-zero word (state 0 = free)."""
        assert engine.state_word(engine.capacity - 1) == 0
