"""Unit tests of the public Engine API on the default position lifecycle.

Every test runs on its own randomly named segment (fixtures in conftest.py)
that is unlinked afterwards.  Bit positions come from ``engine._native.lib``.
"""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import posix_ipc
import pytest

from engine import (
    POSITION_SPEC,
    CapacityError,
    ClosedError,
    Context,
    Engine,
    Handle,
    NotOpenError,
    Outcome,
    PriceSnapshot,
    SegmentError,
    SegmentNotFoundError,
    State,
    Trigger,
    WaitTimeout,
)
from engine._native import lib

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)

GEN_SHIFT = lib.ENG_SW_GEN_SHIFT
GEN_MASK = lib.ENG_SW_GEN_MASK


def generation(word: int) -> int:
    return (word >> GEN_SHIFT) & GEN_MASK


def shm_path(name: str) -> str:
    return "/dev/shm/" + name


def opened(eng: Engine, entry: float = 100.0, amount: float = 2.0, side: int = 1,
           token: int = 7) -> int:
    """A position moved to MONITORING; returns its id."""
    pos = eng.open_position(entry_price=entry, amount=amount, side=side, token=token)
    assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return pos


def word_of(eng: Engine, pos: int) -> int:
    """The state word of position ``pos``'s slot (state_word takes a slot index)."""
    return eng.state_word(eng.slot_of(pos))


def waiting(eng: Engine, pos: int) -> int:
    """The slot's waiting flag: 1 once a process in wait_for_change on it may
    sleep on its futex word, cleared by the next commit (read from the shared
    slot record: the only way to know a waiter got as far as sleeping)."""
    return int(eng._slot(eng.slot_of(pos)).waiting)


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.001)
    return pred()


# ---------------------------------------------------------------------------------
class TestCreateAttach:
    @pytest.mark.shm_only
    def test_create_gives_empty_engine_of_requested_capacity(self, make_engine):
        """create() makes a segment with `capacity` slots and no open position."""
        eng = make_engine(capacity=5)
        assert eng.capacity == 5
        assert not eng.closed
        assert len(eng.snapshot()) == 0
        assert os.path.exists(shm_path(eng.name))

    @pytest.mark.shm_only
    def test_create_with_explicit_name(self, make_engine):
        """create(name=...) uses exactly that segment name."""
        name = f"test_{os.urandom(6).hex()}"
        eng = make_engine(capacity=2, name=name)
        assert eng.name == name
        assert os.path.exists(shm_path(name))

    def test_create_refuses_existing_name_and_leaves_it_intact(self, engine):
        """create() on a name in use raises SegmentError and does not touch the segment."""
        pos = opened(engine)
        with pytest.raises(SegmentError, match="already exists"):
            Engine.create(capacity=4, name=engine.name, url=engine.url)
        assert engine.state(pos) is State.MONITORING
        with Engine.attach(engine.name, url=engine.url) as other:
            assert other.capacity == engine.capacity
            assert other.state(pos) is State.MONITORING

    @pytest.mark.shm_only
    def test_segment_mode_is_0600(self, engine):
        """The segment file is readable and writable by its owner only."""
        mode = stat.S_IMODE(os.stat(shm_path(engine.name)).st_mode)
        assert mode == 0o600

    def test_attach_by_name_shares_state(self, engine):
        """An Engine attached by name sees and changes the same slots."""
        pos = opened(engine)
        with Engine.attach(engine.name, url=engine.url) as other:
            assert other.state(pos) is State.MONITORING
            assert other.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        assert engine.state(pos) is State.PAUSED

    def test_attach_by_handle_shares_state(self, engine):
        """An Engine attached by handle sees the same segment."""
        pos = opened(engine)
        with Engine.attach(engine.handle) as other:
            assert other.name == engine.name
            assert other.context(pos) == engine.context(pos)

    def test_handle_is_small_and_picklable(self, engine):
        """The handle survives a pickle round trip and still attaches."""
        h = engine.handle
        assert isinstance(h, Handle)
        assert h.spec is None            # default lifecycle travels as None
        h2 = pickle.loads(pickle.dumps(h))
        assert h2 == h
        with Engine.attach(h2) as other:
            assert other.spec == POSITION_SPEC

    def test_engine_itself_is_not_picklable(self, engine):
        """Pickling an Engine is refused with a pointer to the handle."""
        with pytest.raises(TypeError, match="handle"):
            pickle.dumps(engine)

    def test_attach_missing_segment(self):
        """attach() of a name that does not exist raises SegmentNotFoundError."""
        with pytest.raises(SegmentNotFoundError) as info:
            Engine.attach(f"no_such_{os.urandom(6).hex()}")
        assert isinstance(info.value, FileNotFoundError)

    def test_attach_foreign_segment_is_refused(self):
        """attach() of a shm object that is not an engine raises SegmentError."""
        name = f"foreign_{os.urandom(6).hex()}"
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=65536)
        shm.close_fd()
        try:
            with pytest.raises(SegmentError, match="not an engine segment"):
                Engine.attach(name)
        finally:
            posix_ipc.unlink_shared_memory("/" + name)

    def test_repr_names_segment(self, engine):
        """repr says the segment name and capacity, or closed."""
        assert engine.name in repr(engine) and "capacity=16" in repr(engine)
        engine.close()
        assert "closed" in repr(engine)


