"""The token index and the vector calls.

update_token_price walks its token's chain in the segment, not every slot.
Properties: the chains hold every opening that is not released, on its
token's chain (so a quiescent update reaches every open position on the
token); a price lands only on open positions of that token; a process killed
between index steps (ENG_FAULT_DIE_IN_TINDEX_*, or SIGKILL at random) leaves
chains that recover() brings back to exactly the open positions per token.
Vector calls (states, prices, transition_many) refuse the whole call for one
bad element and name its index.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
import traceback
from typing import Any

import numpy as np
import pytest
from procs import READY_TIMEOUT, sigkill, until

from engine import (
    ArgumentError,
    Engine,
    EngineError,
    EngineTypeError,
    NotOpenError,
    Outcome,
    PriceError,
    RiskLimitError,
    SlotError,
    StaleIdError,
    State,
    Trigger,
)
from engine._native import lib

CLOSE = (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
         Trigger.EXIT_COMPLETED)


def close(eng: Engine, pos: int) -> None:
    for trig in CLOSE:
        assert eng.transition(pos, trig) is Outcome.APPLIED


def assert_index_exact(eng: Engine, expected: dict[int, set[int]]) -> None:
    """Every chain holds exactly the openings not released, per token."""
    missing, free_linked, misplaced, entries = eng._tindex_check()
    assert (missing, free_linked, misplaced) == (0, 0, 0), eng._tindex_check()
    assert entries == sum(len(v) for v in expected.values())
    for token, slots in expected.items():
        assert set(eng._tindex_slots(token)) == slots, token


def expected_from(eng: Engine, ids: dict[int, int]) -> dict[int, set[int]]:
    """Token -> slots, from a map id -> token of the openings not released."""
    out: dict[int, set[int]] = {}
    for pos, token in ids.items():
        out.setdefault(token, set()).add(pos & lib.ENG_ID_SLOT_MASK)
    return out


class TestTokenIndex:
    def test_chains_follow_opens_and_releases(self, make_engine):
        """Opens link, releases unlink: the chains are the open positions per token."""
        eng = make_engine(capacity=64)
        rng = random.Random(7)
        live: dict[int, int] = {}
        for _ in range(300):
            if live and (len(live) == 64 or rng.random() < 0.45):
                pos = rng.choice(list(live))
                close(eng, pos)
                assert eng.release_position(pos) is Outcome.APPLIED
                del live[pos]
            else:
                token = rng.randrange(-3, 200)
                live[eng.open_position(100.0, 1.0, 1, token=token)] = token
        assert_index_exact(eng, expected_from(eng, live))

    def test_update_reaches_only_open_positions_on_the_token(self, make_engine):
        """A token update writes every open position on it and nothing else.

        A token update writes every open position on it, and nothing else
        (closed but unreleased ones are on the chain and skipped).
        """
        eng = make_engine(capacity=64)
        on = [eng.open_position(100.0, 2.0, 1, token=5) for _ in range(10)]
        off = [eng.open_position(100.0, 2.0, 1, token=t) for t in range(6, 40)]
        close(eng, on[0])
        assert eng.update_token_price(5, 110.0) == 9
        assert eng.price(on[0]).price == 100.0
        for pos in on[1:]:
            assert eng.price(pos).price == 110.0 and eng.price(pos).pnl_usd == 20.0
        assert all(eng.price(pos).price == 100.0 for pos in off)
        assert eng.update_token_price(12345, 110.0) == 0

    def test_colliding_tokens_share_a_chain_without_mixing(self, make_engine):
        """Many tokens on few buckets: each update counts only its own token."""
        eng = make_engine(capacity=256)   # 256 buckets, 400 tokens: collisions
        ids = {eng.open_position(100.0, 1.0, 1, token=t % 200): t % 200 for t in range(256)}
        for token in range(200):
            assert eng.update_token_price(token, 101.0) == sum(1 for v in ids.values()
                                                                if v == token)

    def test_reopen_moves_the_slot_to_its_new_token(self, make_engine):
        """A slot reopened on another token leaves its old chain."""
        eng = make_engine(capacity=1)
        a = eng.open_position(100.0, 1.0, 1, token=1)
        close(eng, a)
        eng.release_position(a)
        b = eng.open_position(100.0, 1.0, 1, token=2)
        assert eng._tindex_slots(1) == [] and eng._tindex_slots(2) == [0]
        assert eng.update_token_price(1, 120.0) == 0 and eng.update_token_price(2, 120.0) == 1
        assert_index_exact(eng, {2: {b & lib.ENG_ID_SLOT_MASK}})

    def test_abandoned_open_is_unlinked(self, make_engine):
        """An abandoned opening leaves no chain entry behind."""
        eng = make_engine(capacity=4)
        pos = eng.open_position(100.0, 1.0, 1, token=9)
        word = eng.state_word(pos & lib.ENG_ID_SLOT_MASK)
        assert lib.eng_abandon_open(eng._seg, pos, word) == lib.ENG_APPLIED
        assert eng._tindex_check() == (0, 0, 0, 0)

    def test_refused_open_leaves_no_entry(self, make_engine):
        """An open refused by a risk limit after its slot was linked unlinks it."""
        eng = make_engine(capacity=4)
        acct = eng.open_account(cash=10, max_exposure=1000, max_positions=10, max_loss=1000)
        with pytest.raises(RiskLimitError):
            eng.open_position(100.0, 1.0, 1, token=3, account=acct)
        assert eng._tindex_check() == (0, 0, 0, 0)
        assert not eng.recover().changed

    def test_bad_input(self, engine):
        """Bad tokens and prices are refused with the value and range."""
        with pytest.raises(PriceError):
            engine.update_token_price(1, float("nan"))
        with pytest.raises(PriceError):
            engine.update_token_price(1, -1.0)
        with pytest.raises(ArgumentError, match=r"-9223372036854775808"):
            engine.update_token_price(2**63, 1.0)
        with pytest.raises(EngineTypeError):
            engine.update_token_price("BTC", 1.0)  # type: ignore[arg-type]


# =====================================================================================
# Kills between index steps, and at random.
def _die_opening(handle: Any, fault: int, token: int, ready: Any) -> None:
    eng = Engine.attach(handle)
    ready.set()
    eng._set_fault(fault)
    eng.open_position(100.0, 1.0, 1, token=token)
    raise AssertionError("the fault did not kill this process")


def _die_releasing(handle: Any, fault: int, pos: int, ready: Any) -> None:
    eng = Engine.attach(handle)
    ready.set()
    eng._set_fault(fault)
    eng.release_position(pos)
    raise AssertionError("the fault did not kill this process")


def run_to_death(spawner: Any, eng: Engine, target: Any, *args: Any) -> None:
    ready = spawner.ctx.Event()
    p = spawner.start(target, *args, ready)
    p.join(READY_TIMEOUT)
    eng._set_fault()
    assert ready.is_set() and not p.is_alive(), "the worker did not run"
    assert p.exitcode == -signal.SIGKILL, f"worker exit code {p.exitcode}"


class TestDeadIndexWriters:
    """Allowed after recover(): chains equal to the open positions per token,
    no bucket lock held.  Forbidden: a missed open position, a price on a
    position of another token, a bucket lock that outlives its dead holder."""

    def test_killed_between_link_steps(self, make_engine, spawner):
        """An open killed between its link steps rolls back; the chains stay exact.

        Killed with tnext written and the head not: the opening rolls back,
        the bucket lock is released by recover(), the chains stay exact.
        """
        eng = make_engine(capacity=8)
        live = {eng.open_position(100.0, 1.0, 1, token=3): 3 for _ in range(3)}
        run_to_death(spawner, eng, _die_opening, eng.handle, lib.ENG_FAULT_DIE_IN_TINDEX_ADD, 3)
        report = eng.recover()
        assert report.tindex_repaired >= 1 and report.rolled_back == 1
        assert_index_exact(eng, expected_from(eng, live))
        assert eng.update_token_price(3, 105.0) == 3
        live[eng.open_position(100.0, 1.0, 1, token=3)] = 3
        assert_index_exact(eng, expected_from(eng, live))

    def test_killed_between_unlink_steps(self, make_engine, spawner):
        """A release killed between its unlink steps leaves the slot free and off its chain.

        Killed after the unlink, before tbucket is cleared: the slot is free
        and off its chain; its next open relinks it cleanly.
        """
        eng = make_engine(capacity=2)
        live = {eng.open_position(100.0, 1.0, 1, token=4): 4 for _ in range(2)}
        gone = next(iter(live))
        close(eng, gone)
        run_to_death(spawner, eng, _die_releasing, eng.handle,
                     lib.ENG_FAULT_DIE_IN_TINDEX_DEL, gone)
        del live[gone]
        assert eng.recover().tindex_repaired >= 1
        assert_index_exact(eng, expected_from(eng, live))
        live[eng.open_position(100.0, 1.0, 1, token=5)] = 5
        assert_index_exact(eng, expected_from(eng, live))
        assert eng.update_token_price(4, 101.0) == 1 and eng.update_token_price(5, 101.0) == 1


def _churn(handle: Any, seed: int, ready: Any, ops: Any, errors: Any) -> None:
    """Open on random tokens, close and release at random, forever; counts the
    opens and releases in ops and reports an unexpected exception to errors."""
    try:
        eng = Engine.attach(handle)
        rng = random.Random(seed)
        mine: list[int] = []
        ready.set()
        while True:
            if mine and (rng.random() < 0.5 or len(mine) > 20):
                pos = mine.pop(rng.randrange(len(mine)))
                for trig in CLOSE:
                    eng.transition(pos, trig)
                eng.release_position(pos)
                ops.value += 1
            else:
                with contextlib.suppress(EngineError):   # full, or busy: the next round tries
                    mine.append(eng.open_position(100.0, 1.0, 1, token=rng.randrange(6)))
                    ops.value += 1
            if rng.random() < 0.3:
                eng.update_token_price(rng.randrange(6), 100.0 + rng.random())
    except Exception:
        errors.put(traceback.format_exc())
        raise


def kill_churner(p: Any, errors: Any) -> None:
    """SIGKILL a churner that must still be running; one that ended on its own fails the test."""
    sigkill(p, may_have_exited=True)   # checked below, with the churner's report
    if p.exitcode != -signal.SIGKILL:
        reported = []
        with contextlib.suppress(Exception):
            while True:
                reported.append(errors.get(timeout=1.0))
        pytest.fail(f"churner {p.pid} ended with exit code {p.exitcode} before its SIGKILL\n"
                    + "\n".join(reported))


MIN_CHURN = 60   # opens and releases the churners must make over the six rounds


class TestRandomKills:
    def test_index_exact_after_random_kills(self, make_engine, spawner):
        """After random kills and recover(), every chain holds exactly its open positions.

        Churners SIGKILLed at random points: after recover() every open
        position is on its token's chain and nothing else is; a token update
        reaches exactly the open positions on it.
        """
        eng = make_engine(capacity=96)
        rng = random.Random(11)
        ops, errors = [], spawner.ctx.Queue()
        for rnd in range(6):
            readies = [spawner.ctx.Event() for _ in range(3)]
            ops += [spawner.ctx.Value("Q", 0, lock=False) for _ in readies]
            procs = [spawner.start(_churn, eng.handle, rng.randrange(2**32), r, n, errors)
                     for r, n in zip(readies, ops[-3:], strict=True)]
            until(lambda rs=readies: all(r.is_set() for r in rs), "churners ready")
            time.sleep(0.05 + rng.random() * 0.2)
            for p in procs:
                kill_churner(p, errors)
            eng.recover()
            expected: dict[int, set[int]] = {}
            open_count: dict[int, int] = {}
            for row in eng.snapshot():
                token = int(eng.context(int(row["id"])).token)
                expected.setdefault(token, set()).add(int(row["slot"]))
                if State(int(row["state"])) is not State.CLOSED:
                    open_count[token] = open_count.get(token, 0) + 1
            assert_index_exact(eng, expected)
            for token in range(6):
                assert eng.update_token_price(token, 200.0 + rnd) == open_count.get(token, 0)
            for row in eng.snapshot():   # nothing written to a position of another token
                if State(int(row["state"])) is not State.CLOSED:
                    assert eng.price(int(row["id"])).price == 200.0 + rnd
        churned = sum(v.value for v in ops)
        assert churned >= MIN_CHURN, f"the churners made only {churned} opens and releases"


# =====================================================================================
# Vector calls.
class TestVectorCalls:
    def test_states_match_state(self, engine):
        """states(ids)[i] is the one-hot code state(ids[i]) gives."""
        ids = [engine.open_position(100.0, 1.0) for _ in range(5)]
        engine.transition(ids[1], Trigger.POSITION_OPENED)
        got = engine.states(np.array(ids))
        assert got.dtype == np.uint16
        assert [int(c) for c in got] == [int(engine.state(p)) for p in ids]
        assert len(engine.states([])) == 0

    def test_prices_match_price(self, engine):
        """prices(ids)[i] holds the fields of price(ids[i])."""
        ids = [engine.open_position(100.0, 2.0, -1, token=1) for _ in range(4)]
        engine.update_price(ids[2], 90.0)
        got = engine.prices(ids)
        for row, pos in zip(got, ids, strict=True):
            snap = engine.price(pos)
            assert (row["price"], row["ts_ns"], row["pnl_pct"], row["pnl_usd"],
                    row["version"]) == tuple(snap)
        assert got[2]["pnl_usd"] == 20.0

    def test_transition_many_applies_each(self, engine):
        """Each element applied independently; outcomes are Outcome codes."""
        ids = [engine.open_position(100.0, 1.0) for _ in range(4)]
        engine.transition(ids[0], Trigger.POSITION_OPENED)
        out = engine.transition_many(ids, Trigger.POSITION_OPENED.value)
        assert out.dtype == np.uint8
        assert [Outcome(int(c)) for c in out] == [Outcome.INVALID] + [Outcome.APPLIED] * 3
        trig = [Trigger.PAUSE.value, Trigger.EXIT_CONDITION_MET.value,
                Trigger.RESUME.value, Trigger.PAUSE.value]
        assert [Outcome(int(c)) for c in engine.transition_many(ids, trig)] == \
            [Outcome.APPLIED, Outcome.APPLIED, Outcome.INVALID, Outcome.APPLIED]
        assert engine.state(ids[0]) == State.PAUSED and engine.state(ids[1]) == State.EXIT_PENDING

    def test_transition_many_halted(self, engine):
        """While halted every element is HALTED."""
        ids = [engine.open_position(100.0, 1.0) for _ in range(3)]
        engine.halt()
        try:
            assert set(engine.transition_many(ids, "POSITION_OPENED").tolist()) == \
                {int(Outcome.HALTED)}
        finally:
            engine.halt(False)

    def test_one_bad_id_refuses_the_call(self, engine):
        """One bad id refuses the whole call with its index; nothing is applied."""
        ids = [engine.open_position(100.0, 1.0) for _ in range(3)]
        gone = engine.open_position(100.0, 1.0)
        close(engine, gone)
        engine.release_position(gone)
        for bad, exc in ((gone, StaleIdError), (1 << 30 | 5, NotOpenError),
                         (engine.capacity + 1, SlotError), (-1, SlotError)):
            arr = [ids[0], ids[1], bad, ids[2]]
            with pytest.raises(exc, match="at index 2"):
                engine.states(arr)
            if bad >= 0:
                with pytest.raises(exc, match="at index 2"):
                    engine.prices(arr)
            with pytest.raises(exc, match="at index 2"):
                engine.transition_many(arr, "POSITION_OPENED")
            assert all(engine.state(p) == State.CREATED for p in ids)

    def test_bad_triggers_and_shapes(self, engine):
        """Triggers out of range, wrong lengths and types are refused whole."""
        ids = [engine.open_position(100.0, 1.0) for _ in range(3)]
        with pytest.raises(ValueError, match="at index 1"):
            engine.transition_many(ids, [0, 99, 0])
        with pytest.raises(ValueError, match="at index 2"):
            engine.transition_many(ids, [0, 0, -1])
        with pytest.raises(ArgumentError):
            engine.transition_many(ids, [0, 0])
        with pytest.raises(EngineTypeError):
            engine.transition_many(ids, [0.5, 0.0, 1.0])
        with pytest.raises(EngineTypeError):
            engine.states([1.5])
        with pytest.raises(ArgumentError):
            engine.states([[1]])
        assert all(engine.state(p) == State.CREATED for p in ids)
