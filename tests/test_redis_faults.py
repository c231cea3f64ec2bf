"""The Redis backend under an operator's faults: racing and killed creators,
a foreign key in a later shard, an engine unlinked or re-created under
attached Engines, a server restarted empty or from its AOF (or killed -9
under workers), a replica promoted after ``?wait=1`` calls.

Every test uses a private redis-server (the session's, or its own when it
restarts or kills it)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
import redis
from procs import collect, sigkill, until

import engine.store.redis.store as rb
from engine import (
    ArgumentError,
    Engine,
    Outcome,
    SegmentError,
    SegmentNotFoundError,
    ServerError,
    State,
    Trigger,
)
from engine._native import lib
from engine.tools.redis_server import PrivateRedis

LEASE_S = lib.ENG_REDIS_CREATE_LEASE_MS / 1000


@pytest.fixture
def r(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def name_keys(r: redis.Redis, name: str) -> list[bytes]:
    return sorted(r.scan_iter(match=f"eng:{{{name}:*", count=1000))


def remove(url: str, name: str) -> None:
    """Whatever the name holds, gone (teardown)."""
    r = redis.Redis.from_url(url)
    for k in name_keys(r, name):
        r.delete(k)


def free_lists_exact(r: redis.Redis, name: str, capacity: int, accounts: int, shards: int) -> None:
    """Each shard's free lists hold each of its slots and accounts exactly once."""
    for s in range(shards):
        P = f"eng:{{{name}:{s}}}:"
        free = [int(x) for x in r.lrange(P + "free", 0, -1)]
        assert sorted(free) == list(range(s, capacity, shards)), \
            f"shard {s}: {len(free)} free slots, {len(set(free))} distinct"
        afree = [int(x) for x in r.lrange(P + "afree", 0, -1)]
        assert sorted(afree) == list(range(s, accounts, shards))


def opened(eng: Engine) -> int:
    pos = eng.open_position(100.0, 1.0)
    assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return pos


# -- item 1: create is atomic -------------------------------------------------------------------
def _racer(url: str, names: list[str], barrier: Any, out: Any) -> None:
    try:
        for name in names:
            barrier.wait(60)
            try:
                Engine.create(20_000, name=name, url=url, max_accounts=64).close()
                out.put(("result", name, "won"))
            except SegmentError as e:
                out.put(("result", name, f"SegmentError: {e}"))
    except BaseException:
        out.put(("error", traceback.format_exc()))


class _Stop(BaseException):
    pass


def _create_until(url: str, name: str, stop_at: int, capacity: int, shards: int,
                  stopped: Any, out: Any) -> None:
    """Create, but stop for good after the creator's step ``stop_at`` (the test hook)."""
    steps = []

    def hook(step: str) -> None:
        steps.append(step)
        if len(steps) == stop_at:
            stopped.set()
            time.sleep(3600)

    try:
        rb.CREATE_HOOK = hook
        Engine.create(capacity, name=name, url=url, shards=shards, max_accounts=8).close()
        out.put(("done", steps))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _create_stalled(url: str, name: str, stop_at: int, capacity: int, shards: int,
                    stopped: Any, go: Any, out: Any) -> None:
    """Create, but stall after step ``stop_at`` until ``go`` (past its lease)."""
    steps = []

    def hook(step: str) -> None:
        steps.append(step)
        if len(steps) == stop_at:
            stopped.set()
            go.wait(120)

    try:
        rb.CREATE_HOOK = hook
        Engine.create(capacity, name=name, url=url, shards=shards, max_accounts=8).close()
        out.put(("result", "created"))
    except SegmentError as e:
        out.put(("result", f"SegmentError: {e}"))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _create_big(url: str, name: str, out: Any) -> None:
    try:
        Engine.create(1_000_000, name=name, url=url).close()
        out.put(("done", None))
    except BaseException:
        out.put(("error", traceback.format_exc()))


