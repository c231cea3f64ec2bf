"""Exactly-once calls on Redis: a call the client gave up on, a reply lost
with its connection, a connection the server closed while idle, resends to
several shards, the request window, WAIT after a resend, calls from threads
and from signal handlers.

A writing call carries a request id; the shard answers a resend with the
first reply.  Each test makes the fault happen at a known point of one call
(deposit, open, transition, update_price) and checks the call applied once:
never twice, and not lost when it returned."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
from decimal import Decimal
from typing import Any, NamedTuple

import pytest
import redis
from conftest import redis_url
from procs import exit_guarded_spec, readable, until

import engine.store.redis.store as rb
from engine import BusyError, Engine, Outcome, ServerError, State, Trigger, WaitTimeout
from engine._native import lib
from engine.tools.redis_server import PrivateRedis, _answers, _free_port

WINDOW_S = lib.ENG_REDIS_REQUEST_WINDOW_MS / 1000


class Op(NamedTuple):
    """A writing call: made on a fresh engine, then checked applied once."""
    name: str
    setup: Any    # (engine) -> context
    act: Any      # (engine, context) -> result
    check: Any    # (engine, context, result) -> None (asserts applied exactly once)
    nth: int = 1  # the round trip of the call whose reply a test loses


def allow(ctx: Any, price: Any) -> bool:
    return True


GUARDED = exit_guarded_spec(allow, "allow")


def _account(e: Engine) -> int:
    return e.open_account(cash=100, max_exposure=100, max_positions=4, max_loss=100)


def _deposited(e: Engine, a: int, result: Any) -> None:
    assert e.account(a).cash == Decimal(101), "the deposit applied twice (or not at all)"


def _opened(e: Engine, _ctx: Any, pos: int) -> None:
    rows = e.snapshot()
    assert len(rows) == 1, f"{len(rows)} positions open after one open"
    assert e.state(pos) is State.CREATED


def _moved(e: Engine, pos: int, outcome: Outcome) -> None:
    assert outcome is Outcome.APPLIED, "the resend did not get the first reply"
    assert e.state(pos) is State.MONITORING
    assert e.metrics()["transition"].applied == 1, "the transition applied twice"


def _exit_pending(e: Engine) -> int:
    pos = e.open_position(100.0, 1.0)
    for t in (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET):
        assert e.transition(pos, t) is Outcome.APPLIED
    return pos


def _guarded(e: Engine, pos: int, outcome: Outcome) -> None:
    assert outcome is Outcome.APPLIED, "the resend did not get the first reply"
    assert e.state(pos) is State.EXITING
    assert e.metrics()["transition_ctx"].applied == 1, "the guarded commit applied twice"
    name = e._seg.prefixes[0] + "g:*"
    assert not e._seg.conn.client.keys(name), "a guard's lock key was left behind"


def _priced(e: Engine, pos: int, _result: Any) -> None:
    p = e.price(pos)
    assert p.price == 101.0
    assert p.version == 2, f"price version {p.version}: the update applied twice"


OPS = [
    Op("deposit", _account, lambda e, a: e.deposit(a, 1), _deposited),
    Op("open", lambda e: None, lambda e, _: e.open_position(100.0, 1.0), _opened),
    Op("transition", lambda e: e.open_position(100.0, 1.0),
       lambda e, pos: e.transition(pos, Trigger.POSITION_OPENED), _moved),
    Op("update_price", lambda e: e.open_position(100.0, 1.0),
       lambda e, pos: e.update_price(pos, 101.0), _priced),
    Op("guarded_lock", _exit_pending, lambda e, pos: e.transition(pos, Trigger.EXIT_STARTED),
       _guarded),
    Op("guarded_commit", _exit_pending, lambda e, pos: e.transition(pos, Trigger.EXIT_STARTED),
       _guarded, nth=2),
]


class _DebugServer(NamedTuple):
    url: str
    port: int


@pytest.fixture(scope="module")
def debug_server() -> Any:
    """A private server (loopback, no persistence) that takes DEBUG SLEEP."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="engine-debug-redis-") as d:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", d, "--enable-debug-command", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            until(lambda: _answers(port), "the debug server answering", 20)
            yield _DebugServer(f"redis://127.0.0.1:{port}/0", port)
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def engines() -> Any:
    made: list[Engine] = []

    def make(url: str) -> Engine:
        e = Engine.create(16, url=url, spec=GUARDED)
        made.append(e)
        return e

    yield make
    for e in made:
        try:
            e.unlink()
            e.close()
        except ServerError:
            pass


