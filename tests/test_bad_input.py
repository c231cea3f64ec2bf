"""Bad input: every refusal is a typed exception whose message names the value
and the allowed range, and changes nothing (state, generation, counters,
price, context and their versions are compared before and after)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import (
    ArgumentError,
    BusyError,
    CapacityError,
    ClosedError,
    Engine,
    EngineError,
    EngineTypeError,
    NotOpenError,
    Outcome,
    PriceError,
    SegmentError,
    SegmentNotFoundError,
    SlotError,
    SpecError,
    SpecMismatchError,
    StaleIdError,
    State,
    Trigger,
    TriggerError,
    WaitTimeout,
)
from engine._native import lib

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)

BAD_PRICES = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-300]
BAD_PRICE_IDS = ["nan", "inf", "-inf", "zero", "-zero", "negative", "tiny-negative"]
#: what every refusal of an out-of-range id names: the range of ids
ID_RANGE = f"[1, {lib.ENG_ID_MAX:#x}]"
SLOT_BITS = lib.ENG_ID_SLOT_BITS


@pytest.fixture
def eng(engine):
    """The fixture engine with two MONITORING positions (their ids in
    `eng.slots`) and its remaining slots never opened; `eng.free` is a
    never-opened slot's index, which as an id was never issued."""
    a = engine.open_position(entry_price=100.0, amount=2.0, side=1, token=7)
    b = engine.open_position(entry_price=50.0, amount=1.0, side=-1, token=7)
    for s in (a, b):
        engine.transition(s, Trigger.POSITION_OPENED)
        engine.update_price(s, 101.0)
    engine.slots = (a, b)
    used = {engine.slot_of(a), engine.slot_of(b)}
    engine.free = next(s for s in range(engine.capacity) if s not in used)
    return engine


def observe(engine: Engine) -> np.ndarray:
    """Everything a refusal must not change, for every open slot."""
    return engine.snapshot()


def assert_unchanged(engine: Engine, before: np.ndarray) -> None:
    after = observe(engine)
    for field in ("id", "slot", "state", "generation", "locked", "transitions", "price",
                  "price_version", "pnl_pct", "pnl_usd", "entry_price", "amount",
                  "stop_loss", "take_profit", "token", "side", "exit_reason",
                  "context_version"):
        assert np.array_equal(after[field], before[field]), field
    assert np.array_equal(after, before)


def refused(engine: Engine, exc: type[BaseException], call, *needles: str) -> BaseException:
    """Run ``call``: it must raise ``exc`` whose message contains every needle,
    and leave the engine exactly as it was."""
    before = observe(engine)
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert_unchanged(engine, before)
    return info.value


# ---------------------------------------------------------------------------------
class TestExceptionClasses:
    @pytest.mark.parametrize(("cls", "builtin"), [
        (SlotError, IndexError), (NotOpenError, IndexError), (PriceError, ValueError),
        (EngineTypeError, TypeError), (TriggerError, ValueError), (ArgumentError, ValueError),
        (CapacityError, MemoryError), (BusyError, TimeoutError), (WaitTimeout, TimeoutError),
        (SegmentError, OSError), (SegmentNotFoundError, FileNotFoundError),
        (SpecMismatchError, SegmentError), (SpecError, ValueError),
        (ClosedError, RuntimeError)])
    def test_each_error_is_an_engine_error_and_its_builtin(self, cls, builtin):
        """Each engine exception subclasses EngineError and the natural builtin."""
        assert issubclass(cls, EngineError)
        assert issubclass(cls, builtin)

    def test_not_open_is_a_slot_error(self):
        """NotOpenError is caught by `except SlotError`."""
        assert issubclass(NotOpenError, SlotError)

    def test_stale_id_is_not_open(self):
        """StaleIdError (a released opening's id) is caught by `except NotOpenError`."""
        assert issubclass(StaleIdError, NotOpenError) and issubclass(StaleIdError, LookupError)


