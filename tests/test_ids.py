"""Ids: an id names one opening of a slot; kept across release and reopen
it is refused by every call (StaleIdError), never applied to the new opening."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from owners_helpers import BRIEF_GUARD_SPEC, pword

from engine import Engine, NotOpenError, Outcome, SlotError, Trigger, WaitTimeout
from engine._native import lib
from engine.errors import StaleIdError


def id_calls() -> list[tuple[str, Callable[[Engine, int], Any]]]:
    """Every per-position call, as (name, call(eng, id))."""
    return [
        ("transition", lambda e, i: e.transition(i, Trigger.PAUSE)),
        ("transition ctx", lambda e, i: e.transition(i, Trigger.EXIT_CONDITION_MET,
                                                     exit_reason=3)),
        ("transition guarded", lambda e, i: e.transition(i, Trigger.EXIT_STARTED)),
        ("state", lambda e, i: e.state(i)),
        ("price", lambda e, i: e.price(i)),
        ("context", lambda e, i: e.context(i)),
        ("update_price", lambda e, i: e.update_price(i, 150.0)),
        ("wait_for_change", lambda e, i: e.wait_for_change(i, timeout=0.05)),
        ("release_position", lambda e, i: e.release_position(i)),
    ]


def batch_calls() -> list[tuple[str, Callable[[Engine, int], Any]]]:
    """update_prices of one id, as (name, call(eng, id)): an id whose opening
    is not open is skipped (the call returns how many it wrote), not refused."""
    return [
        ("update_prices", lambda e, i: e.update_prices(np.array([i], dtype=np.uint64),
                                                       np.array([150.0]))),
        ("update_prices int64", lambda e, i: e.update_prices(np.array([i], dtype=np.int64),
                                                             np.array([150.0]))),
    ]


ID_CALLS = id_calls()
BATCH_CALLS = batch_calls()
ALL_ID_CALLS = ID_CALLS + BATCH_CALLS


def observe(eng: Engine, pos: int) -> tuple[Any, ...]:
    """Everything a call on pos could change."""
    slot = eng.slot_of(pos)
    return (eng.state_word(slot), pword(eng, slot), eng.price(pos), eng.context(pos),
            int(eng._slot(slot).transitions), int(eng._slot(slot).opening))


def close_and_release(eng: Engine, pos: int) -> None:
    for trig in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
                 Trigger.EXIT_COMPLETED):
        assert eng.transition(pos, trig) is Outcome.APPLIED
    assert eng.release_position(pos) is Outcome.APPLIED


@pytest.fixture
def reopened(make_engine: Any) -> tuple[Engine, int, int]:
    """Capacity 1: a position opened, closed, released; the slot reopened."""
    eng = make_engine(capacity=1, spec=BRIEF_GUARD_SPEC)
    old = eng.open_position(100.0, 1.0, token=5)
    close_and_release(eng, old)
    new = eng.open_position(200.0, 2.0, token=6)
    assert eng.transition(new, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return eng, old, new


class TestStaleIds:
    """An id names one opening: after release (and reopen) it is refused by
    every per-position call, skipped by update_prices, and never reads or
    changes the new position."""

    @pytest.mark.parametrize("name, call", ID_CALLS, ids=[n for n, _ in ID_CALLS])
    def test_old_id_is_refused_and_changes_nothing(self, reopened, name, call):
        """A released opening's id raises StaleIdError and leaves the new position alone.

        The released opening's id raises StaleIdError and leaves the new
        position's state, price and context as they were; forbidden: reading or
        writing the new position.
        """
        eng, old, new = reopened
        before = observe(eng, new)
        with pytest.raises(StaleIdError):
            call(eng, old)
        assert observe(eng, new) == before

    @pytest.mark.parametrize("name, call", BATCH_CALLS, ids=[n for n, _ in BATCH_CALLS])
    def test_old_id_in_a_batch_is_skipped_and_changes_nothing(self, reopened, name, call):
        """update_prices skips a released opening's id and leaves the new position alone.

        update_prices skips the released opening's id: it returns 0 (nothing
        written) and leaves the new position as it was; forbidden: a refusal,
        or a price written into the new opening.
        """
        eng, old, new = reopened
        before = observe(eng, new)
        assert call(eng, old) == 0
        assert observe(eng, new) == before

    @pytest.mark.parametrize("name, call", ALL_ID_CALLS, ids=[n for n, _ in ALL_ID_CALLS])
    def test_new_id_works(self, reopened, name, call):
        """The current opening's id is served by every call."""
        eng, _, new = reopened
        with contextlib.suppress(WaitTimeout):
            out = call(eng, new)
            if name.startswith("update_prices"):
                assert out == 1

    def test_released_slot_refuses_old_id_before_reopen(self, make_engine):
        """A released, still-free slot's old id raises StaleIdError; update_prices skips it."""
        eng = make_engine(capacity=1)
        old = eng.open_position(100.0, 1.0)
        close_and_release(eng, old)
        for _, call in ID_CALLS:
            with pytest.raises(StaleIdError):
                call(eng, old)
        pw = pword(eng, 0)
        for _, call in BATCH_CALLS:
            assert call(eng, old) == 0
        assert pword(eng, 0) == pw

    def test_batches_of_stale_ids_racing_reopens_write_nothing(self, make_engine):
        """Batches of stale ids racing reopens of their slot write nothing.

        A thread hammers update_prices with ids of released openings while the
        main thread closes, releases and reopens the slot: every batch returns 0
        and each new opening keeps its opening price; forbidden: a stale id's
        price in a later opening, or a refusal.
        """
        eng = make_engine(capacity=1)
        history = [eng.open_position(100.0, 1.0)]
        stop, results, errors = threading.Event(), [], []

        def hammer() -> None:
            try:
                while not stop.is_set():
                    stale = np.array(history[:-1], dtype=np.uint64)
                    if len(stale):
                        results.append(eng.update_prices(stale, np.full(len(stale), 999.0)))
            except BaseException as e:   # the finding
                errors.append(e)

        t = threading.Thread(target=hammer)
        t.start()
        try:
            for _ in range(200):
                close_and_release(eng, history[-1])
                pos = eng.open_position(100.0, 1.0)
                history.append(pos)
                time.sleep(0.0005)
                assert eng.price(pos).price == 100.0
        finally:
            stop.set()
            t.join(10)
        assert not errors, errors
        assert results and set(results) == {0}

    def test_slot_of_and_id_of(self, reopened):
        """Old and new ids name one slot but differ; id_of and the snapshot give the new one."""
        eng, old, new = reopened
        assert old != new and eng.slot_of(old) == eng.slot_of(new) == 0
        assert eng.id_of(0) == new
        rows = eng.snapshot()
        assert [(int(r["id"]), int(r["slot"])) for r in rows] == [(new, 0)]

    @pytest.mark.parametrize("which", ["zero", "future opening"])
    @pytest.mark.parametrize("name, call", ALL_ID_CALLS, ids=[n for n, _ in ALL_ID_CALLS])
    def test_never_issued_id_is_not_open_not_stale(self, reopened, which, name, call):
        """An id never issued raises NotOpenError, not StaleIdError, and changes nothing.

        An id never issued (0, a future opening, a bare slot number) raises
        NotOpenError but not StaleIdError, and changes nothing.  update_prices
        refuses opening 0 from its arrays alone and skips a future opening
        (returns 0): it checks openings only under each slot's latch.
        """
        eng, _, new = reopened
        opening = int(eng._slot(0).opening)
        bad = {"zero": 0, "future opening": ((opening + 5) << lib.ENG_ID_SLOT_BITS) | 0}[which]
        before = observe(eng, new)
        if name.startswith("update_prices") and which == "future opening":
            assert call(eng, bad) == 0
        else:
            with pytest.raises(NotOpenError) as info:
                call(eng, bad)
            assert not isinstance(info.value, StaleIdError), info.value
        assert observe(eng, new) == before

    @pytest.mark.parametrize("name, call", ALL_ID_CALLS, ids=[n for n, _ in ALL_ID_CALLS])
    def test_slot_past_capacity_is_slot_error(self, reopened, name, call):
        """An id whose slot part is >= capacity raises SlotError, not NotOpenError."""
        eng, _, _ = reopened
        bad = (1 << lib.ENG_ID_SLOT_BITS) | eng.capacity
        with pytest.raises(SlotError) as info:
            call(eng, bad)
        assert not isinstance(info.value, NotOpenError), info.value
