"""Adversarial checks of exits fired by the price (issue 20): a fire never
breaks a guarded transition's lock, on either backend, and Redis's rule
decides as shared memory's on random price paths."""

from __future__ import annotations

import os
import signal
import threading
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
import redis
from conftest import _dispose, create_args, redis_url
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import JOIN_TIMEOUT, READY_TIMEOUT, readable

from engine import (
    ORDER_SPEC,
    POSITION_SPEC,
    BusyError,
    Engine,
    ExitReason,
    MachineSpec,
    MoneyError,
    Outcome,
    Rule,
    StaleIdError,
    State,
    Trigger,
)
from engine._native import lib
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
        """A crossing write under a guarded transition's lock neither fires nor publishes."""
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


_LEVEL = st.one_of(st.just(0.0), st.integers(1, 60).map(lambda k: 0.25 * k),
                   st.integers(0, 60).map(lambda k: 100.0 + 0.25 * k), st.floats(0.0, 200.0))
_OPS = st.one_of(
    st.tuples(st.sampled_from(["update_price", "update_prices", "update_token_price"]),
              st.one_of(st.integers(-40, 40).map(lambda k: 100.0 + 0.25 * k),
                        st.floats(50.0, 150.0))),
    st.tuples(st.sampled_from(["PAUSE", "RESUME", "EXIT_CANCELLED", "ERROR_OCCURRED",
                               "RECOVER"]), st.none()),
    st.tuples(st.just("rearm"), st.tuples(st.sampled_from(["stop_loss", "take_profit",
                                                           "trailing_stop"]), _LEVEL)),
)
@pytest.fixture(scope="module")
def both():   # type: ignore[no-untyped-def]
    """One shared-memory and one Redis engine of the position lifecycle."""
    engs = [Engine.create(capacity=512), Engine.create(capacity=512, **create_args("redis"))]
    try:
        yield engs
    finally:
        for e in engs:
            _dispose(e)


_token = iter(range(1_000, 10**9))


