"""Orders as venues send them: a fill after a cancel or an expiry was
acknowledged is applied, a custom spec may let a closed state be left, and
only booking on an account needs a closing that happens once (issue 20)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from engine import ORDER_SPEC, POSITION_SPEC, MachineSpec, Outcome, Rule, SpecError
from engine.spec import POSITION_FIELDS

BACKENDS = ("shm", "redis")


def reopening_spec() -> MachineSpec:
    """The position record on a lifecycle whose closed state can be left."""
    return MachineSpec(
        states=["NEW", "LIVE", "DONE"], triggers=["GO", "END", "AGAIN"],
        rules=[Rule.of("GO", "NEW", "LIVE"), Rule.of("END", "LIVE", "DONE"),
               Rule.of("AGAIN", "DONE", "LIVE")],
        initial="NEW", closed=["DONE"], name="reopening", fields=POSITION_FIELDS)


def to_state(eng, oid, *triggers):   # type: ignore[no-untyped-def]
    for t in triggers:
        assert eng.transition(oid, t) is Outcome.APPLIED, t


class TestLateFills:
    @pytest.mark.parametrize("closed_by", [("SUBMIT", "ACCEPT", "CANCEL"),
                                           ("SUBMIT", "ACCEPT", "EXPIRE")])
    @pytest.mark.parametrize("fill", ["PARTIAL_FILL", "FILL"])
    def test_late_fill_applies_with_its_fields(self, make_engine, closed_by, fill):
        """A (partial) fill on a CANCELED or EXPIRED order applies, its fields with it."""
        eng = make_engine(capacity=4, spec=ORDER_SPEC)
        S = ORDER_SPEC.State
        oid = eng.open(key="cl-late", qty=5.0, leaves_qty=5.0, side=1)
        to_state(eng, oid, *closed_by)
        assert eng.transition(oid, fill, filled_qty=2.0, avg_px=100.5) is Outcome.APPLIED
        assert eng.state(oid) is (S.FILLED if fill == "FILL" else S.PARTIALLY_FILLED)
        c = eng.context(oid)
        assert (c.filled_qty, c.avg_px) == (2.0, 100.5)

    def test_other_closed_states_stay_closed(self, make_engine):
        """A fill on a REJECTED, DENIED or FILLED order is still INVALID and writes nothing."""
        eng = make_engine(capacity=4, spec=ORDER_SPEC)
        for path in (("SUBMIT", "REJECT"), ("DENY",), ("SUBMIT", "FILL")):
            oid = eng.open(qty=1.0)
            to_state(eng, oid, *path)
            before = eng.context(oid)
            assert eng.transition(oid, "FILL", filled_qty=9.0) is Outcome.INVALID
            assert eng.context(oid) == before

    def test_late_fill_then_release(self, make_engine):
        """An order filled late is closed again and releases like any other."""
        eng = make_engine(capacity=4, spec=ORDER_SPEC)
        oid = eng.open(key="cl-r", qty=1.0)
        to_state(eng, oid, "SUBMIT", "ACCEPT", "CANCEL", "FILL")
        assert eng.release_position(oid) is Outcome.APPLIED
        assert eng.lookup("cl-r") is None


class TestLeavingClosed:
    def test_spec_with_account_field_that_leaves_closed_loads(self):
        """A spec with the position record may let a closed state be left."""
        spec = reopening_spec()
        assert spec.reopens is not None and "AGAIN" in spec.reopens
        assert POSITION_SPEC.reopens is None

    def test_it_runs_without_an_account(self, make_engine):
        """Positions of it open, close, reopen and close again; nothing is booked."""
        eng = make_engine(capacity=4, spec=reopening_spec())
        pos = eng.open(entry_price=10.0, amount=1.0, side=1, token=3)
        to_state(eng, pos, "GO", "END", "AGAIN", "END")
        assert eng.state(pos).name == "DONE"
        assert eng.release_position(pos) is Outcome.APPLIED

    def test_booking_on_it_is_refused_at_open(self, make_engine):
        """open(account=) on it raises SpecError naming the rule; the account is untouched."""
        eng = make_engine(capacity=4, spec=reopening_spec())
        acct = eng.open_account(cash=1000, max_exposure=1000, max_positions=5, max_loss=500)
        before = eng.account(acct)
        with pytest.raises(SpecError, match=r"AGAIN.*DONE"):
            eng.open(entry_price=10.0, amount=1.0, side=1, token=3, account=acct)
        with pytest.raises(SpecError, match="AGAIN"):
            eng.open_position(10.0, 1.0, account=acct)
        after = eng.account(acct)
        assert (after.reserved, after.open_positions, after.cash) == (0, 0, Decimal(1000))
        assert after.version == before.version
        assert eng.snapshot().size == 0
