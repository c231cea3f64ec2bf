"""Keyed accounts on a sharded Redis engine.

A keyed account lives on its key's shard: the key's index entry (akeys) and
the account's record change in one function call on one node, so the key
stays unique and names only an open account of its own shard.  The price:
a keyed open can take only a free record of its key's shard, and when that
shard has none it raises ``ShardFullError`` (a ``CapacityError``) naming
the shard and its numbers, never "all records are open" while others are
free.  Attacked with racing opens from six processes, a lost reply resent,
a server's kill -9 under ``appendfsync always`` and a cluster slot moved
under racing opens."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
from procs import JOIN_TIMEOUT, READY_TIMEOUT, until
from test_redis import cluster  # noqa: F401 - the 3-node cluster fixture
from test_redis_calls import _lose_reply_of

from engine import CapacityError, Engine, KeyExistsError, ServerError, ShardFullError
from engine.tools.redis_server import PrivateRedis


def _open(e: Engine, key: str | None = None) -> int:
    return e.open_account(cash=1_000, max_exposure=1_000, max_positions=4, max_loss=1_000,
                          key=key)


def _keys_of(e: Engine, shard: int, n: int, prefix: str = "desk") -> list[str]:
    """``n`` keys that hash to ``shard`` of ``e``."""
    keys = (f"{prefix}-{i}" for i in range(100_000))
    out = [k for k in keys if e._seg._key_shard(k.encode()) == shard][:n]
    assert len(out) == n
    return out


def _index_problems(e: Engine, r: Any) -> list[str]:
    """Where the key index and the account records disagree, read raw from
    each shard: a key naming a closed, reopened or foreign account, or an
    open account whose key the index does not name (empty: they agree)."""
    bad = []
    for s, P in enumerate(e._seg.prefixes):
        index = {k.decode(): v.decode() for k, v in r.hgetall(P + "akeys").items()}
        for key, v in index.items():
            n, op = v.split(":")
            a = {f.decode(): x.decode() for f, x in r.hgetall(f"{P}a:{n}").items()}
            if int(n) % e._seg.shards != s:
                bad.append(f"shard {s}: key {key!r} names account {n} of another shard")
            if a.get("open") != "1" or a.get("op") != op or a.get("key") != key:
                bad.append(f"shard {s}: key {key!r} names {v}, whose record is {a}")
            if e._seg._key_shard(key.encode()) != s:
                bad.append(f"shard {s}: key {key!r} is indexed off its shard")
        records = range(s, e._seg.max_accounts, e._seg.shards)
        pipe = r.pipeline(transaction=False)
        for n in records:
            pipe.hgetall(f"{P}a:{n}")
        for n, raw in zip(records, pipe.execute(), strict=True):
            a = {f.decode(): x.decode() for f, x in raw.items()}
            if a.get("open") == "1" and "key" in a and index.get(a["key"]) != f"{n}:{a['op']}":
                bad.append(f"shard {s}: open account {n} has key {a['key']!r}, which the "
                           f"index names as {index.get(a['key'])}")
    return bad


class TestKeyShardFull:
    def test_a_full_key_shard_raises_shard_full_with_its_numbers(self, made):
        """A keyed open on a full key shard: ShardFullError, naming the shard and room elsewhere."""
        e = made(8, shards=2, max_accounts=4)
        for k in _keys_of(e, 0, 2):
            _open(e, k)
        third = _keys_of(e, 0, 3)[2]
        with pytest.raises(ShardFullError) as got:
            _open(e, third)
        err = got.value
        assert isinstance(err, CapacityError)
        assert (err.kind, err.key, err.shard, err.shards, err.records, err.total,
                err.free_elsewhere) == ("account", third.encode(), 0, 2, 2, 4, 2)
        msg = str(err)
        assert "shard 0" in msg and "2 free" in msg and "all 4" not in msg, msg
        assert e.lookup_account(third) is None and len(e.accounts()) == 2   # nothing changed

    def test_the_other_shard_still_opens_and_a_full_engine_says_so(self, made):
        """Key shard full: other shards still open accounts; all full: the error says none free."""
        e = made(8, shards=2, max_accounts=4)
        for k in _keys_of(e, 0, 2):
            _open(e, k)
        _open(e, _keys_of(e, 1, 1)[0])
        _open(e)                                   # an unkeyed open takes shard 1's last record
        assert len(e.accounts()) == 4
        with pytest.raises(ShardFullError) as got:
            _open(e, _keys_of(e, 0, 3)[2])
        assert got.value.free_elsewhere == 0 and "all 4" in str(got.value), str(got.value)
        with pytest.raises(CapacityError):
            _open(e)

    def test_a_record_freed_on_the_key_shard_opens_the_key(self, made):
        """A record freed on the key's shard opens the next keyed account: no false refusal."""
        e = made(8, shards=2, max_accounts=4)
        first, second, third = _keys_of(e, 0, 3)
        a = _open(e, first)
        _open(e, second)
        with pytest.raises(ShardFullError):
            _open(e, third)
        e.close_account(a)
        c = _open(e, third)
        assert e.lookup_account(third) == c and e.lookup_account(first) is None

    def test_one_shard_engine_keeps_the_plain_capacity_error(self, made):
        """On one shard a keyed open on a full engine raises the plain CapacityError."""
        e = made(8, max_accounts=2)
        _open(e, "a")
        _open(e, "b")
        with pytest.raises(CapacityError) as got:
            _open(e, "c")
        assert not isinstance(got.value, ShardFullError)
        assert "all 2 account records are open" in str(got.value)