class TestCreate:
    def test_racing_creators_exactly_one_wins(self, url, r, spawner):
        """Of two processes creating one name at once, exactly one wins.

        Two processes create one name at once, 12 times: exactly one wins
        and the other gets SegmentError; the free lists hold every slot once.
        Forbidden: two winners, a ServerError, a slot listed twice.
        """
        names = [f"race_{os.getpid()}_{i}_{time.monotonic_ns()}" for i in range(12)]
        barrier = spawner.ctx.Barrier(2)
        out = spawner.ctx.Queue()
        for _ in range(2):
            spawner.start(_racer, url, names, barrier, out)
        try:
            got = collect(out, 2 * len(names), spawner, timeout=240)
            for name in names:
                results = sorted(x[2] for x in got if x[1] == name)
                assert results[-1] == "won" and results[0].startswith("SegmentError"), \
                    (name, results)
                free_lists_exact(r, name, 20_000, 64, 1)
        finally:
            for name in names:
                remove(url, name)

    def test_a_creator_killed_half_way_never_hands_slots_out_twice(self, url, r, spawner):
        """A creator killed half-way never makes the next create hand slots out twice.

        SIGKILL a creator while it fills the free list: the next create
        refuses (SegmentError naming how to remove it) while the dead
        creator's lease lasts, then clears the remains and builds the
        engine whole.  Forbidden: a create over a partial free list.
        """
        name = f"killed_{os.getpid()}_{time.monotonic_ns()}"
        out = spawner.ctx.Queue()
        p = spawner.start(_create_big, url, name, out)
        try:
            until(lambda: r.llen(f"eng:{{{name}:0}}:free") > 0, "the creator to start filling",
                  timeout=60)
            sigkill(p)
            with pytest.raises(SegmentError, match="engine rm") as info:
                Engine.create(1_000_000, name=name, url=url)
            assert not isinstance(info.value, SegmentNotFoundError)
            with pytest.raises(SegmentError, match="not ready"):
                Engine.attach(name, url=url)
            r.delete(f"eng:{{{name}:0}}:lease")     # the dead creator's lease expires
            with Engine.create(1_000_000, name=name, url=url) as e:
                free_lists_exact(r, name, 1_000_000, 64, 1)
                assert e.open_position(100.0, 1.0) is not None
        finally:
            remove(url, name)

    def test_a_creator_killed_at_every_step(self, url, r, spawner):
        """A creator killed after any of its steps leaves a name the next create builds whole.

        A creator stopped for good and SIGKILLed after each of its steps
        (claim, shard init, every chunk, every seal): attach says not ready,
        create refuses while the lease lasts and afterwards builds the engine
        whole (each slot and account listed once, every shard ready).
        """
        capacity, shards = 2 * lib.ENG_REDIS_CREATE_CHUNK + 100, 2
        steps: list[str] = []
        probe = f"probe_{os.getpid()}_{time.monotonic_ns()}"
        rb.CREATE_HOOK = steps.append
        try:
            Engine.create(capacity, name=probe, url=url, shards=shards, max_accounts=8).close()
        finally:
            rb.CREATE_HOOK = None
            remove(url, probe)
        assert len(steps) >= 8, steps
        for stop_at in range(1, len(steps)):
            name = f"step{stop_at}_{os.getpid()}_{time.monotonic_ns()}"
            stopped, out = spawner.ctx.Event(), spawner.ctx.Queue()
            p = spawner.start(_create_until, url, name, stop_at, capacity, shards, stopped, out)
            try:
                assert stopped.wait(60), f"creator never reached step {stop_at}"
                sigkill(p)
                with pytest.raises(SegmentError, match="not ready"):
                    Engine.attach(name, url=url)
                with pytest.raises(SegmentError, match="engine rm"):
                    Engine.create(capacity, name=name, url=url, shards=shards, max_accounts=8)
                r.delete(f"eng:{{{name}:0}}:lease")
                with Engine.create(capacity, name=name, url=url, shards=shards,
                                   max_accounts=8) as e:
                    free_lists_exact(r, name, capacity, 8, shards)
                    assert all(r.hget(f"eng:{{{name}:{s}}}:m", "ready") == b"1"
                               for s in range(shards))
                    assert e.open_position(100.0, 1.0) is not None
            finally:
                remove(url, name)

    def test_a_creator_stalled_past_its_lease_at_every_step(self, url, r, spawner):
        """A creator stalled past its lease never changes the engine that took its name over.

        A creator stalled after each of its steps until its lease is gone;
        another create takes the name over and finishes; then the stalled one
        goes on.  Allowed: it gets SegmentError.  Forbidden: it succeeds, or
        changes the winner's engine (free lists, readiness, incarnation).
        """
        capacity, shards = 2 * lib.ENG_REDIS_CREATE_CHUNK + 100, 2
        for stop_at in range(1, 10):
            name = f"stall{stop_at}_{os.getpid()}_{time.monotonic_ns()}"
            stopped, go, out = spawner.ctx.Event(), spawner.ctx.Event(), spawner.ctx.Queue()
            spawner.start(_create_stalled, url, name, stop_at, capacity, shards, stopped, go,
                          out)
            try:
                assert stopped.wait(60)
                r.delete(f"eng:{{{name}:0}}:lease")   # its lease runs out while it stalls
                with Engine.create(capacity, name=name, url=url, shards=shards,
                                   max_accounts=8) as winner:
                    pos = winner.open_position(100.0, 1.0)
                    go.set()
                    [(_, result)] = collect(out, 1, spawner)
                    assert result.startswith("SegmentError"), result
                    assert "lost its claim" in result or "being created" in result, result
                    with Engine.attach(winner.handle) as again:
                        assert again.state(pos) is State.CREATED
                    free = [int(x) for s in range(shards)
                            for x in r.lrange(f"eng:{{{name}:{s}}}:free", 0, -1)]
                    assert sorted([*free, winner.slot_of(pos)]) == list(range(capacity))
                    assert all(r.hget(f"eng:{{{name}:{s}}}:m", "inc") ==
                               str(winner.handle.incarnation).encode() for s in range(shards))
            finally:
                go.set()
                remove(url, name)

    def test_a_takeover_killed_after_clearing(self, url, r, spawner):
        """A takeover killed right after clearing the remains leaves the third create whole.

        A creator killed half-way, then the creator that took the name over
        killed right after clearing the remains: the third create builds the
        engine whole.
        """
        capacity = 2 * lib.ENG_REDIS_CREATE_CHUNK + 100
        name = f"takeover_{os.getpid()}_{time.monotonic_ns()}"
        try:
            for stop_at in (4, 2):   # a fill chunk; then the takeover's "clear"
                stopped, out = spawner.ctx.Event(), spawner.ctx.Queue()
                p = spawner.start(_create_until, url, name, stop_at, capacity, 2, stopped, out)
                assert stopped.wait(60)
                sigkill(p)
                r.delete(f"eng:{{{name}:0}}:lease")
            with Engine.create(capacity, name=name, url=url, shards=2, max_accounts=8):
                free_lists_exact(r, name, capacity, 8, 2)
        finally:
            remove(url, name)

    def test_a_dead_creators_lease_expires_by_itself(self, url, r, spawner):
        """A dead creator's lease expires by itself; the next create clears and succeeds."""
        name = f"expire_{os.getpid()}_{time.monotonic_ns()}"
        stopped, out = spawner.ctx.Event(), spawner.ctx.Queue()
        p = spawner.start(_create_until, url, name, 2, 64, 2, stopped, out)
        try:
            assert stopped.wait(60)
            sigkill(p)
            until(lambda: not r.exists(f"eng:{{{name}:0}}:lease"), "the lease to expire",
                  timeout=LEASE_S + 10)
            with Engine.create(64, name=name, url=url, shards=2, max_accounts=8):
                free_lists_exact(r, name, 64, 8, 2)
        finally:
            remove(url, name)

    @pytest.mark.parametrize("key", ["m", "free"])
    def test_a_foreign_key_in_a_later_shard(self, url, r, key):
        """A foreign key where shard 1's keys go raises SegmentError naming it.

        A key of another kind where shard 1's keys go: SegmentError naming
        it, no key of the name left but the foreign one; once it is removed,
        the name can be created.
        """
        name = f"foreign_{os.getpid()}_{time.monotonic_ns()}"
        foreign = f"eng:{{{name}:1}}:{key}"
        r.set(foreign, "someone else's")
        try:
            with pytest.raises(SegmentError, match=foreign.replace("{", r"\{")):
                Engine.create(64, name=name, url=url, shards=3)
            assert name_keys(r, name) == [foreign.encode()]
            assert r.get(foreign) == b"someone else's"
            r.delete(foreign)
            with Engine.create(64, name=name, url=url, shards=3, max_accounts=8):
                free_lists_exact(r, name, 64, 8, 3)
        finally:
            remove(url, name)