def _stall_after_queued(url: str, port: int) -> threading.Thread:
    """Writes paused; once a function call waits in the pause, unpause and
    sleep the server 1.5 s in one step: the call runs after the sleep, when
    its client (timeout 0.5 s) has given up on it."""
    admin = redis.Redis.from_url(url)
    admin.execute_command("CLIENT", "PAUSE", "20000", "WRITE")

    def stall() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            until(lambda: any(c.get("cmd") == "fcall" and "b" in c["flags"]
                              for c in admin.client_list()), "a call waiting in the pause", 10)
            s.sendall(b"CLIENT UNPAUSE\r\nDEBUG SLEEP 1.5\r\n")
            s.settimeout(10)
            s.recv(64)   # the sleep's reply: the server is awake again

    t = threading.Thread(target=stall, daemon=True)
    t.start()
    return t


def _again(call: Any) -> Any:
    """The same call made again until it returns (each try bounded by the url's timeout)."""
    for _ in range(40):
        try:
            return call()
        except ServerError:
            continue
    raise AssertionError("the call never returned")


@pytest.mark.parametrize("op", OPS, ids=[o.name for o in OPS])
class TestExactlyOnce:
    def test_a_call_given_up_on_applies_once_when_made_again(self, debug_server, engines, op):
        """A call given up on and made again returns the first reply and applies once.

        The server runs the call after its client gave up (ServerError: not
        known to have applied); the same call made again returns the first
        reply and applies nothing: one apply, never two.
        """
        e = engines(debug_server.url + "?timeout=0.5")
        ctx = op.setup(e)
        stall = _stall_after_queued(debug_server.url, debug_server.port)
        with pytest.raises(ServerError, match="not known to have applied"):
            op.act(e, ctx)
        result = _again(lambda: op.act(e, ctx))
        stall.join(10)
        op.check(e, ctx, result)

    def test_a_reply_lost_with_its_connection_is_not_applied_again(self, engines, op):
        """A reply lost with its connection is resent with the first reply; it applied once.

        The connection is killed (CLIENT KILL) after the function ran and
        before its reply is read: the call returns, resent, with the first
        reply; it applied once.
        """
        url = redis_url()
        e = engines(url)
        ctx = op.setup(e)
        conn = e._seg.conn.conn
        cid = e._seg.conn.command("CLIENT", "ID")
        admin = redis.Redis.from_url(url)
        read = conn.read_response
        killed: list[int] = []
        reads = [0]

        def lose_reply(*args: Any, **kw: Any) -> Any:
            reads[0] += 1
            if reads[0] < op.nth:
                return read(*args, **kw)
            conn.read_response = read   # once
            assert readable(conn._sock, 10), "no reply"   # the function ran
            admin.execute_command("CLIENT", "KILL", "ID", cid)
            killed.append(cid)
            conn.disconnect()   # with the reply in its buffer
            raise redis.ConnectionError("killed before the reply was read")

        conn.read_response = lose_reply
        result = op.act(e, ctx)
        assert killed, "the fault never happened"
        op.check(e, ctx, result)

    def test_a_call_after_the_server_closed_the_idle_connection(self, op):
        """A call after the server closed the idle connection goes on a new one, applied once."""
        with PrivateRedis() as r:   # not the engines fixture: its server is gone at teardown
            e = Engine.create(16, url=r.url, spec=GUARDED)
            try:
                ctx = op.setup(e)
                cid = e._seg.conn.command("CLIENT", "ID")
                admin = redis.Redis.from_url(r.url)
                admin.config_set("timeout", 1)
                until(lambda: str(cid) not in {c["id"] for c in admin.client_list()},
                      "the server closing the idle connection", 20)
                result = op.act(e, ctx)
                op.check(e, ctx, result)
            finally:
                e.unlink()
                e.close()


class TestRequestIds:
    def test_an_older_request_is_refused(self, engines):
        """An older request reaching the shard after a later one is refused and applies nothing."""
        e = engines(redis_url())
        a = _account(e)
        e.deposit(a, 1)
        e._seg._seq -= 2   # the next deposit goes out with an older number
        with pytest.raises(ServerError, match="stale request"):
            e.deposit(a, 1)
        assert e.account(a).cash == Decimal(101)

    def test_the_url_timeout_must_be_shorter_than_the_window(self):
        """A timeout the request records would not outlive: ArgumentError naming the range."""
        from engine import ArgumentError
        with pytest.raises(ArgumentError, match=r"\(0, 60\)"):
            Engine.create(4, url=redis_url() + f"?timeout={WINDOW_S:g}")


