"""Restore after a power cut that splits one commit's records: a booked close's
slot frame reached the disk, the account record that rides on it (native/keys.c
journal_fill_riders) did not.

The writer writes in batches that end anywhere (ENG_DJ_BATCH, a file's last
frame) and a power failure keeps any prefix of the unsynced frames, so the
journal's last whole record can be a booked close without its account record.
The restore books such a close itself (engine/durable/restore.py,
_booked_closes): forbidden is a closed position whose realized PnL is missing
from its account's cash and realized, or a booked open whose account misses
its publish.  An open cut from its key record comes back without its key
(xfail: the restore does not yet treat one commit's records as all or none).
"""

from __future__ import annotations

from typing import Any

import pytest
from durable_helpers import Made, made_engines, power_cut  # noqa: F401 (the made fixture)

from engine import Engine, Outcome, State, Trigger
from engine._native import lib
from engine.durable.frames import read

T = Trigger


def cut_and_restore(made: Made, eng: Engine, durable: int) -> Engine:
    """Flush and close ``eng``, keep its frames up to ``durable`` (the rest
    zeroed, as a power cut leaves them) and restore that."""
    eng.flush(10.0)
    eng.close()
    return made.restore(power_cut(made.jdir(eng), made.dir("cut"), durable))


def _booked_close(eng: Engine, exit_price: float | None) -> tuple[int, int, Any, int]:
    """A booked position opened at 100 x 2, priced at 110 and closed (at
    ``exit_price`` if given): (account, position, the account after the
    close, the close's seq)."""
    a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
    p = eng.open_position(100.0, 2.0, side=1, account=a)
    for trig in (T.POSITION_OPENED, T.EXIT_CONDITION_MET, T.EXIT_STARTED):
        eng.transition(p, trig)
    eng.update_price(p, 110.0)
    seq = eng.journal_seq + 1
    kw = {"exit_price": exit_price} if exit_price is not None else {}
    assert eng.transition(p, T.EXIT_COMPLETED, **kw) is Outcome.APPLIED
    return a, p, eng.account(a), seq


def _kinds_after(made: Made, eng: Engine, seq: int) -> list[int]:
    return [f.kind for f in read(str(made.jdir(eng))) if f.seq >= seq]


class TestSplitBookedClose:
    def test_close_at_a_journaled_price_without_its_account_record(self, made: Made) -> None:
        """Its account record lost: the close restores with its books at the journaled price."""
        eng = made.create(max_accounts=4, journal_prices=True)
        a, p, after, seq = _booked_close(eng, None)
        eng.flush(10.0)
        assert _kinds_after(made, eng, seq) == [lib.ENG_JK_TRANSITION, lib.ENG_JK_ACCOUNT]
        got = cut_and_restore(made, eng, seq)
        assert got.restore_report.last_seq == seq
        assert got.state(p) is State.CLOSED
        assert got.account(a) == after
        assert got.restore_report.unpriced_closes == 0

    def test_close_at_an_exit_price_without_its_account_record(self, made: Made) -> None:
        """Its account record lost, no prices journaled: a close at an exit price books exactly."""
        eng = made.create(max_accounts=4, journal_prices=False)
        a, p, after, seq = _booked_close(eng, 130.0)
        assert after.realized_pnl == 60
        got = cut_and_restore(made, eng, seq)
        assert got.state(p) is State.CLOSED
        assert got.account(a) == after
        assert got.restore_report.unpriced_closes == 0

    def test_close_at_no_known_price_is_reported(self, made: Made) -> None:
        """Its account record lost, no price known: booked at the entry and reported."""
        eng = made.create(max_accounts=4, journal_prices=False)
        a, p, after, seq = _booked_close(eng, None)
        got = cut_and_restore(made, eng, seq)
        assert got.state(p) is State.CLOSED
        books = got.account(a)
        assert (books.reserved, books.open_positions, books.version) == \
            (after.reserved, after.open_positions, after.version)
        assert books.realized_pnl == 0 and books.cash == books.opening_cash
        assert got.restore_report.unpriced_closes == 1


class TestSplitOpen:
    def test_booked_open_without_its_account_record(self, made: Made) -> None:
        """Its account record lost: a booked open restores with the books it published."""
        eng = made.create(max_accounts=4, journal_prices=True)
        a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
        seq = eng.journal_seq + 1
        p = eng.open_position(100.0, 2.0, side=1, account=a)
        after = eng.account(a)
        eng.flush(10.0)
        assert _kinds_after(made, eng, seq) == [lib.ENG_JK_OPEN, lib.ENG_JK_ACCOUNT]
        got = cut_and_restore(made, eng, seq)
        assert got.state(p) is State.CREATED
        assert got.account(a) == after

    @pytest.mark.xfail(strict=True, reason="a power cut between an open's record and its key "
                       "record (a rider) restores the open without its key; the restore "
                       "does not treat one commit's records as all or nothing")
    def test_keyed_open_without_its_key_record(self, made: Made) -> None:
        """An open whose key record was lost restores with its key, or not at all."""
        eng = made.create(max_accounts=4, journal_prices=True)
        seq = eng.journal_seq + 1
        p = eng.open_position(100.0, 2.0, key="order-1")
        eng.flush(10.0)
        assert _kinds_after(made, eng, seq) == [lib.ENG_JK_OPEN, lib.ENG_JK_KEY]
        got = cut_and_restore(made, eng, seq)
        restored = got.restore_report.last_seq == seq
        assert not restored or got.keys(p) == ("order-1",), \
            f"the open came back without its key: keys {got.keys(p)}"