# ---------------------------------------------------------------------------------
class TestBadPrices:
    @pytest.mark.parametrize("price", BAD_PRICES, ids=BAD_PRICE_IDS)
    def test_update_price_refuses(self, eng, price):
        """A non-finite or non-positive price raises PriceError naming it; no change."""
        err = refused(eng, PriceError, lambda: eng.update_price(eng.slots[0], price),
                      repr(price), "finite and > 0")
        assert isinstance(err, ValueError)

    @pytest.mark.parametrize("price", BAD_PRICES, ids=BAD_PRICE_IDS)
    def test_update_token_price_refuses(self, eng, price):
        """update_token_price refuses the same prices and writes no slot."""
        refused(eng, PriceError, lambda: eng.update_token_price(7, price), repr(price),
                "finite and > 0")

    @pytest.mark.parametrize("price", BAD_PRICES, ids=BAD_PRICE_IDS)
    def test_open_position_refuses_entry_price(self, eng, price):
        """A bad entry price opens no position."""
        refused(eng, PriceError, lambda: eng.open_position(price, 1.0), repr(price),
                "finite and > 0")

    @pytest.mark.parametrize("amount", BAD_PRICES, ids=BAD_PRICE_IDS)
    def test_open_position_refuses_amount(self, eng, amount):
        """A non-finite or non-positive amount opens no position."""
        refused(eng, ArgumentError, lambda: eng.open_position(100.0, amount), "amount",
                repr(amount), "finite and > 0")

    @pytest.mark.parametrize("value", ["100", None, b"1", [1.0]])
    def test_wrong_price_types(self, eng, value):
        """A price of the wrong type raises EngineTypeError naming it."""
        refused(eng, EngineTypeError, lambda: eng.update_price(eng.slots[0], value), repr(value))
        refused(eng, EngineTypeError, lambda: eng.update_token_price(7, value), repr(value))
        refused(eng, EngineTypeError, lambda: eng.open_position(value, 1.0), repr(value))
        refused(eng, EngineTypeError, lambda: eng.open_position(100.0, value), repr(value))

    @settings(max_examples=200, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.differing_executors])   # one per backend
    @given(price=st.floats(allow_nan=True, allow_infinity=True))
    def test_any_float_is_stored_or_refused(self, eng, price):
        """Any float is stored with its PnL, or refused with PriceError and no change."""
        slot = eng.slots[1]
        if math.isfinite(price) and price > 0:
            v = eng.price(slot).version
            eng.update_price(slot, price)
            p, c = eng.price(slot), eng.context(slot)
            diff = price - c.entry_price
            assert (p.price, p.version) == (price, v + 1)
            assert p.pnl_pct == diff / c.entry_price * 100.0 * c.side
            assert p.pnl_usd == diff * c.amount * c.side
        else:
            refused(eng, PriceError, lambda: eng.update_price(slot, price))


# ---------------------------------------------------------------------------------
def slot_calls(engine: Engine, slot):
    """Every API call that takes a position id (and state_word, which takes a
    slot index)."""
    return {
        "state": lambda: engine.state(slot),
        "state_word": lambda: engine.state_word(slot),
        "price": lambda: engine.price(slot),
        "context": lambda: engine.context(slot),
        "transition": lambda: engine.transition(slot, Trigger.PAUSE),
        "transition_name": lambda: engine.transition(slot, "PAUSE"),
        "transition_ctx": lambda: engine.transition(slot, Trigger.PAUSE, exit_reason=1),
        "update_price": lambda: engine.update_price(slot, 100.0),
        "release_position": lambda: engine.release_position(slot),
        "wait_for_change": lambda: engine.wait_for_change(slot, timeout=0.01),
    }


SLOT_CALLS = list(slot_calls(None, 0))   # type: ignore[arg-type]


def out_of_range(eng: Engine, which: str) -> int:
    """Ids that name no slot of ``eng``: a slot part past the capacity (with
    opening 0 or 1), negative, past ENG_ID_MAX, past uint64."""
    return {"capacity": eng.capacity, "capacity+opening": (1 << SLOT_BITS) | eng.capacity,
            "-1": -1, "2**56": lib.ENG_ID_MAX + 1, "2**64": 2**64}[which]