def _unlink_until(handle: Any, stop_at: str, stopped: Any, out: Any) -> None:
    """Unlink, but stop for good after the remover's step ``stop_at``."""
    def hook(step: str) -> None:
        if step == stop_at:
            stopped.set()
            time.sleep(3600)

    try:
        rb.CREATE_HOOK = hook
        with Engine.attach(handle) as e:
            e.unlink()
        out.put(("done", None))
    except BaseException:
        out.put(("error", traceback.format_exc()))


class TestRemove:
    @pytest.mark.parametrize("stop_at", ["drop", "cleared"])
    def test_an_unlink_killed_half_way(self, url, r, spawner, stop_at):
        """An unlink killed half-way leaves a name that reads as gone and can be created again.

        An unlink SIGKILLed after it claimed the name, or after it deleted
        everything but the claim: attached Engines get SegmentNotFoundError,
        attach says not ready, and a create after the lease builds the
        engine whole.
        """
        e = Engine.create(64, url=url, shards=2, max_accounts=8)
        name = e.name
        try:
            pos = opened(e)
            stopped, out = spawner.ctx.Event(), spawner.ctx.Queue()
            p = spawner.start(_unlink_until, e.handle, stop_at, stopped, out)
            assert stopped.wait(60)
            sigkill(p)
            with pytest.raises(SegmentNotFoundError):
                e.state(pos)
            with pytest.raises(SegmentError, match="being removed"):
                Engine.attach(name, url=url)
            with pytest.raises(SegmentError, match="engine rm"):
                Engine.create(64, name=name, url=url, shards=2, max_accounts=8)
            r.delete(f"eng:{{{name}:0}}:lease")
            with Engine.create(64, name=name, url=url, shards=2, max_accounts=8) as again:
                free_lists_exact(r, name, 64, 8, 2)
                assert again.snapshot().shape[0] == 0
        finally:
            e.close()
            remove(url, name)

    def test_remove_by_name_without_attaching(self, url, r):
        """RedisStore.remove deletes a ready engine by name; a missing name raises."""
        e = Engine.create(64, url=url, shards=2)
        pos = opened(e)
        assert rb.RedisStore.remove(url, e.name) > 0
        assert name_keys(r, e.name) == []
        with pytest.raises(SegmentNotFoundError):
            e.state(pos)
        with pytest.raises(SegmentNotFoundError):
            rb.RedisStore.remove(url, e.name)
        e.close()

    def test_remove_of_a_name_being_created(self, url, r, spawner):
        """remove refuses a name being created unless forced; the creator then leaves nothing.

        While a creator holds its lease, remove refuses (SegmentError);
        with force it removes the name, and the creator, going on, gets
        SegmentError and leaves nothing.
        """
        name = f"removing_{os.getpid()}_{time.monotonic_ns()}"
        stopped, go, out = spawner.ctx.Event(), spawner.ctx.Event(), spawner.ctx.Queue()
        spawner.start(_create_stalled, url, name, 2, 64, 2, stopped, go, out)
        try:
            assert stopped.wait(60)
            with pytest.raises(SegmentError, match="being created"):
                rb.RedisStore.remove(url, name)
            rb.RedisStore.remove(url, name, force=True)
            assert name_keys(r, name) == []
            go.set()
            [(_, result)] = collect(out, 1, spawner)
            assert result.startswith("SegmentError"), result
            assert name_keys(r, name) == []
        finally:
            go.set()
            remove(url, name)

    def test_an_engine_of_another_layout(self, url, r):
        """attach refuses an engine of an older layout saying how to remove it.

        An engine an older version made (layout 1, no incarnation): attach
        refuses it saying how to remove it; remove deletes it; then the name
        can be created.
        """
        name = f"layout1_{os.getpid()}_{time.monotonic_ns()}"
        P = f"eng:{{{name}:0}}:"
        r.hset(P + "m", mapping={"magic": "engine-redis", "layout": "1", "ready": "1",
                                 "shards": "1"})
        r.rpush(P + "free", *range(16))
        try:
            with pytest.raises(SegmentError, match=r"layout.*engine rm"):
                Engine.attach(name, url=url)
            with pytest.raises(SegmentError, match="already exists"):
                Engine.create(16, name=name, url=url)
            assert rb.RedisStore.remove(url, name) == 2
            with Engine.create(16, name=name, url=url, max_accounts=4):
                free_lists_exact(r, name, 16, 4, 1)
        finally:
            remove(url, name)