class TestPositionShardFull:
    def test_a_keyed_position_on_a_full_key_shard_raises_shard_full(self, made):
        """A keyed position on a full key shard: ShardFullError, naming other shards' free slots."""
        e = made(4, shards=2, max_accounts=4)
        keys = _keys_of(e, 0, 3, "pos")
        for k in keys[:2]:
            e.open_position(100.0, 1.0, token=7, key=k)
        with pytest.raises(ShardFullError) as got:
            e.open_position(100.0, 1.0, token=7, key=keys[2])
        err = got.value
        assert (err.kind, err.key, err.shard, err.records, err.total, err.free_elsewhere) == \
            ("position", keys[2].encode(), 0, 2, 4, 2)
        assert "2 free position slots" in str(err) and "all 4" not in str(err), str(err)
        assert e.lookup(keys[2]) is None and len(e.snapshot()) == 2        # nothing changed
        e.open_position(100.0, 1.0, token=7)                              # shard 1 has room

    def test_a_booked_position_on_a_full_account_shard_raises_shard_full(self, made):
        """A position booked on an account of a full shard: ShardFullError naming the account."""
        e = made(4, shards=2, max_accounts=4)
        a = _open(e)
        s = e._seg._acct(a)[0] % 2
        for _ in range(2):
            e.open_position(10.0, 1.0, token=7, account=a)
        with pytest.raises(ShardFullError) as got:
            e.open_position(10.0, 1.0, token=7, account=a)
        err = got.value
        assert (err.kind, err.account, err.shard, err.free_elsewhere) == ("position", a, s, 2)
        assert f"account {a}" in str(err), str(err)
        assert e.account(a).open_positions == 2 and len(e.snapshot()) == 2   # nothing changed


def _race_keys(h: Any, keys: list[str], go: Any, out: Any) -> None:
    """Open an account for each of ``keys`` once ``go`` is set; put (key, id
    or 0 for KeyExistsError) for each."""
    with Engine.attach(h) as e:
        if not go.wait(READY_TIMEOUT):
            return
        for k in keys:
            try:
                out.put((k, _open(e, k)))
            except KeyExistsError:
                out.put((k, 0))


class TestKeyedOpenRaces:
    def test_six_processes_racing_each_key_open_one_account(self, made, spawner):
        """Six processes opening the same keys on 2 shards: one account per key, never two."""
        e = made(8, shards=2, max_accounts=16)
        keys = [*_keys_of(e, 0, 6, "race"), *_keys_of(e, 1, 6, "race")]
        go, out = spawner.ctx.Event(), spawner.ctx.Queue()
        for i in range(6):
            spawner.start(_race_keys, e.handle, keys[i:] + keys[:i], go, out)
        go.set()
        got = [out.get(timeout=READY_TIMEOUT) for _ in range(6 * len(keys))]
        spawner.join_all(JOIN_TIMEOUT)
        for k in keys:
            winners = [a for kk, a in got if kk == k and a]
            assert len(winners) == 1, f"key {k!r} opened {winners}"
            assert e.lookup_account(k) == winners[0]
        assert len(e.accounts()) == len(keys)
        assert _index_problems(e, redis.Redis.from_url(e.url)) == []


