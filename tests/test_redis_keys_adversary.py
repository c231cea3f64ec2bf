"""Adversary of the account key read back (``aread``/``alist``, an account
record's key) and of an open's key record, on Redis (and shared memory where
the same API promises the same): lost replies and resends, racing creates of
one key, a killed server, a key of every byte value, maximal length, unicode.

Forbidden: a duplicated or missing key record, an ``Account.key`` (read back or
in an ``account`` event) that differs from the bound key, a journal order per
id different from the commit order.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from procs import readable
from test_redis import cluster  # noqa: F401  (the three-node cluster fixture)
from test_redis_account_shards import _begin_move, _end_move, _move_keys, _slot_mover
from test_redis_calls import _lose_reply_of

from engine import Engine, KeyExistsError, Outcome, ServerError
from engine._native import lib
from engine.store.redis.journal import RedisJournal, shard_of
from engine.tools.redis_server import PrivateRedis

BACKENDS = ("shm", "redis")
KEY_MAX = lib.ENG_KEY_MAX
#: keys at the edges: every byte value, the maximal length, unicode, NULs
KEYS: list[str | bytes] = [bytes([b]) for b in range(256)] + [
    bytes(range(i, i + KEY_MAX)) for i in range(0, 256 - KEY_MAX, 41)] + [
    "é" * (KEY_MAX // 2), "\U0001F600" * (KEY_MAX // 4), "x" * KEY_MAX, b"\0" * KEY_MAX,
    b"\xff" * KEY_MAX, b"a\0b", "desk 1/ä"]


def as_bytes(k: str | bytes | None) -> bytes | None:
    return k.encode() if isinstance(k, str) else k


def account_events(eng: Engine, acct: int) -> list[Any]:
    return [e.record for e in eng.events(since=0, timeout=0)
            if e.kind == "account" and e.id == acct]


class TestAccountKeyInItsRecords:
    def test_an_account_event_carries_the_bound_key(self, make_engine: Any) -> None:
        """Every account event of a keyed account is that Account, key and all."""
        eng = make_engine(capacity=4, journal=True, max_accounts=2)
        acct = eng.open_account(1000, 1000, 5, 100, key="desk-1")
        eng.deposit(acct, 5)
        pos = eng.open_position(10.0, 1.0, account=acct)
        recs = account_events(eng, acct)
        assert [r.key for r in recs] == ["desk-1"] * 3, "an account record without its key"
        assert recs[-1] == eng.account(acct)
        assert eng.account(acct).key == "desk-1" and pos

    def test_a_close_is_recorded_with_the_key_it_closed(self, make_engine: Any) -> None:
        """An account close's record carries the key the account had (both backends alike)."""
        eng = make_engine(capacity=4, journal=True, max_accounts=2)
        acct = eng.open_account(1000, 1000, 5, 100, key="desk-1")
        last = eng.close_account(acct)
        recs = account_events(eng, acct)
        assert len(recs) == 2 and recs[-1].key == last.key == "desk-1"
        assert eng.lookup_account("desk-1") is None

    def test_every_account_record_has_the_next_version(self, make_engine: Any) -> None:
        """Open, deposit, close: the account records' versions run 1, 2, 3 on both backends."""
        eng = make_engine(capacity=4, journal=True, max_accounts=2)
        acct = eng.open_account(1000, 1000, 5, 100, key="desk-1")
        eng.deposit(acct, 5)
        eng.close_account(acct)
        assert [r.version for r in account_events(eng, acct)] == [1, 2, 3]

    def test_every_key_value_reads_back_as_bound(self, make_engine: Any) -> None:
        """Keys of every byte value, maximal length, unicode: read, listed, recorded as bound."""
        eng = make_engine(capacity=4, journal=True, max_accounts=2, keys_per_position=1)
        for k in KEYS:
            acct = eng.open_account(1000, 1000, 5, 100, key=k)
            pos = eng.open_position(10.0, 1.0, key=k)
            assert as_bytes(eng.account(acct).key) == as_bytes(k), f"Account.key of {k!r}"
            listed = [a for a in eng.accounts() if int(a["id"]) == acct]
            assert len(listed) == 1 and bytes(listed[0]["key"][:listed[0]["key_len"]]) == \
                as_bytes(k), f"accounts() key of {k!r}"
            assert eng.lookup_account(k) == acct and eng.lookup(k) == pos
            assert [as_bytes(x) for x in eng.keys(pos)] == [as_bytes(k)]
            assert as_bytes(account_events(eng, acct)[-1].key) == as_bytes(k), \
                f"the account record's key of {k!r}"
            eng.close_account(acct)
            for t in ("POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"):
                eng.transition(pos, t)
            eng.release_position(pos)
        evs = list(eng.events(since=0, timeout=0))
        assert [e.record for e in evs if e.kind == "key"] == [as_bytes(k) for k in KEYS], \
            "a key record missing, twice, or not the bound key"


