"""Closing an account on Redis on an operator's bad day: the close's reply
lost and the call resent, writes paused past the url's timeout, a full
server, the library flushed.

The property: a close applies exactly once or not at all, and says which;
its journal record (kind ``account``) carries version == previous + 1,
one record per close; the account's version never moves twice for one close."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import redis
from conftest import redis_url
from procs import readable, until
from test_redis import cluster  # noqa: F401 - the 3-node cluster fixture
from test_redis_account_shards import _begin_move, _end_move, _move_keys, _slot_mover
from test_redis_calls import GUARDED, _again, _stall_after_queued, debug_server  # noqa: F401

from engine import Engine, EngineError, ServerError
from engine._native import lib
from engine.journal import Event
from engine.store.redis.journal import RedisJournal
from engine.tools.redis_server import PrivateRedis

ID_SLOT_MASK = lib.ENG_ID_SLOT_MASK



def _client(e: Engine) -> Any:
    """A client of the engine's server (a cluster client on a cluster)."""
    url = e.url.split("?")[0]
    if url.startswith("redis+cluster"):
        from redis.cluster import RedisCluster
        return RedisCluster.from_url(url.replace("redis+cluster", "redis"))
    return redis.Redis.from_url(url)


def _made(url: str, **kw: Any) -> tuple[Engine, RedisJournal, int]:
    """A journaled engine with one open account (no positions)."""
    e = Engine.create(16, url=url, spec=GUARDED, **kw)
    r = _client(e)
    for k in e._seg.meta_keys:
        r.hset(k, mapping={"jrec": 1000, "jprices": 0})
    a = e.open_account(cash=100, max_exposure=100, max_positions=4, max_loss=100)
    e.deposit(a, 1)   # a version past the open's
    return e, RedisJournal(e._seg, e.spec), a


def _hash(e: Engine, a: int) -> dict[bytes, bytes]:
    """The account's record on its shard, read straight from Redis."""
    n = a & ID_SLOT_MASK
    P = e._seg.prefixes[n % e._seg.shards]
    got: dict[bytes, bytes] = _client(e).hgetall(f"{P}a:{n}")
    return got


def _records(j: RedisJournal, a: int) -> list[Event]:
    """The account's records, every shard's stream read with a cursor."""
    out: list[Event] = []
    cursor = (0,) * len(j.shards)
    while True:
        got, cursor = j.read_cursor(cursor, 1000)
        if not got:
            return [ev for ev in out if ev.kind == "account" and ev.id == a]
        out += got


def _version(e: Engine, a: int) -> int:
    return int(_hash(e, a)[b"version"])


def _closed_once(e: Engine, j: RedisJournal, a: int, v0: int, n0: int) -> None:
    """Applied once: one close record more, version v0 + 1 in it and on the account."""
    recs = _records(j, a)
    assert len(recs) == n0 + 1, f"{len(recs) - n0} close records for one close"
    assert recs[-1].record.version == v0 + 1, "the close record's version is not previous + 1"
    h = _hash(e, a)
    assert h[b"open"] == b"0", "a close record without the close"
    assert int(h[b"version"]) == v0 + 1, "the version moved twice (or not at all) for one close"


def _not_closed(e: Engine, j: RedisJournal, a: int, v0: int, n0: int) -> None:
    """Applied nothing: no close record, version and open flag unchanged."""
    assert len(_records(j, a)) == n0, "a close record without the close"
    h = _hash(e, a)
    assert h[b"open"] == b"1", "the close applied though refused"
    assert int(h[b"version"]) == v0, "the version moved for a refused close"


def _lose_close_reply(e: Engine, a: int, fault: Any) -> list[int]:
    """The next close's reply lost: once the close ran on the server (its
    account reads closed there), ``fault()`` runs (it breaks the connection
    or the server) and the reply is never read; the call is resent."""
    conn = e._seg.conn.conn
    read = conn.read_response
    seen: list[int] = []
    reads = [0]

    def lose_reply(*args: Any, **kw: Any) -> Any:
        reads[0] += 1
        if reads[0] < 2:   # close_account reads the account first
            return read(*args, **kw)
        conn.read_response = read   # once
        assert readable(conn._sock, 10), "no reply"   # the close ran
        assert _hash(e, a)[b"open"] == b"0", "the reply lost is not the close's"
        fault()
        seen.append(1)
        conn.disconnect()   # with the reply in its buffer
        raise redis.ConnectionError("the reply was lost")

    conn.read_response = lose_reply
    return seen


