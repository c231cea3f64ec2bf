"""An open+close cycle booked on an account: the engine against the same
portfolio kept behind a ``multiprocessing.Lock`` (the cross-process form of
seed 003's lock-guarded portfolio), measured in the same run.

One cycle: open with a reservation (limits checked), four transitions to
CLOSED (the last books realized PnL and releases the reservation), release
the slot.  The lock-based peer keeps books and position states in shared
``RawArray``s and takes the lock for the open, for each transition and for
the close, as a guarded portfolio must for other processes to see
consistent books.

Run: ``python -m pytest bench/test_bench_accounts.py --benchmark-only``.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest

from engine import Engine, Trigger
from engine.accounts import money_of

STEPS = (int(Trigger.POSITION_OPENED), int(Trigger.EXIT_CONDITION_MET),
         int(Trigger.EXIT_STARTED), int(Trigger.EXIT_COMPLETED))
CASH, RESERVED, REALIZED, OPEN = range(4)


class LockedPortfolio:
    """Books and position states in shared memory behind one mp.Lock."""

    def __init__(self, capacity: int) -> None:
        ctx = mp.get_context("spawn")
        self.lock = ctx.Lock()
        self.books = ctx.RawArray("q", 4)
        self.books[CASH] = 10**17
        self.state = ctx.RawArray("i", capacity)
        self.entry = ctx.RawArray("d", capacity)
        self.amount = ctx.RawArray("d", capacity)
        self.price = ctx.RawArray("d", capacity)
        self.max_exposure, self.max_positions = 10**16, 10**6

    def open(self, slot: int, entry: float, amount: float) -> None:
        notional = money_of(entry, amount)
        with self.lock:
            b = self.books
            if b[OPEN] >= self.max_positions or b[RESERVED] + notional > self.max_exposure:
                raise RuntimeError("risk limit")
            if notional > b[CASH] - b[RESERVED]:
                raise RuntimeError("cash")
            b[RESERVED] += notional
            b[OPEN] += 1
            self.state[slot], self.entry[slot], self.amount[slot] = 1, entry, amount
            self.price[slot] = entry

    def step(self, slot: int, last: bool) -> None:
        with self.lock:
            self.state[slot] <<= 1
            if last:
                b = self.books
                notional = money_of(self.entry[slot], self.amount[slot])
                realized = money_of(self.price[slot], self.amount[slot]) - notional
                b[RESERVED] -= notional
                b[OPEN] -= 1
                b[CASH] += realized
                b[REALIZED] += realized

    def release(self, slot: int) -> None:
        with self.lock:
            self.state[slot] = 0


@pytest.mark.benchmark(group="account open+close cycle")
class TestAccountCycle:
    def test_engine_cycle(self, benchmark: Any) -> None:
        """open_position(account=) + 4 transitions (last one booked) + release."""
        eng = Engine.create(capacity=64)
        try:
            a = eng.open_account(10**9, 10**8, 10**6, 10**9)
            op, tr, rel = eng.open_position, eng.transition, eng.release_position

            def cycle() -> None:
                p = op(100.0, 2.0, 1, 0, None, a)
                for s in STEPS:
                    tr(p, s)
                rel(p)

            benchmark(cycle)
            acc = eng.account(a)
            assert acc.reserved == 0 and acc.open_positions == 0
        finally:
            eng.close()
            eng.unlink()

    def test_mp_lock_cycle(self, benchmark: Any) -> None:
        """The same cycle on a portfolio behind a multiprocessing.Lock."""
        pf = LockedPortfolio(64)

        def cycle() -> None:
            pf.open(0, 100.0, 2.0)
            for i in range(len(STEPS)):
                pf.step(0, i == len(STEPS) - 1)
            pf.release(0)

        benchmark(cycle)
        assert pf.books[RESERVED] == 0
