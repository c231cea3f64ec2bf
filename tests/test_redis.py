"""The Redis backend itself: connection faults, exact values, guards' lock
keys, kills mid-guard and mid-batch, waits, the EVALSHA fallback, a cluster.

The public API runs on both backends in the other modules (``BACKENDS``);
this module holds what only Redis has.  Every test uses a private
redis-server (the session's, or its own when it kills it)."""

from __future__ import annotations

import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import threading
import time
import traceback
import zlib
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
import redis
from procs import collect, exit_guarded_spec, sigkill, timed, until

from engine import (
    ArgumentError,
    Engine,
    MachineSpec,
    Outcome,
    Rule,
    SegmentError,
    SegmentNotFoundError,
    ServerError,
    SpecMismatchError,
    StaleIdError,
    State,
    Trigger,
    WaitTimeout,
)
from engine._native import lib
from engine.errors import EngineError
from engine.tools.redis_server import PrivateRedis

TTL_S = lib.ENG_REDIS_GUARD_TTL_MS / 1000




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def opened(eng: Engine, **kw: Any) -> int:
    pos = eng.open_position(kw.pop("entry_price", 100.0), kw.pop("amount", 1.0), **kw)
    assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return pos


class TestConnect:
    def test_unreachable_server_is_a_server_error_within_the_timeout(self):
        """Nothing listening: ServerError (a ConnectionError) in about the url's timeout."""
        port = free_port()
        t0 = time.monotonic()
        with pytest.raises(ServerError) as info:
            Engine.create(4, url=f"redis://127.0.0.1:{port}/0?timeout=1")
        took = time.monotonic() - t0
        assert isinstance(info.value, ConnectionError)
        assert took < 10, "a connect must give up within its timeout, not hang"
        assert str(port) in str(info.value)

    @pytest.mark.parametrize("bad", ["http://x:1", "redis", 42, "mysql://h/db"])
    def test_bad_url_is_refused_before_connecting(self, bad):
        """A url that is not redis://, rediss://, unix:// or redis+cluster://: ArgumentError."""
        with pytest.raises(ArgumentError, match="url must be"):
            Engine.create(4, url=bad)

    def test_attach_to_a_missing_name(self, url):
        """No engine of that name: SegmentNotFoundError."""
        with pytest.raises(SegmentNotFoundError):
            Engine.attach("no_such_engine_here", url=url)

    def test_attach_with_another_spec_is_refused(self, made):
        """The stored fingerprint decides: another spec gets SpecMismatchError."""
        e = made()
        other = MachineSpec(states=["A", "B"], triggers=["GO"], rules=[Rule.of("GO", "A", "B")],
                            initial="A", name="other")
        with pytest.raises(SpecMismatchError):
            Engine.attach(e.name, url=e.url, spec=other)

    def test_existing_name_is_refused_and_left_intact(self, made):
        """create() on a name in use: SegmentError; the engine keeps its positions."""
        e = made()
        pos = opened(e)
        with pytest.raises(SegmentError, match="already exists"):
            Engine.create(4, name=e.name, url=e.url)
        assert e.state(pos) is State.MONITORING

    @pytest.mark.parametrize("value", ["hash", "string"])
    def test_a_key_that_is_not_an_engines(self, url, value):
        """A name whose meta key holds something else: SegmentError, nothing changed."""
        r = redis.Redis.from_url(url)
        key = "eng:{foreign_thing:0}:m"
        if value == "hash":
            r.hset(key, mapping={"magic": "something-else", "x": "1"})
        else:
            r.set(key, "hello")
        try:
            with pytest.raises(SegmentError):
                Engine.attach("foreign_thing", url=url)
            assert r.type(key) == (b"hash" if value == "hash" else b"string")
        finally:
            r.delete(key)

    def test_handle_pickles_with_its_url(self, made):
        """The handle carries the url; attach(handle) reaches the same engine."""
        e = made()
        pos = opened(e)
        h = pickle.loads(pickle.dumps(e.handle))
        assert h.url == e.url
        with Engine.attach(h) as other:
            assert other.state(pos) is State.MONITORING

    def test_evalsha_fallback_runs_the_same_functions(self, made, url):
        """Without Functions (servers before 7), the same library runs as one EVALSHA script.

        With Functions off (servers before 7), the same library runs as one
        EVALSHA script: a lifecycle, a key, a batch and an account.
        """
        e = made(url=url + "?functions=0")
        assert not e._seg.conn.functions
        redis.Redis.from_url(url).script_flush()   # NOSCRIPT: the client loads it again
        acct = e.open_account(cash=1000, max_exposure=1000, max_positions=4, max_loss=100)
        pos = e.open_position(100.0, 2.0, token=3, key="K-1", account=acct)
        assert e.lookup("K-1") == pos
        assert e.update_prices(np.array([pos]), np.array([101.0])) == 1
        for t in ("POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"):
            assert e.transition(pos, t) is Outcome.APPLIED
        assert e.account(acct).cash == Decimal(1002)


