"""metrics(): per-operation counters that add up (applied, invalid,
conflicts, rejected, halted, errors)."""

from __future__ import annotations

import numpy as np
from api_helpers import opened

from engine import Engine, Outcome, Trigger

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)

OUTCOME_FIELDS = ("applied", "invalid", "conflicts", "rejected", "halted", "errors")


def assert_counts_add_up(metrics) -> None:
    for op, m in metrics.items():
        assert m.attempts == sum(getattr(m, f) for f in OUTCOME_FIELDS), (op, m)


class TestMetrics:
    def test_counts_add_up_and_match_operations(self, engine):
        """Attempts equal the sum of outcomes, and counts match the ops done."""
        pos = engine.open_position(100.0, 1.0)
        engine.transition(pos, Trigger.POSITION_OPENED)        # applied
        engine.transition(pos, Trigger.POSITION_OPENED)        # invalid
        engine.transition(pos, Trigger.PAUSE)                  # applied
        engine.halt()
        engine.transition(pos, Trigger.RESUME)                 # halted
        engine.halt(False)
        engine.transition(pos, Trigger.RESUME, exit_reason=2)  # slow path, applied
        engine.update_price(pos, 101.0)
        engine.update_prices(np.array([pos]), np.array([102.0]))
        engine.update_token_price(0, 103.0)
        m = engine.metrics()
        assert_counts_add_up(m)
        t = m["transition"]
        assert (t.attempts, t.applied, t.invalid, t.halted, t.errors) == (4, 2, 1, 1, 0)
        assert t.success_rate == 0.5
        tc = m["transition_ctx"]
        assert (tc.attempts, tc.applied, tc.errors) == (1, 1, 0)
        assert (m["open"].attempts, m["open"].applied) == (1, 1)
        assert (m["price"].attempts, m["price"].applied) == (1, 1)
        assert (m["price_batch"].attempts, m["price_batch"].applied) == (2, 2)
        assert m["transition"].p50_ns <= m["transition"].p99_ns <= m["transition"].p999_ns

    def test_departed_engine_counts_survive(self, engine):
        """Counts of an Engine that closed stay in the merged metrics."""
        pos = opened(engine)
        before = engine.metrics()["transition"].applied
        with Engine.attach(engine.name, url=engine.url) as other:
            for trig in (Trigger.PAUSE, Trigger.RESUME, Trigger.PAUSE):
                assert other.transition(pos, trig) is Outcome.APPLIED
        after = engine.metrics()
        assert after["transition"].applied == before + 3
        assert_counts_add_up(after)

    def test_metrics_can_be_switched_off(self, engine):
        """With metrics off, operations are not counted."""
        pos = opened(engine)
        before = engine.metrics()["transition"].attempts
        engine.set_metrics(False)
        engine.transition(pos, Trigger.PAUSE)
        assert engine.metrics()["transition"].attempts == before
        engine.set_metrics(True, sample_every=1)
        engine.transition(pos, Trigger.RESUME)
        m = engine.metrics()["transition"]
        assert m.attempts == before + 1 and m.samples >= 1

    def test_empty_metrics(self, engine):
        """A fresh engine has zero counts and success rate 1.0 everywhere."""
        for m in engine.metrics().values():
            assert m.attempts == 0 and m.success_rate == 1.0 and m.p99_ns == 0.0
