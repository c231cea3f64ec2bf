"""Hot-call costs of the engine against the empty-call floors.

Each benchmark's pytest-benchmark row is microseconds per round of 1000
calls, which is nanoseconds per call (see ``conftest.py``).  ``*_raw``
benchmarks call ``lib`` directly on the Engine's private segment pointer:
the difference to the public call is what the Python wrapper costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from engine import Engine, Trigger
from engine._native import ffi, lib

if TYPE_CHECKING:
    from conftest import CallTimer, Recorder

PAUSE, RESUME = int(Trigger.PAUSE), int(Trigger.RESUME)
TRANSITION_SLOT, PRICE_SLOT, READ_SLOT = 0, 1, 2   # slot indexes; calls take eng.id_of(slot)


def all_ids(eng: Engine) -> np.ndarray:
    """The id of every slot's position, by slot (every slot is open)."""
    return np.array([eng.id_of(s) for s in range(eng.capacity)], dtype=np.uint64)


class EmptyEngine:
    """The floor any Python API pays: empty methods taking the hot calls' arguments."""

    def transition(self, pos: int, trigger: int, /, **fields: Any) -> None:
        return None

    def update_price(self, pos: int, price: float) -> None:
        return None

    def price(self, pos: int) -> None:
        return None


@pytest.mark.benchmark(group="floors (us per round = ns per call)")
class TestFloors:
    """The cost of calling C at all, per argument shape, and of an empty
    Python method of each hot call's arguments."""

    def test_floor_method_transition(self, timer: CallTimer) -> None:
        """An empty Python method ``transition(pos, trigger, /, **fields)``."""
        timer.calls("floor_method_transition", ["f(s, P)", "f(s, R)"],
                    f=EmptyEngine().transition, s=1 << 24, P=PAUSE, R=RESUME)

    def test_floor_method_update_price(self, timer: CallTimer) -> None:
        """An empty Python method ``update_price(pos, price)``."""
        timer.calls("floor_method_update_price", ["f(s, 101.5)", "f(s, 99.5)"],
                    f=EmptyEngine().update_price, s=1 << 24)

    def test_floor_method_price(self, timer: CallTimer) -> None:
        """An empty Python method ``price(pos)``."""
        timer.calls("floor_method_price", ["f(s)"], f=EmptyEngine().price, s=1 << 24)

    def test_floor_noop(self, timer: CallTimer) -> None:
        """``lib.eng_noop()``: no arguments, empty C body (METH_NOARGS)."""
        timer.calls("floor_noop", ["f()"], f=lib.eng_noop)

    def test_floor_1arg(self, timer: CallTimer, engine: Engine) -> None:
        """``lib.eng_check(seg)``: one argument (METH_O), a check of the view in C."""
        timer.calls("floor_1arg", ["f(s)"], f=lib.eng_check, s=engine._seg)

    def test_floor_2arg(self, timer: CallTimer, engine: Engine) -> None:
        """``lib.eng_state(seg, id)``: two arguments (METH_VARARGS), one
        acquire load in C."""
        timer.calls("floor_2arg", ["f(seg, s)"], f=lib.eng_state, seg=engine._seg,
                    s=engine.id_of(TRANSITION_SLOT))

    def test_floor_transition_shape(self, timer: CallTimer, engine: Engine) -> None:
        """``eng_transition(seg, id, trigger)`` refused before any work
        (trigger past the table): the transition's own call shape."""
        bad = len(engine.spec.triggers)
        s = engine.id_of(TRANSITION_SLOT)
        assert lib.eng_transition(engine._seg, s, bad) == lib.ENG_EBADTRIGGER
        timer.calls("floor_transition_shape", ["f(seg, s, t)"], f=lib.eng_transition,
                    seg=engine._seg, s=s, t=bad)

    def test_floor_update_price_shape(self, timer: CallTimer, engine: Engine) -> None:
        """``eng_update_price(seg, id, price)`` refused before any work (NaN)."""
        nan = float("nan")
        s = engine.id_of(PRICE_SLOT)
        assert lib.eng_update_price(engine._seg, s, nan) == lib.ENG_EBADPRICE
        timer.calls("floor_update_price_shape", ["f(seg, s, p)"], f=lib.eng_update_price,
                    seg=engine._seg, s=s, p=nan)

    def test_floor_price_read_shape(self, timer: CallTimer, engine: Engine) -> None:
        """``eng_read_price(seg, id, out)`` refused before any work (an id
        whose slot is past the capacity)."""
        out = ffi.new("eng_price_out *")
        assert lib.eng_read_price(engine._seg, engine.capacity, out) == lib.ENG_EBADSLOT
        timer.calls("floor_price_read_shape", ["f(seg, s, o)"], f=lib.eng_read_price,
                    seg=engine._seg, s=engine.capacity, o=out)


