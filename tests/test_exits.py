"""Exits fired by the price write (issue 20): stop loss, take profit and
trailing stop fire EXIT_CONDITION_MET from MONITORING in the same call,
exit_reason and exit_price with it, exactly once; and the close books at
the fill."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import numpy as np
import pytest

from engine import (
    POSITION_SPEC,
    ExitReason,
    MachineSpec,
    Outcome,
    Rule,
    SpecError,
    State,
    Trigger,
)
from engine.spec import POSITION_FIELDS

BACKENDS = ("shm", "redis")
R = ExitReason


def armed(eng, entry=100.0, side=1, token=7, **levels):   # type: ignore[no-untyped-def]
    """A MONITORING position with the given exit levels."""
    pos = eng.open_position(entry_price=entry, amount=2.0, side=side, token=token, **levels)
    assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return pos


def fired(eng, pos):   # type: ignore[no-untyped-def]
    c = eng.context(pos)
    return eng.state(pos), c.exit_reason, c.exit_price


class TestExitSpec:
    def test_position_spec_arms_monitoring(self):
        """The default spec fires EXIT_CONDITION_MET from MONITORING; ExitReason codes."""
        assert POSITION_SPEC.exits == ("MONITORING", "EXIT_CONDITION_MET")
        assert [int(r) for r in R] == [0, 1, 2, 3]
        assert {"trailing_stop", "exit_price"} <= set(POSITION_SPEC.record.types)

    def _spec(self, fields=POSITION_FIELDS, exits=("LIVE", "HIT"), rules=None):   # type: ignore[no-untyped-def]
        rules = rules or [Rule.of("GO", "NEW", "LIVE"), Rule.of("HIT", "LIVE", "OUT"),
                          Rule.of("END", "OUT", "DONE")]
        return MachineSpec(states=["NEW", "LIVE", "OUT", "DONE"], triggers=["GO", "HIT", "END"],
                           rules=rules, initial="NEW", closed=["DONE"], fields=fields,
                           exits=exits, name="x")

    def test_custom_spec_builds(self):
        """A custom spec names its armed state and trigger; exits are in the fingerprint."""
        spec = self._spec()
        assert spec.exits == ("LIVE", "HIT")
        no_exits = MachineSpec(states=spec.states, triggers=spec.triggers, rules=spec.rules,
                               initial="NEW", closed=["DONE"], fields=POSITION_FIELDS, name="x")
        assert spec.fingerprint != no_exits.fingerprint

    @pytest.mark.parametrize("missing", ["exit_price", "exit_reason", "side", "entry_price"])
    def test_missing_field_is_named(self, missing):
        """A spec whose record lacks a field the exits use: SpecError naming it."""
        fields = {k: v for k, v in POSITION_FIELDS.items() if k != missing}
        with pytest.raises(SpecError, match=missing):
            self._spec(fields=fields)

    def test_no_level_at_all(self):
        """A record without any of stop_loss, take_profit, trailing_stop: SpecError."""
        fields = {k: v for k, v in POSITION_FIELDS.items()
                  if k not in ("stop_loss", "take_profit", "trailing_stop")}
        with pytest.raises(SpecError, match="at least one"):
            self._spec(fields=fields)

    def test_wrong_type_is_named(self):
        """A level of the wrong type: SpecError with the type it must have."""
        with pytest.raises(SpecError, match=r"stop_loss.*f8"):
            self._spec(fields={**POSITION_FIELDS, "stop_loss": "i8"})

    @pytest.mark.parametrize("exits, match", [
        (("NOPE", "HIT"), "armed state"), (("LIVE", "NOPE"), "trigger"),
        (("NEW", "HIT"), "no rule"), (("LIVE",), "pair"), ("LIVE", "pair")])
    def test_bad_exits(self, exits, match):
        """exits names a state and a trigger with a rule between them, or SpecError."""
        with pytest.raises(SpecError, match=match):
            self._spec(exits=exits)

    def test_rule_that_closes_or_stays_is_refused(self):
        """The exit rule must leave the armed state for a state that is not closed."""
        closing = [Rule.of("GO", "NEW", "LIVE"), Rule.of("HIT", "LIVE", "DONE")]
        with pytest.raises(SpecError, match="not closed"):
            self._spec(rules=closing)
        looping = [Rule.of("GO", "NEW", "LIVE"), Rule.of("HIT", "LIVE", "LIVE")]
        with pytest.raises(SpecError, match="leave the armed state"):
            self._spec(rules=looping)

    def test_guarded_rule_is_refused(self):
        """A guarded exit rule is refused: C fires it and cannot call a guard."""
        rules = [Rule.of("GO", "NEW", "LIVE"), Rule.of("HIT", "LIVE", "OUT", guard=_yes)]
        with pytest.raises(SpecError, match="guard"):
            self._spec(rules=rules)

    def test_open_position_levels_need_fields(self, make_engine):
        """open_position(stop_loss=) on a spec without that field: FieldError naming it."""
        from engine import FieldError
        fields = {k: v for k, v in POSITION_FIELDS.items() if k != "trailing_stop"}
        eng = make_engine(capacity=2, spec=self._spec(fields=fields))
        with pytest.raises(FieldError, match="trailing_stop"):
            eng.open_position(10.0, 1.0, trailing_stop=1.0)


def _yes(ctx, price):   # type: ignore[no-untyped-def]
    return True


class TestFiring:
    @pytest.mark.parametrize("side, levels, prices, reason", [
        (1, {"stop_loss": 95.0}, [96.0, 95.0], R.STOP_LOSS),
        (1, {"take_profit": 110.0}, [109.0, 110.0], R.TAKE_PROFIT),
        (1, {"trailing_stop": 3.0}, [104.0, 106.0, 103.5, 103.0], R.TRAILING_STOP),
        (-1, {"stop_loss": 105.0}, [104.0, 105.0], R.STOP_LOSS),
        (-1, {"take_profit": 90.0}, [91.0, 90.0], R.TAKE_PROFIT),
        (-1, {"trailing_stop": 3.0}, [96.0, 94.0, 96.5, 97.0], R.TRAILING_STOP),
    ])
    def test_crossing_fires_in_the_same_call(self, engine, side, levels, prices, reason):
        """The first price at or past a level fires in that call, with its reason and price."""
        pos = armed(engine, side=side, **levels)
        for p in prices[:-1]:
            engine.update_price(pos, p)
            assert fired(engine, pos) == (State.MONITORING, 0, 0.0), p
        engine.update_price(pos, prices[-1])
        assert fired(engine, pos) == (State.EXIT_PENDING, reason, prices[-1])
        assert engine.price(pos).price == prices[-1]

    def test_design_example(self, engine):
        """DESIGN.md's example: 94.9 below stop 95 fires STOP_LOSS at 94.9."""
        pos = armed(engine, stop_loss=95.0, take_profit=110.0, trailing_stop=3.0)
        engine.update_price(pos, 94.9)
        assert engine.state(pos) is State.EXIT_PENDING
        c = engine.context(pos)
        assert c.exit_reason == ExitReason.STOP_LOSS and c.exit_price == 94.9

    def test_levels_off_never_fire(self, engine):
        """Levels of 0 are off: no price fires."""
        pos = armed(engine)
        for p in (1e-9, 50.0, 1e12):
            engine.update_price(pos, p)
        assert fired(engine, pos) == (State.MONITORING, 0, 0.0)

    def test_stop_wins_over_trailing(self, engine):
        """A price past both the stop and the trailing level fires STOP_LOSS."""
        pos = armed(engine, stop_loss=95.0, trailing_stop=2.0)
        engine.update_price(pos, 90.0)
        assert fired(engine, pos) == (State.EXIT_PENDING, R.STOP_LOSS, 90.0)

    @pytest.mark.parametrize("path", [(), (Trigger.POSITION_OPENED, Trigger.PAUSE),
                                      (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET)])
    def test_not_armed_no_fire(self, engine, path):
        """CREATED, PAUSED or EXIT_PENDING: a crossing price fires nothing."""
        pos = engine.open_position(entry_price=100.0, amount=1.0, stop_loss=95.0)
        for t in path:
            assert engine.transition(pos, t) is Outcome.APPLIED
        state, version = engine.state(pos), engine.context(pos).version
        engine.update_price(pos, 90.0)
        assert engine.state(pos) is state
        assert engine.context(pos).version == version

    def test_peak_counts_only_while_armed(self, engine):
        """Prices written before the position is armed do not raise the trailing peak."""
        pos = engine.open_position(entry_price=100.0, amount=1.0, trailing_stop=3.0)
        engine.update_price(pos, 120.0)      # CREATED: not armed
        engine.transition(pos, Trigger.POSITION_OPENED)
        engine.update_price(pos, 98.0)       # peak still 100: 98 > 97
        assert engine.state(pos) is State.MONITORING
        engine.update_price(pos, 97.0)
        assert fired(engine, pos) == (State.EXIT_PENDING, R.TRAILING_STOP, 97.0)

    def test_fires_once(self, engine):
        """Further crossings after a fire change nothing: one commit, one exit counted."""
        pos = armed(engine, stop_loss=95.0)
        before = engine.metrics()["exit"].applied
        for p in (94.0, 93.0, 92.0):
            engine.update_price(pos, p)
        assert fired(engine, pos) == (State.EXIT_PENDING, R.STOP_LOSS, 94.0)
        assert engine.metrics()["exit"].applied == before + 1

    def test_cancel_rearms(self, engine):
        """EXIT_CANCELLED arms it again: the next crossing fires again, with its price."""
        pos = armed(engine, stop_loss=95.0)
        engine.update_price(pos, 94.0)
        assert engine.transition(pos, Trigger.EXIT_CANCELLED) is Outcome.APPLIED
        engine.update_price(pos, 93.5)
        assert fired(engine, pos) == (State.EXIT_PENDING, R.STOP_LOSS, 93.5)

    def test_update_prices_fires(self, engine):
        """A batch fires each crossing position and only those."""
        a = armed(engine, stop_loss=95.0)
        b = armed(engine, take_profit=110.0)
        c = armed(engine, stop_loss=95.0)
        engine.update_prices(np.array([a, b, c], dtype=np.uint64), np.array([94.0, 111.0, 96.0]))
        assert fired(engine, a) == (State.EXIT_PENDING, R.STOP_LOSS, 94.0)
        assert fired(engine, b) == (State.EXIT_PENDING, R.TAKE_PROFIT, 111.0)
        assert fired(engine, c) == (State.MONITORING, 0, 0.0)

    def test_update_token_price_fires(self, engine):
        """A token write fires every crossing position on the token, the paused one not."""
        a = armed(engine, token=5, stop_loss=95.0)
        b = armed(engine, token=5, stop_loss=90.0)
        c = armed(engine, token=5, stop_loss=95.0)
        engine.transition(c, Trigger.PAUSE)
        assert engine.update_token_price(5, 94.0) == 3
        assert fired(engine, a) == (State.EXIT_PENDING, R.STOP_LOSS, 94.0)
        assert fired(engine, b) == (State.MONITORING, 0, 0.0)
        assert fired(engine, c) == (State.PAUSED, 0, 0.0)

    @pytest.mark.shm_only
    def test_waiter_wakes(self, engine):
        """A thread asleep in wait_for_change is woken by the fire with EXIT_PENDING."""
        pos = armed(engine, stop_loss=95.0)
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(engine.wait_for_change(pos, timeout=60)))
        t.start()
        deadline = time.monotonic() + 30
        while not engine._slot(engine.slot_of(pos)).waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.update_price(pos, 94.0)
        t.join(90)
        assert got == [State.EXIT_PENDING]

    def test_custom_spec_fires_its_trigger(self, make_engine):
        """A custom spec's armed state fires its own trigger."""
        spec = TestExitSpec()._spec()
        eng = make_engine(capacity=4, spec=spec)
        pos = eng.open_position(entry_price=10.0, amount=1.0, side=-1, take_profit=8.0)
        assert eng.transition(pos, "GO") is Outcome.APPLIED
        eng.update_price(pos, 8.5)
        assert eng.state(pos).name == "LIVE"
        eng.update_price(pos, 7.5)
        c = eng.context(pos)
        assert (eng.state(pos).name, c.exit_reason, c.exit_price) == ("OUT", R.TAKE_PROFIT, 7.5)

    def test_halted_no_fire(self, engine):
        """While halted the price is written and nothing fires; after, the next crossing fires."""
        pos = armed(engine, stop_loss=95.0)
        engine.halt(True)
        try:
            engine.update_price(pos, 94.0)
            assert fired(engine, pos) == (State.MONITORING, 0, 0.0)
            assert engine.price(pos).price == 94.0
        finally:
            engine.halt(False)
        engine.update_price(pos, 93.0)
        assert fired(engine, pos) == (State.EXIT_PENDING, R.STOP_LOSS, 93.0)


