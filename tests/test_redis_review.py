"""Adversarial review of the Redis backend after the issue-17 merge: each
test broke the merged code it was written against."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
import redis
import test_redis
from procs import readable, until

import engine.store.redis.store as rb
from engine import (
    BusyError,
    Engine,
    Outcome,
    SegmentError,
    ServerError,
    State,
    Trigger,
)
from engine.tools.redis_server import PrivateRedis


class TestThreads:
    def test_two_threads_on_one_engine_never_read_each_others_replies(self, made):
        """Two threads calling one Engine: every deposit that returned is in
        the books once (none answered with another call's recorded reply),
        every state read is the position's, and the Engine stays in step."""
        e = made(16)
        acct = e.open_account(cash=0, max_exposure=0, max_positions=0, max_loss=0)
        pos = e.open_position(100.0, 1.0)
        done = [0, 0]
        wrong: list[Any] = []

        def work(i: int) -> None:
            for _ in range(1500):
                try:
                    e.deposit(acct, 1)
                    done[i] += 1
                    st = e.state(pos)
                    if st is not State.CREATED:
                        wrong.append(st)
                except Exception as ex:   # a reply read out of step: any error
                    wrong.append(repr(ex)[:120])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert wrong == []
        assert e.account(acct).deposits == sum(done)
        assert e.state(pos) is State.CREATED


@pytest.mark.parametrize("policy", ["volatile-ttl", "allkeys-lru"])
class TestEviction:
    def test_a_server_that_may_evict_the_engines_keys_is_refused(self, policy):
        """A server whose maxmemory-policy evicts keys would drop a request
        record (volatile-ttl: an acknowledged deposit applied twice on its
        resend) or the engine itself (allkeys-lru): create refuses it with
        SegmentError naming the policy, and so does attach after the policy
        was switched on a running engine; nothing is created."""
        with PrivateRedis() as server:
            admin = redis.Redis.from_url(server.url)
            admin.config_set("maxmemory-policy", policy)
            with pytest.raises(SegmentError, match=f"maxmemory-policy {policy}.*noeviction"):
                Engine.create(16, url=server.url, name="evictable")
            assert list(admin.scan_iter(match="eng:*")) == []
            admin.config_set("maxmemory-policy", "noeviction")
            e = Engine.create(16, url=server.url, name="evictable")
            admin.config_set("maxmemory-policy", policy)
            with pytest.raises(SegmentError, match=f"maxmemory-policy {policy}"):
                Engine.attach(e.handle)
            e.close()


def _lose_reply_of(e: Engine, fn: str, nth: int) -> list[int]:
    """The ``nth`` call of function ``fn`` that applies (not a NEED answer)
    runs on the server, then raises ServerError as if its reply and every
    resend were lost (once)."""
    conn = e._seg.conn
    real = conn.fcall
    seen = [0]

    def fcall(route: Any, keys: bytes, nk: int, f: str, args: Any) -> Any:
        r = real(route, keys, nk, f, args)
        if f == fn and not rb._needs(r):
            seen[0] += 1
            if seen[0] == nth:
                conn.fcall = real
                raise ServerError(f"{f} failed (not known to have applied): lost")
        return r

    conn.fcall = fcall
    return seen


class TestSeveralShards:
    @pytest.mark.parametrize("shard", [1, 2])
    def test_transition_many_made_again_returns_the_first_outcomes(self, made, shard):
        """transition_many over 3 shards raises ServerError after shard
        ``shard``'s part ran: made again, every element's outcome is the
        first one (APPLIED), each transition applied once."""
        e = made(12, shards=3)
        ids = [e.open_position(100.0, 1.0) for _ in range(6)]
        _lose_reply_of(e, "txmany", shard + 1)
        with pytest.raises(ServerError):
            e.transition_many(ids, Trigger.POSITION_OPENED)
        out = e.transition_many(ids, Trigger.POSITION_OPENED)
        assert [Outcome(int(o)) for o in out] == [Outcome.APPLIED] * 6
        assert [e.state(i) for i in ids] == [State.MONITORING] * 6

    @pytest.mark.parametrize("shard", [1, 2])
    def test_update_prices_made_again_applies_each_price_once(self, made, shard):
        """update_prices over 3 shards raises ServerError after shard
        ``shard``'s part ran: made again, every price applied once (version 2)."""
        e = made(12, shards=3)
        ids = [e.open_position(100.0, 1.0) for _ in range(6)]
        _lose_reply_of(e, "upds", shard + 1)
        with pytest.raises(ServerError):
            e.update_prices(ids, [101.0] * 6)
        assert e.update_prices(ids, [101.0] * 6) == 6
        assert [e.price(i).version for i in ids] == [2] * 6

    @pytest.mark.parametrize("shard", [1, 2])
    def test_update_token_price_made_again_applies_each_price_once(self, made, shard):
        """update_token_price over 3 shards raises ServerError after shard
        ``shard``'s part ran: made again, every position's price applied once."""
        e = made(12, shards=3)
        ids = [e.open_position(100.0, 1.0, token=9) for _ in range(6)]
        _lose_reply_of(e, "tokp", shard + 1)
        with pytest.raises(ServerError):
            e.update_token_price(9, 101.0)
        assert e.update_token_price(9, 101.0) == 6
        assert [e.price(i).version for i in ids] == [2] * 6

    def test_another_call_in_between_makes_it_a_new_call(self, made):
        """After a partial update_prices, another writing call, then the same
        update_prices: a new call (every shard's part sent again, as new requests)."""
        e = made(12, shards=3)
        ids = [e.open_position(100.0, 1.0) for _ in range(6)]
        _lose_reply_of(e, "upds", 2)
        with pytest.raises(ServerError):
            e.update_prices(ids, [101.0] * 6)
        e.update_price(ids[0], 102.0)
        assert e.update_prices(ids, [101.0] * 6) == 6
        versions = [e.price(i).version for i in ids]
        assert versions[0] == 4 and set(versions[1:]) <= {2, 3}


class TestWaitAfterResend:
    def test_a_resent_call_answered_from_its_record_still_waits_for_the_replica(self):
        """?wait=1, the replica stopped: a deposit runs on the primary, its
        reply is lost with the connection (CLIENT KILL) and the resend is
        answered from the request record on a new connection.  It must not
        return (the replica never got it; a failover would lose it): it
        raises ServerError; made again once the replica runs, it returns and
        applied once."""
        with PrivateRedis() as primary, PrivateRedis(replicaof=primary.port) as replica:
            rep = redis.Redis.from_url(replica.url)
            until(lambda: rep.info("replication")["master_link_status"] == "up",
                  "the replica to sync")
            e = Engine.create(16, url=primary.url + "?wait=1&timeout=1")
            acct = e.open_account(cash=0, max_exposure=0, max_positions=0, max_loss=0)
            conn = e._seg.conn.conn
            cid = e._seg.conn.command("CLIENT", "ID")
            admin = redis.Redis.from_url(primary.url)
            read = conn.read_response
            killed: list[int] = []

            def lose_reply(*args: Any, **kw: Any) -> Any:
                conn.read_response = read   # once
                assert readable(conn._sock, 10), "no reply"   # it ran
                admin.execute_command("CLIENT", "KILL", "ID", cid)
                killed.append(cid)
                conn.disconnect()
                raise redis.ConnectionError("killed before the reply was read")

            assert replica.proc is not None
            os.kill(replica.proc.pid, signal.SIGSTOP)
            try:
                conn.read_response = lose_reply
                with pytest.raises(ServerError, match="0 of 1 replica"):
                    e.deposit(acct, 7)
                assert killed, "the fault never happened"
            finally:
                os.kill(replica.proc.pid, signal.SIGCONT)
            e.deposit(acct, 7)   # the same call made again: its first reply, now replicated
            assert e.account(acct).deposits == 7
            until(lambda: rep.hget(f"eng:{{{e.name}:0}}:a:0", "deposits") is not None,
                  "the replica to hold the account")
            e.unlink()
            e.close()


class TestRequestWindow:
    def test_a_call_made_again_past_the_window_is_not_applied_twice(self, made, url):
        """A deposit ran but raised ServerError (reply lost); the same call
        made again after the request window (the server forgot its record):
        it must not apply a second time.  It raises ServerError saying the
        window passed; the books hold the one deposit.  Made once more, it is
        a new call."""
        e = made(16)
        acct = e.open_account(cash=0, max_exposure=0, max_positions=0, max_loss=0)
        _lose_reply_of(e, "acash", 1)
        with pytest.raises(ServerError):
            e.deposit(acct, 1)
        store = e._seg
        admin = redis.Redis.from_url(url)
        # the window passes: the server's record expires, the client's clock moves on
        assert admin.delete(*store._fixed[0][2:]) == 1
        what, seq, args, first = store._pending
        store._pending = (what, seq, args, first - rb.REDIS_REQUEST_WINDOW_MS / 1000)
        with pytest.raises(ServerError, match="request window"):
            e.deposit(acct, 1)
        assert e.account(acct).deposits == 1
        e.deposit(acct, 1)
        assert e.account(acct).deposits == 2


cluster = test_redis.cluster   # the 3-node cluster fixture (one for this module)


@pytest.mark.slow
class TestClusterWait:
    def test_a_call_answered_after_ask_waits_on_the_node_that_ran_it(self, cluster):
        """?wait=1 while the engine's slot migrates (its keys already on the
        importing node): a deposit is redirected (ASK) and runs on the
        importing node; its WAIT must go to that node's connection (there it
        counts the deposit's write), not to the slot's old owner, where it
        would count nothing of it and could say a write is replicated that
        is not."""
        from redis.cluster import RedisCluster
        e = Engine.create(16, url=cluster + "?timeout=2", shards=1, name="askwait")
        acct = e.open_account(cash=0, max_exposure=0, max_positions=0, max_loss=0)
        rc = RedisCluster.from_url(cluster.replace("redis+cluster", "redis"))
        meta = f"eng:{{{e.name}:0}}:m"
        slot = rc.keyslot(meta)
        source = rc.get_node_from_key(meta)
        target = next(n for n in rc.get_primaries() if n.name != source.name)
        src = rc.get_redis_connection(source)
        dst = rc.get_redis_connection(target)
        ids = {n.name: rc.get_redis_connection(n).execute_command("CLUSTER", "MYID").decode()
               for n in (source, target)}
        waits = lambda c: c.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)  # noqa: E731
        e.close()
        with Engine.attach("askwait", url=cluster + "?timeout=2&wait=1") as w:
            with pytest.raises(ServerError, match="0 of 1 replica"):
                w.deposit(acct, 1)   # (no replicas here) writes the client's request record
            try:
                dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.name])
                src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.name])
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
                src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
                before = waits(dst), waits(src)
                with pytest.raises(ServerError, match="0 of 1 replica"):
                    w.deposit(acct, 2)
                assert w._seg.conn.resent >= 1, "no ASK redirection happened"
                assert (waits(dst) - before[0], waits(src) - before[1]) == (1, 0)
            finally:
                for n in rc.get_primaries():
                    rc.get_redis_connection(n).execute_command(
                        "CLUSTER", "SETSLOT", slot, "NODE", ids[target.name])
        rc.nodes_manager.initialize()
        with Engine.attach("askwait", url=cluster + "?timeout=2") as again:
            assert again.account(acct).deposits == 3
            again.unlink()
        rc.close()