BITS = [0.1 + 0.2, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1 / 3,
        123456.789e-7, 9007199254740993.0, math.pi]


class TestExactValues:
    @pytest.mark.parametrize("x", BITS)
    def test_a_double_reads_back_bit_identical(self, made, x):
        """Prices and PnL computed on the server are the IEEE doubles C computes."""
        e = made()
        entry = 1.0000000000000002
        pos = e.open_position(entry, 3.0000000000000004, side=-1)
        e.update_price(pos, x)
        p = e.price(pos)
        diff = x - entry
        for got, want in ((p.price, x), (p.pnl_pct, diff / entry * 100.0 * -1),
                          (p.pnl_usd, diff * 3.0000000000000004 * -1)):
            assert struct.pack("<d", got) == struct.pack("<d", want)
        assert struct.pack("<d", e.context(pos).entry_price) == struct.pack("<d", entry)

    def test_int64_and_bytes_fields_round_trip(self, made):
        """i8 at both ends, u8 at the top, S16 with every byte: exact."""
        spec = MachineSpec(states=["A", "B"], triggers=["GO"], rules=[Rule.of("GO", "A", "B")],
                           initial="A", name="ints",
                           fields={"lo": "i8", "hi": "i8", "u": "u8", "tag": "S16"})
        e = made(spec=spec)
        pos = e.open(lo=-(2**63), hi=2**63 - 1, u=2**64 - 1, tag=bytes(range(1, 17)))
        c = e.context(pos)
        assert (c.lo, c.hi, c.u, c.tag) == (-(2**63), 2**63 - 1, 2**64 - 1, bytes(range(1, 17)))
        assert e.transition(pos, "GO", lo=2**53 + 1) is Outcome.APPLIED
        assert e.context(pos).lo == 2**53 + 1

    def test_money_stays_exact_past_2_to_the_53(self, made):
        """Money stays exact past 2^53 units (int64 HINCRBY, not Lua doubles).

        Cash of 10^10 + 1e-8 is 10^18 + 1 units: Lua doubles would lose the
        unit; the server's int64 HINCRBY keeps it.
        """
        e = made()
        a = e.open_account(cash=Decimal("10000000000.00000001"), max_exposure=10**9,
                           max_positions=4, max_loss=1)
        e.deposit(a, Decimal("0.00000001"))
        e.withdraw(a, Decimal("0.00000003"))
        assert e.account(a).cash == Decimal("9999999999.99999999")


class TestShards:
    def test_a_sharded_batch_skips_a_stale_id(self, made):
        """A batch across shards skips a stale id and writes the others."""
        e = made(capacity=16, shards=4)
        ids = [e.open_position(100.0, 1.0) for _ in range(8)]
        assert len({e.slot_of(i) % 4 for i in ids}) == 4
        gone = ids[5]
        for t in ("POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"):
            e.transition(gone, t)
        e.release_position(gone)
        live = [i for i in ids if i != gone]
        before = e.prices(live)["version"]
        assert e.update_prices(np.array(ids), np.full(8, 120.0)) == 7
        assert (e.prices(live)["version"] == before + 1).all()
        assert (e.prices(live)["price"] == 120.0).all()


# -- guards: a lock key with an expiry ------------------------------------------------------
def slow_guard(ctx: Any, price: Any) -> bool:
    """Takes its time: the test process decides how long (a file)."""
    path = os.environ.get("ENGINE_TEST_GUARD_FILE", "")
    while path and os.path.exists(path):
        time.sleep(0.01)
    delay = float(os.environ.get("ENGINE_TEST_GUARD_SLEEP", "0"))
    time.sleep(delay)
    return True


