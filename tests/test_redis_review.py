"""Adversarial review of the Redis backend after the issue-17 merge: each
test broke the merged code it was written against."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
from conftest import redis_url

from engine import Engine, SegmentError, SegmentNotFoundError, ServerError, State
from engine.tools.redis_server import PrivateRedis


@pytest.fixture
def url() -> str:
    return redis_url()


@pytest.fixture
def made(url: str) -> Any:
    engines: list[Engine] = []

    def make(capacity: int = 16, **kw: Any) -> Engine:
        e = Engine.create(capacity, url=kw.pop("url", url), **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        try:
            e.close()
            with Engine.attach(e.handle) as again:
                again.unlink()
        except (SegmentNotFoundError, ServerError):
            pass


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
