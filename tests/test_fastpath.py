"""The hot calls in C (native/fastpath.c) behave exactly as the Python
methods they shadow: same results, same exceptions, for every argument
shape; and they never outlive their view."""

from __future__ import annotations

import gc
import inspect
import os
import weakref
from typing import Any

import numpy as np
import pytest

from engine import Engine, EngineError, Outcome, PriceSnapshot, State, Trigger
from engine import core as engine_core
from engine._native import lib

pytestmark = pytest.mark.skipif(engine_core._fastpath is None, reason="built without _fastpath")

# the Python methods the C descriptors stand for
PY_TRANSITION = getattr(Engine.transition, "__wrapped__", Engine.transition)
PY_UPDATE_PRICE = getattr(Engine.update_price, "__wrapped__", Engine.update_price)
PY_PRICE = getattr(Engine.price, "__wrapped__", Engine.price)

ARGS_POS = [None, 0, -1, 2**64, 2**70, 1.0, True, np.uint64(0), np.int64(0), "1", 1 << 24]
ARGS_TRIGGER = [0, 2, 9, 10, 256, 2**32, -1, True, False, 1.5, "PAUSE", "NOPE", Trigger.PAUSE,
                np.uint32(2)]
ARGS_PRICE = [101.5, 0.0, -1.0, float("nan"), float("inf"), 1e308, 5e-324, 100, True, "1",
              np.float64(1.0), 2**2000]


def outcome_of(call: Any) -> tuple[str, Any]:
    try:
        return "ok", call()
    except EngineError as e:
        return type(e).__name__, str(e)


def fresh() -> tuple[Engine, int, int]:
    eng = Engine.create(4)
    pos = eng.open_position(100.0, 1.0)
    eng.transition(pos, Trigger.POSITION_OPENED)
    stale = eng.open_position(100.0, 1.0)
    for t in ("EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"):
        eng.transition(stale, t)
    eng.release_position(stale)
    return eng, pos, stale


@pytest.fixture
def pair() -> Any:
    """Two engines in the same state: one called through C, one through Python."""
    made = [fresh(), fresh()]
    yield made
    for eng, _, _ in made:
        eng.close()
        eng.unlink()


def entries(eng: Engine) -> int:
    """Registry entries of this process in eng's segment (one per attached Engine)."""
    reg = eng._seg.registry
    return sum(int(reg[i].pid) == os.getpid() for i in range(lib.ENG_MAX_PROCS))


def subst(v: Any, pos: int, stale: int) -> Any:
    return {"POS": pos, "STALE": stale}.get(v, v) if isinstance(v, str) else v


class TestSameBehaviour:
    @pytest.mark.parametrize("p", [*ARGS_POS, "POS", "STALE"])
    @pytest.mark.parametrize("t", ARGS_TRIGGER)
    def test_transition(self, pair, p, t):
        """transition(p, t): the C call's result or exception equals the Python method's."""
        (a, pa, sa), (b, pb, sb) = pair
        fast = outcome_of(lambda: a.transition(subst(p, pa, sa), t))
        slow = outcome_of(lambda: PY_TRANSITION(b, subst(p, pb, sb), t))
        assert fast[0] == slow[0]
        assert a.state(pa) == b.state(pb)

    @pytest.mark.parametrize("p", [*ARGS_POS, "POS", "STALE"])
    @pytest.mark.parametrize("x", ARGS_PRICE)
    def test_update_price(self, pair, p, x):
        """update_price(p, x): same result or exception; the record moves alike."""
        (a, pa, sa), (b, pb, sb) = pair
        fast = outcome_of(lambda: a.update_price(subst(p, pa, sa), x))
        slow = outcome_of(lambda: PY_UPDATE_PRICE(b, subst(p, pb, sb), x))
        assert fast[0] == slow[0]
        ra, rb = a.price(pa), PY_PRICE(b, pb)
        assert (ra.price, ra.pnl_pct, ra.version) == (rb.price, rb.pnl_pct, rb.version)

    @pytest.mark.parametrize("p", [*ARGS_POS, "POS", "STALE"])
    def test_price(self, pair, p):
        """price(p): a PriceSnapshot equal to the Python method's, or the same exception."""
        (a, pa, sa), _ = pair
        fast = outcome_of(lambda: a.price(subst(p, pa, sa)))
        slow = outcome_of(lambda: PY_PRICE(a, subst(p, pa, sa)))
        assert fast[0] == slow[0]
        if fast[0] == "ok":
            assert type(fast[1]) is PriceSnapshot
            assert fast[1][:1] + fast[1][2:] == slow[1][:1] + slow[1][2:]

    def test_the_comparison_is_c_against_python(self):
        """The compared class attributes are the C descriptors and the PY_* the Python methods."""
        for name in ("transition", "update_price", "price"):
            assert type(getattr(Engine, name)) is engine_core._fastpath.FastMethod
        assert all(inspect.isfunction(f) for f in (PY_TRANSITION, PY_UPDATE_PRICE, PY_PRICE))

    def test_fields_and_guards_take_the_python_path(self, pair):
        """Keyword fields commit with the state (the Python slow path)."""
        (a, pa, _), _ = pair
        assert a.transition(pa, Trigger.EXIT_CONDITION_MET, exit_reason=4) is Outcome.APPLIED
        assert a.context(pa).exit_reason == 4 and a.state(pa) is State.EXIT_PENDING