SLOW = exit_guarded_spec(slow_guard, "slow_guard")


def _guarded_exit(handle: Any, pos: int, env: dict[str, str], out: Any) -> None:
    try:
        os.environ.update(env)
        with Engine.attach(handle) as eng:
            out.put(("started", None))
            out.put(("done", eng.transition(pos, Trigger.EXIT_STARTED).name))
    except BaseException:
        out.put(("error", traceback.format_exc()))


class TestGuards:
    def _pending(self, made: Any) -> tuple[Engine, int]:
        e = made(spec=SLOW)
        pos = opened(e)
        assert e.transition(pos, Trigger.EXIT_CONDITION_MET) is Outcome.APPLIED
        return e, pos

    def test_a_client_killed_mid_guard_never_commits_and_blocks_only_until_expiry(
            self, made, spawner, tmp_path):
        """A client killed mid-guard never commits and blocks the position only until expiry.

        Forbidden: the dead client's transition applied; the position stuck
        past the lock's expiry.  Allowed: CONFLICT for others while it lives.
        """
        e, pos = self._pending(made)
        gate = tmp_path / "hold"
        gate.write_text("")
        out = spawner.ctx.Queue()
        p = spawner.start(_guarded_exit, e.handle, pos, {"ENGINE_TEST_GUARD_FILE": str(gate)},
                          out)
        assert out.get(timeout=60)[0] == "started"
        r = redis.Redis.from_url(e.url)
        until(lambda: r.exists(e._seg.prefixes[0] + f"g:{e.slot_of(pos)}"), "the guard's lock")
        assert e.transition(pos, Trigger.EXIT_CANCELLED) is Outcome.CONFLICT
        sigkill(p)
        killed_at = time.monotonic()
        until(lambda: e.transition(pos, Trigger.EXIT_CANCELLED) is Outcome.APPLIED,
              "the lock to expire", timeout=TTL_S + 10)
        assert time.monotonic() - killed_at <= TTL_S + 5
        assert e.state(pos) is State.MONITORING
        assert e.snapshot()["transitions"][0] == 4   # open, OPENED, EXIT_MET, CANCELLED

    def test_a_guard_stalled_past_expiry_cannot_commit(self, made, spawner):
        """A guard stalled past its lock's expiry gets CONFLICT and changes nothing."""
        e, pos = self._pending(made)
        out = spawner.ctx.Queue()
        spawner.start(_guarded_exit, e.handle, pos,
                      {"ENGINE_TEST_GUARD_SLEEP": str(TTL_S + 1.0)}, out)
        assert out.get(timeout=60)[0] == "started"
        r = redis.Redis.from_url(e.url)
        until(lambda: r.exists(e._seg.prefixes[0] + f"g:{e.slot_of(pos)}"), "the guard's lock")
        until(lambda: e.transition(pos, Trigger.EXIT_CANCELLED) is Outcome.APPLIED,
              "the lock to expire", timeout=TTL_S + 30)
        [(kind, outcome)] = collect(out, 1, spawner)
        assert (kind, outcome) == ("done", "CONFLICT")
        assert e.state(pos) is State.MONITORING

    def test_a_raising_guard_releases_its_lock_at_once(self, url, made):
        """A raising guard's exception reaches the caller and its lock goes at once.

        A guard that raises: the exception reaches the caller and the lock
        is gone (the next transition does not wait for the expiry).
        """
        def boom(ctx: Any, price: Any) -> bool:
            raise RuntimeError("guard failed")

        e = made(spec=exit_guarded_spec(boom, "boom"))
        pos = opened(e)
        e.transition(pos, Trigger.EXIT_CONDITION_MET)
        with pytest.raises(RuntimeError, match="guard failed"):
            e.transition(pos, Trigger.EXIT_STARTED)
        outcome, took = timed(lambda: e.transition(pos, Trigger.EXIT_CANCELLED))
        assert outcome is Outcome.APPLIED and took < TTL_S / 2


# -- kills and faults -------------------------------------------------------------------------
def _batcher(handle: Any, ids: list[int], ready: Any, out: Any) -> None:
    try:
        with Engine.attach(handle) as eng:
            arr = np.array(ids, dtype=np.uint64)
            k = 1
            ready.set()
            while True:
                eng.update_prices(arr, np.full(len(arr), float(k)))
                k += 1
    except BaseException:
        out.put(("error", traceback.format_exc()))


