"""Fuzz every public Engine call with garbage arguments.

Allowed: the call works (garbage that happens to be valid, e.g. a position's
id), or it raises an ``EngineError`` subclass (which may also be a
``TypeError``/``ValueError``/... through the class's second base).  Forbidden:
any other exception, a crash, a hang, and a call that raised but changed a
state word, a price record or a context record.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine import (
    Engine,
    EngineError,
    Handle,
    Outcome,
    SegmentNotFoundError,
    State,
    Trigger,
)
from engine._native import lib
from engine.store import shm as segment

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
CAPACITY = 8

_WEIRD = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, 5e-324, 2**31, 2**31 - 1, 2**32,
          2**32 - 1, 2**63, 2**63 - 1, -(2**63) - 1, 2**64, 10**400, -1, 0, 1, CAPACITY,
          CAPACITY - 1, lib.ENG_MAX_CAPACITY, np.int64(1), np.uint32(2), np.int8(-1),
          np.float32(1.5), np.float64("nan"), np.bool_(True), complex(1, 1), b"\x00",
          bytearray(b"1"), "1", "", "POSITION_OPENED", "PAUSE", "nope", Trigger.PAUSE,
          State.MONITORING, (), [], {}, set(), ..., NotImplemented, object(), len,
          np.array([1, 2]), np.array(3), np.array([], dtype=np.float64)]

#: anything at all
GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(-5, CAPACITY + 5),
    st.integers(-(2**70), 2**70), st.floats(), st.floats(-1e3, 1e3),
    st.text(max_size=6), st.binary(max_size=6), st.sampled_from(_WEIRD),
    st.lists(st.integers(-3, 12), max_size=3), st.tuples(st.floats()),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
#: the ids of the first opening of each slot (the module engine opens slots 0-4 once)
FIRST_IDS = st.integers(0, CAPACITY - 1).map(lambda s: (1 << lib.ENG_ID_SLOT_BITS) | s)
#: position ids: valid ones, never-issued small ints, anything at all
IDS = st.one_of(FIRST_IDS, GARBAGE)
#: garbage for array arguments: numpy arrays of every dtype and shape, ragged lists
ARRAYS = st.one_of(
    GARBAGE,
    hnp.arrays(dtype=st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(),
                               hnp.floating_dtypes(), hnp.boolean_dtypes(),
                               hnp.complex_number_dtypes(), st.just(np.dtype(object))),
               shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4)),
    st.lists(GARBAGE, max_size=4),
    st.lists(IDS, max_size=4),
    st.lists(st.lists(st.integers(0, 3), max_size=3), max_size=3),   # ragged
)


def observe(eng: Engine) -> tuple[Any, ...]:
    """Every slot's state word, price word, opening count, published context
    version, and its position's price and context records, raw."""
    out = []
    for s in range(eng.capacity):
        sl = eng._slot(s)
        word = int(sl.word)
        published = eng._rec_copy(s, 1 if word & lib.ENG_SW_CTX else 0)
        pos = eng.id_of(s) if word & lib.ENG_SW_STATE_MASK else None
        out.append((word, int(sl.pword), int(sl.opening), int(published.version),
                    None if pos is None else eng.price(pos),
                    None if pos is None else eng.context(pos)))
    return tuple(out)


def check_call(eng: Engine, call: Callable[[], Any]) -> Any:
    """Run ``call``: if it raises, it must be an EngineError and ``eng`` unchanged."""
    before = observe(eng)
    try:
        return call()
    except EngineError:
        assert observe(eng) == before, "a call that raised changed the segment"
        return None
    except Exception as e:  # the finding: something else escaped
        pytest.fail(f"{type(e).__name__} escaped instead of an EngineError: {e!r}")


@pytest.fixture(scope="module")
def eng() -> Iterator[Engine]:
    """One engine with slots in several states (shared by the examples)."""
    e = Engine.create(capacity=CAPACITY, name=f"tfuzz_{secrets.token_hex(6)}")
    try:
        ids = []
        for i in range(5):
            s = e.open_position(100.0 + i, 1.0 + i, side=1 if i % 2 else -1, token=i % 2)
            assert s == (1 << lib.ENG_ID_SLOT_BITS) | i   # what FIRST_IDS generates
            ids.append(s)
            if i:
                e.transition(s, Trigger.POSITION_OPENED)
        e.transition(ids[2], Trigger.PAUSE)
        e.transition(ids[3], Trigger.EXIT_CONDITION_MET, exit_reason=4)
        yield e
    finally:
        e.close()
        with contextlib.suppress(SegmentNotFoundError):
            e.unlink()