class TestRedisRuleIsCs:
    @settings(max_examples=200, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(side=st.sampled_from([1, -1]), stop=_LEVEL, take=_LEVEL, trail=_LEVEL,
           ops=st.lists(_OPS, max_size=14))
    def test_same_fire_on_the_same_path(self, both, side, stop, take, trail, ops):
        """On any path of writes and transitions Redis fires exactly as shared memory."""
        token = next(_token)
        ids = []
        for e in both:
            pos = e.open_position(entry_price=100.0, amount=1.0, side=side, token=token,
                                  stop_loss=stop, take_profit=take, trailing_stop=trail)
            e.transition(pos, Trigger.POSITION_OPENED)
            ids.append(pos)

        def seen(e, pos):   # type: ignore[no-untyped-def]
            c = e.context(pos)
            return e.state(pos), c.exit_reason, c.exit_price, e.price(pos).price

        for step, (op, arg) in enumerate(ops):
            for e, pos in zip(both, ids, strict=True):
                if op == "update_price":
                    e.update_price(pos, arg)
                elif op == "update_prices":
                    e.update_prices(np.array([pos], dtype=np.uint64), np.array([arg]))
                elif op == "update_token_price":
                    e.update_token_price(token, arg)
                elif op == "rearm":   # the levels move with a cancel of a pending exit
                    e.transition(pos, Trigger.EXIT_CANCELLED, **{arg[0]: arg[1]})
                else:
                    e.transition(pos, op)
            assert seen(both[0], ids[0]) == seen(both[1], ids[1]), (step, op, arg)


class TestCloseAtFillRefused:
    def test_refused_fill_is_named_not_the_last_price(self, engine):
        """A fill above the booking band is refused naming that fill; nothing changes."""
        acct = engine.open_account(cash=10_000, max_exposure=10_000, max_positions=10,
                                   max_loss=5_000)
        pos = engine.open_position(entry_price=100.0, amount=2.0, side=1, account=acct,
                                   stop_loss=95.0)
        engine.transition(pos, Trigger.POSITION_OPENED)
        engine.update_price(pos, 94.0)
        engine.transition(pos, Trigger.EXIT_STARTED)
        engine.update_price(pos, 99.0)
        with pytest.raises(MoneyError) as e:
            engine.transition(pos, Trigger.EXIT_COMPLETED, exit_price=1e12)
        assert "1000000000000.0" in str(e.value) and "99.0" not in str(e.value)
        assert engine.state(pos) == State.EXITING and engine.context(pos).exit_price == 94.0
        assert engine.account(acct).cash == Decimal(10_000)


# -- processes: racing writers, a manual fire, the trailing peak ---------------------------
WRITERS = 2 * (os.cpu_count() or 2) + 2     # more processes than cores


def _write_band(handle: Any, ids: list[int], token: int, kind: int, lo: float, hi: float,
                seed: int, go: Any, after: Any, rounds: int) -> None:
    """Write prices in [lo, hi] by id, batch or token; `rounds` more once `after` is set."""
    eng = Engine.attach(handle)
    rng = np.random.default_rng(seed)
    arr = np.array(ids, dtype=np.uint64)
    go.wait(READY_TIMEOUT)
    done_after = 0
    while done_after < rounds:
        if after.is_set():
            done_after += 1
        p = float(rng.uniform(lo, hi))
        try:
            if kind == 0:
                for pos in ids:
                    eng.update_price(pos, p)
            elif kind == 1:
                eng.update_prices(arr, np.full(len(ids), p))
            else:
                eng.update_token_price(token, p)
        except BusyError:
            pass   # a live holder past the bound: nothing written, the next round writes
    eng.close()


def _manual_exit(handle: Any, ids: list[int], go: Any, out: Any) -> None:
    """EXIT_CONDITION_MET by hand on each position, racing the writers' fires."""
    eng = Engine.attach(handle)
    go.wait(READY_TIMEOUT)
    for i, pos in enumerate(ids):
        out[i] = int(eng.transition(pos, Trigger.EXIT_CONDITION_MET))
    eng.close()


class TestRacingProcesses:
    def test_manual_exit_races_the_fire(self, engine, spawner):
        """A hand EXIT_CONDITION_MET racing crossing writers: exactly one of them commits."""
        ids = []
        for _ in range(12):
            pos = engine.open_position(entry_price=100.0, amount=1.0, token=5, stop_loss=95.0)
            engine.transition(pos, Trigger.POSITION_OPENED)
            ids.append(pos)
        before = {int(r["id"]): int(r["transitions"]) for r in engine.snapshot()}
        go, after = spawner.ctx.Event(), spawner.ctx.Event()
        after.set()
        out = spawner.ctx.Array("i", [-1] * len(ids))
        for k in range(WRITERS):
            spawner.start(_write_band, engine.handle, ids, 5, k % 3, 90.0, 96.0, k, go, after, 8)
        spawner.start(_manual_exit, engine.handle, ids, go, out)
        go.set()
        spawner.join_all(JOIN_TIMEOUT)
        rows = {int(r["id"]): r for r in engine.snapshot()}
        for i, pos in enumerate(ids):
            r = rows[pos]
            assert int(r["transitions"]) - before[pos] == 1, f"{pos}: not exactly one commit"
            assert State(int(r["state"])) is State.EXIT_PENDING, pos
            manual = out[i] == int(Outcome.APPLIED)
            assert out[i] in (int(Outcome.APPLIED), int(Outcome.INVALID)), out[i]
            if manual:
                assert (r["exit_reason"], r["exit_price"]) == (0, 0.0), pos
            else:
                assert r["exit_reason"] == ExitReason.STOP_LOSS and 90.0 <= r["exit_price"] <= 95.0

    def test_trailing_peak_not_lost_to_a_lower_racing_write(self, engine, spawner):
        """A 120 spike amid racing writes at 110-111 (trail 2) is never lost: fires once."""
        ids = []
        for _ in range(8):
            pos = engine.open_position(entry_price=100.0, amount=1.0, token=6, trailing_stop=2.0)
            engine.transition(pos, Trigger.POSITION_OPENED)
            ids.append(pos)
        before = {int(r["id"]): int(r["transitions"]) for r in engine.snapshot()}
        go, after = spawner.ctx.Event(), spawner.ctx.Event()
        for k in range(WRITERS):
            spawner.start(_write_band, engine.handle, ids, 6, k % 3, 110.0, 111.0, k, go, after, 6)
        go.set()
        for pos in ids:   # the spike, racing the band writers
            engine.update_price(pos, 120.0)
        after.set()
        spawner.join_all(JOIN_TIMEOUT)
        rows = {int(r["id"]): r for r in engine.snapshot()}
        for pos in ids:
            r = rows[pos]
            # forbidden: armed after post-spike writes at <= 111 (the peak went backwards)
            assert State(int(r["state"])) is State.EXIT_PENDING, (pos, r["price"])
            assert int(r["transitions"]) - before[pos] == 1, pos
            assert r["exit_reason"] == ExitReason.TRAILING_STOP, pos
            assert 110.0 <= r["exit_price"] <= 111.0, (pos, r["exit_price"])


# -- kills (shared memory: the fault switches of native/engine.h) ---------------------------
def _die_writing(handle: Any, pos: int, fault: int, price: float) -> None:
    """Set the fault and write a price: SIGKILLed inside it."""
    eng = Engine.attach(handle)
    eng._set_fault(flags=fault)
    eng.update_price(pos, price)


def _die_transition(handle: Any, pos: int, fault: int, trigger: int) -> None:
    """Set the fault and fire trigger: SIGKILLed inside it."""
    eng = Engine.attach(handle)
    eng._set_fault(flags=fault)
    eng.transition(pos, trigger)


@pytest.mark.shm_only
class TestKillsInTheFire:
    @pytest.fixture(autouse=True)
    def _faults_off(self, engine):   # type: ignore[no-untyped-def]
        yield
        engine._set_fault(0)

    def _armed(self, engine):   # type: ignore[no-untyped-def]
        pos = engine.open_position(entry_price=100.0, amount=1.0, token=9, stop_loss=95.0)
        engine.transition(pos, Trigger.POSITION_OPENED)
        engine.update_price(pos, 96.0)
        return pos, int(next(r for r in engine.snapshot() if int(r["id"]) == pos)["transitions"])

    def test_killed_after_the_fires_commit_cas(self, engine, spawner):
        """A fire killed after its commit CAS fired once at its price, never again."""
        pos, commits = self._armed(engine)
        p = spawner.start(_die_writing, engine.handle, pos, lib.ENG_FAULT_DIE_AFTER_CAS, 94.25)
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL
        engine._set_fault(0)
        engine.recover()
        c = engine.context(pos)
        assert (engine.state(pos), c.exit_reason, c.exit_price) == \
            (State.EXIT_PENDING, ExitReason.STOP_LOSS, 94.25)
        assert engine.price(pos).price == 96.0            # its price never published
        engine.update_price(pos, 90.0)
        assert engine.price(pos).price == 90.0 and engine.context(pos).exit_price == 94.25
        rows = {int(r["id"]): r for r in engine.snapshot()}
        assert int(rows[pos]["transitions"]) <= commits + 1   # one fire (its bump may be lost)

    def test_killed_pause_never_fires(self, engine, spawner):
        """A PAUSE killed after its CAS: no write of any kind nor recover() fires it."""
        pos, _ = self._armed(engine)
        p = spawner.start(_die_transition, engine.handle, pos, lib.ENG_FAULT_DIE_AFTER_CAS,
                          int(Trigger.PAUSE))
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL
        engine._set_fault(0)
        engine.update_price(pos, 90.0)
        engine.update_prices(np.array([pos], dtype=np.uint64), np.array([89.0]))
        engine.update_token_price(9, 88.0)
        engine.recover()
        c = engine.context(pos)
        assert (engine.state(pos), c.exit_reason, c.exit_price) == (State.PAUSED, 0, 0.0)
        assert engine.price(pos).price == 88.0
        assert engine.transition(pos, Trigger.RESUME) is Outcome.APPLIED
        engine.update_price(pos, 94.0)                    # armed again: the next write fires
        c = engine.context(pos)
        assert (engine.state(pos), c.exit_reason, c.exit_price) == \
            (State.EXIT_PENDING, ExitReason.STOP_LOSS, 94.0)


# -- Redis: a firing call whose reply is lost is resent and fires once ---------------------
def _lose_next_reply(e: Engine, nth: int = 1) -> list[int]:
    """Kill e's connection after the server ran its nth next call, before the reply is read."""
    conn = e._seg.conn.conn
    cid = e._seg.conn.command("CLIENT", "ID")
    admin = redis.Redis.from_url(redis_url())
    read = conn.read_response
    killed: list[int] = []
    reads = [0]

    def lose_reply(*args: Any, **kw: Any) -> Any:
        reads[0] += 1
        if reads[0] < nth:
            return read(*args, **kw)
        conn.read_response = read   # once
        assert readable(conn._sock, 10), "no reply"   # the function ran
        admin.execute_command("CLIENT", "KILL", "ID", cid)
        killed.append(cid)
        conn.disconnect()
        raise redis.ConnectionError("killed before the reply was read")

    conn.read_response = lose_reply
    return killed


class TestRedisResendFiresOnce:
    @pytest.mark.parametrize("call", ["update_price", "update_prices", "update_token_price"])
    @pytest.mark.parametrize("nth", [1, 2])
    def test_a_lost_reply_of_a_firing_write(self, call, nth):
        """A firing write whose reply is lost is resent and fires each position once."""
        e = Engine.create(capacity=16, url=redis_url(), shards=4)
        try:
            ids = []
            for _ in range(4):
                pos = e.open_position(entry_price=100.0, amount=1.0, token=4, stop_loss=95.0)
                e.transition(pos, Trigger.POSITION_OPENED)
                ids.append(pos)
            killed = _lose_next_reply(e, nth if call != "update_price" else 1)
            if call == "update_price":
                e.update_price(ids[0], 94.0)
                ids = ids[:1]
            elif call == "update_prices":
                e.update_prices(np.array(ids, dtype=np.uint64), np.full(len(ids), 94.0))
            else:
                e.update_token_price(4, 94.0)
            assert killed, "the fault never happened"
            assert e.metrics()["exit"].applied == len(ids), "a resend fired again"
            for pos in ids:
                c = e.context(pos)
                assert (e.state(pos), c.exit_reason, c.exit_price) == \
                    (State.EXIT_PENDING, ExitReason.STOP_LOSS, 94.0)
                assert e.price(pos).version == 2, "the price applied twice"
        finally:
            e.unlink()
            e.close()


# -- late fills racing a release -------------------------------------------------------------
def _release_all(handle: Any, ids: list[int], go: Any, out: Any) -> None:
    eng = Engine.attach(handle)
    go.wait(READY_TIMEOUT)
    for i, oid in enumerate(ids):
        try:
            out[i] = int(eng.release_position(oid))
        except StaleIdError:
            out[i] = -1
    eng.close()


def _late_fill_all(handle: Any, ids: list[int], go: Any, out: Any) -> None:
    eng = Engine.attach(handle)
    go.wait(READY_TIMEOUT)
    for i, oid in enumerate(ids):
        try:
            out[i] = int(eng.transition(oid, "PARTIAL_FILL", filled_qty=1.0, avg_px=10.0))
        except StaleIdError:
            out[i] = -1
    eng.close()


class TestLateFillVersusRelease:
    def test_late_partial_fill_races_the_release(self, make_engine, spawner):
        """A late PARTIAL_FILL racing the release of its CANCELED order: never both apply."""
        eng = make_engine(capacity=64, spec=ORDER_SPEC)
        ids = []
        for _ in range(40):
            oid = eng.open(qty=5.0, leaves_qty=5.0, side=1)
            for t in ("SUBMIT", "ACCEPT", "CANCEL"):
                eng.transition(oid, t)
            ids.append(oid)
        go = spawner.ctx.Event()
        rel, fill = spawner.ctx.Array("i", [-2] * len(ids)), spawner.ctx.Array("i", [-2] * len(ids))
        spawner.start(_release_all, eng.handle, ids, go, rel)
        spawner.start(_late_fill_all, eng.handle, ids, go, fill)
        go.set()
        spawner.join_all(JOIN_TIMEOUT)
        rows = {int(r["id"]) for r in eng.snapshot()}
        applied = int(Outcome.APPLIED)
        for i, oid in enumerate(ids):
            assert not (rel[i] == applied and fill[i] == applied), f"{oid}: both applied"
            if fill[i] == applied:
                assert rel[i] == int(Outcome.INVALID), (oid, rel[i])
                assert oid in rows and eng.state(oid) is ORDER_SPEC.State.PARTIALLY_FILLED
                assert eng.context(oid).filled_qty == 1.0
            else:
                assert (rel[i], fill[i]) == (applied, -1), (oid, rel[i], fill[i])
                assert oid not in rows