# -- Redis only ---------------------------------------------------------------------------------
def keys_of(e: Engine, shard: int, n: int, prefix: str = "k") -> list[str]:
    """``n`` keys that hash to ``shard`` of ``e`` (a Redis engine)."""
    out = [k for k in (f"{prefix}-{i}" for i in range(100_000))
           if e._seg._key_shard(k.encode()) == shard][:n]
    assert len(out) == n
    return out


def acct_shard(e: Engine, acct: int) -> int:
    """The shard account ``acct`` lives on (accounts are dealt round the shards)."""
    return (acct & lib.ENG_ID_SLOT_MASK) % len(e._seg.prefixes)


def lose_next_reply(e: Engine) -> list[int]:
    """The next call's reply is lost with its connection (CLIENT KILL after
    the function ran, before the reply is read); the call is resent."""
    conn = e._seg.conn.conn
    cid = e._seg.conn.command("CLIENT", "ID")
    admin = redis.Redis.from_url(e.url.split("?")[0])
    read = conn.read_response
    killed: list[int] = []

    def lose_reply(*args: Any, **kw: Any) -> Any:
        conn.read_response = read   # once
        assert readable(conn._sock, 10), "no reply"   # the function ran
        admin.execute_command("CLIENT", "KILL", "ID", cid)
        killed.append(cid)
        conn.disconnect()
        raise redis.ConnectionError("killed before the reply was read")

    conn.read_response = lose_reply
    return killed


def _all_records(e: Engine) -> list[Any]:
    """Every record of every shard, shard by shard, each in its seq order."""
    j = RedisJournal(e._seg, e.spec)
    out: list[Any] = []
    cursor = (0,) * len(j.shards)
    while True:
        got, cursor = j.read_cursor(cursor, 1000)
        if not got:
            return out
        out += got


def new_since(e: Engine, before: list[Any]) -> list[Any]:
    seen = set(before)
    return [ev for ev in _all_records(e) if ev not in seen]


def assert_key_records_match(e: Engine, keys: list[str], pos: bool = True) -> None:
    """Per key: exactly one key record (or account record with it) per
    binding, naming the id the key is bound to."""
    evs = _all_records(e)
    for k in keys:
        if pos:
            recs = [ev for ev in evs if ev.kind == "key" and ev.record == k.encode()]
            owner = e.lookup(k)
        else:
            recs = [ev for ev in evs if ev.kind == "account" and ev.record.key == k and
                    ev.record.version == 1]
            owner = e.lookup_account(k)
        assert len(recs) == (owner is not None), f"key {k!r}: {len(recs)} records, bound to {owner}"
        if owner is not None:
            assert recs[0].id == owner, f"key {k!r} recorded for {recs[0].id}, bound to {owner}"


OPENS = {
    "keyed open": (lambda e, k, a: e.open_position(10.0, 1.0, key=k), ["open", "key"]),
    "keyed booked open": (lambda e, k, a: e.open_position(10.0, 1.0, key=k, account=a),
                          ["open", "key", "account"]),
    "keyed account open": (lambda e, k, a: e.open_account(1000, 1000, 5, 100, key=k),
                           ["account"]),
}


@pytest.fixture
def rmade(made: Any) -> Any:
    """A Redis engine with the journal on, 2 shards."""
    def make(**kw: Any) -> Engine:
        kw.setdefault("journal", True)
        return made(8, shards=2, max_accounts=8, keys_per_position=1, **kw)
    return make