class TestIdleConnection:
    def test_a_plain_command_after_the_server_closed_the_idle_connection(self):
        """A plain command after the idle timeout goes on a new connection, no ServerError."""
        with PrivateRedis() as r:
            e = Engine.create(16, url=r.url)
            e.open_position(100.0, 1.0)
            cid = e._seg.conn.command("CLIENT", "ID")
            admin = redis.Redis.from_url(r.url)
            admin.config_set("timeout", 1)
            until(lambda: str(cid) not in {c["id"] for c in admin.client_list()},
                  "the server closing the idle connection", 20)
            assert e.metrics()["open"].applied == 1
            e.unlink()
            e.close()

    def test_an_idle_check_on_a_descriptor_above_1024(self):
        """The idle connection check works on a descriptor above 1024.

        The idle connection's check works on any descriptor number (select()
        refused those past FD_SETSIZE: every call of a process with many files
        open failed).
        """
        import os
        import resource
        import time
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"the hard limit on open files is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
        filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        try:
            e = Engine.create(4, url=redis_url())
            try:
                assert e._seg.conn.conn._sock.fileno() >= 1024
                pos = e.open_position(100.0, 1.0)
                time.sleep(0.6)   # idle long enough for the check to run
                assert e.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
            finally:
                e.unlink()
                e.close()
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _checking_script() -> str:
    """The EVALSHA script with every redis.call checked: its key (the
    command's first) must be one of the call's KEYS, and must not be one the
    call deleted before (a migrating node would take that touch for a key
    that moved).  The create and remove steps are not checked: they declare
    only the shard's meta key (their claim and lease make a step that fails
    half-way one that the next create or remove clears)."""
    from engine.store.redis import connection as rb
    body = rb._SCRIPT.replace("redis.call", "checked_call")
    steps = ["claim", "binit", "fill", "seal", "renew", "wipe", "abort", "drop"]
    check = ("local DELETED = {}\n"
             "local STEPS = {" + ", ".join(f"{n} = true" for n in steps) + "}\n"
             "local function checked_call(cmd, key, ...)\n"
             "    if key == nil then return redis.call(cmd) end\n"
             "    if STEPS[ARGV[1]] then return redis.call(cmd, key, ...) end\n"
             "    local ok = false\n"
             "    for i = 1, #KEYS do if KEYS[i] == key then ok = true end end\n"
             "    if not ok then error('undeclared ' .. tostring(key) .. ' in ' .. ARGV[1]) end\n"
             "    if DELETED[key] then error('touched after delete ' .. key) end\n"
             "    if cmd == 'DEL' then DELETED[key] = true end\n"
             "    return redis.call(cmd, key, ...)\n"
             "end\n")
    return check + body


class TestDeclaredKeys:
    def test_every_key_a_function_touches_is_declared(self, monkeypatch):
        """Every server function touches only the keys its call declared.

        Every function, run through the API (positions with keys, tokens
        and accounts; guarded and booked closings; releases; batches; waits;
        accounts), touches only keys its call declared, and never one it
        deleted: the property that lets a Cluster refuse a call whole while
        its slot migrates.
        """
        import hashlib

        import numpy as np

        from engine.store.redis import connection as rb
        script = _checking_script()
        monkeypatch.setattr(rb, "_SCRIPT", script)
        monkeypatch.setattr(rb, "_SCRIPT_SHA", hashlib.sha1(script.encode()).hexdigest())
        url = redis_url() + "?functions=0"
        e = Engine.create(64, url=url, spec=GUARDED, shards=4, max_accounts=8)
        other = Engine.attach(e.handle)   # learns what it did not open itself
        try:
            a = e.open_account(cash=10_000, max_exposure=10_000, max_positions=16,
                               max_loss=10_000)
            e.deposit(a, 5)
            e.withdraw(a, 5)
            e.halt_account(a, False)
            e.update_account(a, lambda acc: {"max_positions": 20})
            ids = [e.open_position(100.0, 1.0, token=7, account=a if i % 2 else None,
                                   key=f"key-{i}" if i % 3 == 0 and not i % 2 else None)
                   for i in range(12)]
            more = next(k for k in (f"more-{n}" for n in range(100))   # of ids[2]'s shard
                        if e._seg._key_shard(k.encode()) == e.slot_of(ids[2]) % 4)
            e.bind_key(ids[2], more)
            assert e.lookup("key-0") == ids[0] and e.keys(ids[0])
            assert e.update_token_price(7, 101.0) == 12
            assert e.update_prices(np.array(ids), np.full(12, 102.0)) == 12
            e.states(ids)
            e.prices(ids)
            e.transition_many(ids, Trigger.POSITION_OPENED)
            e.transition_many(ids, Trigger.EXIT_CONDITION_MET)
            for i, pos in enumerate(ids):
                who = other if i % 2 else e
                assert who.transition(pos, Trigger.EXIT_STARTED) is Outcome.APPLIED
                e.context(pos)
                e.price(pos)
                e.id_of(e.slot_of(pos))
                with pytest.raises(WaitTimeout):
                    e.wait_for_change(pos, timeout=0)
            other.transition_many(ids[:6], Trigger.EXIT_COMPLETED)
            for i, pos in enumerate(ids[6:]):
                who = other if i % 2 else e
                assert who.transition(pos, Trigger.EXIT_COMPLETED) is Outcome.APPLIED
            for i, pos in enumerate(ids):
                who = other if i % 2 else e
                assert who.release_position(pos) is Outcome.APPLIED
            assert e.lookup("key-0") is None and e.lookup(more) is None
            assert e.account(a).open_positions == 0
            e.accounts()
            e.close_account(a)
            e.set_metrics(True)
            e.halt(False)
        finally:
            other.close()
            e.unlink()
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


