"""An operator's bad day against this round's Redis additions: exits fired
inside price writes, keyed accounts (akeys) and the journal stream: lost
replies and resends, declared keys, a full server (maxmemory)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
import redis
from conftest import redis_url
from test_redis_calls import _checking_script, _lose_reply_of

from engine import Engine, Outcome, ServerError, State, Trigger
from engine.errors import EngineError, ShardFullError
from engine.tools.redis_server import PrivateRedis


def _armed(e: Engine, account: Any = None, token: int = 7) -> int:
    pos = e.open_position(entry_price=100.0, amount=2.0, side=1, token=token, stop_loss=90.0,
                          account=account)
    assert e.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return pos


def _account(e: Engine, **kw: Any) -> Any:
    return e.open_account(cash=10_000, max_exposure=10_000, max_positions=16, max_loss=10_000,
                          **kw)


class TestFiresDeclareTheirKeys:
    def test_a_firing_price_write_touches_only_declared_keys(self, monkeypatch):
        """Fires in upd, upds, tokp, halt and keyed aopen, alookup, aclose: only declared keys."""
        from engine.store.redis import connection as rb
        script = _checking_script()
        monkeypatch.setattr(rb, "_SCRIPT", script)
        monkeypatch.setattr(rb, "_SCRIPT_SHA", hashlib.sha1(script.encode()).hexdigest())
        e = Engine.create(64, url=redis_url() + "?functions=0", shards=2,
                          max_accounts=8, journal=True)
        try:
            a = _account(e, key="acct-1")
            ids = [_armed(e, account=a, token=t) for t in (7, 7, 8, 8, 9, 9)]
            for pos in ids[:2]:
                e.update_price(pos, 80.0)                          # upd fires
            e.update_prices(np.array(ids[2:4]), np.array([80.0, 80.0]))   # upds fires
            assert e.update_token_price(9, 80.0) == 2              # tokp fires
            assert [e.context(i).exit_price for i in ids] == [80.0] * 6
            assert [e.state(i) for i in ids] == [State.EXIT_PENDING] * 6
            e.halt(True)                                       # halt journals
            e.halt(False)
            b = _account(e, key="acct-2")                      # aopen, alookup, aclose
            assert e.lookup_account("acct-2") == b
            e.close_account(b)
            assert e.lookup_account("acct-2") is None
        finally:
            e.unlink()
            e.close()


class TestFiringWriteLostReply:
    @pytest.mark.parametrize("fn", ["upd", "upds", "tokp"])
    def test_a_fire_made_again_applies_once(self, made, fn):
        """A firing write whose reply was lost, made again, fires, prices and journals once."""
        e = made(16, max_accounts=4, journal=True, journal_prices=True)
        a = _account(e)
        pos = _armed(e, account=a)
        since = e.journal_seq
        _lose_reply_of(e, fn, 1)

        def write() -> Any:
            if fn == "upd":
                return e.update_price(pos, 80.0)
            if fn == "upds":
                return e.update_prices(np.array([pos]), np.array([80.0]))
            return e.update_token_price(7, 80.0)
        with pytest.raises(ServerError):
            write()
        write()
        assert e.state(pos) is State.EXIT_PENDING
        assert e.context(pos).exit_price == 80.0
        assert e.price(pos).version == 2
        kinds = [ev.kind for ev in e.events(since=since, timeout=0)]
        assert sorted(kinds) == sorted(["transition", "price"]), kinds   # journaled once


class TestKeyedOpenLostReply:
    def test_a_keyed_open_made_again_opens_once(self, made):
        """open_account(key=) whose reply was lost, made again, opens one account with the key."""
        e = made(8, max_accounts=4, journal=True)
        _lose_reply_of(e, "aopen", 1)
        with pytest.raises(ServerError):
            _account(e, key="k1")
        a = _account(e, key="k1")
        assert e.lookup_account("k1") == a
        assert len(e.accounts()) == 1


class TestFullServer:
    def _full(self, e: Engine) -> redis.Redis:
        r = redis.Redis.from_url(redis_url())
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        r.config_set("maxmemory", "1")
        return r

    def test_a_firing_write_on_a_full_server_is_refused_whole(self, made):
        """A firing price write on a full server: refused, not fired, not priced."""
        e = made(16, max_accounts=4, journal=True)
        a = _account(e)
        pos = _armed(e, account=a)
        before = (e.state(pos), e.context(pos).exit_price, e.price(pos).version,
                  e.account(a).open_positions)
        r = self._full(e)
        try:
            with pytest.raises(ServerError, match="maxmemory"):
                e.update_price(pos, 80.0)
        finally:
            r.config_set("maxmemory", 0)
        assert (e.state(pos), e.context(pos).exit_price, e.price(pos).version,
                e.account(a).open_positions) == before

    def test_a_keyed_open_on_a_full_server_is_refused_whole(self, made):
        """open_account(key=) on a full server: refused, no account, no akeys entry."""
        e = made(8, max_accounts=4, journal=True)
        r = self._full(e)
        try:
            with pytest.raises(ServerError, match="maxmemory"):
                _account(e, key="full")
        finally:
            r.config_set("maxmemory", 0)
        assert e.lookup_account("full") is None and len(e.accounts()) == 0
        a = _account(e, key="full")
        assert e.lookup_account("full") == a


class TestFunctionFlush:
    def test_a_fire_and_a_keyed_open_after_function_flush(self, made):
        """After FUNCTION FLUSH between calls a fire and a keyed open each apply once."""
        e = made(16, max_accounts=4, journal=True)
        pos = _armed(e)
        r = redis.Redis.from_url(redis_url())
        r.function_flush()
        r.script_flush()
        e.update_price(pos, 80.0)
        assert e.state(pos) is State.EXIT_PENDING and e.price(pos).version == 2
        r.function_flush()
        r.script_flush()
        a = _account(e, key="flushed")
        assert e.lookup_account("flushed") == a and len(e.accounts()) == 1

    def test_a_lost_fire_made_again_after_function_flush_applies_once(self, made):
        """A firing write whose reply was lost, made again after FUNCTION FLUSH, applies once."""
        e = made(16, max_accounts=4, journal=True)
        pos = _armed(e)
        _lose_reply_of(e, "upd", 1)
        with pytest.raises(ServerError):
            e.update_price(pos, 80.0)
        r = redis.Redis.from_url(redis_url())
        r.function_flush()
        r.script_flush()
        e.update_price(pos, 80.0)
        assert e.state(pos) is State.EXIT_PENDING and e.price(pos).version == 2


class TestPausedWrites:
    def _again(self, call: Any) -> Any:
        for _ in range(3):   # the first call may meet the connection that timed out
            try:
                return call()
            except ServerError:
                continue
        raise AssertionError("made again three times, it kept failing")

    @pytest.mark.parametrize("what", ["fire", "keyed_open"])
    def test_paused_past_the_timeout_then_made_again_applies_once(self, what):
        """Under CLIENT PAUSE WRITE past the timeout: ServerError; made again, it applies once."""
        with PrivateRedis() as server:
            e = Engine.create(16, url=server.url + "?timeout=1", max_accounts=4, journal=True)
            try:
                pos = _armed(e)
                call = ((lambda: e.update_price(pos, 80.0)) if what == "fire"
                        else (lambda: _account(e, key="paused")))
                r = redis.Redis.from_url(server.url)
                r.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
                with pytest.raises(ServerError):
                    call()
                r.execute_command("CLIENT", "UNPAUSE")
                got = self._again(call)
                if what == "fire":
                    assert e.state(pos) is State.EXIT_PENDING
                    assert e.context(pos).exit_price == 80.0 and e.price(pos).version == 2
                else:
                    assert e.lookup_account("paused") == got and len(e.accounts()) == 1
            finally:
                e.unlink()
                e.close()


class TestRestartWithoutPersistence:
    def test_keyed_lookups_and_fires_after_a_lost_server_say_gone(self):
        """After a restart without persistence: lookup_account and a fire raise, never None."""
        with PrivateRedis() as server:
            e = Engine.create(16, url=server.url + "?timeout=2", max_accounts=4, journal=True)
            try:
                pos = _armed(e)
                _account(e, key="lost")
                server.restart(kill=True)
                for call in (lambda: e.lookup_account("lost"), lambda: e.update_price(pos, 80.0),
                             lambda: _account(e, key="lost")):
                    for _ in range(3):   # the first call may meet the dead connection
                        try:
                            call()
                        except ServerError:
                            continue
                        except EngineError:
                            break
                        raise AssertionError("a call on a lost engine answered")
                    else:
                        raise AssertionError("it kept failing with ServerError, not gone")
            finally:
                e.close()


class TestKeyedAccountsAcrossShards:
    @pytest.mark.xfail(strict=True, raises=ShardFullError,
                       reason="by design (docs/accounts.md): a keyed account opens only on its "
                       "key's shard, its index and record in one call on one node; keys that "
                       "hash to one shard fill it while others have free records (shm: one "
                       "pool of max_accounts): ShardFullError says so")
    def test_keyed_opens_use_every_free_account(self, made):
        """Keyed accounts can use all max_accounts records, as on shared memory."""
        e = made(8, shards=2, max_accounts=4)
        keys = [k for k in (f"desk-{i}" for i in range(200)) if e._seg._key_shard(k.encode()) == 0]
        for k in keys[:4]:
            _account(e, key=k)
        assert len(e.accounts()) == 4

