"""Exits under racing writers and kills (issue 20, adversarial part).

What holds (shared memory): a price write fires before it publishes its
price, both under the slot's price latch.  So a write killed anywhere has
done a prefix of (fire, publish): nothing, or the fire alone (exit_price the
price it was writing, its price never published), or both.  A crossing price
is never published on an armed position without its fire, and a position
fires at most once per arming however many writers race: the fire is the
armed trigger's commit from the armed state, and writers of one slot hold
its latch in turn.

Forbidden outcomes checked here: a MONITORING position whose published
price crosses a level; a position fired twice (two commits); a fire whose
exit_price does not cross or whose reason is wrong; a paused position fired.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest
from procs import JOIN_TIMEOUT, READY_TIMEOUT

from engine import Engine, ExitReason, Outcome, State, Trigger
from engine._native import lib

BACKENDS = ("shm", "redis")
JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)
STOP = 95.0
WRITERS = 2 * (os.cpu_count() or 2) + 2     # more processes than cores


def open_armed(eng: Engine, n: int, token: int = 3) -> list[int]:
    ids = []
    for _ in range(n):
        pos = eng.open_position(entry_price=100.0, amount=1.0, token=token, stop_loss=STOP)
        assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
        ids.append(pos)
    return ids


def check_exits(eng: Engine, ids: list[int], commits_before: dict[int, int],
                strict: bool = True) -> dict[str, int]:
    """Every position fired at most once, crossing, STOP_LOSS; no armed one
    shows a crossing price; strict: the only commit since is the fire.
    Returns counts by state."""
    rows = {int(r["id"]): r for r in eng.snapshot()}
    seen = {"fired": 0, "armed": 0, "paused": 0}
    for pos in ids:
        r = rows[pos]
        state = State(int(r["state"]))
        commits = int(r["transitions"]) - commits_before[pos]
        if state is State.MONITORING:
            assert r["price"] > STOP, f"{pos}: armed with a crossing price {r['price']}"
            seen["armed"] += 1
        elif state is State.EXIT_PENDING:
            assert r["exit_reason"] == ExitReason.STOP_LOSS, pos
            assert 0 < r["exit_price"] <= STOP, (pos, r["exit_price"])
            seen["fired"] += 1
        else:
            assert state is State.PAUSED, (pos, state)
            seen["paused"] += 1
        fired = state is State.EXIT_PENDING
        if strict:
            assert commits == int(fired), f"{pos}: {commits} commits, fired: {fired}"
    return seen


def commits_of(eng: Engine) -> dict[int, int]:
    return {int(r["id"]): int(r["transitions"]) for r in eng.snapshot()}


# -- workers (module level: spawned) ---------------------------------------------------------
def writer(handle: Any, ids: list[int], token: int, kind: int, seed: int, go: Any,
           rounds: int) -> None:
    """Write falling prices around the stop, by id, by batch or by token."""
    eng = Engine.attach(handle)
    rng = np.random.default_rng(seed)
    arr = np.array(ids, dtype=np.uint64)
    go.wait(READY_TIMEOUT)
    for i in range(rounds):
        p = float(100.0 - 8.0 * i / rounds + rng.uniform(-1.0, 1.0))
        if kind == 0:
            for pos in ids:
                eng.update_price(pos, p)
        elif kind == 1:
            eng.update_prices(arr, np.full(len(ids), p))
        else:
            eng.update_token_price(token, p)
    eng.close()


def killed_writer(handle: Any, ids: list[int], token: int, seed: int) -> None:
    """Write crossing and non-crossing prices forever, every way, until killed."""
    eng = Engine.attach(handle)
    rng = np.random.default_rng(seed)
    arr = np.array(ids, dtype=np.uint64)
    while True:
        p = float(rng.uniform(93.0, 97.0))
        k = int(rng.integers(3))
        if k == 0:
            eng.update_price(int(rng.choice(arr)), p)
        elif k == 1:
            eng.update_prices(arr, np.full(len(ids), p))
        else:
            eng.update_token_price(token, p)


def die_in_fire(handle: Any, pos: int, fault: int, price: float) -> None:
    """Set the fault and write a crossing price: SIGKILLed inside it."""
    eng = Engine.attach(handle)
    eng._set_fault(flags=fault)
    eng.update_price(pos, price)


# -- tests -------------------------------------------------------------------------------------
class TestRacingWriters:
    def test_threads_fire_once(self, engine):
        """Threads writing by id, batch and token on the same positions: each fires once."""
        ids = open_armed(engine, 8)
        before = commits_of(engine)
        arr = np.array(ids, dtype=np.uint64)
        start = threading.Barrier(6)
        errors: list[BaseException] = []

        def run(kind: int) -> None:
            try:
                start.wait(10)
                for i in range(200):
                    p = 100.0 - 8.0 * i / 200 + (kind - 1) * 0.3
                    if kind == 0:
                        for pos in ids:
                            engine.update_price(pos, p)
                    elif kind == 1:
                        engine.update_prices(arr, np.full(len(ids), p))
                    else:
                        engine.update_token_price(3, p)
            except BaseException as e:
                errors.append(e)

        ts = [threading.Thread(target=run, args=(k % 3,)) for k in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errors, errors
        after = commits_of(engine)
        for pos in ids:
            assert engine.state(pos) is State.EXIT_PENDING, pos
            assert after[pos] - before[pos] == 1, f"{pos} fired {after[pos] - before[pos]} times"
        assert check_exits(engine, ids, before)["fired"] == len(ids)


@pytest.mark.shm_only
class TestProcesses:
    def test_processes_more_than_cores_fire_once(self, engine, spawner):
        """More writer processes than cores, every way: each position fires once, crossing."""
        ids = open_armed(engine, 12)
        before = commits_of(engine)
        go = spawner.ctx.Event()
        for k in range(WRITERS):
            spawner.start(writer, engine.handle, ids, 3, k % 3, k, go, 60)
        go.set()
        spawner.join_all(120)
        after = commits_of(engine)
        for pos in ids:
            assert after[pos] - before[pos] == 1, f"{pos} fired {after[pos] - before[pos]} times"
        assert check_exits(engine, ids, before)["fired"] == len(ids)

    def test_pauser_never_fired_while_paused(self, engine, spawner):
        """A pauser toggles PAUSE/RESUME while writers cross: no fire from PAUSED, none lost."""
        ids = open_armed(engine, 6)
        before = commits_of(engine)
        go = spawner.ctx.Event()
        for k in range(4):
            spawner.start(writer, engine.handle, ids, 3, k % 3, 100 + k, go, 80)
        go.set()
        stop_at = time.monotonic() + 30
        while any(p.is_alive() for p in spawner.procs) and time.monotonic() < stop_at:
            for pos in ids:
                if engine.transition(pos, Trigger.PAUSE) is Outcome.APPLIED:
                    engine.transition(pos, Trigger.RESUME)
        spawner.join_all(60)
        # the writers' last prices may have come while paused: one more crossing write
        for pos in ids:
            engine.update_price(pos, 90.0)
        seen = check_exits(engine, ids, before, strict=False)
        assert seen["fired"] == len(ids), seen
        for pos in ids:
            assert engine.context(pos).exit_price <= STOP


@pytest.mark.shm_only
class TestKills:
    @pytest.fixture(autouse=True)
    def _faults_off(self, engine):
        yield
        engine._set_fault(0)

    def test_killed_between_fire_and_publish(self, engine, spawner):
        """Killed between fire and publish: fired once at its price, the price unpublished.

        The next write takes the dead writer's latch over and does not fire again.
        """
        (pos,) = open_armed(engine, 1)
        engine.update_price(pos, 96.0)
        version, commits = engine.price(pos).version, commits_of(engine)[pos]
        p = spawner.start(die_in_fire, engine.handle, pos, lib.ENG_FAULT_DIE_IN_EXIT, 94.0)
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL
        engine._set_fault(0)
        c = engine.context(pos)
        assert (engine.state(pos), c.exit_reason, c.exit_price) == \
            (State.EXIT_PENDING, ExitReason.STOP_LOSS, 94.0)
        assert engine.price(pos).version == version and engine.price(pos).price == 96.0
        engine.update_price(pos, 93.0)                  # takes the dead writer's latch over
        assert engine.price(pos).price == 93.0
        assert engine.context(pos).exit_price == 94.0   # not fired again
        assert commits_of(engine)[pos] == commits + 1

    def test_killed_inside_the_fire(self, engine, spawner):
        """Killed right after the fire's lock: rolled back; the next crossing fires once."""
        (pos,) = open_armed(engine, 1)
        engine.update_price(pos, 96.0)
        commits = commits_of(engine)[pos]
        p = spawner.start(die_in_fire, engine.handle, pos, lib.ENG_FAULT_DIE_AFTER_LOCK, 94.0)
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL
        engine._set_fault(0)
        assert engine.price(pos).price == 96.0
        engine.update_price(pos, 94.5)
        c = engine.context(pos)
        assert (engine.state(pos), c.exit_reason, c.exit_price) == \
            (State.EXIT_PENDING, ExitReason.STOP_LOSS, 94.5)
        assert commits_of(engine)[pos] == commits + 1

    def test_killed_inside_the_fire_then_no_crossing(self, engine, spawner):
        """Killed inside the fire, then a write that does not cross: no fire, armed."""
        (pos,) = open_armed(engine, 1)
        p = spawner.start(die_in_fire, engine.handle, pos, lib.ENG_FAULT_DIE_AFTER_LOCK, 94.0)
        p.join(JOIN_TIMEOUT)
        engine._set_fault(0)
        engine.update_price(pos, 97.0)
        assert engine.state(pos) is State.MONITORING
        assert engine.price(pos).price == 97.0
        engine.recover()
        assert engine.state(pos) is State.MONITORING

    def test_random_kills(self, engine, spawner):
        """Writers killed at random: no armed position at a crossing price, none fired twice."""
        ids = open_armed(engine, 16)
        before = commits_of(engine)
        rng = np.random.default_rng(7)
        kills = 0
        deadline = time.monotonic() + 20
        while kills < 12 and time.monotonic() < deadline:
            procs = [spawner.start(killed_writer, engine.handle, ids, 3, int(rng.integers(1 << 30)))
                     for _ in range(3)]
            time.sleep(float(rng.uniform(0.2, 0.6)))
            for q in procs:
                os.kill(q.pid, signal.SIGKILL)
                q.join(JOIN_TIMEOUT)
                kills += 1
            engine.recover()
            for pos in ids:   # re-arm what fired, so later kills can land in fires
                if engine.state(pos) is State.EXIT_PENDING:
                    assert engine.transition(pos, Trigger.EXIT_CANCELLED) is Outcome.APPLIED
                    before[pos] = commits_of(engine)[pos]
                    engine.update_price(pos, 99.0)
        engine.recover()
        assert kills >= 6, kills
        check_exits(engine, ids, before)