@pytest.fixture(autouse=True)
def _not_halted(eng: Engine) -> Iterator[None]:
    yield
    eng.halt(False)
    eng._set_fault()


class TestFuzzTransition:
    """transition(slot, trigger, exit_reason, stop_loss, take_profit)."""

    @FUZZ
    @given(slot=IDS, trigger=GARBAGE)
    def test_fast_path(self, eng, slot, trigger):
        """Garbage slot/trigger: an Outcome or an EngineError, nothing changed on error."""
        out = check_call(eng, lambda: eng.transition(slot, trigger))
        assert out is None or isinstance(out, Outcome)

    @FUZZ
    @given(slot=st.one_of(FIRST_IDS, st.integers(0, CAPACITY - 1), GARBAGE),
           trigger=st.one_of(st.sampled_from(list(Trigger)), GARBAGE),
           ctx=st.dictionaries(st.sampled_from(["exit_reason", "stop_loss", "take_profit"]),
                               GARBAGE, min_size=1))
    def test_with_context(self, eng, slot, trigger, ctx):
        """Garbage context values: applied atomically or refused with nothing changed."""
        check_call(eng, lambda: eng.transition(slot, trigger, **ctx))


class TestFuzzReads:
    """state, state_word, price, context."""

    @FUZZ
    @given(slot=IDS)
    def test_reads(self, eng, slot):
        """Garbage ids and slot indexes give a value or an EngineError, never another exception."""
        for read in (eng.state, eng.state_word, eng.price, eng.context, eng.id_of):
            check_call(eng, lambda read=read: read(slot))


class TestFuzzPrices:
    """update_price, update_prices, update_token_price."""

    @FUZZ
    @given(slot=st.one_of(FIRST_IDS, st.integers(0, CAPACITY - 1), GARBAGE), price=GARBAGE)
    def test_update_price(self, eng, slot, price):
        """Garbage slot/price (NaN, inf, huge ints, strings...): written or refused unchanged."""
        check_call(eng, lambda: eng.update_price(slot, price))

    @FUZZ
    @given(slots=ARRAYS, prices=ARRAYS)
    def test_update_prices(self, eng, slots, prices):
        """Mismatched, ragged, wrongly typed arrays: the whole batch or nothing."""
        check_call(eng, lambda: eng.update_prices(slots, prices))

    @FUZZ
    @given(token=GARBAGE, price=GARBAGE)
    def test_update_token_price(self, eng, token, price):
        """Garbage token/price: a count, or refused with nothing changed."""
        out = check_call(eng, lambda: eng.update_token_price(token, price))
        assert out is None or (isinstance(out, int) and 0 <= out <= CAPACITY)


class TestFuzzPositions:
    """open_position, release_position."""

    @FUZZ
    @given(entry=GARBAGE, amount=GARBAGE, side=GARBAGE, token=GARBAGE)
    def test_open_position(self, eng, entry, amount, side, token):
        """Garbage position fields: a position id, or refused with no slot taken."""
        out = check_call(eng, lambda: eng.open_position(entry, amount, side, token))
        assert out is None or 0 <= eng.slot_of(out) < CAPACITY

    @FUZZ
    @given(slot=IDS)
    def test_release_position(self, eng, slot):
        """Garbage slot ids: an Outcome or an EngineError."""
        check_call(eng, lambda: eng.release_position(slot))


def _short(t: Any) -> bool:
    """Timeouts that would make a valid wait block for long are left out."""
    if isinstance(t, (complex, np.complexfloating)):
        return True   # not a valid timeout (and float() of a numpy complex warns)
    try:
        return not (float(t) > 0.01)
    except Exception:
        return True


class TestFuzzWait:
    """wait_for_change."""

    @FUZZ
    @given(slot=IDS, timeout=GARBAGE.filter(_short))
    def test_wait_for_change(self, eng, slot, timeout):
        """Garbage slot/timeout: a state, WaitTimeout, or another EngineError."""
        check_call(eng, lambda: eng.wait_for_change(slot, timeout))