class TestKeyedLostReplies:
    def test_a_lost_keyed_open_made_again_on_a_sharded_engine_opens_once(self, made):
        """A keyed open on shard 1 whose reply was lost, made again, opens one account."""
        e = made(8, shards=2, max_accounts=4)
        key = _keys_of(e, 1, 1)[0]
        _lose_reply_of(e, "aopen", 1)
        with pytest.raises(ServerError):
            _open(e, key)
        a = _open(e, key)
        assert e.lookup_account(key) == a and len(e.accounts()) == 1
        assert _index_problems(e, redis.Redis.from_url(e.url)) == []

    def test_a_lost_keyed_open_on_a_full_key_shard_made_again_opens_once(self, made):
        """A lost keyed open that took its shard's last record, made again: one account."""
        e = made(8, shards=2, max_accounts=4)
        first, last = _keys_of(e, 0, 2)
        _open(e, first)
        _lose_reply_of(e, "aopen", 1)
        with pytest.raises(ServerError):
            _open(e, last)
        a = _open(e, last)                      # the first reply, not ShardFullError
        assert e.lookup_account(last) == a and len(e.accounts()) == 2

    def test_a_lost_account_close_made_again_frees_the_key_once(self, made):
        """A close whose reply was lost, made again: returns its books, frees the key once."""
        e = made(8, shards=2, max_accounts=4)
        key = _keys_of(e, 1, 1)[0]
        a = _open(e, key)
        _lose_reply_of(e, "aclose", 1)
        with pytest.raises(ServerError):
            e.close_account(a)
        last = e.close_account(a)           # the first reply: the books it closed with
        assert last.cash == 1_000 and last.open_positions == 0 and last.id == a
        assert e.lookup_account(key) is None and len(e.accounts()) == 0
        b = _open(e, key)
        assert b != a and e.lookup_account(key) == b
        assert _index_problems(e, redis.Redis.from_url(e.url)) == []


class _Churn:
    """A thread that opens keyed accounts kill-0, kill-1, ... on ``e`` and
    closes every third, until a call raises ServerError or ``join``:
    what was acknowledged (``opened``, ``closed``) and the key whose call
    was in doubt.  ``started`` is set after the first ten."""

    def __init__(self, e: Engine) -> None:
        self.e, self.opened, self.closed = e, dict[str, int](), set[str]()
        self.doubt: list[str] = []
        self.started, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            for i in range(3000):   # (2000 open at most)
                if self.stop.is_set():
                    return
                k = f"kill-{i}"
                self.doubt[:] = [k]
                self.opened[k] = _open(self.e, k)
                if i % 3 == 2:
                    self.e.close_account(self.opened[k])
                    self.closed.add(k)
                self.doubt.clear()
                if i == 10:
                    self.started.set()
        except ServerError:
            pass
        finally:
            self.started.set()

    def join(self) -> None:
        self.stop.set()
        self.thread.join(JOIN_TIMEOUT)
        assert not self.thread.is_alive()

    def check(self, again: Engine, r: Any) -> None:
        """On ``again`` (the same engine after the fault): every acknowledged
        open is found by its key and every acknowledged close names nothing;
        the call in doubt, made again by a new Engine, is whole or refused;
        the index agrees with the records."""
        for k, a in self.opened.items():
            if k not in self.doubt:
                assert again.lookup_account(k) == (None if k in self.closed else a), k
        assert _index_problems(again, r) == []
        for k in self.doubt:
            found = again.lookup_account(k)
            if found is None:
                found = _open(again, k)
            assert again.lookup_account(k) == found
        assert _index_problems(again, r) == []