class TestLostReplies:
    @pytest.mark.parametrize("op", list(OPENS))
    def test_a_keyed_open_whose_reply_is_lost_is_recorded_once(self, rmade: Any, op: str) -> None:
        """A keyed open resent after its reply was lost: one open, one key record, not two."""
        e = rmade()
        acct = e.open_account(10_000, 10_000, 5, 5_000)
        k = keys_of(e, acct_shard(e, acct), 1, "lost")[0]
        before = _all_records(e)
        killed = lose_next_reply(e)
        act, kinds = OPENS[op]
        got = act(e, k, acct)
        assert killed, "the fault never happened"
        new = new_since(e, before)
        assert sorted(ev.kind for ev in new) == sorted(kinds), f"recorded {[ev.kind for ev in new]}"
        assert all(ev.id in (got, acct) for ev in new)
        assert_key_records_match(e, [k], pos=op != "keyed account open")

    @pytest.mark.parametrize("op", list(OPENS))
    def test_a_keyed_open_given_up_on_and_made_again_is_recorded_once(self, rmade: Any,
                                                                      op: str) -> None:
        """A keyed open that raised ServerError (reply lost), made again: one record."""
        e = rmade()
        acct = e.open_account(10_000, 10_000, 5, 5_000)
        fn = "aopen" if op == "keyed account open" else "open"
        k = keys_of(e, acct_shard(e, acct), 1, "again")[0]
        _lose_reply_of(e, fn, 1)
        act, kinds = OPENS[op]
        before = _all_records(e)
        with pytest.raises(ServerError):
            act(e, k, acct)
        got = act(e, k, acct)   # the first reply, not KeyExistsError
        new = new_since(e, before)
        assert sorted(ev.kind for ev in new) == sorted(kinds)
        assert all(ev.id in (got, acct) for ev in new)
        assert_key_records_match(e, [k], pos=op != "keyed account open")


def race_keys(h: Any, keys: list[str], accounts: bool, go: Any, out: Any) -> None:
    """Child: open a position (or an account) for each key once ``go`` is
    set; put (key, id or 0 when refused as taken)."""
    with Engine.attach(h) as e:
        if not go.wait(60):
            return
        for k in keys:
            try:
                got = (e.open_account(1000, 1000, 5, 100, key=k) if accounts
                       else e.open_position(10.0, 1.0, key=k))
                out.put((k, got))
            except KeyExistsError:
                out.put((k, 0))


class TestRacingCreates:
    @pytest.mark.parametrize("accounts", [False, True], ids=["positions", "accounts"])
    def test_processes_racing_one_key_one_winner_one_record(self, rmade: Any, spawner: Any,
                                                            accounts: bool) -> None:
        """Four processes opening the same keys on 2 shards: one winner per key, one key record."""
        e = rmade()
        keys = [*keys_of(e, 0, 3, "race"), *keys_of(e, 1, 3, "race")]
        go, out = spawner.ctx.Event(), spawner.ctx.Queue()
        for i in range(4):
            spawner.start(race_keys, e.handle, keys[i:] + keys[:i], accounts, go, out)
        go.set()
        got = [out.get(timeout=60) for _ in range(4 * len(keys))]
        spawner.join_all(60)
        for k in keys:
            winners = [a for kk, a in got if kk == k and a]
            assert len(winners) == 1, f"key {k!r} opened {winners}"
            assert (e.lookup_account(k) if accounts else e.lookup(k)) == winners[0]
        assert_key_records_match(e, keys, pos=not accounts)


def kill_server_before_next_reply(e: Engine, server: PrivateRedis) -> list[int]:
    """The next call runs on the server, which is then SIGKILLed and started
    again before its reply is read (appendfsync always: what it ran is kept)."""
    conn = e._seg.conn.conn
    read = conn.read_response
    killed: list[int] = []

    def kill_then_read(*args: Any, **kw: Any) -> Any:
        conn.read_response = read   # once
        assert readable(conn._sock, 10), "no reply"   # the function ran (and was fsynced)
        server.restart(kill=True)
        killed.append(1)
        conn.disconnect()
        raise redis.ConnectionError("the server died before the reply was read")

    conn.read_response = kill_then_read
    return killed