class TestKills:
    def test_a_client_killed_mid_batch_leaves_no_half_batch(self, made, spawner):
        """A client killed mid-batch leaves no half batch on a shard.

        A batch on one shard is one script: after a SIGKILL every position
        shows the same batch.  Forbidden: two prices among them.
        """
        e = made(capacity=512)
        ids = [e.open_position(100.0, 1.0) for _ in range(512)]
        out = spawner.ctx.Queue()
        for _ in range(5):
            ready = spawner.ctx.Event()
            p = spawner.start(_batcher, e.handle, ids, ready, out)
            assert ready.wait(60)
            time.sleep(0.2)
            sigkill(p)
            prices = e.prices(ids)
            assert len(set(prices["price"].tolist())) == 1, set(prices["price"].tolist())
            assert len(set(prices["version"].tolist())) == 1
        assert not e.recover().changed

    def test_server_gone_mid_run(self):
        """A server gone mid-run makes calls and waits raise ServerError within the timeout."""
        server = PrivateRedis()
        try:
            e = Engine.create(4, url=server.url + "?timeout=2")
            pos = opened(e)
            err: list[BaseException] = []

            def wait() -> None:
                try:
                    e2 = Engine.attach(e.handle)
                    e2.wait_for_change(pos, timeout=30)
                except BaseException as x:
                    err.append(x)

            t = threading.Thread(target=wait)
            t.start()
            until(lambda: int(redis.Redis.from_url(server.url).info("clients")["blocked_clients"]),
                  "the waiter to block")
        finally:
            server.stop()
        def call_after() -> None:
            with pytest.raises(ServerError):
                e.state(pos)

        _, took = timed(call_after)
        t.join(10)
        assert not t.is_alive() and err and isinstance(err[0], ServerError), err
        assert took < 5


class TestWait:
    def test_ctrl_c_interrupts_a_wait_and_the_engine_goes_on(self, made):
        """SIGINT interrupts a wait at once and the next call reads its own reply."""
        e = made()
        pos = opened(e)
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            e.wait_for_change(pos, timeout=10)
        timer.join()
        assert e.state(pos) is State.MONITORING
        assert e.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        assert e.state(pos) is State.PAUSED

    def test_release_wakes_a_waiter_with_stale_id(self, made):
        """A waiter on a position that is released: StaleIdError, not a timeout."""
        e = made()
        pos = opened(e)
        for t in ("EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"):
            e.transition(pos, t)
        other = Engine.attach(e.handle)
        threading.Timer(0.2, lambda: other.release_position(pos)).start()
        with pytest.raises(StaleIdError):
            e.wait_for_change(pos, timeout=10)
        other.close()

    def test_timeout_zero_does_not_block(self, made):
        """timeout=0: WaitTimeout at once."""
        e = made()
        pos = opened(e)
        with pytest.raises(WaitTimeout):
            e.wait_for_change(pos, timeout=0)


# -- a real 3-node cluster ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Any:
    """Three redis-server nodes made one cluster with redis-cli --cluster create."""
    ports = [cluster_port() for _ in range(3)]
    procs, dirs = [], []
    import tempfile
    for port in ports:
        d = tempfile.TemporaryDirectory(prefix="engine-cluster-")
        dirs.append(d)
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled",
             "yes", "--cluster-config-file", f"{d.name}/nodes.conf", "--save", "",
             "--cluster-allow-replica-migration", "no",   # a node resharded empty stays primary
             "--appendonly", "no", "--dir", d.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for port in ports:
            until(lambda p=port: _listening(p), f"node {port}")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)
        for port in ports:
            node = redis.Redis(port=port)
            until(lambda n=node: n.cluster("info")["cluster_state"] == "ok",
                  f"cluster state ok on {port}")
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        for d in dirs:
            d.cleanup()


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    import random
    for _ in range(200):
        port = random.randrange(20000, 55000)
        if not (_listening(port) or _listening(port + 10000)):
            try:
                for p in (port, port + 10000):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", p))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair for a cluster node")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