class TestKilledServer:
    def test_acknowledged_keyed_opens_survive_kill_9_with_appendfsync_always(self):
        """kill -9 of redis-server (appendfsync always) mid-opens: every acknowledged key is kept.

        A thread opens keyed accounts on a 2-shard engine and closes every
        third; the server is SIGKILLed under it.  After the restart every
        acknowledged open is found by its key, every acknowledged close
        names nothing, the one call in doubt is whole or absent, and the
        index agrees with the records (no key on a closed account).
        """
        with PrivateRedis(appendfsync="always") as server:
            e = Engine.create(8, url=server.url + "?timeout=2", shards=2, max_accounts=4096)
            churn = _Churn(e)
            try:
                assert churn.started.wait(READY_TIMEOUT)
                server.restart(kill=True)
                churn.join()
                with Engine.attach(e.handle) as again:
                    churn.check(again, redis.Redis.from_url(server.url))
            finally:
                e.close()

    def test_a_failover_to_a_waited_replica_keeps_every_acknowledged_key(self):
        """kill -9 of the primary mid-opens, replica promoted (?wait=1): acknowledged keys all kept.

        The key's index entry and the account's record replicate as one
        function's effects, so the promoted replica never has one without
        the other; with ?wait=1 an open or close that returned is on it.
        """
        with PrivateRedis() as primary, PrivateRedis(replicaof=primary.port) as replica:
            rep = redis.Redis.from_url(replica.url)
            until(lambda: rep.info("replication")["master_link_status"] == "up",
                  "the replica to sync")
            e = Engine.create(8, url=primary.url + "?timeout=2&wait=1", shards=2,
                              max_accounts=4096)
            churn = _Churn(e)
            try:
                assert churn.started.wait(READY_TIMEOUT)
                assert primary.proc is not None
                primary.proc.kill()
                primary.proc.wait()
                churn.join()
                rep.execute_command("REPLICAOF", "NO", "ONE")
                with Engine.attach(e.handle, url=replica.url) as promoted:
                    churn.check(promoted, rep)
            finally:
                e.close()


def _slot_mover(e: Engine, shard: int) -> Any:
    """(cluster client, slot of ``shard``'s keys, its node, another primary,
    {node name: node id}) for moving the shard's slot by hand."""
    from redis.cluster import RedisCluster
    rc = RedisCluster.from_url(e.url.split("?")[0].replace("redis+cluster", "redis"))
    meta = e._seg.meta_keys[shard]
    source = rc.get_node_from_key(meta)
    target = next(n for n in rc.get_primaries() if n.name != source.name)
    ids = {n.name: rc.get_redis_connection(n).execute_command("CLUSTER", "MYID").decode()
           for n in rc.get_primaries()}
    return rc, rc.keyslot(meta), source, target, ids


def _begin_move(rc: Any, slot: int, source: Any, target: Any, ids: dict[str, str]) -> None:
    rc.get_redis_connection(target).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING",
                                                    ids[source.name])
    rc.get_redis_connection(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING",
                                                    ids[target.name])


def _move_keys(rc: Any, slot: int, source: Any, target: Any, keys: Any = None) -> int:
    """MIGRATE ``keys`` (default: all, one at a time) of ``slot`` from source to target."""
    src = rc.get_redis_connection(source)
    moved = 0
    while True:
        batch = [keys.pop()] if keys else [] if keys is not None else \
            src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1)
        if not batch:
            return moved
        src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *batch)
        moved += 1


def _end_move(rc: Any, slot: int, target: Any, ids: dict[str, str]) -> None:
    for n in rc.get_primaries():
        rc.get_redis_connection(n).execute_command("CLUSTER", "SETSLOT", slot, "NODE",
                                                   ids[target.name])
    rc.nodes_manager.initialize()


class TestKeyedOpenOnAMigratingSlot:
    def test_a_keyed_open_with_its_keys_split_over_two_nodes_is_refused_whole(
            self, cluster):  # noqa: F811
        """A keyed open with its key index moved, its free list not: refused whole, then once.

        The key's shard's slot is MIGRATING with only akeys on the importing
        node: the call's declared keys straddle two nodes, the server
        refuses it (TRYAGAIN) before it runs, so no account is taken without
        its index entry; made again after the move, it opens one account.
        """
        e = Engine.create(8, url=cluster + "?timeout=1", shards=3, max_accounts=12)
        try:
            first, key = _keys_of(e, 1, 2, "mig")
            _open(e, first)                              # akeys exists; the hint is learned
            rc, slot, source, target, ids = _slot_mover(e, 1)
            P = e._seg.prefixes[1]
            before = rc.lrange(P + "afree", 0, -1)
            _begin_move(rc, slot, source, target, ids)
            try:
                _move_keys(rc, slot, source, target, [(P + "akeys").encode()])
                with pytest.raises(ServerError):
                    _open(e, key)
                src = rc.get_redis_connection(source)
                dst = redis.Redis(host=target.host, port=target.port,
                                  single_connection_client=True)
                dst.execute_command("ASKING")                            # (importing node)
                assert set(dst.hkeys(P + "akeys")) == {first.encode()}    # no index entry
                dst.close()
                assert src.lrange(P + "afree", 0, -1) == before           # no record taken
                _move_keys(rc, slot, source, target)
            finally:
                _end_move(rc, slot, target, ids)
            a = _open(e, key)                            # made again: applies once
            assert e.lookup_account(key) == a and len(e.accounts()) == 2
            assert _index_problems(e, rc) == []
            rc.close()
        finally:
            e.unlink()
            e.close()


