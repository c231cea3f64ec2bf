"""Token updates at 1M positions, vector calls at 10k, batch prices at 1M,
each beside its floor measured in the same run.

* ``update_token_price`` with 10 positions on the token in a 1M-position
  engine (100 000 tokens of 10 positions each), against its same-shape floor
  (a NaN price, refused before any work) and ten ``update_price`` calls (the
  work it replaces).  Unit: one call.
* ``states`` / ``prices`` / ``transition_many`` of 10 000 ids in one C call,
  against the same call with no ids (the fixed cost) and a numpy copy of the
  ids.  Unit: one element.
* ``update_prices`` of 1M slots in one C call against a numpy copy of 128
  bytes per slot (1M x 128 B).  Unit: one slot.
* ``update_prices`` of the 10k slots of the session engine (public call and
  raw) against a numpy copy of 128 bytes per slot (10k x 128 B).  Unit: one
  slot.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from conftest import CallTimer

from engine import Engine, Trigger
from engine._native import ffi, lib

BIG = 1_000_000
PER_TOKEN = 10
VEC = 10_000


@pytest.fixture(scope="module")
def big() -> Iterator[Engine]:
    """1M open positions, PER_TOKEN per token; token 7 is the measured one."""
    eng = Engine.create(capacity=BIG, keys_per_position=0)
    try:
        op = eng.open_position
        ids = [op(100.0, 1.0, 1, token=i // PER_TOKEN) for i in range(BIG)]
        eng._big_ids = np.array(ids, dtype=np.uint64)  # type: ignore[attr-defined]
        yield eng
    finally:
        eng.close()
        eng.unlink()


@pytest.mark.benchmark(group="token index (us per round = ns per call)")
class TestTokenPrice:
    def test_floor_token_price_shape(self, timer: CallTimer, big: Engine) -> None:
        """Same signature, refused before any work (NaN price)."""
        timer.calls("floor_token_price_shape", ["f(seg, t, p)"],
                    f=lib.eng_update_token_price, seg=big._seg, t=7, p=float("nan"))

    def test_ten_update_price(self, timer: CallTimer, big: Engine) -> None:
        """Ten raw update_price calls on the token's ten positions (per call of ten)."""
        ids = [int(i) for i in big._big_ids[70:80]]  # type: ignore[attr-defined]
        body = ["; ".join(f"f(seg, {i}, 101.0)" for i in ids)]
        timer.calls("ten_update_price_raw", body, f=lib.eng_update_price, seg=big._seg)

    def test_update_token_price_raw(self, timer: CallTimer, big: Engine) -> None:
        """lib.eng_update_token_price: 10 positions on the token, 1M in the engine."""
        assert lib.eng_update_token_price(big._seg, 7, 101.0) == PER_TOKEN
        timer.calls("update_token_price_raw", ["f(seg, t, p)"],
                    f=lib.eng_update_token_price, seg=big._seg, t=7, p=101.0)

    def test_update_token_price(self, timer: CallTimer, big: Engine) -> None:
        """Engine.update_token_price (GIL released around the walk)."""
        assert big.update_token_price(7, 102.0) == PER_TOKEN
        timer.calls("update_token_price", ["f(7, 102.0)"], f=big.update_token_price)


@pytest.mark.benchmark(group="batch at 1M (s per round of one call)")
class TestBatchBig:
    def test_numpy_copy_128(self, timer: CallTimer) -> None:
        """Floor: numpy copy of 128 bytes per slot, 1M slots."""
        src = np.ones((BIG, 16), dtype=np.float64)
        dst = np.empty_like(src)
        timer.rounds("numpy_copy_128B_1M", lambda: np.copyto(dst, src), BIG, unit="slot")

    def test_update_prices_1m_raw(self, timer: CallTimer, big: Engine) -> None:
        """lib.eng_update_prices over 1M slots in one call."""
        ids = big._big_ids  # type: ignore[attr-defined]
        prices = np.linspace(90.0, 110.0, BIG)
        sbuf, pbuf = ffi.from_buffer("uint64_t[]", ids), ffi.from_buffer("double[]", prices)
        bad, written = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        seg, f = big._seg, lib.eng_update_prices
        assert f(seg, sbuf, pbuf, BIG, bad, written) == 0 and written[0] == BIG
        timer.rounds("update_prices_1M_raw", lambda: f(seg, sbuf, pbuf, BIG, bad, written),
                     BIG, unit="slot")


