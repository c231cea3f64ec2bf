"""Hostile tests of the Redis backend: each one broke the code it was written against."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from engine import Engine, Outcome, State, Trigger, WaitTimeout
from engine.errors import ArgumentError, EngineError


def _exiting(e: Engine, acct: int) -> int:
    pos = e.open_position(1.0, 1000.0, side=1, token=1, account=acct)
    for t in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED):
        assert e.transition(pos, t) is Outcome.APPLIED
    return pos


class TestNothingHalfApplied:
    def test_a_closing_refused_by_the_books_leaves_the_record_untouched(self, made):
        """A close whose realized PnL cannot be booked (last x amount past
        int64 units) is refused; the fields given with it must not stick."""
        e = made()
        a = e.open_account(cash=1_000_000, max_exposure=1_000_000, max_positions=4,
                           max_loss=10**9)
        pos = _exiting(e, a)
        e.update_price(pos, 1e12)          # 1e15 money: 1e23 units, past int64
        before = e.context(pos)
        with pytest.raises(EngineError):
            e.transition(pos, Trigger.EXIT_COMPLETED, exit_reason=9)
        after = e.context(pos)
        assert after.exit_reason == before.exit_reason
        assert after.version == before.version
        assert e.state(pos) is State.EXITING
        acc = e.account(a)
        assert acc.reserved == 1000 and acc.open_positions == 1 and acc.cash == 1_000_000

    def test_realized_past_int64_is_refused_at_the_opening(self, made):
        """Large wins with the cash withdrawn between them: the opening whose
        worst close would pass realized's int64 top is refused at the opening
        (before: accepted, and its close refused for good); the books stay
        exact."""
        e = made()
        amount = 30_000_000.0      # notional 3e15 units; worst gain 1023x that
        a = e.open_account(cash=amount, max_exposure=amount, max_positions=4, max_loss=10**9)
        wins = 0
        with pytest.raises(EngineError, match="no room to book it"):
            for wins in range(10):   # noqa: B007 - three fit in int64, the fourth does not
                p = e.open_position(1.0, amount, side=1, token=1, account=a)
                for t in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET,
                          Trigger.EXIT_STARTED):
                    e.transition(p, t)
                e.update_price(p, 1024.0)                 # the top of its band
                assert e.transition(p, Trigger.EXIT_COMPLETED) is Outcome.APPLIED
                e.withdraw(a, e.account(a).cash - int(amount))
        assert wins == 3
        acc = e.account(a)
        assert acc.open_positions == 0 and acc.reserved == 0
        assert acc.cash == acc.opening_cash + acc.deposits - acc.withdrawals + acc.realized_pnl


class TestShardedKeys:
    def test_a_key_opened_on_an_account_of_another_shard_is_found_and_unique(self, made):
        e = made(capacity=16, shards=2)
        a = e.open_account(cash=10**6, max_exposure=10**6, max_positions=8, max_loss=10**6)
        shard = (a & 0xFFFFFF) % 2
        key = next(f"K{i}" for i in range(100) if zlib.crc32(f"K{i}".encode()) % 2 != shard)
        try:
            pos = e.open_position(100.0, 1.0, side=1, token=1, account=a, key=key)
        except ArgumentError:
            return   # refused as bind_key refuses a key of another shard: fine
        assert e.lookup(key) == pos
        with pytest.raises(EngineError):   # KeyExistsError: the key is taken
            e.open_position(100.0, 1.0, side=1, token=1, key=key)


class TestWaits:
    def test_a_wait_longer_than_the_url_timeout_is_a_timeout_not_a_server_error(self, made, url):
        e = made(url=url + "?timeout=0.3")
        pos = e.open_position(100.0, 1.0, side=1, token=1)
        with pytest.raises(WaitTimeout):
            e.wait_for_change(pos, timeout=1.5)
        assert e.state(pos) is State.CREATED


class TestBatches:
    def test_transition_many_reports_a_refused_close_as_its_error(self, made):
        """C mapped every error of one element but stale/not-open to CONFLICT
        (and a negative code packed as a byte read back as a bogus outcome,
        221): now the element's MoneyError is raised, with every outcome."""

        e = made()
        a = e.open_account(cash=1_000_000, max_exposure=1_000_000, max_positions=4,
                           max_loss=10**9)
        pos = _exiting(e, a)
        e.update_price(pos, 1e12)
        with pytest.raises(EngineError) as exc:
            e.transition_many(np.array([pos]), np.array([int(Trigger.EXIT_COMPLETED)]))
        assert type(exc.value).__name__ == "MoneyError"
        assert [int(x) for x in exc.value.outcomes] == [0x80 | 35]
        assert e.state(pos) is State.EXITING


class TestAccountsEdges:
    def test_withdrawals_past_int64_are_refused_whole(self, made):
        """Cumulative withdrawals can pass int64 while cash never does; the
        cash must not move when the withdrawals counter cannot."""
        e = made()
        big = 90_000_000_000                     # 9e18 units
        a = e.open_account(cash=big, max_exposure=1, max_positions=1, max_loss=1)
        e.withdraw(a, big)
        e.deposit(a, big)
        before = e.account(a)
        with pytest.raises(EngineError):
            e.withdraw(a, big)
        acc = e.account(a)
        assert (acc.cash, acc.withdrawals) == (before.cash, before.withdrawals)
        assert acc.cash == acc.opening_cash + acc.deposits - acc.withdrawals + acc.realized_pnl