class TestCluster:
    def test_the_api_on_a_three_node_cluster(self, cluster):
        """The whole API works on a three-node cluster, each call on one node.

        Positions spread over the nodes, each call on one node: lifecycle,
        fields, prices, token fan-out, batch, keys, an account, snapshot,
        wait, release, attach by handle.
        """
        e = Engine.create(64, url=cluster, shards=6)
        try:
            acct = e.open_account(cash=10_000, max_exposure=10_000, max_positions=8,
                                  max_loss=1000)
            ids = [e.open_position(100.0, 1.0, token=9, key=f"K{i}") for i in range(12)]
            booked = e.open_position(100.0, 2.0, token=9, account=acct)
            nodes = {e._seg.conn.client.get_node_from_key(e._seg.meta_keys[e.slot_of(i) % 6]).name
                     for i in ids}
            assert len(nodes) == 3, f"positions on {nodes}"
            for i in ids:
                assert e.transition(i, Trigger.POSITION_OPENED) is Outcome.APPLIED
                assert e.lookup(f"K{ids.index(i)}") == i
            assert e.update_token_price(9, 105.0) == 13
            assert e.update_prices(np.array(ids), np.full(12, 106.0)) == 12
            assert (e.states(ids) == int(State.MONITORING)).all()
            assert e.transition(ids[0], Trigger.EXIT_CONDITION_MET, exit_reason=7) \
                is Outcome.APPLIED
            assert e.context(ids[0]).exit_reason == 7
            assert len(e.snapshot()) == 13
            for t in ("POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"):
                e.transition(booked, t)
            assert e.account(acct).cash == Decimal(10_010)
            with Engine.attach(e.handle) as other:
                threading.Timer(0.2, lambda: other.transition(ids[1], Trigger.PAUSE)).start()
                assert e.wait_for_change(ids[1], timeout=10) is State.PAUSED
            assert e.release_position(booked) is Outcome.APPLIED
        finally:
            e.unlink()
            e.close()


    def test_a_reshard_under_load_applies_every_call_once(self, cluster):
        """A reshard under load applies every call once and loses no slot.

        redis-cli --cluster reshard moves every slot of one node to another
        and back while a worker cycles positions (some booked on an account,
        some with a key) through open, transitions, a guarded exit, the
        closing and release.  Forbidden: a lost or doubled slot (free + open
        != capacity per shard), a guard's lock key left behind, a call applied
        twice or half (the worker's model and the books disagree).
        """
        capacity, shards = 3000, 16
        e = Engine.create(capacity, url=cluster + "?timeout=20", shards=shards,
                          spec=RESHARD_SPEC)
        admin = e._seg.conn.client
        try:
            acct = e.open_account(cash=10**6, max_exposure=10**6, max_positions=10**4,
                                  max_loss=10**6)
            node_of = {s: admin.get_node_from_key(e._seg.meta_keys[s]).name
                       for s in range(shards)}
            stop, errors = threading.Event(), []
            log = {"cycles": 0, "server_errors": 0, "booked": 0}
            worker = threading.Thread(target=_reshard_worker, args=(e, acct, stop, log, errors))
            worker.start()
            try:
                ids = {n["name"]: n["id"] for n in _cluster_nodes(admin)}
                a, b = sorted(ids)[:2]
                before = log["cycles"]
                for src, dst in ((a, b), (b, a)):
                    done = subprocess.run(["redis-cli", "--cluster", "reshard", a, "--cluster-from",
                                    ids[src], "--cluster-to", ids[dst], "--cluster-slots",
                                    "16384", "--cluster-yes"],
                                   capture_output=True, text=True, timeout=600)
                    assert done.returncode == 0, f"reshard failed: {done.stdout[-600:]}"
                during = log["cycles"] - before
            finally:
                stop.set()
                worker.join(120)
            assert not errors, errors[0]
            assert during > 0, "no cycle ran during the reshard"
            assert e._seg.conn.resent > 0, "no call met the migration (ASK, TRYAGAIN, MOVED)"
            moved = {s for s in range(shards) if node_of[s] in (a, b)}
            assert moved, "no shard of the engine was on the nodes resharded"
            time.sleep(TTL_S)   # a lock of a call that raised expires by itself
            for s in range(shards):
                P = e._seg.prefixes[s]
                free = admin.llen(P + "free")
                opened_n = admin.scard(P + "open")
                mine = len(range(s, capacity, shards))
                assert free + opened_n == mine, f"shard {s}: {free} free + {opened_n} open"
                assert len(set(admin.lrange(P + "free", 0, -1))) == free, f"shard {s}: twice"
                locks = list(admin.scan_iter(match=P.replace("{", "\\{").replace("}", "\\}")
                                             + "g:*", target_nodes=admin.get_node_from_key(P)))
                assert not locks, f"orphaned guard locks {locks}"
            assert len(e.snapshot()) == 0, "a position the worker released is still open"
            books = e.account(acct)
            assert books.open_positions == 0 and books.reserved == 0
            # each booked cycle: bought at 100, sold at 101, one unit
            assert books.realized_pnl == log["booked"]
            assert books.cash == 10**6 + log["booked"]
        finally:
            e.unlink()
            e.close()


