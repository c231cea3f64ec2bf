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
from procs import JOIN_TIMEOUT, READY_TIMEOUT
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
        for n in range(s, e._seg.max_accounts, e._seg.shards):
            a = {f.decode(): x.decode() for f, x in r.hgetall(f"{P}a:{n}").items()}
            if a.get("open") == "1" and "key" in a and index.get(a["key"]) != f"{n}:{a['op']}":
                bad.append(f"shard {s}: open account {n} has key {a['key']!r}, which the "
                           f"index names as {index.get(a['key'])}")
    return bad


class TestKeyShardFull:
    def test_a_full_key_shard_raises_shard_full_with_its_numbers(self, made):
        """A keyed open on a full key shard: ShardFullError naming the shard and the room elsewhere."""
        e = made(8, shards=2, max_accounts=4)
        for k in _keys_of(e, 0, 2):
            _open(e, k)
        third = _keys_of(e, 0, 3)[2]
        with pytest.raises(ShardFullError) as got:
            _open(e, third)
        err = got.value
        assert isinstance(err, CapacityError)
        assert (err.key, err.shard, err.shards, err.records, err.max_accounts,
                err.free_elsewhere) == (third.encode(), 0, 2, 2, 4, 2)
        msg = str(err)
        assert "shard 0" in msg and "2 free" in msg and "all 4" not in msg, msg
        assert e.lookup_account(third) is None and len(e.accounts()) == 2   # nothing changed

    def test_the_other_shard_still_opens_and_a_full_engine_says_so(self, made):
        """With the key shard full, other shards open accounts; all full, the error says none is free."""
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
        """A record freed on the key's shard opens the next keyed account there: no false refusal."""
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
        """Six processes opening the same keys on a 2-shard engine: one account per key, never two."""
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
        """A lost keyed open that took its shard's last record, made again: one account, not full."""
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
            e = Engine.create(8, url=server.url + "?timeout=2", shards=2, max_accounts=64)
            opened: dict[str, int] = {}
            closed: set[str] = set()
            doubt: list[str] = []
            started = threading.Event()

            def work() -> None:
                try:
                    for i in range(60):
                        k = f"kill-{i}"
                        doubt[:] = [k]
                        opened[k] = _open(e, k)
                        if i % 3 == 2:
                            e.close_account(opened[k])
                            closed.add(k)
                        doubt.clear()
                        if i == 10:
                            started.set()
                except ServerError:
                    pass
                finally:
                    started.set()
            t = threading.Thread(target=work)
            t.start()
            try:
                assert started.wait(READY_TIMEOUT)
                server.restart(kill=True)
                t.join(JOIN_TIMEOUT)
                assert not t.is_alive()
                with Engine.attach(e.handle) as again:
                    for k, a in opened.items():
                        if k in doubt:
                            continue
                        assert again.lookup_account(k) == (None if k in closed else a), k
                    r = redis.Redis.from_url(server.url)
                    assert _index_problems(again, r) == []
                    for k in doubt:   # in doubt: made again by a new Engine, whole or refused
                        found = again.lookup_account(k)
                        if found is None:
                            found = _open(again, k)
                        assert again.lookup_account(k) == found
                    assert _index_problems(again, r) == []
            finally:
                e.close()
