"""halt(): a halted engine refuses every change (HALTED) and commits nothing,
not even a transition whose guard was running when the halt came."""

from __future__ import annotations

from typing import Any

import pytest
from api_helpers import opened, word_of
from owners_helpers import LOCK, sw_gen, sw_state

from engine import Engine, MachineSpec, NotOpenError, Outcome, Rule, Trigger

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)


#: the Engine the halting guard calls halt() through (set by the test, taken once)
_HALTER: dict[str, Engine] = {}


def halting_guard(*_: Any) -> bool:
    """Approves, after another Engine turned the emergency stop on (once)."""
    other = _HALTER.pop("eng", None)
    if other is not None:
        other.halt(True)
    return True


HALT_GUARD_SPEC = MachineSpec(
    states=["IDLE", "FIRED"], triggers=["FIRE", "RESET"],
    rules=[Rule.of("FIRE", "IDLE", "FIRED", guard=halting_guard),
           Rule.of("RESET", "FIRED", "IDLE")],
    initial="IDLE", name="own_halt_guard")


class TestHalt:
    def test_halt_stops_transitions_not_prices(self, engine):
        """Halted: transitions return HALTED and change nothing; prices update."""
        pos = opened(engine)
        word, ctx = word_of(engine, pos), engine.context(pos)
        engine.halt()
        assert engine.transition(pos, Trigger.PAUSE) is Outcome.HALTED
        assert engine.transition(pos, "PAUSE") is Outcome.HALTED
        assert engine.transition(pos, Trigger.PAUSE, exit_reason=1) is Outcome.HALTED
        assert engine.transition(pos, Trigger.RESUME) is Outcome.HALTED   # even if invalid
        assert word_of(engine, pos) == word and engine.context(pos) == ctx
        engine.update_price(pos, 120.0)
        assert engine.price(pos).price == 120.0
        assert engine.update_token_price(7, 121.0) == 1
        engine.halt(False)
        assert engine.transition(pos, Trigger.PAUSE) is Outcome.APPLIED

    def test_never_opened_slot_raises_while_halted(self, engine):
        """A never-opened slot raises NotOpenError even while halted."""
        engine.halt()
        try:
            with pytest.raises(NotOpenError):
                engine.transition(3, Trigger.PAUSE)
            with pytest.raises(NotOpenError):
                engine.transition(3, Trigger.PAUSE, exit_reason=1)
        finally:
            engine.halt(False)

    def test_halt_is_shared_by_every_attached_engine(self, engine):
        """A halt set by one process view stops transitions in every other."""
        pos = opened(engine)
        with Engine.attach(engine.name, url=engine.url) as other:
            other.halt()
            try:
                assert engine.transition(pos, Trigger.PAUSE) is Outcome.HALTED
            finally:
                other.halt(False)
        assert engine.transition(pos, Trigger.PAUSE) is Outcome.APPLIED


@pytest.mark.shm_only
class TestHaltDuringGuard:
    """halt() stops a guarded transition whose guard is still running."""

    def test_halt_while_guard_runs_returns_halted(self, make_engine):
        """A halt() during the guard makes the transition return HALTED with nothing changed.

        Another Engine calls halt() while the guard runs (the guard then says
        yes): the transition returns HALTED, state, generation and context are
        unchanged; forbidden: APPLIED after halt() returned.
        """
        eng = make_engine(capacity=2, spec=HALT_GUARD_SPEC)
        other = Engine.attach(eng.handle)
        pos = eng.open_position(100.0, 1.0)
        slot = eng.slot_of(pos)
        w0, ctx0 = eng.state_word(slot), eng.context(pos)
        _HALTER["eng"] = other
        try:
            outcome = eng.transition(pos, "FIRE", exit_reason=5)
            assert "eng" not in _HALTER, "the guard did not run"
            w = eng.state_word(slot)
            assert outcome is Outcome.HALTED, f"halted during the guard, yet {outcome!r}"
            assert not w & LOCK and (sw_state(w), sw_gen(w)) == (sw_state(w0), sw_gen(w0))
            assert eng.state(pos) == HALT_GUARD_SPEC.State["IDLE"]
            assert eng.context(pos) == ctx0
        finally:
            _HALTER.clear()
            other.halt(False)
            other.close()
        assert eng.transition(pos, "FIRE", exit_reason=5) is Outcome.APPLIED
        assert eng.context(pos).exit_reason == 5