class TestThreads:
    def test_two_threads_on_one_engine_never_read_each_others_replies(self, made):
        """Two threads on one Engine never read each other's replies.

        Two threads calling one Engine: every deposit that returned is in
        the books once (none answered with another call's recorded reply),
        every state read is the position's, and the Engine stays in step.
        """
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


class TestSeveralShards:
    @pytest.mark.parametrize("shard", [1, 2])
    def test_transition_many_made_again_returns_the_first_outcomes(self, made, shard):
        """transition_many made again after a partial run returns the first outcomes.

        transition_many over 3 shards raises ServerError after shard
        ``shard``'s part ran: made again, every element's outcome is the
        first one (APPLIED), each transition applied once.
        """
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
        """update_prices made again after a partial run applies each price once.

        update_prices over 3 shards raises ServerError after shard
        ``shard``'s part ran: made again, every price applied once (version 2).
        """
        e = made(12, shards=3)
        ids = [e.open_position(100.0, 1.0) for _ in range(6)]
        _lose_reply_of(e, "upds", shard + 1)
        with pytest.raises(ServerError):
            e.update_prices(ids, [101.0] * 6)
        assert e.update_prices(ids, [101.0] * 6) == 6
        assert [e.price(i).version for i in ids] == [2] * 6

    @pytest.mark.parametrize("shard", [1, 2])
    def test_update_token_price_made_again_applies_each_price_once(self, made, shard):
        """update_token_price made again after a partial run applies each price once.

        update_token_price over 3 shards raises ServerError after shard
        ``shard``'s part ran: made again, every position's price applied once.
        """
        e = made(12, shards=3)
        ids = [e.open_position(100.0, 1.0, token=9) for _ in range(6)]
        _lose_reply_of(e, "tokp", shard + 1)
        with pytest.raises(ServerError):
            e.update_token_price(9, 101.0)
        assert e.update_token_price(9, 101.0) == 6
        assert [e.price(i).version for i in ids] == [2] * 6

    def test_another_call_in_between_makes_it_a_new_call(self, made):
        """Another writing call in between makes the same update_prices a new call.

        After a partial update_prices, another writing call, then the same
        update_prices: a new call (every shard's part sent again, as new requests).
        """
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
        """A resent call answered from its record still waits for the replica.

        ?wait=1, the replica stopped: a deposit runs on the primary, its
        reply is lost with the connection (CLIENT KILL) and the resend is
        answered from the request record on a new connection.  It must not
        return (the replica never got it; a failover would lose it): it
        raises ServerError; made again once the replica runs, it returns and
        applied once.
        """
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
        """A call made again past the request window is not applied twice.

        A deposit ran but raised ServerError (reply lost); the same call
        made again after the request window (the server forgot its record):
        it must not apply a second time.  It raises ServerError saying the
        window passed; the books hold the one deposit.  Made once more, it is
        a new call.
        """
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


class TestSignalHandler:
    def test_a_handlers_call_in_the_middle_of_a_call_never_takes_its_reply(self, made):
        """A signal handler's call never takes the interrupted call's reply.

        A signal handler calls the Engine while the interrupted thread's
        call waits for its reply (same thread, same connection): the
        handler's call is refused (BusyError, nothing sent), the interrupted
        call gets its own reply, and the Engine stays in step.
        """
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