@pytest.mark.benchmark(group="batch at 10k (s per round of one call)")
class TestBatchSmall:
    def test_numpy_copy_128_10k(self, timer: CallTimer) -> None:
        """Floor: numpy copy of 128 bytes per slot, 10k slots."""
        src = np.ones((VEC, 16), dtype=np.float64)
        dst = np.empty_like(src)
        timer.rounds("numpy_copy_128B_10k", lambda: np.copyto(dst, src), VEC, unit="slot")

    def test_update_prices_10k(self, timer: CallTimer, engine: Engine) -> None:
        """Engine.update_prices of the 10k open positions (uint64 ids, float64 prices)."""
        ids = np.array([engine.id_of(i) for i in range(VEC)], dtype=np.uint64)
        prices = np.linspace(90.0, 110.0, VEC)
        assert engine.update_prices(ids, prices) == VEC
        timer.rounds("update_prices_10k", lambda: engine.update_prices(ids, prices), VEC,
                     unit="slot")

    def test_update_prices_10k_raw(self, timer: CallTimer, engine: Engine) -> None:
        """lib.eng_update_prices over the 10k slots on prepared buffers."""
        ids = np.array([engine.id_of(i) for i in range(VEC)], dtype=np.uint64)
        prices = np.linspace(90.0, 110.0, VEC)
        sbuf, pbuf = ffi.from_buffer("uint64_t[]", ids), ffi.from_buffer("double[]", prices)
        bad, written = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        seg, f = engine._seg, lib.eng_update_prices
        assert f(seg, sbuf, pbuf, VEC, bad, written) == 0 and written[0] == VEC
        timer.rounds("update_prices_10k_raw", lambda: f(seg, sbuf, pbuf, VEC, bad, written),
                     VEC, unit="slot")


@pytest.mark.benchmark(group="vector calls at 10k (s per round of one call)")
class TestVector:
    @pytest.fixture
    def ids(self, engine: Engine) -> np.ndarray:
        return np.array([engine.id_of(i) for i in range(VEC)], dtype=np.uint64)

    def test_floor_ids_copy(self, timer: CallTimer, ids: np.ndarray) -> None:
        """Floor: a numpy copy of the 10k ids."""
        timer.rounds("floor_vec_ids_copy", ids.copy, VEC, unit="element")

    def test_floor_vector_call_empty(self, timer: CallTimer, engine: Engine) -> None:
        """Floor: Engine.states of no ids (the call's fixed cost), per 10k elements."""
        empty = np.zeros(0, dtype=np.uint64)
        timer.rounds("floor_vec_call_empty", lambda: engine.states(empty), VEC, unit="element")

    def test_states(self, timer: CallTimer, engine: Engine, ids: np.ndarray) -> None:
        timer.rounds("states_10k", lambda: engine.states(ids), VEC, unit="element")

    def test_prices(self, timer: CallTimer, engine: Engine, ids: np.ndarray) -> None:
        timer.rounds("prices_10k", lambda: engine.prices(ids), VEC, unit="element")

    def test_transition_many(self, timer: CallTimer, engine: Engine, ids: np.ndarray) -> None:
        """PAUSE then RESUME of all 10k, alternating: every element applies."""
        pause = np.full(VEC, Trigger.PAUSE.value, dtype=np.uint32)
        resume = np.full(VEC, Trigger.RESUME.value, dtype=np.uint32)
        flip = [pause, resume]

        def round_() -> None:
            out = engine.transition_many(ids, flip[0])
            flip.reverse()
            assert out[0] == 0

        timer.rounds("transition_many_10k", round_, VEC, unit="element")
        if flip[0] is resume:   # leave every position MONITORING
            engine.transition_many(ids, resume)