class TestCloseUnlink:
    @pytest.mark.shm_only
    def test_close_detaches_but_segment_lives(self, engine):
        """close() detaches this view only; the segment and its data remain."""
        pos = opened(engine)
        engine.close()
        assert engine.closed
        assert os.path.exists(shm_path(engine.name))
        with Engine.attach(engine.name, url=engine.url) as other:
            assert other.state(pos) is State.MONITORING

    def test_close_twice_is_harmless(self, engine):
        """A second close() does nothing."""
        engine.close()
        engine.close()
        assert engine.closed

    def test_calls_after_close_raise_closed_error(self, engine):
        """Every operation on a closed Engine raises ClosedError."""
        pos = opened(engine)
        slot = engine.slot_of(pos)
        engine.close()
        calls = [
            lambda: engine.state(pos), lambda: engine.state_word(slot),
            lambda: engine.price(pos), lambda: engine.context(pos),
            lambda: engine.transition(pos, Trigger.PAUSE),
            lambda: engine.transition(pos, Trigger.PAUSE, exit_reason=1),
            lambda: engine.update_price(pos, 1.0),
            lambda: engine.update_prices(np.array([pos]), np.array([1.0])),
            lambda: engine.update_token_price(7, 1.0),
            lambda: engine.open_position(1.0, 1.0),
            lambda: engine.release_position(pos),
            lambda: engine.wait_for_change(pos, 0.01),
            engine.snapshot, engine.metrics, engine.recover, engine.halt,
        ]
        for call in calls:
            with pytest.raises(ClosedError):
                call()

    def test_unlink_removes_segment(self, engine):
        """unlink() removes the segment name; a later attach finds nothing."""
        engine.unlink()
        assert not os.path.exists(shm_path(engine.name))
        with pytest.raises(SegmentNotFoundError):
            Engine.attach(engine.name, url=engine.url)

    @pytest.mark.shm_only
    def test_unlink_keeps_existing_mappings_working(self, engine):
        """After unlink() an attached Engine keeps working on its mapping."""
        pos = opened(engine)
        engine.unlink()
        assert engine.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        assert engine.state(pos) is State.PAUSED

    def test_context_manager_closes_and_keeps_segment(self):
        """`with Engine.create(...)` closes on exit but does not unlink."""
        with Engine.create(capacity=2) as eng:
            name = eng.name
            pos = opened(eng)
        try:
            assert eng.closed
            with Engine.attach(name) as other:
                assert other.state(pos) is State.MONITORING
        finally:
            eng.unlink()

    def test_context_manager_closes_on_exception(self):
        """An exception inside `with` still closes the Engine."""
        eng = None
        try:
            with pytest.raises(RuntimeError), Engine.create(capacity=2) as eng:
                raise RuntimeError("boom")
            assert eng.closed
        finally:
            if eng is not None:
                eng.unlink()


