"""The systems the bench runs: the engine and its peers, each as a host (set
up in the parent: ``setup``, ``payload`` for the workers, ``committed``,
``teardown``) and a client (``CONNECT[system](payload)`` in a worker: the
three calls as an ``Ops``).

Systems:

``engine``
    the engine: ``Engine.transition`` / ``update_price`` / ``price``, metrics
    on with the default sampling, as users run it;
``value_lock``
    ``multiprocessing.RawArray`` fields (state, generation, price, timestamp,
    pnl, version, context) guarded by one ``multiprocessing.Lock``, written
    the way the multiprocessing docs show (``with lock:``, array indexing);
``value_lock_tuned``
    the same data and lock, tuned: memoryview casts of the arrays instead of
    ctypes indexing, ``acquire``/``release`` bound once (``with lock:`` goes
    through two Python-level methods of ``multiprocessing.synchronize.Lock``,
    about 200 ns; the bound pair costs about 45 ns).  The fastest pure
    Python form of that design we know;
``manager``
    ``multiprocessing.Manager`` dicts guarded by a ``multiprocessing.Lock``
    (a semaphore: the cheaper choice, two manager round trips a transition);
``manager_lock``
    the same dicts guarded by ``Manager().Lock()`` (what ``Pool`` workers
    must use): acquire and release are two more round trips;
``atomicshm``
    the transition composed from ``atomicshm`` primitives on shared memory:
    load the word, look the rule up in a Python table, CAS, fetch-add the
    transition counter; the price record is a seqlock made of a CAS latch,
    ``struct.pack_into`` and release stores; every atomic on a cell made
    once per slot (no offset to pass), the retry loop entered only after a
    lost CAS;
``redis``
    a real ``redis-server`` started here on a free 127.0.0.1 port: the
    transition and the price update are Lua scripts run with EVALSHA, the
    read is one HMGET;
``engine_redis``
    the engine itself on that same server (``Engine.create(url=...)``): the
    same three calls, each one round trip to a server-side function.

The two Redis systems share one private server (``shared_redis``), started
by the first of them and stopped by ``stop_shared_redis`` at the end of the
run.

Every peer uses the engine's transition table (the default position
lifecycle, compacted, with the state stored as its index) and the same price
record.  Peers are written as their users would write them, names hoisted
into locals where that is the idiom; none of them gives the engine's
guarantees (a Lock or latch held by a killed process stays held, the peers
keep no metrics), so they are lower bounds on what those guarantees cost.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine._native import ffi, lib
from engine.core import Engine, Handle
from engine.errors import BusyError
from engine.spec import POSITION_SPEC, Outcome, Trigger
from engine.tools.redis_server import PrivateRedis, RedisUnavailable

SYSTEMS = ("engine", "value_lock", "value_lock_tuned", "manager", "manager_lock", "atomicshm",
           "redis", "engine_redis")
PEERS = SYSTEMS[1:]
LABELS = {
    "engine": "engine",
    "value_lock": "RawArray+Lock",
    "value_lock_tuned": "RawArray+Lock (tuned)",
    "manager": "Manager dict+Lock",
    "manager_lock": "Manager dict+Mgr.Lock",
    "atomicshm": "atomicshm composed",
    "redis": "Redis 7 Lua",
    "engine_redis": "engine on Redis",
}

PAUSE, RESUME = int(Trigger.PAUSE), int(Trigger.RESUME)
APPLIED, INVALID, CONFLICT = int(Outcome.APPLIED), int(Outcome.INVALID), int(Outcome.CONFLICT)
CAS_RETRIES = 64
#: Slots every system gets; each case takes fresh ones.
N_SLOTS = 512
#: Operations per call of the engine's C batch workloads (``Ops.transition_c``).
C_BATCH = 1024
ENTRY, AMOUNT = 100.0, 2.0


def _peer_table() -> tuple[bytes, int, int]:
    """The engine's transition table, compacted for the peers:
    ``table[state index * n_triggers + trigger]`` = target index + 1, 0 = no rule."""
    full = POSITION_SPEC.table_bytes()
    ns, nt = len(POSITION_SPEC.states), len(POSITION_SPEC.triggers)
    stride = lib.ENG_MAX_TRIGGERS
    table = bytes(full[s * stride + t] & lib.ENG_RULE_TARGET_MASK
                  for s in range(ns) for t in range(nt))
    return table, nt, POSITION_SPEC.state_index["MONITORING"]


TABLE, NT, MONITORING = _peer_table()


def _side(slot: int) -> int:
    return 1 if slot % 2 == 0 else -1


class Unavailable(Exception):
    """A peer cannot run here (missing package or server); the text says why."""


@dataclass
class Ops:
    """The three calls a worker makes, bound for one process.  ``key(slot)``
    is what the calls take for slot index ``slot`` (the engine: the id of the
    position open there; the peers: the index itself)."""

    transition: Callable[[int, int], Any]
    update_price: Callable[[int, float], Any]
    read_price: Callable[[int], Any]
    close: Callable[[], None] = lambda: None
    key: Callable[[int], Any] = lambda slot: slot
    #: The C fast paths with Python out of the loop (the engine only, see
    #: ``_engine_c_ops``): each call does ``C_BATCH`` operations on the slot.
    transition_c: Callable[[int, int], Any] | None = None
    update_price_c: Callable[[int, float], Any] | None = None
    #: What a call raises when a bounded wait runs out (the engine's
    #: BusyError: a writer held a latch past its bound); the runner counts
    #: those calls and goes on.  Peers wait without bound: nothing.
    busy: tuple[type[BaseException], ...] = ()


# ==== engine =====================================================================================
class EngineHost:
    """A fresh segment with every slot open and MONITORING."""

    def setup(self) -> None:
        self.eng = Engine.create(capacity=N_SLOTS)
        self._fill()

    def _fill(self) -> None:
        for i in range(N_SLOTS):
            pos = self.eng.open_position(ENTRY, AMOUNT, side=_side(i), token=1)
            self.eng.transition(pos, Trigger.POSITION_OPENED)
            self.eng.update_price(pos, ENTRY)

    def payload(self) -> Handle:
        return self.eng.handle

    def committed(self, slots: Sequence[int]) -> int:
        rows = self.eng.snapshot()
        return int(rows["transitions"][np.isin(rows["slot"], list(slots))].sum())

    def teardown(self) -> None:
        self.eng.close()
        self.eng.unlink()


def _engine_ops(handle: Handle) -> Ops:
    eng = Engine.attach(handle)
    tc, uc = _engine_c_ops(eng)
    return Ops(eng.transition, eng.update_price, eng.price, eng.close, key=eng.id_of,
               transition_c=tc, update_price_c=uc, busy=(BusyError, BatchBusy))


class BatchBusy(Exception):
    """A C batch call stopped at an element whose latch stayed busy (ENG_EBUSY)."""


def _engine_c_ops(eng: Engine) -> tuple[Callable[[int, int], None],
                                        Callable[[int, float], None]]:
    """``C_BATCH`` transitions (PAUSE, RESUME, ...) or price updates (101.5,
    99.5, ...) on one id in one raw ``eng_transition_many`` /
    ``eng_update_prices`` call, on buffers made once: what the C work of a
    hot call costs on its own, and what a contended line adds to it, with
    no Python per operation.  The argument is ignored (the batch alternates)."""
    seg = eng.seg
    half = C_BATCH // 2
    trig = np.array([PAUSE, RESUME] * half, dtype=np.uint32)
    prices = np.array([101.5, 99.5] * half, dtype=np.float64)
    out = np.empty(C_BATCH, dtype=np.uint8)
    bufs = (ffi.from_buffer("uint32_t[]", trig), ffi.from_buffer("double[]", prices),
            ffi.from_buffer("uint8_t[]", out, require_writable=True))
    bad, written = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    ids: dict[int, tuple[np.ndarray, Any]] = {}   # id -> (its array, a cffi view of it)

    def id_buf(pos: int) -> Any:
        if pos not in ids:
            a = np.full(C_BATCH, pos, dtype=np.uint64)
            ids[pos] = (a, ffi.from_buffer("uint64_t[]", a))
        return ids[pos][1]

    def transition_c(pos: int, _trigger: int, f: Any = lib.eng_transition_many) -> None:
        rc = f(seg, id_buf(pos), bufs[0], C_BATCH, bufs[2], bad)
        if rc == lib.ENG_EBUSY:
            raise BatchBusy(f"element {bad[0]}")
        if rc:
            raise RuntimeError(f"eng_transition_many returned {rc} at index {bad[0]}")

    def update_price_c(pos: int, _price: float, f: Any = lib.eng_update_prices) -> None:
        rc = f(seg, id_buf(pos), bufs[1], C_BATCH, bad, written)
        if rc == lib.ENG_EBUSY:
            raise BatchBusy(f"element {bad[0]}")
        if rc:
            raise RuntimeError(f"eng_update_prices returned {rc} at index {bad[0]}")

    return transition_c, update_price_c


# ==== RawArray + Lock ============================================================================
_LOCK_FIELDS = (("state", ctypes.c_uint8), ("gen", ctypes.c_uint64), ("price", ctypes.c_double),
                ("ts", ctypes.c_int64), ("pnl_pct", ctypes.c_double),
                ("pnl_usd", ctypes.c_double), ("version", ctypes.c_uint64),
                ("entry", ctypes.c_double), ("amount", ctypes.c_double),
                ("side", ctypes.c_double))


class ValueLockHost:
    """One RawArray per field, one Lock for all of them."""

    def setup(self) -> None:
        ctx = mp.get_context("spawn")
        self.arrays: dict[str, Any] = {name: ctx.RawArray(ct, N_SLOTS)
                                       for name, ct in _LOCK_FIELDS}
        self.lock = ctx.Lock()
        a = self.arrays
        for i in range(N_SLOTS):
            a["state"][i] = MONITORING
            a["price"][i], a["entry"][i], a["amount"][i] = ENTRY, ENTRY, AMOUNT
            a["side"][i] = _side(i)

    def payload(self) -> tuple[dict[str, Any], Any]:
        return self.arrays, self.lock

    def committed(self, slots: Sequence[int]) -> int:
        with self.lock:
            return sum(int(self.arrays["gen"][s]) for s in slots)

    def teardown(self) -> None:
        pass


class ValueLockClient:
    """The transition and price record the way the multiprocessing docs
    would have you write them: ``with lock:`` around RawArray indexing."""

    def __init__(self, arrays: dict[str, Any], lock: Any) -> None:
        self._lock = lock
        self._state, self._gen = arrays["state"], arrays["gen"]
        self._price, self._ts, self._version = arrays["price"], arrays["ts"], arrays["version"]
        self._pnl_pct, self._pnl_usd = arrays["pnl_pct"], arrays["pnl_usd"]
        self._entry, self._amount, self._side = arrays["entry"], arrays["amount"], arrays["side"]

    def transition(self, slot: int, trigger: int) -> int:
        with self._lock:
            e = TABLE[self._state[slot] * NT + trigger]
            if not e:
                return INVALID
            self._state[slot] = e - 1
            self._gen[slot] += 1
        return APPLIED

    def update_price(self, slot: int, price: float) -> None:
        ts = time.time_ns()
        with self._lock:
            entry, side = self._entry[slot], self._side[slot]
            diff = price - entry
            self._price[slot] = price
            self._ts[slot] = ts
            self._pnl_pct[slot] = diff / entry * 100.0 * side
            self._pnl_usd[slot] = diff * self._amount[slot] * side
            self._version[slot] += 1

    def read_price(self, slot: int) -> tuple[float, int, float, float, int]:
        with self._lock:
            return (self._price[slot], self._ts[slot], self._pnl_pct[slot],
                    self._pnl_usd[slot], self._version[slot])


def _value_lock_ops(payload: tuple[dict[str, Any], Any]) -> Ops:
    c = ValueLockClient(*payload)
    return Ops(c.transition, c.update_price, c.read_price)


def _value_lock_tuned_ops(payload: tuple[dict[str, Any], Any]) -> Ops:
    """Same data and lock; every name a fast local, arrays as memoryviews."""
    arrays, lock = payload
    v = {name: memoryview(arrays[name]).cast("B").cast(ct._type_) for name, ct in _LOCK_FIELDS}

    def transition(slot: int, trigger: int, st: Any = v["state"], gen: Any = v["gen"],
                   acq: Any = lock.acquire, rel: Any = lock.release, table: bytes = TABLE,
                   nt: int = NT) -> int:
        acq()
        try:
            e = table[st[slot] * nt + trigger]
            if not e:
                return INVALID
            st[slot] = e - 1
            gen[slot] += 1
            return APPLIED
        finally:
            rel()

    def update_price(slot: int, price: float, p: Any = v["price"], t: Any = v["ts"],
                     a: Any = v["pnl_pct"], u: Any = v["pnl_usd"], ver: Any = v["version"],
                     en: Any = v["entry"], am: Any = v["amount"], sd: Any = v["side"],
                     acq: Any = lock.acquire, rel: Any = lock.release,
                     now: Any = time.time_ns) -> None:
        ts = now()
        acq()
        try:
            entry, side = en[slot], sd[slot]
            diff = price - entry
            p[slot] = price
            t[slot] = ts
            a[slot] = diff / entry * 100.0 * side
            u[slot] = diff * am[slot] * side
            ver[slot] += 1
        finally:
            rel()

    def read_price(slot: int, p: Any = v["price"], t: Any = v["ts"], a: Any = v["pnl_pct"],
                   u: Any = v["pnl_usd"], ver: Any = v["version"], acq: Any = lock.acquire,
                   rel: Any = lock.release) -> tuple[float, int, float, float, int]:
        acq()
        try:
            return (p[slot], t[slot], a[slot], u[slot], ver[slot])
        finally:
            rel()

    return Ops(transition, update_price, read_price)


# ==== Manager dict + Lock ========================================================================
class ManagerHost:
    """A Manager process holding a state dict and a price dict."""

    def __init__(self, manager_lock: bool = False) -> None:
        self.manager_lock = manager_lock

    def setup(self) -> None:
        ctx = mp.get_context("spawn")
        self.manager = ctx.Manager()
        self.states = self.manager.dict({i: (MONITORING, 0) for i in range(N_SLOTS)})
        self.prices = self.manager.dict(
            {i: (ENTRY, AMOUNT, _side(i), ENTRY, 0, 0.0, 0.0, 0) for i in range(N_SLOTS)})
        self.lock = self.manager.Lock() if self.manager_lock else ctx.Lock()

    def payload(self) -> tuple[Any, Any, Any]:
        return self.states, self.prices, self.lock

    def committed(self, slots: Sequence[int]) -> int:
        return sum(int(self.states[s][1]) for s in slots)

    def teardown(self) -> None:
        self.manager.shutdown()


class ManagerClient:
    """One round trip to read, one to write, under a semaphore lock."""

    def __init__(self, states: Any, prices: Any, lock: Any) -> None:
        self._states, self._prices, self._lock = states, prices, lock

    def transition(self, slot: int, trigger: int) -> int:
        d = self._states
        with self._lock:
            st, gen = d[slot]
            e = TABLE[st * NT + trigger]
            if not e:
                return INVALID
            d[slot] = (e - 1, gen + 1)
        return APPLIED

    def update_price(self, slot: int, price: float) -> None:
        d = self._prices
        ts = time.time_ns()
        with self._lock:
            entry, amount, side, _p, _t, _a, _u, ver = d[slot]
            diff = price - entry
            d[slot] = (entry, amount, side, price, ts, diff / entry * 100.0 * side,
                       diff * amount * side, ver + 1)

    def read_price(self, slot: int) -> tuple[Any, ...]:
        return tuple(self._prices[slot][3:])


def _manager_ops(payload: tuple[Any, Any, Any]) -> Ops:
    c = ManagerClient(*payload)
    return Ops(c.transition, c.update_price, c.read_price)


# ==== atomicshm composed =========================================================================
#
# One 256-byte record per slot, lines as in the engine:
#   +0   word: state index (8 bits) | generation (16 bits) << 8
#   +8   transitions (fetch-add)      +16 price sequence     +24 writer latch (u32)
#   +64  price[0], +96 price[1]: price f64, ts i64, pnl % f64, pnl $ f64
#   +128 context: entry f64, amount f64, side f64 (written once at setup)
_SLOT_BYTES = 256
_PRICE_REC = struct.Struct("<dqdd")
_CTX_REC = struct.Struct("<ddd")


def _atomic_base(address: int) -> int:
    """Offset of the first 64-byte aligned byte (the same in every process:
    the RawArray sits at the same offset of a page-aligned arena)."""
    return (-address) % 64


class AtomicShmHost:
    """A RawArray of slot records, driven through ``atomicshm.AtomicView``."""

    def setup(self) -> None:
        try:
            import atomicshm
        except ImportError:
            raise Unavailable("the atomicshm package is not installed "
                              "(pip install 'engine[bench]')") from None
        self.raw = mp.get_context("spawn").RawArray(ctypes.c_uint8, N_SLOTS * _SLOT_BYTES + 64)
        self.view = atomicshm.AtomicView(self.raw)
        self.base = _atomic_base(self.view.address)
        mv = memoryview(self.raw).cast("B")
        for i in range(N_SLOTS):
            off = self.base + i * _SLOT_BYTES
            self.view.store_u64(off, MONITORING)
            _PRICE_REC.pack_into(mv, off + 64, ENTRY, 0, 0.0, 0.0)
            _CTX_REC.pack_into(mv, off + 128, ENTRY, AMOUNT, float(_side(i)))
        mv.release()

    def payload(self) -> Any:
        return self.raw

    def committed(self, slots: Sequence[int]) -> int:
        return sum(self.view.load_u64(self.base + s * _SLOT_BYTES + 8) for s in slots)

    def teardown(self) -> None:
        self.view.close()


def _atomicshm_ops(raw: Any) -> Ops:
    """Load, table lookup in Python, CAS, fetch-add: each a call into
    atomicshm, on cells (``AtomicView.cell_u64`` & co., bound to one offset:
    no offset argument to pass) made once per slot.  The first attempt is
    written out; only a lost CAS enters the retry loop."""
    import atomicshm

    view = atomicshm.AtomicView(raw)
    mv = memoryview(raw).cast("B")
    base = _atomic_base(view.address)
    acquire, release, relaxed = atomicshm.ACQUIRE, atomicshm.RELEASE, atomicshm.RELAXED
    offs = [base + i * _SLOT_BYTES for i in range(N_SLOTS)]
    # per slot: (state word, transition counter); (price sequence, writer latch, record offset)
    words = [(view.cell_u64(off), view.cell_u64(off + 8)) for off in offs]
    prices = [(view.cell_u64(off + 16), view.cell_u32(off + 24), off) for off in offs]

    def retry(word: Any, count: Any, w: int, trigger: int) -> int:
        for _ in range(CAS_RETRIES):
            e = TABLE[(w & 0xFF) * NT + trigger]
            if not e:
                return INVALID
            prev = word.cas(w, (e - 1) | ((w + 0x100) & 0xFFFF00))
            if prev == w:
                count.fetch_add(1)
                return APPLIED
            w = prev
        return CONFLICT

    def transition(slot: int, trigger: int, words: Any = words, table: bytes = TABLE,
                   nt: int = NT, retry: Any = retry) -> int:
        word, count = words[slot]
        w = word.load()
        e = table[(w & 0xFF) * nt + trigger]
        if not e:
            return INVALID
        prev = word.cas(w, (e - 1) | ((w + 0x100) & 0xFFFF00))   # generation + 1, mod 2^16
        if prev == w:
            count.fetch_add(1)
            return APPLIED
        return retry(word, count, prev, trigger)   # type: ignore[no-any-return]

    def update_price(slot: int, price: float, prices: Any = prices,
                     pack: Any = _PRICE_REC.pack_into, ctx: Any = _CTX_REC.unpack_from,
                     mv: Any = mv, pid: int = os.getpid(), now: Any = time.time_ns,
                     yield_: Any = os.sched_yield) -> None:
        seq, latch, off = prices[slot]
        if latch.cas(0, pid):                     # writer latch taken: wait for it
            spins = 0
            while latch.cas(0, pid):
                spins += 1
                if spins > 16:
                    yield_()
        entry, amount, side = ctx(mv, off + 128)
        diff = price - entry
        q = seq.load(relaxed)
        pack(mv, off + 64 + (((q + 1) & 1) << 5), price, now(),
             diff / entry * 100.0 * side, diff * amount * side)
        seq.store(q + 1, release)                 # publish: readers flip copies
        latch.store(0, release)

    def read_price(slot: int, prices: Any = prices, unpack: Any = _PRICE_REC.unpack_from,
                   fence: Any = atomicshm.fence, mv: Any = mv) -> tuple[Any, ...]:
        seq, _latch, off = prices[slot]
        while True:
            q = seq.load(acquire)
            rec = unpack(mv, off + 64 + ((q & 1) << 5))
            fence(acquire)
            if seq.load(relaxed) == q:
                return (*rec, q)

    def close() -> None:
        words.clear()
        prices.clear()
        mv.release()
        view.close()

    return Ops(transition, update_price, read_price, close)


# ==== Redis ======================================================================================
_REDIS_TRANSITION = """
local T = "{table}"
local st = tonumber(redis.call('HGET', KEYS[1], 'st'))
if not st then return -2 end
local e = string.byte(T, st * {nt} + tonumber(ARGV[1]) + 1)
if e == nil or e == 0 then return {invalid} end
redis.call('HSET', KEYS[1], 'st', e - 1)
redis.call('HINCRBY', KEYS[1], 'gen', 1)
return {applied}
"""
_REDIS_PRICE = """
local c = redis.call('HMGET', KEYS[1], 'entry', 'amount', 'side')
local p = tonumber(ARGV[1])
local entry, amount, side = tonumber(c[1]), tonumber(c[2]), tonumber(c[3])
local d = p - entry
redis.call('HSET', KEYS[1], 'price', ARGV[1], 'ts', ARGV[2],
           'pct', tostring(d / entry * 100 * side), 'usd', tostring(d * amount * side))
