"""Prices: update_price / update_prices / update_token_price and the
seqlock reads (price, PnL, version).

Forbidden: a torn read, a price landing on a position that is not open or
not on the token written."""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any

import numpy as np
import pytest
from api_helpers import opened, word_of
from owners_helpers import CTX, SECONDS
from procs import READY_TIMEOUT

from engine import BusyError, Engine, Outcome, Trigger
from engine._native import lib

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)
JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)


def expected_pnl(price: float, entry: float, amount: float, side: int) -> tuple[float, float]:
    """The design's PnL, computed in the same order as the C code."""
    diff = price - entry
    return diff / entry * 100.0 * float(side), diff * amount * float(side)


TOKEN_A, TOKEN_B = 11, 22
PRICE_RANGE = {TOKEN_A: (100.0, 200.0), TOKEN_B: (1000.0, 2000.0)}


def token_feeder_worker(handle: Any, seed: int, ready: Any, stop: Any) -> None:
    """update_token_price on token A (prices in [100, 200)) or B ([1000, 2000))."""
    eng = Engine.attach(handle)
    rng = random.Random(seed)
    ready.set()
    n = 0
    while True:
        n += 1
        if n % 64 == 0 and stop.is_set():
            return
        tok = TOKEN_A if rng.random() < 0.5 else TOKEN_B
        lo, hi = PRICE_RANGE[tok]
        with contextlib.suppress(BusyError):
            eng.update_token_price(tok, rng.uniform(lo, hi - 1.0))


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
        """update_prices writes each price and PnL, one version step each, and counts them."""
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
        """PnL follows the slot's current opening, bit for bit, after a release and reopen.

        After a release and a reopen of the same slot with another entry, amount
        and side, every price write computes PnL from the new opening, bit for bit;
        forbidden: PnL from the released opening's entry, amount or side.
        """
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


@pytest.mark.shm_only
class TestTokenReopenRace:
    """update_token_price writes a token's price only into positions of that
    token, even while the slot is released and reopened on another token."""

    def test_token_price_never_lands_in_other_tokens_position(self, make_engine, spawn):
        """A token's price never lands in a position of another token on a cycling slot.

        Capacity 1, two feeders pricing tokens A ([100, 200)) and B ([1000, 2000))
        while the slot cycles open(A)/close/release/open(B); forbidden: an A price
        in a B position or vice versa, in reads and snapshot rows.
        """
        eng = make_engine(capacity=1)
        stop = CTX.Event()
        for seed in (1, 2):
            ready = CTX.Event()
            spawn(token_feeder_worker, eng.handle, seed, ready, stop)
            assert ready.wait(READY_TIMEOUT)
        bad: list[str] = []
        touched = cycles = reads = 0

        def check(pos: int, tok: int, where: str) -> None:
            nonlocal touched, reads
            p = eng.price(pos).price
            lo, hi = PRICE_RANGE[tok]
            reads += 1
            if not lo <= p < hi:
                bad.append(f"token {tok} position {pos:#x} {where}: price {p}")
            touched += p != (150.0 if tok == TOKEN_A else 1500.0)

        end = time.monotonic() + SECONDS
        try:
            while time.monotonic() < end:
                tok = TOKEN_A if cycles % 2 == 0 else TOKEN_B
                pos = eng.open_position(150.0 if tok == TOKEN_A else 1500.0, 1.0, token=tok)
                check(pos, tok, "after open")
                for trig in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET,
                             Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
                    assert eng.transition(pos, trig) is Outcome.APPLIED
                    check(pos, tok, f"after {trig.name}")
                if cycles % 16 == 0:
                    for row in eng.snapshot():
                        lo, hi = PRICE_RANGE[int(row["token"])]
                        if not lo <= row["price"] < hi:
                            bad.append(f"snapshot row token {row['token']}: price {row['price']}")
                assert eng.release_position(pos) is Outcome.APPLIED
                cycles += 1
        finally:
            stop.set()
        print(f"\ntoken race: {cycles} cycles, {reads} reads, {touched} fed prices seen")
        assert not bad, f"{len(bad)} cross-token prices, first: {bad[:5]}"
        assert touched > 0, "the feeders never reached the positions: the test proves nothing"


@pytest.mark.shm_only
class TestTearPriceFault:
    """ENG_FAULT_TEAR_PRICE: the vector writes write the copy readers read, switch on only."""

    def test_tear_writes_the_read_copy_only_with_the_switch_on(self, make_engine):
        """Switch off: the copy readers read is left alone; on: it gets the new price too."""
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        ids = np.array([pos], dtype=np.uint64)

        def copies() -> list[float]:
            return sorted(float(eng._slot(slot).price[i].price) for i in (0, 1))

        eng.update_price(pos, 101.0)
        assert copies() == [100.0, 101.0]
        eng._set_fault(lib.ENG_FAULT_TEAR_PRICE)
        try:
            lib.eng_test_faults(0)
            try:
                eng.update_prices(ids, np.array([102.0]))
            finally:
                lib.eng_test_faults(1)
            assert copies() == [101.0, 102.0]    # the spare only: the fault was ignored
            eng.update_prices(ids, np.array([103.0]))
            assert copies() == [103.0, 103.0]    # the read copy was written under readers
            assert eng.update_token_price(0, 104.0) == 1
            assert copies() == [104.0, 104.0]
            eng.update_price(pos, 105.0)         # the single write never tears
            assert copies() == [104.0, 105.0]
        finally:
            eng._set_fault(0)
        p = eng.price(pos)
        assert (p.price, p.pnl_usd) == (105.0, 5.0)