class TestKilledServer:
    @pytest.mark.parametrize("op", list(OPENS))
    def test_kill_9_between_a_keyed_open_and_its_reply(self, op: str) -> None:
        """kill -9 of the server (AOF) after a keyed open ran, before its reply: one record."""
        with PrivateRedis(appendfsync="always") as server:
            e = Engine.create(8, url=server.url + "?timeout=2", journal=True, shards=2,
                              max_accounts=8, keys_per_position=1)
            try:
                acct = e.open_account(10_000, 10_000, 5, 5_000, key="desk")
                k = keys_of(e, acct_shard(e, acct), 1, "killed")[0]
                before = _all_records(e)
                killed = kill_server_before_next_reply(e, server)
                act, kinds = OPENS[op]
                got = act(e, k, acct)   # resent to the restarted server: the first reply
                assert killed, "the fault never happened"
                new = new_since(e, before)
                assert sorted(ev.kind for ev in new) == sorted(kinds)
                assert_key_records_match(e, [k], pos=op != "keyed account open")
                assert e.account(acct).key == "desk"   # read back after the restart
                if op == "keyed account open":
                    assert e.account(got).key == k and e.lookup_account(k) == got
                    listed = {int(a["id"]): bytes(a["key"][:a["key_len"]]) for a in e.accounts()}
                    assert listed == {acct: b"desk", got: k.encode()}
                else:
                    assert e.lookup(k) == got and list(e.keys(got)) == [k]
            finally:
                e.unlink()
                e.close()

    def test_account_keys_read_back_after_a_restart(self) -> None:
        """Account keys of every kind read, listed and recorded alike after a restart (AOF)."""
        with PrivateRedis(appendfsync="always") as server:
            e = Engine.create(8, url=server.url + "?timeout=2", journal=True,
                              max_accounts=len(KEYS) + 1)
            try:
                ids = {e.open_account(1000, 1000, 5, 100, key=k): k for k in KEYS}
                server.restart(kill=False)
                with Engine.attach(e.handle) as again:
                    for a, k in ids.items():
                        assert as_bytes(again.account(a).key) == as_bytes(k)
                        assert again.lookup_account(k) == a
                    listed = {int(r["id"]): bytes(r["key"][:r["key_len"]])
                              for r in again.accounts()}
                    assert listed == {a: as_bytes(k) for a, k in ids.items()}
                    recs = {ev.id: ev.record.key for ev in _all_records(again)
                            if ev.kind == "account"}
                    assert {a: as_bytes(k) for a, k in recs.items()} == \
                        {a: as_bytes(k) for a, k in ids.items()}
            finally:
                e.unlink()
                e.close()


def again(call: Any, tries: int = 400) -> Any:
    """The same call made again until it returns (a slot mid-move refuses
    calls whose keys straddle two nodes; each try is bounded by the url's timeout)."""
    for i in range(tries):
        try:
            return call()
        except ServerError:
            time.sleep(min(0.001 * i, 0.02))
    raise AssertionError("the call never returned")


CLOSE = ("POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED")


class TestReshard:
    def test_per_id_order_and_one_key_record_across_a_slot_move(
            self, cluster: Any) -> None:  # noqa: F811
        """Keyed opens and closes while their shard's slot moves: per-id order, one key record."""
        e = Engine.create(32, url=cluster + "?timeout=2", shards=3, journal=True,
                          keys_per_position=1)
        try:
            keys = keys_of(e, 1, 40, "moving")
            done: list[int] = []
            errors: list[BaseException] = []
            halfway, moving = threading.Event(), threading.Event()

            def write() -> None:
                try:
                    for i, k in enumerate(keys):
                        pos = again(lambda k=k: e.open_position(10.0, 1.0, key=k))
                        for t in CLOSE:
                            assert again(lambda t=t, p=pos: e.transition(p, t)) is Outcome.APPLIED
                        again(lambda p=pos: e.release_position(p))
                        done.append(pos)
                        if i == 5:
                            halfway.set()
                            assert moving.wait(60)   # the rest goes on while the slot moves
                except BaseException as err:   # reported by the test
                    errors.append(err)
                    halfway.set()

            w = threading.Thread(target=write)
            w.start()
            assert halfway.wait(60)
            rc, slot, source, target, ids = _slot_mover(e, 1)
            _begin_move(rc, slot, source, target, ids)
            try:
                at_begin = len(done)
                moving.set()
                _move_keys(rc, slot, source, target)
            finally:
                _end_move(rc, slot, target, ids)
            w.join(120)
            assert at_begin < len(keys), "the writer finished before the move began"
            assert not w.is_alive() and not errors, errors
            assert rc.get_node_from_key(e._seg.meta_keys[1]).name == target.name, "never moved"
            rc.close()
            evs = [ev for ev in _all_records(e) if shard_of(ev, 3) == 1]
            assert [ev.seq for ev in evs] == list(range(1, len(evs) + 1)), "a gap or a duplicate"
            assert len(done) == len(keys)
            for pos, k in zip(done, keys, strict=True):
                mine = [(ev.kind, ev.state.name if ev.state else None) for ev in evs
                        if ev.id == pos]
                assert mine == [("open", "CREATED"), ("key", "CREATED"),
                                ("transition", "MONITORING"), ("transition", "EXIT_PENDING"),
                                ("transition", "EXITING"), ("transition", "CLOSED"),
                                ("release", None)], f"id {pos:#x} out of commit order: {mine}"
                assert [ev.record for ev in evs if ev.kind == "key" and ev.id == pos] == \
                    [k.encode()]
        finally:
            e.unlink()
            e.close()