class TestFuzzControls:
    """set_metrics, halt and the argument-free calls."""

    @FUZZ
    @given(enabled=st.booleans(), sample_every=GARBAGE)
    def test_set_metrics(self, eng, enabled, sample_every):
        """Garbage sampling periods: accepted (a power of two) or an EngineError."""
        try:
            check_call(eng, lambda: eng.set_metrics(enabled, sample_every))
        finally:
            eng.set_metrics(True, 64)

    def test_argument_free_calls(self, eng):
        """snapshot, metrics, recover: no garbage to give, they just work."""
        assert len(check_call(eng, eng.snapshot)) == 5
        assert set(check_call(eng, eng.metrics)) >= {"transition", "price"}
        assert not check_call(eng, eng.recover).changed


class TestFuzzLifecycle:
    """Engine.create, Engine.attach."""

    @FUZZ
    @given(capacity=st.one_of(st.integers(-3, 64), GARBAGE.filter(
        lambda c: not (isinstance(c, int) and 64 < c <= lib.ENG_MAX_CAPACITY))),
        name=st.one_of(st.none(), GARBAGE), spec=st.one_of(st.none(), GARBAGE))
    def test_create(self, capacity, name, spec):
        """Garbage create arguments give an Engine or an EngineError and leave no segment."""
        # Only names this call could have created are checked (and removed):
        # other processes create and remove /dev/shm entries all the time.
        generated: list[str] = []

        def random_name() -> str:
            generated.append(f"tfuzz_{secrets.token_hex(8)}")
            return generated[-1]

        candidates = {name} if isinstance(name, str) and name.isprintable() else set()
        existed = {n for n in candidates if os.path.exists(os.path.join(segment.SHM_DIR, n))}
        eng = None
        try:
            with mock.patch.object(segment, "random_name", random_name):
                eng = Engine.create(capacity, name=name, spec=spec)
        except EngineError:
            pass
        except Exception as e:  # the finding: something else escaped
            pytest.fail(f"{type(e).__name__} escaped instead of an EngineError: {e!r}")
        finally:
            if eng is not None:
                eng.close()
                eng.unlink()
            leaked = [n for n in (candidates - existed) | set(generated)
                      if "/" not in n and os.path.exists(os.path.join(segment.SHM_DIR, n))]
            for n in leaked:
                segment.unlink(n)
        assert not leaked, f"a refused create left segments behind: {leaked}"

    @FUZZ
    @given(target=st.one_of(GARBAGE, st.builds(Handle, GARBAGE)), spec=st.one_of(
        st.none(), GARBAGE))
    def test_attach_garbage(self, target, spec):
        """Garbage names, handles and specs: an EngineError."""
        try:
            Engine.attach(target, spec=spec).close()
        except EngineError:
            pass
        except Exception as e:  # the finding: something else escaped
            pytest.fail(f"{type(e).__name__} escaped instead of an EngineError: {e!r}")

    @FUZZ
    @given(spec=GARBAGE)
    def test_attach_existing_with_garbage_spec(self, eng, spec):
        """A real segment with a garbage spec: an EngineError, no registry entry kept."""
        before = observe(eng)
        try:
            Engine.attach(eng.name, spec=spec).close()
        except EngineError:
            pass
        except Exception as e:  # the finding: something else escaped
            pytest.fail(f"{type(e).__name__} escaped instead of an EngineError: {e!r}")
        assert observe(eng) == before


#: numbers at the edges of every range the API converts: NaN, infinities,
#: ints too large for a double or for the C type, numpy scalars
EDGE_NUMBERS = [math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 2**31, 2**32, 2**63,
                -(2**63) - 1, 2**64, 2**1024, 10**400, -(10**400), np.int64(2**62),
                np.uint64(2**64 - 1), np.float32("nan"), np.float32(1.0), np.float16(2.0),
                np.longdouble(1.0), np.complex64(1), True, None, "1", np.array([1.0])]
#: number-like values that are not integers: a slot or trigger given one must
#: be refused, not truncated
NON_INTEGRAL = [np.float32(1.9), np.float16(1.0), np.longdouble(2.5), np.complex64(1),
                np.float32(0.0)]