def reshard_allow(ctx: Any, price: Any) -> bool:
    return True


RESHARD_SPEC = exit_guarded_spec(reshard_allow, "reshard_allow")


def _cluster_nodes(client: Any) -> list[dict[str, str]]:
    """name (host:port) and id of each primary."""
    out = []
    raw = client.get_default_node().redis_connection.execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else raw
    for line in text.splitlines():
        f = line.split()
        if "master" in f[2]:
            out.append({"name": f[1].split("@")[0], "id": f[0]})
    return out


def _reshard_worker(e: Engine, acct: int, stop: threading.Event, log: dict[str, int],
                    errors: list[str]) -> None:
    """Cycle positions until stopped (and take a snapshot now and then);
    every call made again (the same call) until it returns, each must return
    what applying it once returns."""
    def again(call: Any) -> Any:
        for _ in range(200):
            try:
                return call()
            except ServerError:
                log["server_errors"] += 1
        raise AssertionError("a call never returned")

    n = 0
    live: list[tuple[int, bool]] = []
    path = (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED)
    try:
        while not stop.is_set() or live:
            if not stop.is_set() and len(live) < 8:
                n += 1
                booked = n % 2 == 0
                kw: dict[str, Any] = {"account": acct} if booked else {"key": f"K{n}"}
                pos = again(lambda kw=kw, tok=n % 5: e.open_position(100.0, 1.0, token=tok, **kw))
                for t in path:
                    rc = again(lambda t=t, pos=pos: e.transition(pos, t))
                    assert rc is Outcome.APPLIED, f"{t.name} of {pos}: {rc}"
                live.append((pos, booked))
                continue
            pos, booked = live.pop(0)
            again(lambda pos=pos: e.update_price(pos, 101.0))
            rc = again(lambda pos=pos: e.transition(pos, Trigger.EXIT_COMPLETED))
            assert rc is Outcome.APPLIED, f"EXIT_COMPLETED of {pos}: {rc}"
            rc = again(lambda pos=pos: e.release_position(pos))
            assert rc is Outcome.APPLIED, f"release of {pos}: {rc}"
            log["booked"] += booked
            log["cycles"] += 1
            if log["cycles"] % 25 == 0:   # a reader of undeclared keys (it writes nothing)
                again(e.snapshot)
    except BaseException:
        errors.append(traceback.format_exc())


def _exiting(e: Engine, acct: int) -> int:
    pos = e.open_position(1.0, 1000.0, side=1, token=1, account=acct)
    for t in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED):
        assert e.transition(pos, t) is Outcome.APPLIED
    return pos