class TestBadSlots:
    @pytest.mark.parametrize(("which", "call"), [
        (which, call) for which in ("capacity", "capacity+opening", "-1", "2**56", "2**64")
        for call in SLOT_CALLS
        if not (call == "state_word" and which == "capacity+opening")])   # a slot index
    def test_out_of_range(self, eng, call, which):
        """An id or slot index outside the engine's range raises SlotError naming the range."""
        slot = out_of_range(eng, which)
        needle = f"[0, {eng.capacity})" if call == "state_word" else ID_RANGE
        err = refused(eng, SlotError, slot_calls(eng, slot)[call], str(slot), needle)
        assert isinstance(err, IndexError) and not isinstance(err, NotOpenError)

    @pytest.mark.parametrize("call", SLOT_CALLS)
    @pytest.mark.parametrize("slot", [1.5, "3", None, 1.0, b"\x01"], ids=repr)
    def test_wrong_type(self, eng, call, slot):
        """A non-int id raises EngineTypeError naming it and what is allowed."""
        needle = f"[0, {eng.capacity})" if call == "state_word" else "open_position"
        err = refused(eng, EngineTypeError, slot_calls(eng, slot)[call], repr(slot), needle)
        assert isinstance(err, TypeError)

    @pytest.mark.parametrize("call", [c for c in SLOT_CALLS if c != "state_word"])
    @pytest.mark.parametrize("opening", [0, 1, 2], ids=["opening0", "opening1", "opening2"])
    def test_never_opened(self, eng, call, opening):
        """An id never issued raises NotOpenError and changes nothing."""
        pos = (opening << SLOT_BITS) | eng.free
        err = refused(eng, NotOpenError, slot_calls(eng, pos)[call], str(pos), "never issued")
        assert not isinstance(err, StaleIdError)

    @pytest.mark.parametrize("call", [c for c in SLOT_CALLS if c != "state_word"])
    def test_opening_not_reached_on_an_open_slot(self, eng, call):
        """The next opening's id of an open slot was never issued either."""
        a = eng.slots[0]
        pos = a + (1 << SLOT_BITS)
        refused(eng, NotOpenError, slot_calls(eng, pos)[call], str(pos), "never issued")

    def test_released_slot_is_not_open(self, make_engine):
        """A released position's id raises StaleIdError, also after its slot reopened."""
        engine = make_engine(capacity=1)
        pos = engine.open_position(100.0, 1.0)
        for trig in ("POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"):
            engine.transition(pos, trig)
        engine.release_position(pos)
        for name, call in slot_calls(engine, pos).items():
            if name != "state_word":
                err = refused(engine, NotOpenError, call, str(pos), "released")
                assert isinstance(err, StaleIdError), name
        again = engine.open_position(100.0, 1.0)
        assert engine.slot_of(again) == engine.slot_of(pos)
        for name, call in slot_calls(engine, pos).items():
            if name != "state_word":
                err = refused(engine, NotOpenError, call, str(pos), "released")
                assert isinstance(err, StaleIdError), name
        assert engine.state(again) is State.CREATED

    @settings(max_examples=100, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.differing_executors])   # one per backend
    @given(slot=st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                          st.integers(0, 3).flatmap(lambda o: st.integers(0, 20).map(
                              lambda s: (o << SLOT_BITS) | s))))
    def test_any_int_slot_is_served_or_refused(self, eng, slot):
        """Any int is a served id, an id never issued, or a SlotError."""
        if slot in eng.slots:
            assert eng.state(slot) is State.MONITORING
        elif 0 <= slot <= lib.ENG_ID_MAX and slot & lib.ENG_ID_SLOT_MASK < eng.capacity:
            refused(eng, NotOpenError, lambda: eng.state(slot))
        else:
            refused(eng, SlotError, lambda: eng.state(slot), ID_RANGE)
            refused(eng, SlotError, lambda: eng.update_price(slot, 1.0))


# ---------------------------------------------------------------------------------
class TestBadTriggers:
    @pytest.mark.parametrize("trigger", [len(Trigger), lib.ENG_MAX_TRIGGERS, -1, 2**40, 2**64])
    @pytest.mark.parametrize("path", ["fast", "ctx"])
    def test_int_out_of_range(self, eng, trigger, path):
        """A trigger index outside the spec raises TriggerError naming it and the range."""
        kw = {"exit_reason": 1} if path == "ctx" else {}
        refused(eng, TriggerError, lambda: eng.transition(eng.slots[0], trigger, **kw),
                str(trigger), f"[0, {len(Trigger)})")

    @pytest.mark.parametrize("name", ["NOPE", "pause", "", "PAUSE "])
    @pytest.mark.parametrize("path", ["fast", "ctx"])
    def test_unknown_name(self, eng, name, path):
        """An unknown trigger name raises TriggerError listing the known ones."""
        kw = {"stop_loss": 1.0} if path == "ctx" else {}
        refused(eng, TriggerError, lambda: eng.transition(eng.slots[0], name, **kw),
                repr(name), "PAUSE", "RESUME")

    @pytest.mark.parametrize("trigger", [1.5, None, b"PAUSE", 6.0], ids=repr)
    @pytest.mark.parametrize("path", ["fast", "ctx"])
    def test_wrong_type(self, eng, trigger, path):
        """A trigger that is neither an int nor a name raises EngineTypeError."""
        kw = {"take_profit": 1.0} if path == "ctx" else {}
        refused(eng, EngineTypeError, lambda: eng.transition(eng.slots[0], trigger, **kw),
                repr(trigger))

    def test_bad_trigger_on_never_opened_slot(self, eng):
        """A bad trigger is refused even on a free slot (before it is looked at)."""
        refused(eng, TriggerError, lambda: eng.transition(eng.free, 99))
        refused(eng, TriggerError, lambda: eng.transition((1 << SLOT_BITS) | eng.free, 99))