class TestLostReplyAcrossAReshard:
    def test_a_lost_keyed_open_made_again_after_its_slot_moved_opens_once(
            self, cluster):  # noqa: F811
        """A keyed open whose reply was lost, made again after its slot moved node: opens once.

        The client's request record lives in the shard's hash tag, so it
        moves with the account and the key index: the resend, redirected to
        the new node, gets the first reply there instead of opening again.
        """
        e = Engine.create(8, url=cluster + "?timeout=2", shards=3, max_accounts=12)
        try:
            key = _keys_of(e, 2, 1, "moved")[0]
            _lose_reply_of(e, "aopen", 1)
            with pytest.raises(ServerError):
                _open(e, key)
            rc, slot, source, target, ids = _slot_mover(e, 2)
            _begin_move(rc, slot, source, target, ids)
            try:
                assert _move_keys(rc, slot, source, target) > 3
            finally:
                _end_move(rc, slot, target, ids)
            a = _open(e, key)
            assert e.lookup_account(key) == a and len(e.accounts()) == 1
            assert rc.get_node_from_key(e._seg.meta_keys[2]).name == target.name
            assert _index_problems(e, rc) == []
            rc.close()
        finally:
            e.unlink()
            e.close()


def _churn_keys(h: Any, keys: list[str], go: Any, stop: Any, out: Any, done: Any) -> None:
    """Open and close accounts of ``keys`` until ``stop``, each call made again
    after ServerError until it returns; after each open, the key must name
    this account.  Counts each open tried in ``done``; puts "ready" once
    attached, then (opens, problems)."""
    def again(call: Any) -> Any:
        for _ in range(200):
            try:
                return call()
            except ServerError:
                continue
        raise AssertionError("a call never returned")

    problems: list[str] = []
    opens = 0
    with Engine.attach(h) as e:
        out.put("ready")
        if not go.wait(READY_TIMEOUT):
            return
        i = 0
        while not stop.is_set():
            k = keys[i % len(keys)]
            i += 1
            with done.get_lock():
                done.value += 1
            try:
                a = again(lambda k=k: _open(e, k))
            except KeyExistsError:
                continue
            opens += 1
            found = again(lambda k=k: e.lookup_account(k))
            if found != a:
                problems.append(f"opened {a} with key {k!r}, which names {found}")
            again(lambda a=a: e.close_account(a))
    out.put((opens, problems))


@pytest.mark.slow
class TestKeyedOpensUnderAReshard:
    def test_six_processes_churn_keys_while_their_slot_moves_twice(
            self, cluster, spawner):  # noqa: F811
        """Six processes open and close keyed accounts while their shard's slot moves away and back.

        Forbidden: an open whose key names another account (two accounts
        with one key), a key left naming a closed account, an account
        record lost or listed free twice.
        """
        e = Engine.create(8, url=cluster + "?timeout=5", shards=3, max_accounts=24)
        try:
            keys = _keys_of(e, 1, 3, "churn")
            go, stop, out = spawner.ctx.Event(), spawner.ctx.Event(), spawner.ctx.Queue()
            done = spawner.ctx.Value("l", 0)
            for i in range(6):
                spawner.start(_churn_keys, e.handle, keys[i % 3:] + keys[:i % 3], go, stop, out,
                              done)
            assert [out.get(timeout=READY_TIMEOUT) for _ in range(6)] == ["ready"] * 6
            rc, slot, source, target, ids = _slot_mover(e, 1)
            go.set()

            def churned() -> None:   # the workers ran some opens since the last look
                at = done.value
                until(lambda: done.value >= at + 6, "six more opens tried")

            def refused(node: Any) -> int:   # calls the node refused while the slot was split
                stats = rc.get_redis_connection(node).info("errorstats")
                return int(stats.get("errorstat_TRYAGAIN", {}).get("count", 0))
            try:
                churned()
                moved = 0
                for a, b in ((source, target), (target, source)):
                    _begin_move(rc, slot, a, b, ids)
                    try:
                        at = refused(a)
                        moved += _move_keys(rc, slot, a, b, keys=[*rc.get_redis_connection(a)
                                            .execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1)])
                        # the slot is split over two nodes: wait until calls meet it
                        until(lambda a=a, at=at: refused(a) > at, "a call refused (TRYAGAIN)")
                        moved += _move_keys(rc, slot, a, b)
                    finally:
                        _end_move(rc, slot, b, ids)
                    churned()
            finally:
                stop.set()
            got = [out.get(timeout=60) for _ in range(6)]
            spawner.join_all(60)
            assert moved > 2, f"only {moved} keys moved"
            assert [p for _, ps in got for p in ps] == []
            assert sum(n for n, _ in got) > 0, "no process opened an account"
            assert len(e.accounts()) == 0 and _index_problems(e, rc) == []
            P = e._seg.prefixes[1]
            free = [int(x) for x in rc.lrange(P + "afree", 0, -1)]
            assert sorted(free) == list(range(1, 24, 3)), f"shard 1's free list {free}"
            rc.close()
        finally:
            e.unlink()
            e.close()