class TestIndependentInterpreter:
    @pytest.mark.shm_only
    @pytest.mark.parametrize("close", [True, False], ids=["close", "no-close"])
    def test_attach_and_exit_leaves_segment(self, engine, child_env, close):
        """Another interpreter attaching and exiting keeps the segment; stderr stays clean."""
        pos = opened(engine)
        code = textwrap.dedent(f"""
            from engine import Engine, Trigger
            eng = Engine.attach({engine.name!r})
            print(eng.state({pos}).name)
            eng.transition({pos}, Trigger.PAUSE)
            eng.update_price({pos}, 123.0)
            {"eng.close()" if close else "pass"}
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=child_env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "MONITORING"
        assert r.stderr == "", r.stderr          # no resource_tracker leak warning
        assert os.path.exists(shm_path(engine.name))
        with Engine.attach(engine.name, url=engine.url) as again:
            assert again.state(pos) is State.PAUSED
            assert again.price(pos).price == 123.0
        assert engine.recover().changed is False   # the child left the registry

    def test_segment_outlives_its_creator(self, child_env):
        """A segment created by a process that exits without unlink() remains."""
        code = textwrap.dedent("""
            from engine import Engine
            eng = Engine.create(capacity=4)
            eng.open_position(100.0, 1.0, token=3)
            print(eng.name)
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=child_env, timeout=120)
        name = r.stdout.strip()
        try:
            assert r.returncode == 0, r.stderr
            assert r.stderr == "", r.stderr
            assert os.path.exists(shm_path(name))
            with Engine.attach(name) as eng:
                rows = eng.snapshot()
                assert len(rows) == 1 and rows["token"][0] == 3
        finally:
            if name and os.path.exists(shm_path(name)):
                posix_ipc.unlink_shared_memory("/" + name)


class TestRegistry:
    @pytest.mark.shm_only
    def test_registry_full_raises_capacity_error(self, make_engine):
        """Attach past ENG_MAX_PROCS raises CapacityError; closing one frees an entry."""
        eng = make_engine(capacity=1)
        views = []
        try:
            for _ in range(lib.ENG_MAX_PROCS - 1):
                views.append(Engine.attach(eng.name, url=eng.url))
            with pytest.raises(CapacityError, match=str(lib.ENG_MAX_PROCS)):
                Engine.attach(eng.name, url=eng.url)
            views.pop().close()
            views.append(Engine.attach(eng.name, url=eng.url))
        finally:
            for v in views:
                v.close()


# ---------------------------------------------------------------------------------
class TestOpenRelease:
    def test_open_starts_created_with_context(self, engine):
        """open_position returns the id of a position in CREATED whose context
        holds its arguments."""
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


# ---------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------
def expected_pnl(price: float, entry: float, amount: float, side: int) -> tuple[float, float]:
    """The design's PnL, computed in the same order as the C code."""
    diff = price - entry
    return diff / entry * 100.0 * float(side), diff * amount * float(side)