def _edge_calls(eng: Engine) -> dict[str, Callable[[Any], Any]]:
    """Each public call with one argument left open (the others valid)."""
    s = eng.id_of(1)   # the position open at slot 1 of the module engine (MONITORING)
    return {
        "transition(slot)": lambda v: eng.transition(v, Trigger.PAUSE),
        "transition(trigger)": lambda v: eng.transition(s, v),
        "transition(exit_reason)": lambda v: eng.transition(s, Trigger.PAUSE, exit_reason=v),
        "transition(stop_loss)": lambda v: eng.transition(s, Trigger.PAUSE, stop_loss=v),
        "transition(take_profit)": lambda v: eng.transition(s, Trigger.PAUSE, take_profit=v),
        "state(slot)": eng.state,
        "state_word(slot)": eng.state_word,
        "id_of(slot)": eng.id_of,
        "slot_of(slot)": eng.slot_of,
        "price(slot)": eng.price,
        "context(slot)": eng.context,
        "update_price(slot)": lambda v: eng.update_price(v, 100.0),
        "update_price(price)": lambda v: eng.update_price(s, v),
        "update_prices(slots)": lambda v: eng.update_prices([v], [100.0]),
        "update_prices(prices)": lambda v: eng.update_prices([s], [v]),
        "update_token_price(token)": lambda v: eng.update_token_price(v, 100.0),
        "update_token_price(price)": lambda v: eng.update_token_price(0, v),
        "open_position(entry_price)": lambda v: eng.open_position(v, 1.0),
        "open_position(amount)": lambda v: eng.open_position(100.0, v),
        "open_position(side)": lambda v: eng.open_position(100.0, 1.0, v),
        "open_position(token)": lambda v: eng.open_position(100.0, 1.0, 1, v),
        "release_position(slot)": eng.release_position,
        "wait_for_change(slot)": lambda v: eng.wait_for_change(v, 0.0),
        "wait_for_change(timeout)": lambda v: eng.wait_for_change(s, v) if _short(v) else None,
        "set_metrics(sample_every)": lambda v: eng.set_metrics(True, v),
    }


class TestEdgeValues:
    """Every edge number through every argument of every call: deterministic."""

    def test_edge_numbers(self, eng):
        """Edge numbers in every argument work or raise an EngineError with nothing changed.

        NaN, infinities, ints too large for a double or the C type, numpy
        scalars, through each argument: the call works or raises an
        EngineError with nothing changed.  Lists every escape it finds.
        """
        escaped = []
        for call, fn in _edge_calls(eng).items():
            for v in EDGE_NUMBERS:
                before = observe(eng)
                try:
                    fn(v)
                except EngineError:
                    if observe(eng) != before:
                        escaped.append(f"{call} <- {v!r:.40}: raised but changed the segment")
                except Exception as e:  # the finding: something else escaped
                    escaped.append(f"{call} <- {v!r:.40}: {type(e).__name__}: {e!s:.60}")
                finally:
                    eng.set_metrics(True, 64)
        assert not escaped, f"{len(escaped)} escapes:\n" + "\n".join(escaped)

    def test_non_integral_ids_are_refused(self, eng):
        """A non-integral numeric id or trigger raises, never truncates."""
        accepted = []
        for call, fn in _edge_calls(eng).items():
            if not call.endswith(("(slot)", "(trigger)", "(slots)")):
                continue
            for v in NON_INTEGRAL:
                before = observe(eng)
                try:
                    fn(v)
                except EngineError:
                    continue
                except Exception as e:  # the finding: something else escaped
                    accepted.append(f"{call} <- {v!r}: {type(e).__name__}: {e}")
                    continue
                changed = " and changed the segment" if observe(eng) != before else ""
                accepted.append(f"{call} <- {v!r}: taken as {int(v.real)}{changed}")
        assert not accepted, f"{len(accepted)} accepted:\n" + "\n".join(accepted)


class TestClosedEngine:
    """Every call on a closed Engine raises ClosedError."""

    def test_calls_after_close(self):
        """After close(), each public call raises an EngineError, none crashes."""
        e = Engine.create(capacity=2, name=f"tfuzz_{secrets.token_hex(6)}")
        pos = e.open_position(100.0, 1.0)
        slot = e.slot_of(pos)
        e.close()
        try:
            calls = [lambda: e.transition(pos, 0), lambda: e.transition(pos, 0, exit_reason=1),
                     lambda: e.state(pos), lambda: e.state_word(slot), lambda: e.price(pos),
                     lambda: e.context(pos), lambda: e.update_price(pos, 1.0),
                     lambda: e.update_prices([pos], [1.0]), lambda: e.update_token_price(0, 1.0),
                     lambda: e.open_position(1.0, 1.0), lambda: e.release_position(pos),
                     lambda: e.wait_for_change(pos, 0.0), lambda: e.id_of(slot), e.snapshot,
                     e.metrics, e.recover, lambda: e.halt(True), lambda: e.set_metrics(True, 1)]
            for call in calls:
                with pytest.raises(EngineError):
                    call()
        finally:
            e.unlink()
