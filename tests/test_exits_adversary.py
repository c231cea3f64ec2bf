"""Adversarial checks of exits fired by the price (issue 20): a fire never
breaks a guarded transition's lock, on either backend, and Redis's rule
decides as shared memory's on random price paths."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engine import POSITION_SPEC, BusyError, MachineSpec, Rule, State, Trigger
from engine.spec import POSITION_FIELDS

BACKENDS = ("shm", "redis")

_inside = threading.Event()
_writer_done = threading.Event()


def _holding_guard(ctx, price) -> bool:   # type: ignore[no-untyped-def]
    """Holds the transition lock until the crossing writer has finished (bounded)."""
    _inside.set()
    _writer_done.wait(5.0)
    return True


def _guarded_error_spec() -> MachineSpec:
    """The position lifecycle with ERROR_OCCURRED guarded by _holding_guard."""
    rules = [Rule.of(r.trigger, list(r.sources), r.target,
                     _holding_guard if r.trigger == "ERROR_OCCURRED" else None)
             for r in POSITION_SPEC.rules]
    return MachineSpec(states=list(State.__members__), triggers=list(Trigger.__members__),
                       rules=rules, initial="CREATED", closed=["CLOSED"], name="guarded_error",
                       fields=POSITION_FIELDS, exits=("MONITORING", "EXIT_CONDITION_MET"))


class TestFireVersusGuardLock:
    @pytest.mark.parametrize("call", ["update_price", "update_prices", "update_token_price"])
    def test_crossing_write_does_not_fire_under_a_guards_lock(self, make_engine, call):
        """A crossing price written while a guarded transition holds the lock neither fires
        nor publishes (BusyError); the guarded transition commits from the state its guard saw."""
        _inside.clear()
        _writer_done.clear()
        eng = make_engine(capacity=8, spec=_guarded_error_spec())
        pos = eng.open_position(entry_price=100.0, amount=1.0, token=1, stop_loss=95.0)
        eng.transition(pos, "POSITION_OPENED")
        result: list[object] = []

        def writer() -> None:
            assert _inside.wait(10.0)
            try:
                if call == "update_price":
                    eng.update_price(pos, 90.0)
                elif call == "update_prices":
                    eng.update_prices(np.array([pos], dtype=np.uint64), np.array([90.0]))
                else:
                    eng.update_token_price(1, 90.0)
                result.append("written")
            except BusyError:
                result.append("busy")
            finally:
                _writer_done.set()

        th = threading.Thread(target=writer)
        th.start()
        eng.transition(pos, "ERROR_OCCURRED")
        th.join(30.0)
        assert not th.is_alive()
        ctx = eng.context(pos)
        # forbidden: the fire committed EXIT_CONDITION_MET inside another transition's lock
        assert (result, eng.state(pos), ctx.exit_reason, ctx.exit_price) == (
            ["busy"], State.ERROR, 0, 0.0)
        assert eng.price(pos).price == 100.0