def adjustable_spec() -> Any:
    """Positions whose stop can be moved while armed (ADJUST: LIVE -> LIVE)."""
    from engine import MachineSpec, Rule
    from engine.spec import POSITION_FIELDS
    return MachineSpec(
        states=["NEW", "LIVE", "OUT", "DONE"], triggers=["GO", "HIT", "ADJUST", "END"],
        rules=[Rule.of("GO", "NEW", "LIVE"), Rule.of("HIT", "LIVE", "OUT"),
               Rule.of("ADJUST", "LIVE", "LIVE"), Rule.of("END", "OUT", "DONE")],
        initial="NEW", closed=["DONE"], fields=POSITION_FIELDS, exits=("LIVE", "HIT"),
        name="adjustable")


@pytest.mark.shm_only
class TestLevelsMovedMeanwhile:
    def test_fire_uses_the_levels_it_locks_from(self, spawner):
        """A stop moved while a crossing write waits for the lock: the new stop decides.

        ADJUST is held in its slow path by another process; the write checks
        the new stop and does not fire (with the old one it would have).
        """
        eng = Engine.create(capacity=16, spec=adjustable_spec())
        try:
            for _attempt in range(10):   # the 4 ms window can be missed on a loaded host
                pos = eng.open_position(100.0, 1.0, stop_loss=95.0)
                assert eng.transition(pos, "GO") is Outcome.APPLIED
                slot = eng.slot_of(pos)
                eng._set_fault(0, pause_ns=4_000_000)   # a slow path holds the lock 4 ms
                try:
                    p = spawner.start(adjust_worker, eng.handle, pos)
                    deadline = time.monotonic() + READY_TIMEOUT
                    while not eng.state_word(slot) & lib.ENG_SW_LOCK and p.is_alive():
                        assert time.monotonic() < deadline, "no ADJUST seen"
                    seen = p.is_alive()
                    eng.update_price(pos, 94.0)   # crosses 95, not 80
                    p.join(JOIN_TIMEOUT)
                finally:
                    eng._set_fault(0)
                c = eng.context(pos)
                assert (eng.state(pos).name, c.stop_loss, c.exit_reason) == ("LIVE", 80.0, 0)
                assert eng.price(pos).price == 94.0
                eng.update_price(pos, 79.0)
                assert eng.state(pos).name == "OUT" and eng.context(pos).exit_price == 79.0
                if seen:
                    break
            assert seen, "the write never met the held ADJUST in 10 attempts"
        finally:
            eng.close()
            eng.unlink()


def adjust_worker(handle: Any, pos: int) -> None:
    """Move the stop to 80 (the slow path pauses holding the lock)."""
    eng = Engine.attach(handle)
    time.sleep(0.05)
    eng.transition(pos, "ADJUST", stop_loss=80.0)