class TestPrices:
    @pytest.mark.parametrize(("side", "price"), [(1, 110.0), (1, 87.5), (-1, 110.0),
                                                  (-1, 87.5), (1, 100.0)])
    def test_update_price_computes_pnl(self, engine, side, price):
        """PnL is (p-e)/e*100*side percent and (p-e)*amount*side USD."""
        pos = engine.open_position(entry_price=100.0, amount=3.0, side=side)
        engine.update_price(pos, price)
        p = engine.price(pos)
        assert p.price == price
        assert (p.pnl_pct, p.pnl_usd) == expected_pnl(price, 100.0, 3.0, side)
        assert p.pnl_pct == pytest.approx((price - 100.0) / 100.0 * 100.0 * side)
        assert p.pnl_usd == pytest.approx((price - 100.0) * 3.0 * side)

    def test_short_profits_when_price_falls(self, engine):
        """A short position's PnL is positive below its entry price."""
        pos = engine.open_position(entry_price=200.0, amount=0.5, side=-1)
        engine.update_price(pos, 150.0)
        p = engine.price(pos)
        assert p.pnl_pct == 25.0 and p.pnl_usd == 25.0

    def test_version_and_timestamp_advance(self, engine):
        """Each update bumps the price version by one; timestamps do not go back."""
        pos = opened(engine)
        prev = engine.price(pos)
        for i in range(5):
            engine.update_price(pos, 100.0 + i)
            p = engine.price(pos)
            assert p.version == prev.version + 1
            assert p.timestamp_ns >= prev.timestamp_ns - 10**9   # wall clock
            prev = p

    def test_price_update_does_not_touch_state_or_context(self, engine):
        """A price update changes neither the state word nor the context."""
        pos = opened(engine)
        word, ctx = word_of(engine, pos), engine.context(pos)
        engine.update_price(pos, 101.0)
        assert word_of(engine, pos) == word
        assert engine.context(pos) == ctx

    def test_update_prices_batch(self, make_engine):
        """update_prices writes each position's price and PnL, one version step each,
        and returns how many it wrote."""
        eng = make_engine(capacity=10)
        ids = np.array([eng.open_position(10.0 + i, 1.0 + i, side=1 if i % 2 else -1)
                        for i in range(10)])
        versions = [eng.price(int(s)).version for s in ids]
        prices = np.linspace(5.0, 50.0, len(ids))
        assert eng.update_prices(ids, prices) == len(ids)
        for s, p, v in zip(ids, prices, versions, strict=True):
            snap, ctx = eng.price(int(s)), eng.context(int(s))
            assert snap.price == p
            assert snap.version == v + 1
            assert (snap.pnl_pct, snap.pnl_usd) == expected_pnl(p, ctx.entry_price,
                                                                ctx.amount, ctx.side)

    def test_pnl_follows_the_slots_current_opening(self, make_engine):
        """After a release and a reopen of the same slot with another entry, amount
        and side, every price write computes PnL from the new opening, bit for bit;
        forbidden: PnL from the released opening's entry, amount or side."""
        eng = make_engine(capacity=1)
        old = eng.open_position(50.0, 3.0, side=1, token=4)
        for trig in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
                     Trigger.EXIT_COMPLETED):
            eng.transition(old, trig)
        eng.release_position(old)
        new = eng.open_position(200.0, 0.5, side=-1, token=4)
        assert eng.slot_of(new) == eng.slot_of(old)
        writes = [lambda p: eng.update_price(new, p),
                  lambda p: eng.update_prices(np.array([new], dtype=np.uint64), np.array([p])),
                  lambda p: eng.update_token_price(4, p)]
        for write, price in zip(writes, (210.5, 190.25, 200.0), strict=True):
            write(price)
            snap = eng.price(new)
            assert snap.price == price
            assert (snap.pnl_pct, snap.pnl_usd) == expected_pnl(price, 200.0, 0.5, -1)

    def test_update_prices_is_one_batch_operation(self, make_engine):
        """A batch of N prices is one C call: one price_batch attempt."""
        eng = make_engine(capacity=32)
        ids = np.array([eng.open_position(100.0, 1.0) for _ in range(32)], dtype=np.uint64)
        m0 = eng.metrics()
        eng.update_prices(ids, np.full(32, 101.0))
        m1 = eng.metrics()
        assert m1["price_batch"].attempts - m0["price_batch"].attempts == 1
        assert m1["price_batch"].applied - m0["price_batch"].applied == 1
        assert m1["price"].attempts == m0["price"].attempts

    def test_update_prices_accepts_other_int_and_float_dtypes(self, engine):
        """int64 / uint32 ids and float32 prices are converted, not refused."""
        a, b = opened(engine), opened(engine)
        engine.update_prices(np.array([a, b], dtype=np.int64), np.array([1.5, 2.5], np.float32))
        engine.update_prices(np.array([a], dtype=np.uint32), [3.25])   # a first opening's id fits
        assert engine.price(a).price == 3.25 and engine.price(b).price == 2.5

    def test_empty_batch_is_a_no_op(self, engine):
        """An empty batch changes nothing."""
        pos = opened(engine)
        before = engine.snapshot()
        engine.update_prices(np.array([], dtype=np.uint32), np.array([], dtype=np.float64))
        assert np.array_equal(engine.snapshot(), before)
        assert engine.price(pos).version == before["price_version"][0]

    def test_update_token_price_counts_open_positions_of_token(self, engine):
        """A token price reaches and counts its open positions only."""
        on_token = [engine.open_position(100.0, 1.0, token=5) for _ in range(3)]
        engine.transition(on_token[0], Trigger.POSITION_OPENED)   # MONITORING counts too
        closed = opened(engine, token=5)
        for trig in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
            engine.transition(closed, trig)
        other = engine.open_position(100.0, 1.0, token=6)
        v_closed, v_other = engine.price(closed).version, engine.price(other).version

        assert engine.update_token_price(5, 111.0) == 3
        for s in on_token:
            assert engine.price(s).price == 111.0
        assert engine.price(closed).version == v_closed
        assert engine.price(other).version == v_other
        assert engine.update_token_price(99, 1.0) == 0

    def test_update_token_price_skips_released_slots(self, make_engine):
        """A released slot's old token is not counted."""
        eng = make_engine(capacity=2)
        pos = opened(eng, token=8)
        for trig in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
            eng.transition(pos, trig)
        eng.release_position(pos)
        assert eng.update_token_price(8, 50.0) == 0

    def test_price_of_short_and_long_from_token_update(self, engine):
        """A token update computes each position's own PnL."""
        long_ = engine.open_position(100.0, 2.0, side=1, token=1)
        short = engine.open_position(80.0, 1.0, side=-1, token=1)
        engine.update_token_price(1, 90.0)
        assert (engine.price(long_).pnl_pct, engine.price(long_).pnl_usd) == \
            expected_pnl(90.0, 100.0, 2.0, 1)
        assert (engine.price(short).pnl_pct, engine.price(short).pnl_usd) == \
            expected_pnl(90.0, 80.0, 1.0, -1)


