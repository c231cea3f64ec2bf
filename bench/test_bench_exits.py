"""Exits fired by the price write: what arming costs a price write that does
not fire, and how soon a tick wakes an exit executor in another process.

* ``update_price_armed`` (and ``_raw``): ``update_price`` on a MONITORING
  position with a stop loss, a take profit and a trailing stop that the
  prices written never reach; beside ``update_price`` (no levels) of
  ``test_bench_core`` in the same run, and interleaved with it round by
  round here (``exit_ab_*``), so that drift of a shared host cannot pass
  for a cost.  Target: armed <= 1.1 x unarmed.
* ``update_prices_armed_batch`` (and ``_raw``): one ``update_prices`` of
  10 000 positions, every one armed.  Target: <= 10 ns per slot.
* ``exit_wake``: a tick that crosses a stop, to an exit executor blocked in
  ``wait_for`` in a spawned process returning (CLOCK_MONOTONIC on both
  sides); p50 / p99 over the rounds (compare: seed 000's 30-60 s poll).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from engine import POSITION_SPEC, Engine, MachineSpec, State, Trigger, WaitTimeout
from engine._native import ffi, lib
from engine.spec import POSITION_FIELDS

if TYPE_CHECKING:
    from conftest import CallTimer, Recorder

from conftest import CAPACITY, OPS_PER_ROUND, compile_loop

#: Levels no price of the benchmarks (90 .. 110, entry 100) reaches, by side.
FAR = {1: {"stop_loss": 1.0, "take_profit": 1e6, "trailing_stop": 50.0},
       -1: {"stop_loss": 1e6, "take_profit": 1.0, "trailing_stop": 50.0}}
#: The position spec without exits: its price writes take the path of before.
NO_EXITS = MachineSpec(states=POSITION_SPEC.states, triggers=POSITION_SPEC.triggers,
                       rules=POSITION_SPEC.rules, initial=POSITION_SPEC.initial,
                       closed=POSITION_SPEC.closed, fields=POSITION_FIELDS, name="no_exits")
WAKE_ROUNDS = 300


def _engine(spec: MachineSpec | None, levels: bool) -> Iterator[Engine]:
    eng = Engine.create(capacity=CAPACITY, spec=spec)
    try:
        ids = []
        for i in range(CAPACITY):
            side = 1 if i % 2 else -1
            pos = eng.open_position(entry_price=100.0, amount=2.0, side=side,
                                    token=i % 64, **(FAR[side] if levels else {}))
            eng.transition(pos, Trigger.POSITION_OPENED)
            ids.append(pos)
        eng.update_prices(ids, [100.0] * CAPACITY)
        eng.set_metrics(True, 64)
        yield eng
    finally:
        eng.close()
        eng.unlink()


@pytest.fixture(scope="module")
def armed_engine() -> Iterator[Engine]:
    """10 000 MONITORING positions, every one with all three levels armed."""
    yield from _engine(None, True)


@pytest.fixture(scope="module")
def no_exits_engine() -> Iterator[Engine]:
    """10 000 MONITORING positions of a spec without exits (the path of before)."""
    yield from _engine(NO_EXITS, False)


def _ids(eng: Engine) -> np.ndarray:
    return np.array([eng.id_of(s) for s in range(eng.capacity)], dtype=np.uint64)


def _never_fired(eng: Engine) -> None:
    snap = eng.snapshot()
    assert (snap["state"] == int(State.MONITORING)).all()


@pytest.mark.benchmark(group="exits (us per round = ns per call)")
class TestArmedPrice:
    def test_update_price_armed(self, timer: CallTimer, armed_engine: Engine) -> None:
        """``Engine.update_price`` on an armed position that does not fire."""
        s = armed_engine.id_of(1)
        timer.calls("update_price_armed", ["f(s, 101.5)", "f(s, 99.5)"],
                    f=armed_engine.update_price, s=s)
        assert armed_engine.state(s) is State.MONITORING

    def test_update_price_armed_raw(self, timer: CallTimer, armed_engine: Engine) -> None:
        """``lib.eng_update_price`` on an armed position, without the wrapper."""
        timer.calls("update_price_armed_raw", ["f(seg, s, 101.5)", "f(seg, s, 99.5)"],
                    f=lib.eng_update_price, seg=armed_engine._seg, s=armed_engine.id_of(1))

    def test_armed_vs_unarmed_interleaved(self, timer: CallTimer, armed_engine: Engine,
                                          metrics_default: Engine, recorder: Recorder) -> None:
        """The same call on an armed and on an unarmed position, alternating
        round by round (best of 300 rounds each)."""
        body = ["f(s, 101.5)", "f(s, 99.5)"]
        loops = {"exit_ab_armed": compile_loop(body, {"f": armed_engine.update_price,
                                                      "s": armed_engine.id_of(1)}),
                 "exit_ab_unarmed": compile_loop(body, {"f": metrics_default.update_price,
                                                        "s": metrics_default.id_of(1)})}
        best = dict.fromkeys(loops, math.inf)
        for _ in range(300):
            for key, loop in loops.items():
                t0 = time.perf_counter_ns()
                loop()
                best[key] = min(best[key], (time.perf_counter_ns() - t0) / OPS_PER_ROUND)
        for key, ns in best.items():
            recorder.note(f"{key}_ns", ns)
        timer.benchmark.pedantic(lambda: None, rounds=1)   # keeps it under --benchmark-only


@pytest.mark.benchmark(group="exits batch (s per round of one call)")
class TestArmedBatch:
    def test_update_prices_no_exits_batch_raw(self, timer: CallTimer,
                                              no_exits_engine: Engine) -> None:
        """``lib.eng_update_prices`` over 10 000 positions of a spec without exits."""
        _raw_batch(timer, no_exits_engine, "update_prices_no_exits_batch_raw")

    def test_update_prices_armed_batch(self, timer: CallTimer, armed_engine: Engine) -> None:
        """``Engine.update_prices`` of 10 000 positions, every one armed."""
        ids = _ids(armed_engine)
        prices = np.linspace(90.0, 110.0, armed_engine.capacity)
        timer.rounds("update_prices_armed_batch", lambda: armed_engine.update_prices(ids, prices),
                     armed_engine.capacity, unit="slot")
        _never_fired(armed_engine)

    def test_update_prices_armed_batch_raw(self, timer: CallTimer,
                                           armed_engine: Engine) -> None:
        """``lib.eng_update_prices`` over 10 000 armed positions: the C loop alone."""
        _raw_batch(timer, armed_engine, "update_prices_armed_batch_raw")
        _never_fired(armed_engine)


def _raw_batch(timer: CallTimer, eng: Engine, key: str) -> None:
    n = eng.capacity
    ids = _ids(eng)
    prices = np.linspace(90.0, 110.0, n)
    sbuf, pbuf = ffi.from_buffer("uint64_t[]", ids), ffi.from_buffer("double[]", prices)
    bad, written = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    seg, f = eng._seg, lib.eng_update_prices
    assert f(seg, sbuf, pbuf, n, bad, written) == 0 and written[0] == n
    timer.rounds(key, lambda: f(seg, sbuf, pbuf, n, bad, written), n, unit="slot")


def executor(handle: Any, conn: Any) -> None:
    """An exit executor: for each id received, block in wait_for_change until
    it is EXIT_PENDING and send back CLOCK_MONOTONIC at the wake."""
    eng = Engine.attach(handle)
    conn.send("up")
    while True:
        pos = conn.recv()
        if pos is None:
            return
        conn.send("waiting")
        while eng.state(pos) is not State.EXIT_PENDING:
            with contextlib.suppress(WaitTimeout):
                eng.wait_for_change(pos, timeout=30.0)
        conn.send(time.monotonic_ns())


@pytest.mark.benchmark(group="exits wake")
def test_exit_wake(benchmark: Any, recorder: Recorder) -> None:
    """Tick -> an executor blocked in wait_for in another process returns: p50 / p99."""
    ctx = multiprocessing.get_context("spawn")
    eng = Engine.create(capacity=WAKE_ROUNDS + 1)
    try:
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=executor, args=(eng.handle, theirs), daemon=True)
        p.start()
        try:
            assert ours.poll(60) and ours.recv() == "up"
            lat = []
            for _ in range(WAKE_ROUNDS):
                pos = eng.open_position(entry_price=100.0, amount=1.0, stop_loss=95.0)
                eng.transition(pos, Trigger.POSITION_OPENED)
                ours.send(pos)
                assert ours.poll(30) and ours.recv() == "waiting"
                slot = eng._slot(eng.slot_of(pos))
                deadline = time.monotonic() + 10
                while not slot.waiting and time.monotonic() < deadline:
                    time.sleep(0.0002)   # until it sleeps on the futex
                time.sleep(0.001)
                t0 = time.monotonic_ns()
                eng.update_price(pos, 94.0)
                assert ours.poll(30)
                lat.append(ours.recv() - t0)
            ours.send(None)
        finally:
            p.join(10)
            if p.is_alive():
                p.kill()
    finally:
        eng.close()
        eng.unlink()
    a = np.array(lat, dtype=float)
    recorder.note("exit_wake_p50_ns", float(np.percentile(a, 50)))
    recorder.note("exit_wake_p99_ns", float(np.percentile(a, 99)))
    benchmark.extra_info.update(p50_us=float(np.percentile(a, 50)) / 1e3,
                                p99_us=float(np.percentile(a, 99)) / 1e3)
    benchmark.pedantic(lambda: None, rounds=1)
