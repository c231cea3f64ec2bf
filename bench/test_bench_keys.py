"""Key lookup and insert: the engine against a ``multiprocessing.Manager``
dict and Redis ``HGET`` / ``HSETNX``, in the same run.

Rows read as nanoseconds per call (see ``conftest.py``).  Lookups hit one of
``N_KEYS`` keys of an order engine (``ORDER_SPEC``); inserts bind a fresh key
to each of ``OPS_PER_ROUND`` fresh orders per round (the orders are opened in
an untimed setup).  ``transition_orders`` is a fast-path transition on the
same engine: the issue's bar is a lookup that costs no more than it.  The
Redis rows are skipped (with the reason) when redis-server or the client is
missing: ``make bench`` installs both.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from engine import ORDER_SPEC, Engine
from engine.tools.bench.peers import RedisHost, Unavailable

if TYPE_CHECKING:
    from conftest import CallTimer, Recorder

N_KEYS = 10_000
ROUND = 1000
_fresh = itertools.count()


@pytest.fixture(scope="module")
def orders() -> Iterator[Engine]:
    """An order engine with N_KEYS open orders, each under key ``CL-<n>``, and
    room for ROUND more per insert round."""
    eng = Engine.create(capacity=N_KEYS + ROUND, spec=ORDER_SPEC)
    try:
        for n in range(N_KEYS):
            eng.open(key=f"CL-{n}", qty=1.0, side=1)
        yield eng
    finally:
        eng.close()
        eng.unlink()


@pytest.fixture(scope="module")
def manager_dict() -> Iterator[Any]:
    import multiprocessing as mp

    with mp.get_context("spawn").Manager() as m:
        d = m.dict({f"CL-{n}": n + 1 for n in range(N_KEYS)})
        yield d


@pytest.fixture(scope="module")
def redis_client() -> Iterator[Any]:
    host = RedisHost()
    try:
        host.setup()
    except Unavailable as e:
        pytest.skip(str(e))
    try:
        pipe = host.client.pipeline(transaction=False)
        for n in range(N_KEYS):
            pipe.hset("keys", f"CL-{n}", n + 1)
        pipe.execute()
        yield host.client
    finally:
        host.teardown()


def _insert_rounds(timer: CallTimer, key: str, setup: Any, insert: Any, rounds: int = 30) -> None:
    """Time ``insert(ids_or_None, tag)`` of ROUND fresh keys per round."""
    def args() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (setup(), f"K{next(_fresh)}-"), {}

    timer.benchmark.pedantic(insert, setup=args, rounds=rounds, iterations=1)
    timer.recorder.record(timer.benchmark, key, ROUND)


@pytest.mark.benchmark(group="keys: lookup (ns per call)")
class TestLookup:
    def test_engine_lookup_hit(self, timer: CallTimer, orders: Engine) -> None:
        timer.calls("key_lookup_hit", ["f(k)"], f=orders.lookup, k="CL-4242")

    def test_engine_lookup_miss(self, timer: CallTimer, orders: Engine) -> None:
        timer.calls("key_lookup_miss", ["f(k)"], f=orders.lookup, k="NOPE-4242")

    def test_engine_transition(self, timer: CallTimer, orders: Engine) -> None:
        """The bar: a fast-path transition on the same engine (SUBMIT from
        INITIALIZED, then INVALID from SUBMITTED: one rule lookup, no commit)."""
        oid = orders.lookup("CL-1")
        orders.transition(oid, "SUBMIT")
        timer.calls("transition_orders", ["f(o, t)"], f=orders.transition, o=oid, t=0)

    def test_manager_dict_get(self, timer: CallTimer, manager_dict: Any) -> None:
        timer.calls("manager_dict_get", ["f(k)"], f=manager_dict.get, k="CL-4242")

    def test_redis_hget(self, timer: CallTimer, redis_client: Any) -> None:
        timer.calls("redis_hget", ["f(h, k)"], f=redis_client.hget, h="keys", k="CL-4242")


@pytest.mark.benchmark(group="keys: insert (ns per call)")
class TestInsert:
    def test_engine_bind_key(self, timer: CallTimer, orders: Engine) -> None:
        """bind_key of a fresh key to each of ROUND fresh orders (opened and,
        after the round, released untimed)."""
        opened: list[int] = []

        def setup() -> list[int]:
            for oid in opened:
                orders.transition(oid, "DENY")
                orders.release_position(oid)
            opened[:] = [orders.open(qty=1.0, side=1) for _ in range(ROUND)]
            return opened

        def insert(ids: list[int], tag: str, bind: Any = orders.bind_key) -> None:
            for i, oid in enumerate(ids):
                bind(oid, f"{tag}{i}")

        _insert_rounds(timer, "key_insert", setup, insert)

    def test_manager_dict_setdefault(self, timer: CallTimer, manager_dict: Any) -> None:
        """``setdefault``: the Manager's atomic insert-if-absent."""
        def insert(_: None, tag: str, f: Any = manager_dict.setdefault) -> None:
            for i in range(ROUND):
                f(f"{tag}{i}", i)

        _insert_rounds(timer, "manager_dict_setdefault", lambda: None, insert, rounds=5)

    def test_redis_hsetnx(self, timer: CallTimer, redis_client: Any) -> None:
        def insert(_: None, tag: str, f: Any = redis_client.hsetnx) -> None:
            for i in range(ROUND):
                f("keys", f"{tag}{i}", i)

        _insert_rounds(timer, "redis_hsetnx", lambda: None, insert, rounds=10)


def test_keys_summary(recorder: Recorder) -> None:
    """Not a benchmark: print the ratios measured above (run last in the file)."""
    r = recorder.results
    if "key_lookup_hit" not in r:
        pytest.skip("benchmarks disabled")
    for k in ("key_lookup_hit", "key_lookup_miss", "transition_orders", "manager_dict_get",
              "redis_hget", "key_insert", "manager_dict_setdefault", "redis_hsetnx"):
        if k in r:
            recorder.note(f"{k}_ns", r[k].min_ns)
    hit, tr = r["key_lookup_hit"].min_ns, r["transition_orders"].min_ns
    recorder.note("lookup_over_transition", hit / tr)