@pytest.mark.benchmark(group="hot calls (us per round = ns per call)")
class TestHotCalls:
    """One whole operation per C call, through the public API and raw.

    Metrics are on with the default sampling (1 in 64), as users run it.
    """

    def test_transition(self, timer: CallTimer, metrics_default: Engine) -> None:
        """``Engine.transition``: PAUSE then RESUME on one slot, per transition."""
        eng = metrics_default
        s = eng.id_of(TRANSITION_SLOT)
        timer.calls("transition", ["f(s, P)", "f(s, R)"], f=eng.transition,
                    s=s, P=PAUSE, R=RESUME)
        assert eng.state(s).name == "MONITORING"

    def test_transition_raw(self, timer: CallTimer, metrics_default: Engine) -> None:
        """``lib.eng_transition``: the same without the Python wrapper."""
        timer.calls("transition_raw", ["f(seg, s, P)", "f(seg, s, R)"], f=lib.eng_transition,
                    seg=metrics_default._seg, s=metrics_default.id_of(TRANSITION_SLOT),
                    P=PAUSE, R=RESUME)

    def test_update_price(self, timer: CallTimer, metrics_default: Engine) -> None:
        """``Engine.update_price``: seqlock write with PnL computed in C."""
        timer.calls("update_price", ["f(s, 101.5)", "f(s, 99.5)"],
                    f=metrics_default.update_price, s=metrics_default.id_of(PRICE_SLOT))

    def test_update_price_raw(self, timer: CallTimer, metrics_default: Engine) -> None:
        """``lib.eng_update_price`` without the wrapper."""
        timer.calls("update_price_raw", ["f(seg, s, 101.5)", "f(seg, s, 99.5)"],
                    f=lib.eng_update_price, seg=metrics_default._seg,
                    s=metrics_default.id_of(PRICE_SLOT))

    def test_price_read(self, timer: CallTimer, metrics_default: Engine) -> None:
        """``Engine.price``: a consistent read returned as a 5-field PriceSnapshot."""
        s = metrics_default.id_of(READ_SLOT)
        snap = metrics_default.price(s)
        assert len(snap) == 5 and snap.price == 100.0
        timer.calls("price_read", ["f(s)"], f=metrics_default.price, s=s)

    def test_price_read_raw(self, timer: CallTimer, metrics_default: Engine) -> None:
        """``lib.eng_read_price`` into a cffi struct; no Python snapshot built."""
        timer.calls("price_read_raw", ["f(seg, s, o)"], f=lib.eng_read_price,
                    seg=metrics_default._seg, s=metrics_default.id_of(READ_SLOT),
                    o=ffi.new("eng_price_out *"))


@pytest.mark.benchmark(group="batch (s per round of one call)")
class TestBatch:
    """``update_prices`` over every slot of the engine in one C call."""

    def test_update_prices_batch(self, timer: CallTimer, metrics_default: Engine) -> None:
        """``Engine.update_prices`` of 10 000 positions (uint64 ids / float64 arrays)."""
        eng = metrics_default
        ids = all_ids(eng)
        prices = np.linspace(90.0, 110.0, eng.capacity)

        def batch() -> None:
            eng.update_prices(ids, prices)

        timer.rounds("update_prices_batch", batch, eng.capacity, unit="slot")
        assert eng.price(int(ids[-1])).price == 110.0

    def test_update_prices_batch_raw(self, timer: CallTimer, metrics_default: Engine) -> None:
        """``lib.eng_update_prices`` on prepared buffers: the C loop alone."""
        n = metrics_default.capacity
        ids = all_ids(metrics_default)
        prices = np.linspace(90.0, 110.0, n)
        sbuf, pbuf = ffi.from_buffer("uint64_t[]", ids), ffi.from_buffer("double[]", prices)
        bad, written = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        seg, f = metrics_default._seg, lib.eng_update_prices

        def batch() -> None:
            f(seg, sbuf, pbuf, n, bad, written)

        assert f(seg, sbuf, pbuf, n, bad, written) == 0 and written[0] == n
        timer.rounds("update_prices_batch_raw", batch, n, unit="slot")


@pytest.mark.benchmark(group="metrics overhead (us per round = ns per call)")
class TestMetricsOverhead:
    """Transition cost with metrics on (default sampling, 1 in 64) and off."""

    def test_transition_metrics_off(self, timer: CallTimer, metrics_default: Engine) -> None:
        """Metrics off: no counters, no clock reads."""
        eng = metrics_default
        eng.set_metrics(False)
        timer.calls("transition_metrics_off", ["f(s, P)", "f(s, R)"], f=eng.transition,
                    s=eng.id_of(TRANSITION_SLOT), P=PAUSE, R=RESUME)

    def test_transition_metrics_on(self, timer: CallTimer, metrics_default: Engine) -> None:
        """Metrics on: counters on every call, latency sampled 1 in 64.

        Afterwards the two settings are also timed interleaved, round by
        round, so that drift in the host's speed between the two benchmarks
        cannot pass for overhead."""
        eng = metrics_default
        eng.set_metrics(True, 64)
        s = eng.id_of(TRANSITION_SLOT)
        timer.calls("transition_metrics_on", ["f(s, P)", "f(s, R)"], f=eng.transition,
                    s=s, P=PAUSE, R=RESUME)
        timer.interleaved(["f(s, P)", "f(s, R)"],
                          {"f": eng.transition, "s": s, "P": PAUSE, "R": RESUME},
                          {"metrics_ab_on": lambda: eng.set_metrics(True, 64),
                           "metrics_ab_off": lambda: eng.set_metrics(False)})


@pytest.mark.benchmark(group="memory")
def test_memory_per_position(benchmark: Any, recorder: Recorder, engine: Engine) -> None:
    """Segment bytes per position at capacity 10 000 (timed only so that
    ``--benchmark-only`` keeps this test; the result is a size)."""
    cap = engine.capacity
    words, kpp, accts = engine.spec.record.n_words, engine.keys_per_position, 64
    size = benchmark.pedantic(lib.eng_segment_size, args=(cap, words, kpp, accts), rounds=1,
                              iterations=1)
    marginal = (lib.eng_segment_size(2 * cap, words, kpp, accts) - size) / cap
    recorder.note("segment_bytes", size)
    recorder.note("bytes_per_position", size / cap)
    recorder.note("marginal_bytes_per_position", marginal)
    recorder.note("slot_bytes", engine._seg.slot_size)
    # the slot, its key records and its share of the key index
    assert marginal >= engine._seg.slot_size + kpp * ffi.sizeof("eng_keyrec")
