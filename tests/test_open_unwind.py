"""eng_open's unwind (native/positions.c, "open and release"): a refusal on a
slot it has locked leaves that slot as it was -- the word unlocked, no key
record held for the opening that was never issued, no token index link of a
free slot -- whether the open then tries another slot or gives up.

The undo paths the other tests never reach (checked with a coverage build of
the suite's key, token index, account and ownership tests): a live writer on a
free slot's price latch (open tries the next slot), the token's chain busy with
a key inserted, and an account's refusal at the latch with a key inserted.
Each test here failed against a mutated eng_open that skips that path's
key drop or token index drop.  The chain-busy case is SIMULATED by writing
this (live) process's token into every bucket word through cffi, as a
stopped walker holding the lock would leave it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from procs import READY_TIMEOUT, sigkill

from engine import BusyError, Engine, Outcome, RiskLimitError, State, Trigger
from engine._native import lib

JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)

TOKEN_MASK = int(lib.ENG_TOKEN_MASK)
CLOSE = (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
         Trigger.EXIT_COMPLETED)


def close_and_release(eng: Engine, pos: int) -> None:
    """CREATED -> CLOSED -> free."""
    for trig in CLOSE:
        assert eng.transition(pos, trig) is Outcome.APPLIED
    assert eng.release_position(pos) is Outcome.APPLIED


def stray_keys(eng: Engine) -> list[tuple[int, int, int]]:
    """(slot, record, id) of every key record held for an id that is not its
    slot's open opening (a key an unwind should have dropped)."""
    kpp, out = int(eng._seg.kpp), []
    for slot in range(eng.capacity):
        sl = eng._slot(slot)
        free = (int(sl.word) & lib.ENG_SW_STATE_MASK) == 0
        for r in range(kpp):
            tag = int(eng._seg.keyrecs[slot * kpp + r].tag)
            if tag & 0xFF != lib.ENG_KR_HELD:
                continue
            rid = tag >> 8
            if free or rid >> lib.ENG_ID_SLOT_BITS != int(sl.opening):
                out.append((slot, r, rid))
    return out


def assert_clean(eng: Engine) -> None:
    """No slot locked, no stray key record, no free slot on a chain."""
    locked = [s for s in range(eng.capacity) if eng.state_word(s) & lib.ENG_SW_LOCK]
    assert not locked, f"slots left locked: {locked}"
    assert not stray_keys(eng), f"key records left held: {stray_keys(eng)}"
    missing, free_linked, misplaced, _ = eng._tindex_check()
    assert (missing, free_linked, misplaced) == (0, 0, 0), eng._tindex_check()


def _hold_latch(handle: Any, pos: int, ready: Any) -> None:
    """Take pos's price latch and keep it (a live writer that stopped)."""
    eng = Engine.attach(handle)
    assert lib.eng_test_hold(eng._seg, 1, pos) == 0
    ready.set()
    time.sleep(600)


class TestBusyPriceLatch:
    """A live process sits on a free slot's price latch: open retries."""

    def test_refused_slot_is_left_as_it_was_and_the_next_slot_opens(self, make_engine, spawner):
        """The latched slot keeps no key record, chain link or lock; the open lands on slot 1."""
        eng = make_engine(capacity=2)
        p = eng.open_position(100.0, 1.0, 1, token=7)   # alloc hint 0: slot 0
        q = eng.open_position(100.0, 1.0, 1, token=7)   # slot 1
        assert (eng.slot_of(p), eng.slot_of(q)) == (0, 1)
        ready = spawner.ctx.Event()
        holder = spawner.start(_hold_latch, eng.handle, p, ready)
        try:
            assert ready.wait(READY_TIMEOUT), "the latch holder did not start"
            close_and_release(eng, p)
            close_and_release(eng, q)
            before = eng.state_word(0)
            x = eng.open_position(100.0, 1.0, 1, token=7, key="x")   # hint 2: slot 0 first
            assert eng.slot_of(x) == 1, "the open did not try the latched slot first"
            assert eng.state_word(0) == before, "the refused slot's word changed"
            assert eng.lookup("x") == x
            assert_clean(eng)
            assert eng._tindex_slots(7) == [1]
        finally:
            sigkill(holder)
        eng.recover()   # the holder is dead: its latch goes
        y = eng.open_position(100.0, 1.0, 1, token=7, key="y")
        assert eng.slot_of(y) == 0 and eng.lookup("y") == y and eng.lookup("x") == x
        assert sorted(eng._tindex_slots(7)) == [0, 1]
        assert_clean(eng)


class TestBusyChainWithKey:
    """The token's chain stays busy (SIMULATED: every bucket word holds this
    live process's token): the open gives up after inserting its key."""

    def test_refused_open_drops_its_key(self, make_engine):
        """BusyError; the key record is dropped, the key is free, the slot unlocked."""
        eng = make_engine(capacity=4)
        n = int(eng._seg.tindex_buckets)
        words = eng._seg.tindex
        for b in range(n):
            words[b] = int(words[b]) | int(eng._seg.token)
        try:
            with pytest.raises(BusyError):
                eng.open_position(100.0, 1.0, 1, token=7, key="k")
            assert eng.lookup("k") is None
            assert not stray_keys(eng), f"key records left held: {stray_keys(eng)}"
        finally:
            for b in range(n):
                words[b] = int(words[b]) & ~TOKEN_MASK
        assert_clean(eng)
        pos = eng.open_position(100.0, 1.0, 1, token=7, key="k")
        assert eng.lookup("k") == pos and eng.state(pos) is State.CREATED
        assert_clean(eng)


class TestAccountRefusalWithKey:
    """The account refuses at the latch (its position count is full)."""

    def test_refused_open_drops_its_key_and_link(self, make_engine):
        """RiskLimitError; the key record and the chain link are dropped, nothing opens."""
        eng = make_engine(capacity=4, max_accounts=1)
        a = eng.open_account(10_000, 10_000, 1, 100)
        eng.open_position(100.0, 1.0, 1, token=7, account=a, key="first")
        rows = len(eng.snapshot())
        with pytest.raises(RiskLimitError):
            eng.open_position(100.0, 1.0, 1, token=7, account=a, key="k")
        assert eng.lookup("k") is None and len(eng.snapshot()) == rows
        assert_clean(eng)
        assert len(eng._tindex_slots(7)) == 1
        pos = eng.open_position(100.0, 1.0, 1, token=7, key="k")
        assert eng.lookup("k") == pos
        assert_clean(eng)