class TestNothingHalfApplied:
    def test_a_closing_refused_by_the_books_leaves_the_record_untouched(self, made):
        """A close refused by the books leaves the fields given with it unwritten.

        A close whose realized PnL cannot be booked (last x amount past
        int64 units) is refused; the fields given with it must not stick.
        """
        e = made()
        a = e.open_account(cash=1_000_000, max_exposure=1_000_000, max_positions=4,
                           max_loss=10**9)
        pos = _exiting(e, a)
        e.update_price(pos, 1e12)          # 1e15 money: 1e23 units, past int64
        before = e.context(pos)
        with pytest.raises(EngineError):
            e.transition(pos, Trigger.EXIT_COMPLETED, exit_reason=9)
        after = e.context(pos)
        assert after.exit_reason == before.exit_reason
        assert after.version == before.version
        assert e.state(pos) is State.EXITING
        acc = e.account(a)
        assert acc.reserved == 1000 and acc.open_positions == 1 and acc.cash == 1_000_000

    def test_realized_past_int64_is_refused_at_the_opening(self, made):
        """An opening whose worst close would pass realized's int64 top is refused.

        Large wins with the cash withdrawn between them: the opening whose
        worst close would pass realized's int64 top is refused at the opening
        (before: accepted, and its close refused for good); the books stay
        exact.
        """
        e = made()
        amount = 30_000_000.0      # notional 3e15 units; worst gain 1023x that
        a = e.open_account(cash=amount, max_exposure=amount, max_positions=4, max_loss=10**9)
        wins = 0
        with pytest.raises(EngineError, match="no room to book it"):
            for wins in range(10):   # noqa: B007 - three fit in int64, the fourth does not
                p = e.open_position(1.0, amount, side=1, token=1, account=a)
                for t in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET,
                          Trigger.EXIT_STARTED):
                    e.transition(p, t)
                e.update_price(p, 1024.0)                 # the top of its band
                assert e.transition(p, Trigger.EXIT_COMPLETED) is Outcome.APPLIED
                e.withdraw(a, e.account(a).cash - int(amount))
        assert wins == 3
        acc = e.account(a)
        assert acc.open_positions == 0 and acc.reserved == 0
        assert acc.cash == acc.opening_cash + acc.deposits - acc.withdrawals + acc.realized_pnl


class TestShardedKeys:
    def test_a_key_opened_on_an_account_of_another_shard_is_found_and_unique(self, made):
        """A key opened with an account of another shard is found by lookup and stays unique."""
        e = made(capacity=16, shards=2)
        a = e.open_account(cash=10**6, max_exposure=10**6, max_positions=8, max_loss=10**6)
        shard = (a & 0xFFFFFF) % 2
        key = next(f"K{i}" for i in range(100) if zlib.crc32(f"K{i}".encode()) % 2 != shard)
        try:
            pos = e.open_position(100.0, 1.0, side=1, token=1, account=a, key=key)
        except ArgumentError:
            return   # refused as bind_key refuses a key of another shard: fine
        assert e.lookup(key) == pos
        with pytest.raises(EngineError):   # KeyExistsError: the key is taken
            e.open_position(100.0, 1.0, side=1, token=1, key=key)


class TestWaits:
    def test_a_wait_longer_than_the_url_timeout_is_a_timeout_not_a_server_error(self, made, url):
        """A wait longer than the url's timeout ends in WaitTimeout, not ServerError."""
        e = made(url=url + "?timeout=0.3")
        pos = e.open_position(100.0, 1.0, side=1, token=1)
        with pytest.raises(WaitTimeout):
            e.wait_for_change(pos, timeout=1.5)
        assert e.state(pos) is State.CREATED


class TestBatches:
    def test_transition_many_reports_a_refused_close_as_its_error(self, made):
        """transition_many raises an element's MoneyError with every outcome.

        C mapped every error of one element but stale/not-open to CONFLICT
        (and a negative code packed as a byte read back as a bogus outcome,
        221): now the element's MoneyError is raised, with every outcome.
        """

        e = made()
        a = e.open_account(cash=1_000_000, max_exposure=1_000_000, max_positions=4,
                           max_loss=10**9)
        pos = _exiting(e, a)
        e.update_price(pos, 1e12)
        with pytest.raises(EngineError) as exc:
            e.transition_many(np.array([pos]), np.array([int(Trigger.EXIT_COMPLETED)]))
        assert type(exc.value).__name__ == "MoneyError"
        assert [int(x) for x in exc.value.outcomes] == [0x80 | 35]
        assert e.state(pos) is State.EXITING


class TestAccountsEdges:
    def test_withdrawals_past_int64_are_refused_whole(self, made):
        """A withdrawal that would pass the withdrawals counter's int64 top leaves cash alone.

        Cumulative withdrawals can pass int64 while cash never does; the
        cash must not move when the withdrawals counter cannot.
        """
        e = made()
        big = 90_000_000_000                     # 9e18 units
        a = e.open_account(cash=big, max_exposure=1, max_positions=1, max_loss=1)
        e.withdraw(a, big)
        e.deposit(a, big)
        before = e.account(a)
        with pytest.raises(EngineError):
            e.withdraw(a, big)
        acc = e.account(a)
        assert (acc.cash, acc.withdrawals) == (before.cash, before.withdrawals)
        assert acc.cash == acc.opening_cash + acc.deposits - acc.withdrawals + acc.realized_pnl