def _close(e: Engine) -> None:
    try:
        e.unlink()
        e.close()
    except ServerError:
        pass


class TestLostReply:
    def test_a_close_whose_reply_is_lost_is_resent_and_applies_once(self):
        """A close whose reply is lost with its connection, resent: one version bump, one record."""
        e, j, a = _made(redis_url())
        try:
            v0, n0 = _version(e, a), len(_records(j, a))
            cid = e._seg.conn.command("CLIENT", "ID")
            admin = redis.Redis.from_url(redis_url())
            killed = _lose_close_reply(e, a, lambda: admin.execute_command("CLIENT", "KILL",
                                                                           "ID", cid))
            e.close_account(a)
            assert killed, "the fault never happened"
            _closed_once(e, j, a, v0, n0)
        finally:
            _close(e)


    def test_a_resent_close_never_closes_the_account_that_took_its_slot(self):
        """A close's reply lost; its slot reopened before the resend: the new account untouched.

        One account slot: the close runs, its reply is lost, another handle
        opens an account (the same slot, the next op) before the close is
        resent; the resend returns the first reply and neither closes the
        new account nor moves its version, and the old one has one record.
        """
        e, j, a = _made(redis_url(), max_accounts=1)
        try:
            v0, n0 = _version(e, a), len(_records(j, a))
            other = Engine.attach(e.handle)
            conn = e._seg.conn.conn
            cid = e._seg.conn.command("CLIENT", "ID")
            admin = redis.Redis.from_url(redis_url())
            read = conn.read_response
            reopened: list[int] = []
            reads = [0]

            def lose_reply(*args: Any, **kw: Any) -> Any:
                reads[0] += 1
                if reads[0] < 2:   # close_account reads the account first
                    return read(*args, **kw)
                conn.read_response = read   # once
                assert readable(conn._sock, 10), "no reply"   # the close ran
                admin.execute_command("CLIENT", "KILL", "ID", cid)
                conn.disconnect()
                reopened.append(other.open_account(cash=7, max_exposure=7, max_positions=1,
                                                   max_loss=7))
                raise redis.ConnectionError("killed before the reply was read")

            try:
                conn.read_response = lose_reply
                e.close_account(a)
                assert reopened, "the fault never happened"
                b = reopened[0]
                assert b & ID_SLOT_MASK == a & ID_SLOT_MASK and b != a   # its slot, a new id
                closes = [ev for ev in _records(j, a)][n0:]
                assert len(closes) == 1 and closes[0].record.version == v0 + 1
                assert other.account(b).cash == 7, "the resend closed the new account"
                assert [ev.record.version for ev in _records(j, b)] == \
                    [other.account(b).version], "the resend moved the new account's version"
                assert _hash(e, b)[b"open"] == b"1"
            finally:
                other.close()
        finally:
            _close(e)


class TestIdleConnection:
    def test_a_close_after_the_server_closed_the_idle_connection_applies_once(self):
        """A close after the server closed the idle connection goes on a new one, applied once."""
        with PrivateRedis() as srv:
            e, j, a = _made(srv.url)
            try:
                v0, n0 = _version(e, a), len(_records(j, a))
                cid = e._seg.conn.command("CLIENT", "ID")
                admin = redis.Redis.from_url(srv.url)
                admin.config_set("timeout", 1)
                until(lambda: str(cid) not in {c["id"] for c in admin.client_list()},
                      "the server closing the idle connection", 20)
                e.close_account(a)
                _closed_once(e, j, a, v0, n0)
            finally:
                _close(e)


class TestRefusedClose:
    def test_a_close_of_an_account_with_open_positions_applies_nothing(self):
        """A close refused (open positions): a typed error, no record, version unchanged."""
        e, j, a = _made(redis_url())
        try:
            e.open_position(100.0, 1.0, account=a)
            v0, n0 = _version(e, a), len(_records(j, a))
            with pytest.raises(EngineError):
                e.close_account(a)
            _not_closed(e, j, a, v0, n0)
        finally:
            _close(e)


class TestPausedWrites:
    def test_a_close_given_up_on_in_a_write_pause_applies_once(self, debug_server):  # noqa: F811
        """A close stalled past the url's timeout, made again: applied once, one record."""
        e, j, a = _made(debug_server.url + "?timeout=0.5")
        try:
            v0, n0 = _version(e, a), len(_records(j, a))
            stall = _stall_after_queued(debug_server.url, debug_server.port)
            with pytest.raises(ServerError, match="not known to have applied"):
                e.close_account(a)
            _again(lambda: e.close_account(a))
            stall.join(10)
            _closed_once(e, j, a, v0, n0)
        finally:
            _close(e)