# ---------------------------------------------------------------------------------
class TestWaitForChange:
    def test_timeout_raises_wait_timeout(self, engine):
        """With no transition, wait_for_change raises WaitTimeout, a TimeoutError."""
        pos = opened(engine)
        with pytest.raises(WaitTimeout) as info:
            engine.wait_for_change(pos, timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        assert engine.state(pos) is State.MONITORING

    def test_zero_timeout_returns_at_once(self, engine):
        """timeout=0 polls: it raises WaitTimeout when nothing changed."""
        pos = opened(engine)
        with pytest.raises(TimeoutError):
            engine.wait_for_change(pos, timeout=0)

    @pytest.mark.shm_only
    def test_returns_new_state_after_transition(self, engine):
        """A waiter blocked on a slot wakes with the state another Engine committed."""
        pos = opened(engine)
        seen: list[object] = []

        def wait() -> None:
            with Engine.attach(engine.name, url=engine.url) as mine:
                try:
                    seen.append(mine.wait_for_change(pos, timeout=10))
                except BaseException as e:  # reported to the main thread
                    seen.append(e)

        t = threading.Thread(target=wait, daemon=True)
        t.start()
        try:
            assert wait_until(lambda: waiting(engine, pos) == 1), "waiter never blocked"
            assert engine.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        finally:
            t.join(15)
        assert not t.is_alive()
        assert seen == [State.PAUSED]
        # a waiter that returned leaves at most one spurious wake behind: the
        # next commit clears the flag
        assert engine.transition(pos, Trigger.RESUME) is Outcome.APPLIED
        assert waiting(engine, pos) == 0

    @pytest.mark.shm_only
    def test_invalid_transition_does_not_wake(self, engine):
        """An INVALID transition is not a change: the waiter times out."""
        pos = opened(engine)
        result: list[object] = []

        def wait() -> None:
            with Engine.attach(engine.name, url=engine.url) as mine:
                try:
                    result.append(mine.wait_for_change(pos, timeout=0.5))
                except WaitTimeout as e:
                    result.append(e)

        t = threading.Thread(target=wait, daemon=True)
        t.start()
        try:
            assert wait_until(lambda: waiting(engine, pos) == 1)
            assert engine.transition(pos, Trigger.RESUME) is Outcome.INVALID
        finally:
            t.join(15)
        assert len(result) == 1 and isinstance(result[0], WaitTimeout)

    def test_wait_on_free_slot_raises_not_open(self, engine):
        """Waiting on a never-opened slot (an id never issued) is bad input."""
        with pytest.raises(NotOpenError):
            engine.wait_for_change(3, timeout=0.01)


# ---------------------------------------------------------------------------------
class TestSnapshot:
    def test_rows_match_individual_reads(self, engine):
        """Each snapshot row equals the slot's state, word, price and context reads."""
        a = opened(engine, entry=100.0, amount=2.0, side=1, token=1)
        b = engine.open_position(50.0, 4.0, side=-1, token=2)
        engine.update_price(a, 104.0)
        engine.transition(a, Trigger.EXIT_CONDITION_MET, exit_reason=7, stop_loss=99.0)
        rows = engine.snapshot()
        assert isinstance(rows, np.ndarray) and rows.dtype.names is not None
        assert sorted(rows["id"].tolist()) == sorted([a, b])
        for row in rows:
            pos = int(row["id"])
            assert row["slot"] == engine.slot_of(pos)
            p, c = engine.price(pos), engine.context(pos)
            assert row["state"] == engine.state(pos)
            assert row["generation"] == generation(word_of(engine, pos))
            assert row["locked"] == 0
            assert (row["price"], row["pnl_pct"], row["pnl_usd"], row["price_version"]) == \
                (p.price, p.pnl_pct, p.pnl_usd, p.version)
            assert row["price_ts_ns"] == p.timestamp_ns
            assert (row["entry_price"], row["amount"], row["side"], row["token"]) == \
                (c.entry_price, c.amount, c.side, c.token)
            assert (row["stop_loss"], row["take_profit"], row["exit_reason"]) == \
                (c.stop_loss, c.take_profit, c.exit_reason)
            assert (row["opened_ns"], row["context_version"]) == (c.opened_ns, c.version)
        row_a = rows[rows["id"] == a][0]
        assert row_a["transitions"] == 3          # open, POSITION_OPENED, EXIT_CONDITION_MET
        assert row_a["exit_reason"] == 7

    def test_empty_engine_has_no_rows(self, engine):
        """A snapshot lists only open slots: none in a fresh engine."""
        rows = engine.snapshot()
        assert rows.shape == (0,)

    def test_snapshot_is_a_copy(self, engine):
        """A snapshot does not change when the engine does."""
        pos = opened(engine)
        rows = engine.snapshot()
        engine.update_price(pos, 150.0)
        assert rows["price"][0] == 100.0


# ---------------------------------------------------------------------------------
OUTCOME_FIELDS = ("applied", "invalid", "conflicts", "rejected", "halted", "errors")


def assert_counts_add_up(metrics) -> None:
    for op, m in metrics.items():
        assert m.attempts == sum(getattr(m, f) for f in OUTCOME_FIELDS), (op, m)


class TestMetrics:
    def test_counts_add_up_and_match_operations(self, engine):
        """Attempts equal the sum of outcomes, and counts match the ops done."""
        pos = engine.open_position(100.0, 1.0)
        engine.transition(pos, Trigger.POSITION_OPENED)        # applied
        engine.transition(pos, Trigger.POSITION_OPENED)        # invalid
        engine.transition(pos, Trigger.PAUSE)                  # applied
        engine.halt()
        engine.transition(pos, Trigger.RESUME)                 # halted
        engine.halt(False)
        engine.transition(pos, Trigger.RESUME, exit_reason=2)  # slow path, applied
        engine.update_price(pos, 101.0)
        engine.update_prices(np.array([pos]), np.array([102.0]))
        engine.update_token_price(0, 103.0)
        m = engine.metrics()
        assert_counts_add_up(m)
        t = m["transition"]
        assert (t.attempts, t.applied, t.invalid, t.halted, t.errors) == (4, 2, 1, 1, 0)
        assert t.success_rate == 0.5
        tc = m["transition_ctx"]
        assert (tc.attempts, tc.applied, tc.errors) == (1, 1, 0)
        assert (m["open"].attempts, m["open"].applied) == (1, 1)
        assert (m["price"].attempts, m["price"].applied) == (1, 1)
        assert (m["price_batch"].attempts, m["price_batch"].applied) == (2, 2)
        assert m["transition"].p50_ns <= m["transition"].p99_ns <= m["transition"].p999_ns

    def test_departed_engine_counts_survive(self, engine):
        """Counts of an Engine that closed stay in the merged metrics."""
        pos = opened(engine)
        before = engine.metrics()["transition"].applied
        with Engine.attach(engine.name, url=engine.url) as other:
            for trig in (Trigger.PAUSE, Trigger.RESUME, Trigger.PAUSE):
                assert other.transition(pos, trig) is Outcome.APPLIED
        after = engine.metrics()
        assert after["transition"].applied == before + 3
        assert_counts_add_up(after)

    def test_metrics_can_be_switched_off(self, engine):
        """With metrics off, operations are not counted."""
        pos = opened(engine)
        before = engine.metrics()["transition"].attempts
        engine.set_metrics(False)
        engine.transition(pos, Trigger.PAUSE)
        assert engine.metrics()["transition"].attempts == before
        engine.set_metrics(True, sample_every=1)
        engine.transition(pos, Trigger.RESUME)
        m = engine.metrics()["transition"]
        assert m.attempts == before + 1 and m.samples >= 1

    def test_empty_metrics(self, engine):
        """A fresh engine has zero counts and success rate 1.0 everywhere."""
        for m in engine.metrics().values():
            assert m.attempts == 0 and m.success_rate == 1.0 and m.p99_ns == 0.0


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


class TestHalt:
    def test_halt_stops_transitions_not_prices(self, engine):
        """Halted: transitions return HALTED and change nothing; prices update."""
        pos = opened(engine)
        word, ctx = word_of(engine, pos), engine.context(pos)
        engine.halt()
        assert engine.transition(pos, Trigger.PAUSE) is Outcome.HALTED
        assert engine.transition(pos, "PAUSE") is Outcome.HALTED
        assert engine.transition(pos, Trigger.PAUSE, exit_reason=1) is Outcome.HALTED
        assert engine.transition(pos, Trigger.RESUME) is Outcome.HALTED   # even if invalid
        assert word_of(engine, pos) == word and engine.context(pos) == ctx
        engine.update_price(pos, 120.0)
        assert engine.price(pos).price == 120.0
        assert engine.update_token_price(7, 121.0) == 1
        engine.halt(False)
        assert engine.transition(pos, Trigger.PAUSE) is Outcome.APPLIED

    def test_never_opened_slot_raises_while_halted(self, engine):
        """A never-opened slot raises NotOpenError even while halted."""
        engine.halt()
        try:
            with pytest.raises(NotOpenError):
                engine.transition(3, Trigger.PAUSE)
            with pytest.raises(NotOpenError):
                engine.transition(3, Trigger.PAUSE, exit_reason=1)
        finally:
            engine.halt(False)

    def test_halt_is_shared_by_every_attached_engine(self, engine):
        """A halt set by one process view stops transitions in every other."""
        pos = opened(engine)
        with Engine.attach(engine.name, url=engine.url) as other:
            other.halt()
            try:
                assert engine.transition(pos, Trigger.PAUSE) is Outcome.HALTED
            finally:
                other.halt(False)
        assert engine.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
