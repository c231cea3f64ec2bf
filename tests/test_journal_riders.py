"""The records that ride on a slot commit: an open's key and a booked
change's account books, recorded with the position's own record, all or
none, wherever the writer dies (see "riders" in native/keys.c).

Forbidden: a committed open without its key's record, a key record for an
open that did not commit; an account whose books moved by a booked open or
close without the record of its books, or a record of books it never had.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from typing import Any

import pytest
from test_journal import FAULTS, SLOT_MASK, assert_record_iff_commit, drain

from engine import Engine, Trigger
from engine._native import lib


@pytest.fixture
def make_engine(make_engine: Any) -> Any:
    """conftest's make_engine with the journal on."""
    def make(capacity: int = 8, **kw: Any) -> Any:
        kw.setdefault("journal", True)
        return make_engine(capacity=capacity, **kw)
    return make


def die_in(handle: Any, fault: int, op: str, pos: int, acct: int) -> None:
    """Child: switch ``fault`` on and run ``op``; the fault kills it."""
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    if op == "keyed open":
        eng.open_position(50.0, 1.0, key="K-1")
    elif op == "booked open":
        eng.open_position(50.0, 1.0, account=acct)
    elif op == "booked close":
        eng.transition(pos, Trigger.EXIT_COMPLETED, exit_price=12.5)
    os._exit(3)   # the fault did not fire


def account_records(eng: Engine, acct: int) -> list[Any]:
    return [e for e in drain(eng) if e.kind == "account" and e.id == acct]


class TestRidersUnderKills:
    @pytest.mark.parametrize("op", ["keyed open", "booked open", "booked close"])
    @pytest.mark.parametrize("fault", FAULTS)
    def test_riders_are_recorded_iff_the_position_commits(self, make_engine: Any, fault: str,
                                                          op: str) -> None:
        """SIGKILL at each step: a key or books record exists iff the position's commit does."""
        eng = make_engine(max_accounts=2)
        acct = eng.open_account(10_000, 10_000, 5, 5_000)
        pos = eng.open_position(10.0, 2.0, side=1, account=acct)
        for t in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED):
            eng.transition(pos, t)
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=die_in, args=(eng.handle, getattr(lib, fault), op, pos, acct))
        p.start()
        p.join(60)
        eng._set_fault(0)
        if p.exitcode == 3:
            pytest.skip(f"{fault} is not on the path of a {op}")
        assert p.exitcode == -signal.SIGKILL, f"the fault did not fire: exit {p.exitcode}"
        eng.recover()
        evs = assert_record_iff_commit(eng)
        # every record of a commit right after it: the key's, then the books'
        for i, ev in enumerate(evs):
            if ev.kind == "key":
                assert evs[i - 1].kind == "open" and evs[i - 1].id == ev.id
        owner = eng.lookup("K-1")
        keyed = [e for e in evs if e.kind == "key" and e.record == b"K-1"]
        assert len(keyed) == (owner is not None), "the key and its record disagree"
        if owner is not None:
            assert keyed[0].id == owner
        books = eng.account(acct)
        recs = account_records(eng, acct)
        assert len(recs) == books.version, "a booked change without its books' record"
        assert recs[-1].record == books, "the last books recorded are not the account's"
        slots = {e.id & SLOT_MASK for e in evs if e.kind in ("open", "transition")}
        assert slots, "no position record at all"
