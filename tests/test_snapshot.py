"""snapshot(): every row pairs a state with its own context and price.

Forbidden: a row whose context or price belongs to another state or opening."""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np
import pytest
from api_helpers import generation, opened, word_of
from owners_helpers import CTX, SECONDS, monitoring
from procs import READY_TIMEOUT

from engine import Engine, State, Trigger

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)


def flipper_worker(handle: Any, pos: int, ready: Any, stop: Any) -> None:
    """MONITORING -> EXIT_PENDING (exit_reason 7) -> MONITORING (exit_reason 0), forever."""
    eng = Engine.attach(handle)
    ready.set()
    while not stop.is_set():
        for _ in range(32):
            eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=7)
            eng.transition(pos, Trigger.EXIT_CANCELLED, exit_reason=0)


class TestSnapshot:
    def test_rows_match_individual_reads(self, engine):
        """Each snapshot row equals the slot's state, word, price and context reads."""
        a = opened(engine, entry=100.0, amount=2.0, side=1, token=1)
        b = engine.open_position(50.0, 4.0, side=-1, token=2)
        engine.update_price(a, 104.0)
        engine.transition(a, Trigger.EXIT_CONDITION_MET, exit_reason=7, stop_loss=99.0)
        rows = engine.snapshot()
        assert isinstance(rows, np.ndarray) and rows.dtype.names is not None
        assert sorted(rows["id"].tolist()) == sorted([a, b])
        for row in rows:
            pos = int(row["id"])
            assert row["slot"] == engine.slot_of(pos)
            p, c = engine.price(pos), engine.context(pos)
            assert row["state"] == engine.state(pos)
            assert row["generation"] == generation(word_of(engine, pos))
            assert row["locked"] == 0
            assert (row["price"], row["pnl_pct"], row["pnl_usd"], row["price_version"]) == \
                (p.price, p.pnl_pct, p.pnl_usd, p.version)
            assert row["price_ts_ns"] == p.timestamp_ns
            assert (row["entry_price"], row["amount"], row["side"], row["token"]) == \
                (c.entry_price, c.amount, c.side, c.token)
            assert (row["stop_loss"], row["take_profit"], row["exit_reason"]) == \
                (c.stop_loss, c.take_profit, c.exit_reason)
            assert (row["opened_ns"], row["context_version"]) == (c.opened_ns, c.version)
        row_a = rows[rows["id"] == a][0]
        assert row_a["transitions"] == 3          # open, POSITION_OPENED, EXIT_CONDITION_MET
        assert row_a["exit_reason"] == 7

    def test_empty_engine_has_no_rows(self, engine):
        """A snapshot lists only open slots: none in a fresh engine."""
        rows = engine.snapshot()
        assert rows.shape == (0,)

    def test_snapshot_is_a_copy(self, engine):
        """A snapshot does not change when the engine does."""
        pos = opened(engine)
        rows = engine.snapshot()
        engine.update_price(pos, 150.0)
        assert rows["price"][0] == 100.0


@pytest.mark.shm_only
class TestSnapshotPairing:
    """Each snapshot row pairs a state with the context committed with it."""

    def test_rows_pair_state_with_own_context_under_flipping_writer(self, make_engine, spawn):
        """Snapshot rows pair each state with its own context under a flipping writer.

        A child flips MONITORING (exit_reason 0) <-> EXIT_PENDING (exit_reason 7)
        while snapshots run: every row, locked ones too, pairs EXIT_PENDING with 7
        and MONITORING with 0; forbidden: a mismatched row.
        """
        eng = make_engine(capacity=2)
        pos, still = monitoring(eng), monitoring(eng, entry_price=50.0)
        slot = eng.slot_of(pos)
        want = {State.MONITORING: 0, State.EXIT_PENDING: 7}
        ready, stop = CTX.Event(), CTX.Event()
        spawn(flipper_worker, eng.handle, pos, ready, stop)
        assert ready.wait(READY_TIMEOUT)
        counts: collections.Counter[str] = collections.Counter()
        bad: list[str] = []
        end = time.monotonic() + SECONDS
        try:
            while time.monotonic() < end:
                for row in eng.snapshot():
                    rid = int(row["id"])
                    state = State(int(row["state"]))
                    counts["rows"] += 1
                    counts["locked"] += int(row["locked"])
                    if rid == still:
                        ok = state is State.MONITORING and row["entry_price"] == 50.0
                    else:
                        ok = (rid == pos and int(row["slot"]) == slot
                              and row["exit_reason"] == want.get(state, -1))
                        counts[state.name] += 1
                    if not ok:
                        bad.append(f"id {rid:#x} {state.name} exit_reason {row['exit_reason']} "
                                   f"locked {row['locked']}")
        finally:
            stop.set()
        print(f"\nsnapshot pairing: {dict(counts)}")
        assert not bad, f"{len(bad)} of {counts['rows']} rows mismatched, first: {bad[:5]}"
        assert counts["MONITORING"] and counts["EXIT_PENDING"], "the writer never flipped"