class TestFullServer:
    def test_a_close_on_a_full_server_is_refused_and_applies_nothing(self):
        """At maxmemory (noeviction) a close raises ServerError and applies nothing; then once."""
        with PrivateRedis() as srv:
            e, j, a = _made(srv.url)
            admin = redis.Redis.from_url(srv.url)
            try:
                v0, n0 = _version(e, a), len(_records(j, a))
                admin.config_set("maxmemory", "1")
                try:
                    with pytest.raises(ServerError, match="maxmemory"):
                        e.close_account(a)
                finally:
                    admin.config_set("maxmemory", "0")
                _not_closed(e, j, a, v0, n0)
                e.close_account(a)
                _closed_once(e, j, a, v0, n0)
            finally:
                _close(e)


class TestFunctionFlush:
    def test_a_close_after_function_flush_applies_once(self):
        """After FUNCTION FLUSH a close loads the library again and applies once."""
        e, j, a = _made(redis_url())
        try:
            v0, n0 = _version(e, a), len(_records(j, a))
            redis.Redis.from_url(redis_url()).function_flush()
            e.close_account(a)
            _closed_once(e, j, a, v0, n0)
        finally:
            _close(e)


class TestKilledServer:
    def test_kill_9_between_a_close_and_its_reply_applies_once(self):
        """kill -9 of the server (AOF, fsync always) after the close ran, before its reply: once."""
        with PrivateRedis(appendfsync="always") as server:
            e, j, a = _made(server.url + "?timeout=2")
            try:
                v0, n0 = _version(e, a), len(_records(j, a))
                killed = _lose_close_reply(e, a, lambda: server.restart(kill=True))
                e.close_account(a)   # resent to the restarted server: the first reply
                assert killed, "the fault never happened"
                _closed_once(e, j, a, v0, n0)
            finally:
                _close(e)


class TestFailover:
    def test_a_waited_close_survives_a_replica_promotion_once(self):
        """A close returned with ?wait=1, then the primary killed and the replica promoted: once."""
        with PrivateRedis() as primary, PrivateRedis(replicaof=primary.port) as replica:
            rep = redis.Redis.from_url(replica.url)
            until(lambda: rep.info("replication")["master_link_status"] == "up",
                  "the replica to sync")
            e, _, a = _made(primary.url + "?wait=1&timeout=2")
            j0 = RedisJournal(e._seg, e.spec)
            v0, n0 = _version(e, a), len(_records(j0, a))
            e.close_account(a)
            assert primary.proc is not None
            os.kill(primary.proc.pid, signal.SIGKILL)
            primary.proc.wait()
            rep.execute_command("REPLICAOF", "NO", "ONE")
            with Engine.attach(e.handle, url=replica.url) as promoted:
                j = RedisJournal(promoted._seg, promoted.spec)
                _closed_once(promoted, j, a, v0, n0)
                with pytest.raises(EngineError):   # closed: a second close is refused
                    promoted.close_account(a)
                _closed_once(promoted, j, a, v0, n0)
            e.close()


class TestReshard:
    def test_a_close_with_its_keys_split_over_two_nodes_is_refused_whole(
            self, cluster):  # noqa: F811
        """A close whose account moved to the importing node, its free list not: refused whole.

        The account's shard slot is MIGRATING with only the account record on
        the importing node: the close's declared keys straddle two nodes, the
        server refuses it before it runs (no record, no version move); after
        the move it applies once.
        """
        e, j, a = _made(cluster + "?timeout=1", shards=3, max_accounts=12)
        try:
            n = a & ID_SLOT_MASK
            s = n % 3
            P = e._seg.prefixes[s]
            v0, n0 = _version(e, a), len(_records(j, a))
            rc, slot, source, target, ids = _slot_mover(e, s)
            _begin_move(rc, slot, source, target, ids)
            try:
                _move_keys(rc, slot, source, target, [f"{P}a:{n}".encode()])
                with pytest.raises(ServerError):
                    e.close_account(a)
                _move_keys(rc, slot, source, target)
            finally:
                _end_move(rc, slot, target, ids)
            _not_closed(e, j, a, v0, n0)
            e.close_account(a)
            _closed_once(e, j, a, v0, n0)
        finally:
            _close(e)