class TestLifetime:
    def test_a_kept_call_after_close_raises_closed(self):
        """A bound call kept past close() says ClosedError (its view is detached), never crashes."""
        eng = Engine.create(2)
        pos = eng.open_position(100.0, 1.0)
        calls = (eng.transition, eng.update_price, eng.price)
        eng.close()
        for call, args in zip(calls, ((pos, 0), (pos, 1.0), (pos,)), strict=True):
            with pytest.raises(EngineError, match="closed"):
                call(*args)
        Engine.attach(eng.name).unlink()

    def test_a_kept_call_keeps_its_engine(self):
        """A hot call kept alone keeps its Engine alive, as a bound method would."""
        eng = Engine.create(2)
        name = eng.name
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        try:
            up = Engine.attach(name).update_price
            read = Engine.attach(name).price
            move = Engine.attach(name).transition
            gc.collect()
            up(pos, 101.5)                 # the C path
            assert read(pos).price == 101.5
            assert move(pos, Trigger.PAUSE) is Outcome.APPLIED
            up(pos, 102)                   # an int: the Python slow path, same Engine
            assert read(pos).price == 102.0
            assert move(pos, "RESUME") is Outcome.APPLIED
            with pytest.raises(EngineError):
                up(pos, -1.0)              # a refused price: the failure path
            assert eng.state(pos) is State.MONITORING
        finally:
            eng.close()
            eng.unlink()

    def test_a_dropped_kept_call_releases_its_engine_at_once(self):
        """Dropping the last reference to a kept call detaches its Engine at once."""
        eng = Engine.create(2)
        name, fin, ref = eng.name, eng._finalizer, weakref.ref(eng)
        watch = Engine.attach(name)   # sees the registry
        calls = [eng.update_price, eng.price, eng.transition]
        del eng
        gc.disable()
        try:
            assert ref() is not None and fin.alive and entries(watch) == 2
            del calls[:2]
            assert ref() is not None and fin.alive and entries(watch) == 2
            calls.clear()
            assert ref() is None and not fin.alive and entries(watch) == 1   # entry freed
        finally:
            gc.enable()
        watch.close()
        watch.unlink()

    def test_a_call_stored_on_its_engine_is_collected(self):
        """An Engine holding one of its own calls (a cycle) is still detached by the collector."""
        eng = Engine.create(2)
        name, fin = eng.name, eng._finalizer
        eng.cb = eng.update_price   # type: ignore[attr-defined]
        del eng
        gc.collect()
        assert not fin.alive
        Engine.attach(name).unlink()

    def test_no_reference_cycle(self):
        """Dropping the last reference detaches at once (the calls hold the Engine weakly)."""
        eng = Engine.create(2)
        name, ref = eng.name, weakref.ref(eng)
        gc.disable()
        try:
            del eng
            assert ref() is None
        finally:
            gc.enable()
        Engine.attach(name).unlink()


class TestSnapshotReuse:
    """price() fills a result again only when nobody else holds it."""

    def test_a_held_snapshot_never_changes(self):
        """Forbidden: a snapshot the caller still holds showing a later price."""
        eng = Engine.create(4)
        try:
            pos = eng.open_position(100.0, 1.0)
            held = []
            for i in range(1, 50):
                eng.update_price(pos, float(i))
                held.append(eng.price(pos))
                snap = eng.price(pos)   # the loop shape: the last result is held while asking
                assert snap.price == float(i)
            assert [s.price for s in held] == [float(i) for i in range(1, 50)]
            assert len({id(s) for s in held}) == len(held)
            assert snap.version == held[-1].version
        finally:
            eng.close()
            eng.unlink()

    def test_a_dropped_snapshot_is_filled_with_the_new_record(self):
        """A result dropped and reused comes back with the current record, never old values."""
        eng = Engine.create(4)
        try:
            pos = eng.open_position(100.0, 2.0)
            eng.update_price(pos, 101.0)
            first = eng.price(pos)
            old_id, old = id(first), tuple(first)
            del first
            eng.update_price(pos, 250.5)
            again = eng.price(pos)
            assert id(again) == old_id                 # the spare was reused ...
            assert tuple(again) != old                 # ... with the new record
            want = PY_PRICE(eng, pos)
            assert again[:1] + again[2:] == want[:1] + want[2:]
            assert again.price == 250.5 and type(again) is PriceSnapshot
        finally:
            eng.close()
            eng.unlink()

    def test_a_snapshot_held_only_by_a_container_is_kept(self):
        """A result inside a list or dict is held: later calls leave it alone."""
        eng = Engine.create(4)
        try:
            pos = eng.open_position(100.0, 1.0)
            eng.update_price(pos, 5.0)
            box = {"s": eng.price(pos)}
            rows = [eng.price(pos)]
            for p in (6.0, 7.0, 8.0):
                eng.update_price(pos, p)
                eng.price(pos)
            assert box["s"].price == 5.0 and rows[0].price == 5.0
        finally:
            eng.close()
            eng.unlink()