return redis.call('HINCRBY', KEYS[1], 'ver', 1)
"""


_server: PrivateRedis | None = None


def shared_redis() -> PrivateRedis:
    """The run's private redis-server (no persistence), shared by the Redis
    systems so that they are measured on the same server; started on first
    use.  ``Unavailable`` if there is no redis-server or redis package."""
    global _server
    try:
        import redis  # noqa: F401
    except ImportError:
        raise Unavailable("the redis client package is not installed "
                          "(pip install 'engine[bench]')") from None
    if _server is None:
        try:
            _server = PrivateRedis(prefix="engine-bench-redis-")
        except RedisUnavailable as e:
            raise Unavailable(str(e)) from None
    return _server


def stop_shared_redis() -> None:
    """Stop the shared server, if one was started."""
    global _server
    if _server is not None:
        _server.stop()
        _server = None


class RedisHost:
    """The transition and price scripts, loaded on the shared server, and a
    hash per slot."""

    def setup(self) -> None:
        import redis

        self.port = shared_redis().port
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        self.version = str(self.client.info("server").get("redis_version", "?"))
        table = "".join(f"\\{b}" for b in TABLE)
        self.sha_transition = self.client.script_load(_REDIS_TRANSITION.format(
            table=table, nt=NT, invalid=INVALID, applied=APPLIED))
        self.sha_price = self.client.script_load(_REDIS_PRICE)
        pipe = self.client.pipeline(transaction=False)
        for i in range(N_SLOTS):
            pipe.hset(f"s:{i}", mapping={"st": MONITORING, "gen": 0})
            pipe.hset(f"p:{i}", mapping={"entry": ENTRY, "amount": AMOUNT, "side": _side(i),
                                         "price": ENTRY, "ts": 0, "pct": 0, "usd": 0, "ver": 0})
        pipe.execute()

    def payload(self) -> tuple[int, str, str]:
        return self.port, self.sha_transition, self.sha_price

    def committed(self, slots: Sequence[int]) -> int:
        return sum(int(self.client.hget(f"s:{s}", "gen") or 0) for s in slots)

    def teardown(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            for i in range(0, N_SLOTS, 128):
                client.delete(*(f"{k}:{j}" for j in range(i, min(i + 128, N_SLOTS))
                                for k in "sp"))
            client.close()


class EngineRedisHost(EngineHost):
    """The engine on the shared server: every slot open and MONITORING."""

    def setup(self) -> None:
        self.eng = Engine.create(capacity=N_SLOTS, url=shared_redis().url)
        self._fill()


def _redis_ops(payload: tuple[int, str, str]) -> Ops:
    import redis

    port, sha_t, sha_p = payload
    r = redis.Redis(host="127.0.0.1", port=port)
    evalsha: Any = r.evalsha
    hmget: Any = r.hmget

    def transition(slot: int, trigger: int) -> int:
        return int(evalsha(sha_t, 1, f"s:{slot}", trigger))

    def update_price(slot: int, price: float) -> None:
        evalsha(sha_p, 1, f"p:{slot}", repr(price), time.time_ns())

    def read_price(slot: int) -> tuple[float, int, float, float, int]:
        p, ts, pct, usd, ver = hmget(f"p:{slot}", "price", "ts", "pct", "usd", "ver")
        return float(p), int(ts), float(pct), float(usd), int(ver)

    return Ops(transition, update_price, read_price, r.close)


HOSTS: dict[str, Callable[[], Any]] = {
    "engine": EngineHost, "value_lock": ValueLockHost, "value_lock_tuned": ValueLockHost,
    "manager": ManagerHost, "manager_lock": lambda: ManagerHost(manager_lock=True),
    "atomicshm": AtomicShmHost, "redis": RedisHost, "engine_redis": EngineRedisHost,
}
CONNECT: dict[str, Callable[[Any], Ops]] = {
    "engine": _engine_ops, "value_lock": _value_lock_ops,
    "value_lock_tuned": _value_lock_tuned_ops, "manager": _manager_ops,
    "manager_lock": _manager_ops,
    "atomicshm": _atomicshm_ops, "redis": _redis_ops, "engine_redis": _engine_ops,
}