# ---------------------------------------------------------------------------------
class TestBadContext:
    @pytest.mark.parametrize(("key", "value"), [
        ("exit_reason", 2**31), ("exit_reason", -(2**31) - 1), ("stop_loss", math.nan),
        ("stop_loss", math.inf), ("stop_loss", -1.0), ("take_profit", -math.inf),
        ("take_profit", -0.5),
    ], ids=repr)
    def test_bad_context_value(self, eng, key, value):
        """A context value out of range raises ArgumentError naming it; no change."""
        slot = eng.slots[0]
        refused(eng, ArgumentError, lambda: eng.transition(slot, Trigger.PAUSE, **{key: value}),
                key, repr(value))
        assert eng.state(slot) is State.MONITORING

    @pytest.mark.parametrize(("key", "value"), [
        ("exit_reason", 1.5), ("exit_reason", "3"), ("stop_loss", "1"), ("stop_loss", True),
        ("take_profit", [1.0]),
    ], ids=repr)
    def test_wrong_type_context_value(self, eng, key, value):
        """A context value of the wrong type raises a TypeError naming it; no change."""
        slot = eng.slots[0]
        refused(eng, EngineTypeError,
                lambda: eng.transition(slot, Trigger.PAUSE, **{key: value}), key)
        assert eng.state(slot) is State.MONITORING

    def test_bad_value_among_good_ones(self, eng):
        """One bad field refuses the whole update, good fields included."""
        slot = eng.slots[0]
        refused(eng, ArgumentError, lambda: eng.transition(
            slot, Trigger.PAUSE, exit_reason=3, stop_loss=90.0, take_profit=math.nan))

    def test_unknown_context_field(self, eng):
        """A context field the engine does not have is a TypeError; nothing changes."""
        refused(eng, TypeError, lambda: eng.transition(eng.slots[0], Trigger.PAUSE, colour=1),
                "colour")

    def test_context_limits_are_accepted(self, eng):
        """The extremes of each allowed range are accepted."""
        slot = eng.slots[0]
        assert eng.transition(slot, Trigger.PAUSE, exit_reason=2**31 - 1, stop_loss=0.0,
                              take_profit=1e308) is Outcome.APPLIED
        assert eng.transition(slot, Trigger.RESUME, exit_reason=-(2**31)) is Outcome.APPLIED
        c = eng.context(slot)
        assert (c.exit_reason, c.stop_loss, c.take_profit) == (-(2**31), 0.0, 1e308)