class TestCloseAtFill:
    def _booked(self, eng, **levels):   # type: ignore[no-untyped-def]
        acct = eng.open_account(cash=10_000, max_exposure=10_000, max_positions=10,
                                max_loss=5_000)
        pos = eng.open_position(entry_price=100.0, amount=2.0, side=1, account=acct, **levels)
        eng.transition(pos, Trigger.POSITION_OPENED)
        return acct, pos

    def test_books_at_the_fill(self, engine):
        """EXIT_COMPLETED(exit_price=fill) books (fill - entry) x amount, not the last price."""
        acct, pos = self._booked(engine, stop_loss=95.0)
        engine.update_price(pos, 94.0)                   # fires at 94
        engine.transition(pos, Trigger.EXIT_STARTED)
        engine.update_price(pos, 99.0)                   # a feeder moves on
        assert engine.transition(pos, Trigger.EXIT_COMPLETED, exit_price=93.5) is Outcome.APPLIED
        assert engine.context(pos).exit_price == 93.5
        a = engine.account(acct)
        assert a.realized_pnl == Decimal("-13") and a.cash == Decimal(10_000 - 13)

    def test_books_at_the_last_price_without_a_fill(self, engine):
        """Without exit_price the close books at the last price written."""
        acct, pos = self._booked(engine)
        engine.update_price(pos, 104.0)
        for t in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
            assert engine.transition(pos, t) is Outcome.APPLIED
        assert engine.account(acct).realized_pnl == Decimal(8)


class TestJournaled:
    def test_fire_is_journaled_as_a_transition(self, make_engine):
        """A fire is one journal record: EXIT_CONDITION_MET to EXIT_PENDING, with its fields."""
        engine = make_engine(capacity=4, journal=True)
        pos = armed(engine, stop_loss=95.0)
        since = engine.journal_seq
        engine.update_price(pos, 94.0)
        evs = [e for e in engine.events(since=since, timeout=0.5) if e.kind == "transition"]
        assert [(e.id, e.state, e.trigger, e.record.exit_reason, e.record.exit_price)
                for e in evs] == [(pos, State.EXIT_PENDING, Trigger.EXIT_CONDITION_MET,
                                   ExitReason.STOP_LOSS, 94.0)]
