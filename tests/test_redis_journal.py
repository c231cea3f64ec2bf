"""The journal on Redis: a stream per shard written by the same function
call as the change.  A record exists iff its change committed, once (a
resend answered by the request record adds none), in commit order per
shard; a reader that fell behind the retained records is told so."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis

from engine import Engine, Outcome, State, Trigger
from engine._native import lib
from engine.errors import (
    ArgumentError,
    JournalLappedError,
    KeyExistsError,
    RiskLimitError,
    ServerError,
    StaleIdError,
)
from engine.journal import KINDS, Event
from engine.spec import POSITION_SPEC
from engine.store.redis.journal import RedisJournal, shard_of
from engine.store.redis.store import RedisStore
from engine.tools.redis_server import PrivateRedis
from tests.procs import readable
from tests.test_redis import cluster  # noqa: F401  (the three-node cluster fixture)


def _enable(eng: Engine, records: int = 1000, prices: bool = False) -> RedisJournal:
    """Set the journal options in every shard's meta, as RedisStore.create's
    journal_records / journal_prices do (Engine.create forwards them once the
    shared-memory journal's options land there)."""
    r = redis.Redis.from_url(eng.url.split("?")[0])
    for k in eng._seg.meta_keys:
        r.hset(k, mapping={"jrec": records, "jprices": 1 if prices else 0})
    return RedisJournal(eng._seg, eng.spec)


def _all(j: RedisJournal) -> list[Event]:
    out, cursor = [], (0,) * len(j.shards)
    while True:
        got, cursor = j.read_cursor(cursor, 1000)
        if not got:
            return out
        out += got


@pytest.fixture
def eng(made: Callable[..., Engine]) -> Iterator[Engine]:
    yield made(16)


def _opened(e: Engine, **kw: Any) -> int:
    return e.open_position(entry_price=100.0, amount=1.0, side=1, token=7, **kw)


class TestRecords:
    def test_every_kind_once_in_commit_order(self, eng):
        """Each committed change is recorded once, of its kind, in commit order.

        Each committed change: one record of its kind, seq 1, 2, ... in
        commit order, carrying the state, trigger and record after it.
        """
        j = _enable(eng, prices=True)
        acct = eng.open_account(cash=1000, max_exposure=1000, max_positions=5, max_loss=100)
        pos = _opened(eng, account=acct)
        eng.transition(pos, Trigger.POSITION_OPENED)
        eng.update_price(pos, 101.0)
        priced = eng.price(pos)
        eng.bind_key(pos, "K1")
        eng.deposit(acct, 5)
        eng.halt()
        eng.halt(False)
        eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=3)
        for t in (Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
            eng.transition(pos, t)
        ctx = eng.context(pos)
        eng.release_position(pos)
        evs = j.read(0, 100)
        assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
        assert [e.kind for e in evs] == [
            "account", "open", "account", "transition", "price", "key", "account", "halt",
            "halt", "transition", "transition", "transition", "account", "release"]
        assert set(e.kind for e in evs) == set(KINDS)
        opened = evs[1]
        assert (opened.id, opened.state, opened.record.entry_price) == (pos, State.CREATED, 100.0)
        moved = evs[9]
        assert (moved.state, moved.trigger, moved.record.exit_reason) == (
            State.EXIT_PENDING, Trigger.EXIT_CONDITION_MET, 3)
        assert evs[11].record == ctx   # the record after the last transition, version too
        assert evs[4].record == priced
        assert evs[5].record == b"K1"
        assert evs[6].record.cash == Decimal(1005) and evs[6].id == acct
        assert [e.record for e in evs[7:9]] == [True, False]
        assert evs[-2].record.open_positions == 0   # the close booked, in the same call
        assert (evs[-1].kind, evs[-1].id, evs[-1].state) == ("release", pos, None)
        assert all(e.ts_ns > 1_600_000_000 * 10**9 for e in evs)
        assert j.seq() == len(evs)

    def test_refused_calls_record_nothing(self, eng):
        """Refused calls and a halt that changes nothing record nothing.

        INVALID, HALTED, KeyExistsError, RiskLimitError, a stale id, a halt
        that changes nothing: no record (forbidden: any record of them).
        """
        j = _enable(eng, prices=True)
        acct = eng.open_account(cash=10, max_exposure=10, max_positions=1, max_loss=1)
        pos = _opened(eng, key="K")
        eng.transition(pos, Trigger.POSITION_OPENED)
        before = j.seq()
        assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.INVALID
        with pytest.raises(KeyExistsError):
            _opened(eng, key="K")
        with pytest.raises(KeyExistsError):
            eng.bind_key(pos, "K")
        with pytest.raises(RiskLimitError):
            _opened(eng, account=acct)
        with pytest.raises(RiskLimitError):
            eng.withdraw(acct, 11)
        eng.halt(False)   # not halted: no change
        eng.halt()
        halted = j.seq()
        eng.halt()
        assert eng.transition(pos, Trigger.PAUSE) is Outcome.HALTED
        eng.halt(False)
        assert j.seq() == halted + 1 == before + 2
        for t in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
            eng.transition(pos, t)
        eng.release_position(pos)
        after = j.seq()
        with pytest.raises(StaleIdError):
            eng.transition(pos, Trigger.PAUSE)
        with pytest.raises(StaleIdError):
            eng.update_price(pos, 1.0)
        assert j.seq() == after

    def test_prices_only_with_journal_prices(self, eng):
        """Price writes are journaled on every path with journal_prices, and only with it.

        Price writes are journaled only with journal_prices; every path
        (update_price, update_prices, update_token_price) when they are.
        """
        j = _enable(eng, prices=False)
        pos = _opened(eng)
        eng.update_price(pos, 101.0)
        eng.update_token_price(7, 102.0)
        assert [e.kind for e in j.read(0, 10)] == ["open"]
        _enable(eng, prices=True)
        eng.update_price(pos, 103.0)
        eng.update_prices([pos], [104.0])
        eng.update_token_price(7, 105.0)
        got = [e for e in j.read(1, 10)]
        assert [(e.kind, e.record.price) for e in got] == [
            ("price", 103.0), ("price", 104.0), ("price", 105.0)]

    def test_on_by_default_off_with_journal_none(self, made):
        """journal=None journals nothing; the defaults keep journal_records records."""
        off = made(16, journal=None)
        r = redis.Redis.from_url(off.url)
        assert r.hget(off._seg.meta_keys[0], "jrec") == b"0"
        eng = made(16)
        j = RedisJournal(eng._seg, eng.spec)
        pos = _opened(eng)
        eng.update_price(pos, 101.0)
        assert [e.kind for e in j.read(0, 10)] == ["open"]
        assert r.hmget(eng._seg.meta_keys[0], "jrec", "jprices") == [
            str(lib.ENG_JOURNAL_DEFAULT_RECORDS).encode(), b"0"]
        _enable(eng, records=0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        assert j.seq() == 1

    @pytest.mark.parametrize("bad", [-1, lib.ENG_REDIS_JOURNAL_MAX + 1, 1.0, True, "9"])
    def test_bad_journal_records_are_refused(self, url, bad):
        """journal_records out of range is refused with ArgumentError; nothing is created.

        journal_records outside [0, ENG_REDIS_JOURNAL_MAX]: ArgumentError naming
        the range; nothing is created.
        """
        with pytest.raises(ArgumentError, match=r"journal_records must be an int in \[0, "):
            RedisStore.create(url, "jbad", POSITION_SPEC, 16, 2, 4, None, journal_records=bad)
        r = redis.Redis.from_url(url)
        assert r.keys("eng:{jbad:*") == []

    def test_create_sets_records_and_prices(self, url):
        """RedisStore.create's journal_records and journal_prices reach every shard."""
        store = RedisStore.create(url, "jopt", POSITION_SPEC, 16, 2, 4, 2, journal_records=7,
                                  journal_prices=True)
        try:
            r = redis.Redis.from_url(url)
            for k in store.meta_keys:
                assert r.hmget(k, "jrec", "jprices") == [b"7", b"1"]
        finally:
            store.destroy()
            store.eng_detach(store)


class TestReaders:
    def test_a_reader_behind_the_retained_records_is_told(self, eng):
        """A reader behind the retained records gets JournalLappedError and resumes with no gap.

        Trimmed past a reader's seq: JournalLappedError with resume_seq, the
        oldest retained; resuming there reads the rest with no gap.
        """
        j = _enable(eng, records=5)
        pos = _opened(eng)
        for _ in range(6):
            eng.transition(pos, Trigger.POSITION_OPENED if eng.state(pos) is State.CREATED
                           else (Trigger.PAUSE if eng.state(pos) is State.MONITORING
                                 else Trigger.RESUME))
        assert j.seq() == 7
        with pytest.raises(JournalLappedError) as e:
            j.read(0, 10)
        assert e.value.resume_seq == 3
        assert [ev.seq for ev in j.read(e.value.resume_seq - 1, 10)] == [3, 4, 5, 6, 7]
        assert j.read(7, 10) == []

    def test_several_shards_resume_by_a_cursor_per_shard(self, made):
        """Several shards resume by one seq per shard; a single int cursor is refused.

        With several shards each has its own seq 1, 2, ...; a cursor is one
        seq per shard; one int is refused, not guessed.
        """
        e = made(16, shards=3)
        j = _enable(e)
        ids = [_opened(e) for _ in range(6)]
        with pytest.raises(ArgumentError, match="one seq per shard"):
            j.read(0, 10)
        got, cursor = j.read_cursor((0, 0, 0), 100)
        assert sorted(ev.id for ev in got) == sorted(ids)
        for s in range(3):
            mine = [ev.seq for ev in got if shard_of(ev, 3) == s]
            assert mine == list(range(1, len(mine) + 1))
        assert cursor == j.seqs()
        e.transition(ids[0], Trigger.POSITION_OPENED)
        more, _ = j.read_cursor(cursor, 100)
        assert [(ev.kind, ev.id) for ev in more] == [("transition", ids[0])]

    def test_wait_returns_once_a_record_is_there(self, eng):
        """wait(after) returns once a record past ``after`` is there, and is False on timeout.

        wait(after) blocks on the server until a record past ``after``, and
        is False after its timeout with none.
        """
        j = _enable(eng)
        pos = _opened(eng)
        assert j.wait(0, 0) is True
        assert j.wait(1, 0.05) is False
        h = eng.handle

        def later() -> None:
            with Engine.attach(h) as o:
                o.transition(pos, Trigger.POSITION_OPENED)

        t = threading.Thread(target=later)
        t.start()
        assert j.wait(1, 10.0) is True
        t.join()


def _pos_chain(evs: list[Event], pos: int) -> list[Any]:
    return [(e.kind, e.state) for e in evs if e.id == pos and e.kind != "account"]


_RESENT = {   # a call, and the kinds it records
    "transition": (lambda e, p, a: e.transition(p, Trigger.POSITION_OPENED), ["transition"]),
    "open": (lambda e, p, a: _opened(e, account=a), ["open", "account"]),
    "bind_key": (lambda e, p, a: e.bind_key(p, "K9"), ["key"]),
    "deposit": (lambda e, p, a: e.deposit(a, 5), ["account"]),
    "halt": (lambda e, p, a: e.halt(), ["halt"]),
}


class TestExactlyOnce:
    @pytest.mark.parametrize("call", list(_RESENT))
    def test_a_reply_lost_with_its_connection_records_once(self, eng, call, monkeypatch):
        """A call whose reply is lost with its connection is resent and recorded once.

        The connection dies after the function ran, before its reply: the
        call is resent and answered by the request record (halt raises
        ServerError and is made again: the flag is already set); one record
        (forbidden: two).
        """
        j = _enable(eng)
        acct = eng.open_account(cash=1000, max_exposure=1000, max_positions=5, max_loss=100)
        pos = _opened(eng)
        before = j.seq()
        conn = eng._seg.conn.conn
        cid = eng._seg.conn.command("CLIENT", "ID")
        admin = redis.Redis.from_url(eng.url)
        read = conn.read_response

        def lose_reply(*args: Any, **kw: Any) -> Any:
            conn.read_response = read   # once
            assert readable(conn._sock, 10), "no reply"
            admin.execute_command("CLIENT", "KILL", "ID", cid)
            conn.disconnect()
            raise redis.ConnectionError("killed before the reply was read")

        act, kinds = _RESENT[call]
        if call == "halt":   # sent on a connection of its own: lose that one's reply
            import redis.connection as rc
            real = rc.Connection.read_response

            def lose_once(self: Any, *args: Any, **kw: Any) -> Any:
                monkeypatch.setattr(rc.Connection, "read_response", real)
                assert readable(self._sock, 10), "no reply"
                self.disconnect()
                raise redis.ConnectionError("killed before the reply was read")

            monkeypatch.setattr(rc.Connection, "read_response", lose_once)
            with pytest.raises(ServerError, match="call halt again"):
                eng.halt()
            assert rc.Connection.read_response is real, "the fault never happened"
        else:
            conn.read_response = lose_reply
        act(eng, pos, acct)
        assert call == "halt" or conn.read_response is read, "the fault never happened"
        assert [ev.kind for ev in j.read(before, 10)] == kinds


class TestKill:
    def test_records_match_commits_over_a_server_kill(self):
        """Over a server SIGKILL and restart, every commit has exactly one record and no more.

        appendfsync always, SIGKILL the server mid-workload, restart: for
        every position the journal's chain ends in its state and has one
        record per commit (forbidden: a record of a change that is not there,
        a commit without its record, a duplicate).
        """
        with PrivateRedis(appendfsync="always") as server:
            e = Engine.create(32, url=server.url + "?timeout=2")
            j = _enable(e)
            ids = [_opened(e) for _ in range(8)]
            stop = threading.Event()
            applied: dict[int, int] = {}

            def work() -> None:
                with Engine.attach(e.handle) as w:
                    i = 0
                    while not stop.is_set():
                        pos = ids[i % len(ids)]
                        i += 1
                        try:
                            trig = {State.CREATED: Trigger.POSITION_OPENED,
                                    State.MONITORING: Trigger.PAUSE,
                                    State.PAUSED: Trigger.RESUME}[w.state(pos)]
                            if w.transition(pos, trig) is Outcome.APPLIED:
                                applied[pos] = applied.get(pos, 0) + 1
                        except ServerError:
                            return

            t = threading.Thread(target=work)
            t.start()
            _until(lambda: sum(applied.values()) >= 200)
            server.restart(kill=True)
            stop.set()
            t.join(30)
            assert not t.is_alive()
            evs = _again(lambda: _read_all(j))
            for pos in ids:
                chain = _pos_chain(evs, pos)
                assert chain[0] == ("open", State.CREATED)
                assert chain[-1][1] is _again(lambda p=pos: e.state(p))
                moves = [s for k, s in chain[1:]]
                assert all(k == "transition" for k, _ in chain[1:])
                # a resent call in flight at the kill may have applied unacknowledged
                assert applied.get(pos, 0) <= len(moves) <= applied.get(pos, 0) + 1
                assert all(a is not b for a, b in itertools.pairwise(moves))   # each one a change
            assert [ev.seq for ev in evs] == list(range(1, len(evs) + 1))
            e.unlink()
            e.close()


def _read_all(j: RedisJournal) -> list[Event]:
    out: list[Event] = []
    while got := j.read(out[-1].seq if out else 0, 1000):
        out += got
    return out


def _again(call: Callable[[], Any]) -> Any:
    """The call made again until it returns (the first may meet a dead connection)."""
    for _ in range(20):
        try:
            return call()
        except ServerError:
            continue
    raise AssertionError("the call never returned")


def _until(cond: Callable[[], bool]) -> None:
    import time
    deadline = time.monotonic() + 60
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class TestAsyncFollower:
    def test_an_awaiting_follower_wakes_on_the_next_record(self, eng):
        """A shard's probe on the waiter thread sleeps past its seq and wakes on the next record.

        A shard's probe through the Engine's waiter thread (what events_async
        uses): it sleeps on the stream past its seq and wakes on the next record.
        """
        j = _enable(eng)
        pos = _opened(eng)
        shard = j.shards[0]

        async def main() -> int:
            waiter = eng._waiter()
            task = asyncio.ensure_future(waiter.wait(shard.probe(1), 10.0,
                                                     lambda: TimeoutError("no record")))
            for _ in range(2000):
                if waiter.held == 1:
                    break
                await asyncio.sleep(0.005)
            assert waiter.held == 1 and not task.done()
            eng.transition(pos, Trigger.POSITION_OPENED)
            return await task

        assert asyncio.run(main()) == 2


class TestWaitConnection:
    def test_a_blocked_journal_wait_does_not_hold_the_engines_calls(self, eng):
        """A thread blocked in the journal's wait() leaves the Engine's calls free.

        A thread blocked in wait() (its own connection) leaves the Engine's
        calls free: a transition from the Engine's thread lands and ends it.
        """
        j = _enable(eng)
        pos = _opened(eng)
        woke: list[bool] = []
        t = threading.Thread(target=lambda: woke.append(j.wait(1, 30.0)))
        t.start()
        r = redis.Redis.from_url(eng.url)
        _until(lambda: any(c.get("cmd") == "xread" for c in r.client_list()))
        lock = eng._seg.conn.lock
        assert lock.acquire(blocking=False), "the wait holds the Engine's connection"
        lock.release()
        assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
        t.join(30)
        assert woke == [True]


class TestCluster:
    pytestmark = pytest.mark.slow

    def test_each_shard_journals_on_its_node(self, cluster):  # noqa: F811
        """On a three-node cluster every shard journals on its own node, each change once.

        On three nodes every shard's stream is written by the change's own
        call (its key declared, same hash tag): a cursor per shard reads every
        open and transition once, halt once per shard.
        """
        e = Engine.create(64, url=cluster, shards=6, journal=True)
        try:
            j = e._seg.journal_source(e.spec)
            ids = [_opened(e) for _ in range(12)]
            for i in ids:
                e.transition(i, Trigger.POSITION_OPENED)
            e.halt()
            e.halt(False)
            got, cursor = j.read_cursor((0,) * 6, 1000)
            assert sorted((ev.kind, ev.id) for ev in got if ev.kind != "halt") == sorted(
                [("open", i) for i in ids] + [("transition", i) for i in ids])
            assert sum(ev.kind == "halt" for ev in got) == 12
            assert cursor == j.seqs()
        finally:
            e.unlink()
            e.close()