# ---------------------------------------------------------------------------------
class TestBadBatches:
    def batch_refused(self, engine, exc, slots, prices, *needles):
        versions = {s: engine.price(s).version for s in engine.slots}
        refused(engine, exc, lambda: engine.update_prices(slots, prices), *needles)
        assert {s: engine.price(s).version for s in engine.slots} == versions

    def test_lengths_differ(self, eng):
        """Ids and prices of different lengths are refused, naming both lengths."""
        a, b = eng.slots
        self.batch_refused(eng, ArgumentError, np.array([a, b]), np.array([1.0]), "2", "1")

    @pytest.mark.parametrize(("slots", "prices"), [
        (np.array([[0, 1]]), np.array([[1.0, 2.0]])),
        (np.array([0, 1]), np.array([[1.0, 2.0]])),
        (np.array(0), np.array(1.0)),
    ], ids=["2-D", "2-D-prices", "0-D"])
    def test_not_one_dimensional(self, eng, slots, prices):
        """Arrays that are not 1-D are refused, naming their shapes."""
        self.batch_refused(eng, ArgumentError, slots, prices, "1-D", str(prices.shape))

    @pytest.mark.parametrize("dtype", [object, str, bool, np.float64, np.complex128])
    def test_wrong_slot_dtype(self, eng, dtype):
        """Ids that are not an integer array are refused, naming the dtype."""
        a, b = eng.slots
        slots = np.array([a, b]).astype(dtype)
        self.batch_refused(eng, EngineTypeError, slots, np.array([1.0, 2.0]), "ids",
                           str(slots.dtype))

    @pytest.mark.parametrize("dtype", [object, str, bool, np.int64, np.complex128])
    def test_wrong_price_dtype(self, eng, dtype):
        """Prices that are not a float array are refused, naming the dtype."""
        prices = np.array([1.0, 2.0]).astype(dtype)
        self.batch_refused(eng, EngineTypeError, np.array(eng.slots), prices, "prices",
                           str(prices.dtype))

    @pytest.mark.parametrize("bad", BAD_PRICES, ids=BAD_PRICE_IDS)
    def test_one_bad_price_in_the_middle(self, eng, bad):
        """One bad price in a batch refuses all of it: no slot's version moves."""
        a, b = eng.slots
        slots = np.array([a, b, a, b, a], dtype=np.uint64)
        prices = np.array([110.0, 111.0, bad, 112.0, 113.0])
        self.batch_refused(eng, PriceError, slots, prices, "index 2", repr(bad))

    @pytest.mark.parametrize(("dtype", "which"), [
        (dtype, which) for dtype in (np.uint32, np.int64, np.uint64, np.int32)
        for which in ("capacity", "capacity+opening", "-1", "2**56")
        if not (which == "-1" and np.dtype(dtype).kind == "u")            # cannot hold -1
        and not (which == "2**56" and np.dtype(dtype).itemsize < 8)])     # cannot hold 2**56
    def test_one_bad_slot_in_the_middle(self, eng, dtype, which):
        """One out-of-range id in a batch refuses all of it, naming id, range and index."""
        bad = out_of_range(eng, which)
        a, b = eng.slots        # first openings: their ids fit 32 bits
        slots = np.array([a, b, bad, a], dtype=dtype)
        self.batch_refused(eng, SlotError, slots, np.array([110.0, 111.0, 112.0, 113.0]),
                           str(bad), ID_RANGE, "index 2")

    def test_never_opened_slot_in_the_middle(self, eng):
        """An id never issued in a batch refuses all of it."""
        a, b = eng.slots
        slots = np.array([a, eng.free, b], dtype=np.uint64)
        self.batch_refused(eng, NotOpenError, slots, np.array([110.0, 111.0, 112.0]),
                           str(eng.free), "index 1")

    def test_stale_id_in_the_middle_is_skipped(self, make_engine):
        """A released id in a price batch is skipped, never written into the slot's new opening.

        A released position's id in a batch is skipped, not refused: the others
        are written, the return counts it out, and the new opening of its slot is
        not touched; forbidden: a refusal, or the stale id's price in the new
        opening.
        """
        engine = make_engine(capacity=3)
        a, gone, b = (engine.open_position(100.0, 1.0) for _ in range(3))
        for trig in ("POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"):
            engine.transition(gone, trig)
        engine.release_position(gone)
        new = engine.open_position(50.0, 2.0)   # the only free slot: the released one
        assert engine.slot_of(new) == engine.slot_of(gone)
        before = engine.price(new)
        versions = [engine.price(p).version for p in (a, b)]
        assert engine.update_prices(np.array([a, gone, b]), np.array([110.0, 111.0, 112.0])) == 2
        assert engine.price(new) == before
        assert [engine.price(p).price for p in (a, b)] == [110.0, 112.0]
        assert [engine.price(p).version for p in (a, b)] == [v + 1 for v in versions]

    def test_lists_of_python_floats_are_accepted(self, eng):
        """Plain lists of ints and floats convert to the right dtypes."""
        a, b = eng.slots
        assert eng.update_prices([a, b], [120.0, 121.0]) == 2
        assert (eng.price(a).price, eng.price(b).price) == (120.0, 121.0)