def _more(acc: Any) -> dict[str, int]:
    return {"max_positions": acc.max_positions + 10}


class TestUpdateAccountMadeAgain:
    def test_a_lost_update_made_again_applies_fn_once(self, made):
        """update_account whose reply was lost, made again with the same fn: fn applied once."""
        e = made(8, shards=2, max_accounts=4)
        a = e.open_account(cash=0, max_exposure=0, max_positions=1, max_loss=0)
        _lose_reply_of(e, "aset", 1)
        with pytest.raises(ServerError):
            e.update_account(a, _more)
        assert e.update_account(a, _more).max_positions == 11
        assert e.account(a).max_positions == 11

    def test_a_lost_update_retried_with_an_inline_lambda_applies_once(self, made):
        """A retry loop passing the same lambda expression again: applied once, not twice."""
        e = made(8, max_accounts=4)
        a = e.open_account(cash=0, max_exposure=0, max_positions=1, max_loss=0)
        step = 10
        _lose_reply_of(e, "aset", 1)
        for _ in range(3):
            try:
                e.update_account(a, lambda acc: {"max_positions": acc.max_positions + step})
                break
            except ServerError:
                continue
        assert e.account(a).max_positions == 11

    def test_an_update_that_never_ran_made_again_applies_once(self, made):
        """update_account whose request never reached the server, made again: applied once."""
        e = made(8, max_accounts=4)
        a = e.open_account(cash=0, max_exposure=0, max_positions=1, max_loss=0)
        conn = e._seg.conn
        real = conn.fcall

        def lost(route: Any, keys: bytes, nk: int, f: str, args: Any) -> Any:
            if f == "aset":
                conn.fcall = real
                raise ServerError("aset failed (not known to have applied): never sent")
            return real(route, keys, nk, f, args)
        conn.fcall = lost
        with pytest.raises(ServerError):
            e.update_account(a, _more)
        assert e.update_account(a, _more).max_positions == 11

    def test_another_fn_after_a_lost_update_is_a_new_call(self, made):
        """After a lost update, an update with another fn is a new call: both apply."""
        e = made(8, max_accounts=4)
        a = e.open_account(cash=0, max_exposure=0, max_positions=1, max_loss=0)
        _lose_reply_of(e, "aset", 1)
        with pytest.raises(ServerError):
            e.update_account(a, _more)
        got = e.update_account(a, lambda acc: {"max_positions": acc.max_positions + 100})
        assert got.max_positions == 111

    def test_a_lost_update_lost_again_then_made_again_applies_once(self, made):
        """A lost update whose resend is lost too, made a third time: fn applied once."""
        e = made(8, max_accounts=4)
        a = e.open_account(cash=0, max_exposure=0, max_positions=1, max_loss=0)
        for _ in range(2):
            _lose_reply_of(e, "aset", 1)
            with pytest.raises(ServerError):
                e.update_account(a, _more)
        assert e.update_account(a, _more).max_positions == 11


class TestRefusedOpenMetrics:
    def test_a_full_refusal_counts_as_an_error_as_on_shared_memory(self, made):
        """open_account on a full engine counts one error and no applied, as shared memory does."""
        counts = []
        for e in (made(8, max_accounts=1), Engine.create(8, max_accounts=1)):
            try:
                _open(e)
                with pytest.raises(CapacityError):
                    _open(e)
                m = e.metrics()["account"]
                counts.append((m.applied, m.errors))
            finally:
                if e.url is None:
                    e.unlink()
                    e.close()
        assert counts == [(1, 1), (1, 1)], counts