class TestSignalHandler:
    def test_a_handlers_call_in_the_middle_of_a_call_never_takes_its_reply(self, made):
        """A signal handler calls the Engine while the interrupted thread's
        call waits for its reply (same thread, same connection): the
        handler's call is refused (BusyError, nothing sent), the interrupted
        call gets its own reply, and the Engine stays in step."""
        e = made(16)
        created = e.open_position(100.0, 1.0)
        monitoring = e.open_position(100.0, 1.0)
        assert e.transition(monitoring, Trigger.POSITION_OPENED) is Outcome.APPLIED
        conn = e._seg.conn.conn
        read = conn.read_response
        seen: list[Any] = []

        def handler(*_: Any) -> None:
            try:
                seen.append(e.state(monitoring))
            except BusyError:
                seen.append("busy")

        def interrupted(*args: Any, **kw: Any) -> Any:
            conn.read_response = read   # once
            os.kill(os.getpid(), signal.SIGUSR1)   # the handler runs here, mid-call
            return read(*args, **kw)

        old = signal.signal(signal.SIGUSR1, handler)
        try:
            conn.read_response = interrupted
            assert e.state(created) is State.CREATED
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert seen == ["busy"]
        assert e.state(created) is State.CREATED
        assert e.state(monitoring) is State.MONITORING


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
        """appendfsync always, 3 shards, 5 worker processes (more than the
        cores) cycling deposit, booked open, transitions, token price and
        release, each call made again until it returns; the server SIGKILLed
        and restarted 6 times.  Forbidden: a deposit or close booked twice or
        lost (cash != opening + 2 per cycle, deposits != cycles), a slot lost
        or doubled (free + open != capacity per shard), a guard lock left."""
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