# ---------------------------------------------------------------------------------
class TestBadOtherArguments:
    @pytest.mark.parametrize("side", [0, 2, -2])
    def test_side_out_of_range(self, eng, side):
        """A side other than 1 or -1 is refused, naming it."""
        refused(eng, ArgumentError, lambda: eng.open_position(100.0, 1.0, side=side),
                repr(side), "1", "-1")

    @pytest.mark.parametrize("side", [1.0, "1", None, True], ids=repr)
    def test_side_wrong_type(self, eng, side):
        """A side that is not an int is refused with a typed engine error."""
        err = refused(eng, EngineError, lambda: eng.open_position(100.0, 1.0, side=side),
                      repr(side))
        assert isinstance(err, (TypeError, ValueError))

    @pytest.mark.parametrize("token", [2**63, -(2**63) - 1], ids=repr)
    def test_bad_token(self, eng, token):
        """A token outside int64 is refused, naming the range."""
        refused(eng, ArgumentError, lambda: eng.open_position(100.0, 1.0, token=token),
                str(token), str(2**63 - 1))
        refused(eng, ArgumentError, lambda: eng.update_token_price(token, 100.0), repr(token))

    @pytest.mark.parametrize("token", ["7", 1.5, None, True], ids=repr)
    def test_token_of_wrong_type(self, eng, token):
        """A token that is not an int is a TypeError naming it."""
        refused(eng, EngineTypeError, lambda: eng.open_position(100.0, 1.0, token=token),
                repr(token))
        refused(eng, EngineTypeError, lambda: eng.update_token_price(token, 100.0), repr(token))

    @pytest.mark.parametrize("timeout", [-1, -0.001, math.nan, math.inf, "1", None], ids=repr)
    def test_bad_wait_timeout(self, eng, timeout):
        """A timeout that is not a finite number >= 0 is refused, naming it."""
        refused(eng, ArgumentError, lambda: eng.wait_for_change(eng.slots[0], timeout=timeout),
                repr(timeout), ">= 0")

    @pytest.mark.parametrize("capacity", [0, -1, lib.ENG_MAX_CAPACITY + 1])
    def test_bad_capacity(self, capacity):
        """A capacity outside [1, ENG_MAX_CAPACITY] is refused, naming the range."""
        with pytest.raises(ArgumentError, match=rf"\[1, {lib.ENG_MAX_CAPACITY}\], got {capacity}"):
            Engine.create(capacity=capacity)

    @pytest.mark.parametrize("capacity", [1.5, "10", None, True], ids=repr)
    def test_capacity_wrong_type(self, capacity):
        """A capacity that is not an int is refused with EngineTypeError."""
        with pytest.raises(EngineTypeError, match="capacity"):
            Engine.create(capacity=capacity)

    @pytest.mark.parametrize("name", ["", "a/b", "..", "x" * 201, "sp ace", 5], ids=repr)
    def test_bad_segment_name(self, name):
        """A bad segment name is refused before anything is created."""
        with pytest.raises(ArgumentError, match="segment name"):
            Engine.create(capacity=1, name=name)
        if isinstance(name, str) and name and "/" not in name and name != "..":
            assert not os.path.exists("/dev/shm/" + name)

    @pytest.mark.parametrize("target", [None, 5, b"name"], ids=repr)
    def test_attach_wrong_type(self, target):
        """attach() of something that is neither a Handle nor a name is refused."""
        with pytest.raises(EngineTypeError, match="Handle"):
            Engine.attach(target)

    @pytest.mark.parametrize("every", [0, 3, -4])
    def test_bad_sample_period(self, eng, every):
        """A metrics sample period that is not a power of two is refused."""
        with pytest.raises(ArgumentError, match="power of two"):
            eng.set_metrics(True, sample_every=every)


_HUGE = 10**5000   # more digits than int->str allows (sys.get_int_max_str_digits())


class TestHugeIntArguments:
    """An int argument too long to print: the typed error of its range, never a
    ValueError raised while writing that error's message."""

    @pytest.mark.parametrize("call", [
        lambda e, p, v: e.price(v),
        lambda e, p, v: e.transition(v, 0),
        lambda e, p, v: e.update_price(p, v),
        lambda e, p, v: e.open_position(10.0, 1.0, token=v),
        lambda e, p, v: e.account(v),
        lambda e, p, v: e.wait_for_change(p, v),
        lambda e, p, v: Engine.create(v),
    ], ids=["price", "transition", "update_price", "open_token", "account", "wait_timeout",
            "create"])
    def test_an_int_too_long_to_print_is_a_range_error(
            self, eng: Engine, call: Callable[[Engine, int, int], Any]) -> None:
        """An int too long to print, in any argument, raises an EngineError and changes nothing."""
        p = eng.open_position(10.0, 1.0)
        before = eng.snapshot().tobytes()
        with pytest.raises(EngineError):
            call(eng, p, _HUGE)
        assert eng.snapshot().tobytes() == before
