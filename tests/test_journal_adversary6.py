"""Adversary of the journal's append: per-account order when one change commits two objects.

A booked open (and a booked close) commits a slot and an account in one
record; deposits commit the account alone.  With no global latch each change
claims its record under its own object's lock: if a booked change claimed its
seq under the slot's lock but committed the account under the account's, the
account's records could be out of its commit order.

Forbidden outcome: walking the journal in seq order, an account record whose
version is not 1 + the account's records and booked records before it, or
whose open_positions is not the booked opens minus booked closes before it
(the account's records in an order that is not its commit order).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from journal_audit import (
    drain,
    journal_on,  # noqa: F401 (the make_engine fixture, journal on)
)

from engine import Engine, Trigger
from engine.errors import EngineError

pytestmark = pytest.mark.shm_only


def depositor(handle: str, acct: int, n: int, ready: Any, go: Any) -> None:
    """Child: ``n`` deposits (and every 5th a withdrawal) on ``acct``."""
    eng = Engine.attach(handle)
    ready.set()
    go.wait(60)
    for i in range(n):
        try:
            if i % 5 == 4:
                eng.withdraw(acct, 1)
            else:
                eng.deposit(acct, 1)
        except EngineError:
            pass   # a bounded refusal: recorded nowhere, checked by the walk


def booker(handle: str, acct: int, n: int, ready: Any, go: Any) -> None:
    """Child: ``n`` booked open -> close -> release cycles on ``acct``."""
    eng = Engine.attach(handle)
    ready.set()
    go.wait(60)
    for _ in range(n):
        try:
            pos = eng.open_position(10.0, 1.0, account=acct)
        except EngineError:
            continue
        for t in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
                  Trigger.EXIT_COMPLETED):
            try:
                eng.transition(pos, t, **({"exit_reason": 1}
                                          if t is Trigger.EXIT_CONDITION_MET else {}))
            except EngineError:
                break
        with contextlib.suppress(EngineError):
            eng.release_position(pos)


def walk(eng: Engine, acct: int) -> int:
    """Check every account record against the records before it; returns how many."""
    version = 0
    opened = 0
    checked = 0
    for e in drain(eng):
        if e.kind == "account" and e.id == acct:
            version += 1
            assert e.record.version == version, \
                f"seq {e.seq}: account version {e.record.version}, {version} changes " \
                f"recorded before and at it: the account's records out of its commit order"
            assert e.record.open_positions == opened, \
                f"seq {e.seq}: {e.record.open_positions} open positions, the journal's " \
                f"booked opens - closes before it say {opened}"
            checked += 1
        elif e.kind == "open" and e.record.account == acct:
            opened += 1   # the books it moved: the account record right after it
        elif e.kind == "transition" and e.record.account == acct and \
                e.state is not None and e.state.name == "CLOSED":
            opened -= 1
    assert version == eng.account(acct).version, (version, eng.account(acct))
    return checked


class TestAccountOrder:
    @pytest.mark.parametrize("n", [300, pytest.param(3000, marks=pytest.mark.slow)])
    def test_account_records_in_commit_order_with_bookings(self, make_engine: Any,
                                                           spawner: Any, n: int) -> None:
        """Deposits racing booked opens/closes on one account: its records in commit order."""
        eng = make_engine(capacity=64, max_accounts=2, journal_records=1 << 16)
        acct = eng.open_account(cash=10**6, max_exposure=10**5, max_positions=40,
                                max_loss=10**5)
        ctx = spawner.ctx
        go = ctx.Event()
        readies = [ctx.Event() for _ in range(4)]
        spawner.start(depositor, eng.handle, acct, n, readies[0], go)
        spawner.start(depositor, eng.handle, acct, n, readies[1], go)
        spawner.start(booker, eng.handle, acct, n // 5, readies[2], go)
        spawner.start(booker, eng.handle, acct, n // 5, readies[3], go)
        for r in readies:
            assert r.wait(60)
        go.set()
        spawner.join_all(300)
        checked = walk(eng, acct)
        print(f"{checked} account records checked against their bookings")
        assert checked > n // 2