# -- item 6: incarnations, durability, ?wait=N ----------------------------------------------------
class TestIncarnation:
    def test_an_old_engine_never_acts_on_a_recreated_one(self, url):
        """An Engine of a name's first incarnation never acts on the recreated one.

        Unlink and create the name again: an Engine and a handle of the
        first incarnation get SegmentNotFoundError and change nothing.
        Forbidden: the old id moving the new engine's position.
        """
        first = Engine.create(16, url=url)
        old = Engine.attach(first.handle)
        pos = opened(first)
        first.unlink()
        first.close()
        with Engine.create(16, name=old.name, url=url) as new:
            try:
                again = new.open_position(100.0, 1.0)
                assert again == pos, "same slot and opening: the ids would alias"
                with pytest.raises(SegmentNotFoundError, match="incarnation"):
                    old.transition(pos, Trigger.EXIT_CONDITION_MET)
                with pytest.raises(SegmentNotFoundError):
                    old.update_price(pos, 90.0)
                with pytest.raises(SegmentNotFoundError):
                    old.halt()
                with pytest.raises(SegmentNotFoundError):
                    Engine.attach(old.handle)
                assert new.state(again) is State.CREATED
                assert new.price(again).price == 100.0
                assert new.transition(again, Trigger.POSITION_OPENED) is Outcome.APPLIED
            finally:
                old.close()
                new.unlink()

    def test_a_server_restarted_empty(self):
        """After a server restarted empty, the old Engine's calls raise SegmentNotFoundError."""
        with PrivateRedis() as server:
            old = Engine.create(16, url=server.url)
            pos = opened(old)
            server.restart()
            with Engine.create(16, name=old.name, url=server.url) as new:
                again = new.open_position(100.0, 1.0)
                assert again == pos
                # (the old connection died with the server: the call is sent on a new one)
                with pytest.raises(SegmentNotFoundError):
                    old.transition(pos, Trigger.EXIT_CONDITION_MET)
                assert new.state(again) is State.CREATED
            old.close()

    def test_aof_always_keeps_every_acknowledged_call_over_a_kill(self):
        """With appendfsync always, every acknowledged call survives a server SIGKILL.

        appendfsync always: SIGKILL the server mid-workload and restart it:
        the engine is there (same incarnation) and every deposit that
        returned is in the books; the Engine goes on after the restart.
        """
        with PrivateRedis(appendfsync="always") as server:
            e = Engine.create(16, url=server.url + "?timeout=2")
            acct = e.open_account(cash=0, max_exposure=0, max_positions=0, max_loss=0)
            done = 0
            stop = threading.Event()

            def work() -> None:
                nonlocal done
                with Engine.attach(e.handle) as w:
                    while not stop.is_set():
                        try:
                            w.deposit(acct, 1)
                        except ServerError:
                            return
                        done += 1

            t = threading.Thread(target=work)
            t.start()
            until(lambda: done >= 200, "deposits")
            server.restart(kill=True)
            stop.set()
            t.join(30)
            assert not t.is_alive()
            for _ in range(3):   # the first call may meet the dead connection
                try:
                    cash = e.account(acct).cash
                    break
                except ServerError:
                    continue
            assert done <= cash <= done + 1   # one in flight may have applied unacknowledged
            e.deposit(acct, 1)
            e.unlink()
            e.close()

    def test_wait_1_survives_a_replica_promotion(self):
        """With ?wait=1, every returned deposit survives a replica promotion.

        ?wait=1: while the replica is stopped a deposit cannot return (it
        raises ServerError); once it runs, a deposit that returned is on it.
        SIGKILL the primary, promote the replica: both deposits are there,
        the handle attaches to it (same incarnation), the engine goes on.
        """
        with PrivateRedis() as primary, PrivateRedis(replicaof=primary.port) as replica:
            rep = redis.Redis.from_url(replica.url)
            until(lambda: rep.info("replication")["master_link_status"] == "up",
                  "the replica to sync")
            e = Engine.create(16, url=primary.url + "?wait=1&timeout=2")
            acct = e.open_account(cash=0, max_exposure=0, max_positions=0, max_loss=0)
            pos = opened(e)
            assert replica.proc is not None
            os.kill(replica.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(ServerError, match="0 of 1 replica"):
                    e.deposit(acct, 7)
            finally:
                os.kill(replica.proc.pid, signal.SIGCONT)
            e.deposit(acct, 500)
            assert primary.proc is not None
            primary.proc.kill()
            primary.proc.wait()
            rep.execute_command("REPLICAOF", "NO", "ONE")
            with Engine.attach(e.handle, url=replica.url) as promoted:
                assert promoted.account(acct).cash == Decimal(507)
                assert promoted.state(pos) is State.MONITORING
                assert promoted.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
            e.close()

    @pytest.mark.parametrize("bad", ["x", "-1", "65", "1.5"])
    def test_a_bad_wait_is_refused(self, url, bad):
        """?wait= outside [0, 64] replicas: ArgumentError with the value and the range."""
        with pytest.raises(ArgumentError, match=r"\[0, 64\].*" + re.escape(repr(bad))):
            Engine.create(4, url=f"{url}?wait={bad}")

    def test_wait_without_enough_replicas_is_a_server_error(self):
        """?wait=1 without a replica makes every mutating call raise ServerError."""
        with PrivateRedis() as server:
            slow = server.url + "?wait=1&timeout=1"
            with pytest.raises(ServerError, match="0 of 1 replica"):
                Engine.create(16, name="no_replica", url=slow)
            with Engine.attach("no_replica", url=slow) as e:
                with pytest.raises(ServerError, match="0 of 1 replica"):
                    e.open_account(cash=5, max_exposure=0, max_positions=0, max_loss=0)
                [book] = e.accounts()   # a reader does not wait
                assert book["cash"] == 5 * lib.ENG_MONEY_SCALE


# -- item 10: every function checks that its engine exists ----------------------------------------
CALLS: dict[str, Callable[[Engine, int, int], Any]] = {
    "state": lambda e, p, a: e.state(p),
    "price": lambda e, p, a: e.price(p),
    "context": lambda e, p, a: e.context(p),
    "transition": lambda e, p, a: e.transition(p, Trigger.PAUSE),
    "update_price": lambda e, p, a: e.update_price(p, 99.0),
    "update_prices": lambda e, p, a: e.update_prices(np.array([p]), np.array([99.0])),
    "states": lambda e, p, a: e.states([p]),
    "prices": lambda e, p, a: e.prices([p]),
    "transition_many": lambda e, p, a: e.transition_many([p], [Trigger.PAUSE]),
    "update_token_price": lambda e, p, a: e.update_token_price(3, 99.0),
    "open_position": lambda e, p, a: e.open_position(100.0, 1.0),
    "open_keyed": lambda e, p, a: e.open_position(100.0, 1.0, key="K2"),
    "bind_key": lambda e, p, a: e.bind_key(p, "K3"),
    "lookup": lambda e, p, a: e.lookup("K1"),
    "keys": lambda e, p, a: e.keys(p),
    "release": lambda e, p, a: e.release_position(p),
    "wait_for_change": lambda e, p, a: e.wait_for_change(p, timeout=0.1),
    "snapshot": lambda e, p, a: e.snapshot(),
    "halt": lambda e, p, a: e.halt(),
    "set_metrics": lambda e, p, a: e.set_metrics(False),
    "metrics": lambda e, p, a: e.metrics(),
    "open_account": lambda e, p, a: e.open_account(cash=1, max_exposure=1, max_positions=1,
                                                   max_loss=1),
    "account": lambda e, p, a: e.account(a),
    "accounts": lambda e, p, a: e.accounts(),
    "deposit": lambda e, p, a: e.deposit(a, 1),
    "halt_account": lambda e, p, a: e.halt_account(a),
    "close_account": lambda e, p, a: e.close_account(a),
    "unlink": lambda e, p, a: e.unlink(),
}


class TestUnlinked:
    @pytest.mark.parametrize("call", sorted(CALLS))
    def test_every_call_after_unlink_is_segment_not_found_and_writes_nothing(self, url, r,
                                                                            call):
        """Every call after unlink raises SegmentNotFoundError and writes nothing.

        Another Engine unlinked the engine: each call raises
        SegmentNotFoundError and leaves no key behind; the name can be
        created again.  Forbidden: NotOpenError, CapacityError, a meta hash
        recreated by halt().
        """
        e = Engine.create(16, url=url, max_accounts=4)
        name = e.name
        try:
            pos = e.open_position(100.0, 1.0, token=3, key="K1")
            acct = e.open_account(cash=10, max_exposure=10, max_positions=1, max_loss=1)
            with Engine.attach(e.handle) as other:
                other.unlink()
            assert name_keys(r, name) == []
            with pytest.raises(SegmentNotFoundError):
                CALLS[call](e, pos, acct)
            assert name_keys(r, name) == []
            with Engine.create(16, name=name, url=url) as again:
                again.unlink()
        finally:
            e.close()
            remove(url, name)


class TestResend:
    def test_create_and_remove_steps_sent_twice_apply_once(self, url, r):
        """Create and remove steps sent twice apply once."""
        real = rb._Conn.call

        def twice(self: Any, key: Any, fn: str, *args: Any) -> Any:
            first = real(self, key, fn, *args)
            if fn in ("claim", "binit", "fill", "seal", "renew", "drop", "wipe"):
                again = real(self, key, fn, *args)
                assert again == first, (fn, first, again)
            return first

        name = f"twice_{os.getpid()}_{time.monotonic_ns()}"
        rb._Conn.call = twice   # type: ignore[method-assign]
        try:
            capacity = lib.ENG_REDIS_CREATE_CHUNK + 10
            with Engine.create(capacity, name=name, url=url, shards=2, max_accounts=8) as e:
                free_lists_exact(r, name, capacity, 8, 2)
                e.unlink()
            assert name_keys(r, name) == []
        finally:
            rb._Conn.call = real   # type: ignore[method-assign]
            remove(url, name)


def _made_again(call: Any) -> Any:
    """The same call made again on ServerError until it returns (bounded)."""
    for _ in range(400):
        try:
            return call()
        except ServerError:
            time.sleep(0.01)
    raise AssertionError("the call never returned")


def _cycler(handle: Any, acct: int, stop: Any, started: Any, out: Any) -> None:
    """A worker process: deposit 1, open a booked position, move it through
    its life (a price on the way), release it; each call made again until it
    returns.  Reports the deposits and cycles acknowledged."""
    try:
        e = _made_again(lambda: Engine.attach(handle))
        n = 0
        while not stop.is_set():
            _made_again(lambda: e.deposit(acct, 1))
            pos = _made_again(lambda: e.open_position(100.0, 1.0, account=acct, token=7))
            for t in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET):
                assert _made_again(lambda t=t, pos=pos: e.transition(pos, t)) is Outcome.APPLIED
            _made_again(lambda: e.update_token_price(7, 101.0))
            for t in (Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
                assert _made_again(lambda t=t, pos=pos: e.transition(pos, t)) is Outcome.APPLIED
            assert _made_again(lambda pos=pos: e.release_position(pos)) is Outcome.APPLIED
            n += 1
            if n == 1:
                with started.get_lock():
                    started.value += 1
        out.put(("ok", n))
    except BaseException as ex:   # reported, not swallowed
        out.put(("error", repr(ex)[:300]))


@pytest.mark.slow
class TestKilledServer:
    def test_kill_9_with_aof_always_under_workers_applies_every_call_once(self):
        """Server SIGKILLs under workers with appendfsync always apply every call once.

        appendfsync always, 3 shards, 5 worker processes (more than the
        cores) cycling deposit, booked open, transitions, token price and
        release, each call made again until it returns; the server SIGKILLed
        and restarted 6 times.  Forbidden: a deposit or close booked twice or
        lost (cash != opening + 2 per cycle, deposits != cycles), a slot lost
        or doubled (free + open != capacity per shard), a guard lock left.
        """
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        with PrivateRedis(appendfsync="always") as server:
            e = Engine.create(96, url=server.url + "?timeout=2", shards=3)
            acct = e.open_account(cash=10**6, max_exposure=10**6, max_positions=10**6,
                                  max_loss=10**6)
            stop, started, out = ctx.Event(), ctx.Value("i", 0), ctx.Queue()
            workers = [ctx.Process(target=_cycler, args=(e.handle, acct, stop, started, out))
                       for _ in range(5)]
            for w in workers:
                w.start()
            admin = redis.Redis.from_url(server.url)
            try:
                until(lambda: started.value == 5, "every worker's first cycle", 120)
                for _ in range(6):
                    until(lambda a=admin: a.info("stats")["total_commands_processed"] > 2000,
                          "the workers' calls", 60)
                    server.restart(kill=True)
                    admin = redis.Redis.from_url(server.url)
            finally:
                stop.set()
                reports = [out.get(timeout=120) for _ in workers]
                for w in workers:
                    w.join(60)
            assert [r[0] for r in reports] == ["ok"] * 5, reports
            cycles = sum(r[1] for r in reports)
            books = _made_again(lambda: e.account(acct))
            assert books.deposits == cycles
            assert books.cash == 10**6 + 2 * cycles   # each: a deposit of 1, a close at +1
            assert books.open_positions == 0
            for s in range(3):
                P = f"eng:{{{e.name}:{s}}}:"
                free = admin.lrange(P + "free", 0, -1)
                assert len(set(free)) == len(free) == len(range(s, 96, 3))
                assert admin.scard(P + "open") == 0
                assert list(admin.scan_iter(match=P + "g:*")) == []
            e.unlink()
            e.close()
