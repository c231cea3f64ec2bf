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
from engine.errors import EngineError

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
        """A fire in upd, upds and tokp (on an account, the journal on) touches only declared keys."""
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
        finally:
            e.unlink()
            e.close()


class TestFiringWriteLostReply:
    @pytest.mark.parametrize("fn", ["upd", "upds", "tokp"])
    def test_a_fire_made_again_books_once(self, made, fn):
        """A firing price write whose reply was lost, made again, fires and prices once."""
        e = made(16, max_accounts=4, journal=True)
        a = _account(e)
        pos = _armed(e, account=a)
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
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", used)
        r.config_set("maxmemory-policy", "noeviction")
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
            with pytest.raises(EngineError):
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
            with pytest.raises(EngineError):
                _account(e, key="full")
        finally:
            r.config_set("maxmemory", 0)
        assert e.lookup_account("full") is None and len(e.accounts()) == 0
        a = _account(e, key="full")
        assert e.lookup_account("full") == a
