"""The Redis store: the C library's ``eng_*`` calls, answered by the server.

``RedisStore`` implements each ``eng_*`` function as one round trip (see
``connection``) that runs one function of ``functions.lua`` on the server,
with the C function's arguments, out-parameters and status codes.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine._native import ffi, lib
from engine.errors import (
    ArgumentError,
    ClosedError,
    EngineError,
    SegmentError,
    SegmentNotFoundError,
    ServerError,
    ShardFullError,
    SpecMismatchError,
)
from engine.metrics import OPS, Metrics, OpMetrics, percentile
from engine.spec import MachineSpec
from engine.store.redis.connection import _ON_PRIMARY, _Conn, _no_eviction, _packed_keys
from engine.store.redis.create import _LAYOUT, _MAGIC, _Creator, _how_to_remove
from engine.store.redis.functions import (
    _COMMITTED,
    _LEARNS,
    _MUTATING,
    _NEED,
    _ONCE,
    _OP_OF,
    _SLOT_KEYS,
    ACCOUNT_ID_MAX,
    APPLIED,
    CONFLICT,
    DEFAULT_SAMPLE_MASK,
    EACCTFULL,
    EBADACCOUNT,
    EBADARG,
    EBADKEY,
    EBADMONEY,
    EBADPRICE,
    EBADSLOT,
    EBADTRIGGER,
    EBUSY,
    ECLOSED,
    EFORKED,
    EFULL,
    EGUARDFAIL,
    EKEYEXISTS,
    ENOTOPEN,
    ESTALE,
    ETIMEDOUT,
    HIST_BUCKETS,
    ID_MAX,
    ID_SLOT_BITS,
    ID_SLOT_MASK,
    KEY_MAX,
    MANY_ERROR,
    OP_COUNT,
    OP_TRANSITION_CTX,
    REDIS_BUSY_TRIES,
    REDIS_FREE_SCAN,
    REDIS_GUARD_TTL_MS,
    REDIS_REQUEST_WINDOW_MS,
    REDIS_SNAPSHOT_PAGE,
    SW_GEN_MASK,
    SW_GEN_SHIFT,
    SW_LOCK,
    _needs,
)
from engine.store.redis.journal import RedisJournal

__all__ = ["CREATE_HOOK", "RedisStore"]

_F8 = struct.Struct("<d")
_Q = struct.Struct("<q")
_PRICE_OUT = struct.Struct("<32sQ")      # the 32 bytes of the record, then the version
# eng_row up to its words: id slot state generation locked transitions, the
# 32-byte price record, price version, context version
_ROW_HEAD = struct.Struct("<QIIIIQ32sQQ")
_SNAP = struct.Struct("<IIII3d")            # what snap returns before the record bytes
_WAIT_SLICE_MS = 1000                      # XREAD BLOCK at most this long per round trip
#: the keys of a position a price write may touch: a fire reads the guard's lock and wakes waiters
_FIRE_KEYS = _SLOT_KEYS["upd"]


class _Now:
    """Stands for the time of the call in its arguments: filled in when the
    call is first sent, kept when the same call is sent again (see _fn)."""


_TS = _Now()
#: a test hook: called with the name of each create (and remove) step once it
#: is on the server
CREATE_HOOK: Callable[[str], None] | None = None


def _exit_meta(spec: MachineSpec) -> dict[str, Any]:
    """The meta fields of exits (see price_write in redis_functions.lua): the
    words of the exit fields (-1: none), and with exits the armed one-hot
    state and the trigger."""
    rec = spec.record
    meta: dict[str, Any] = {
        "r_" + k: rec.exit_roles.get(v, -1)
        for k, v in (("stop", "stop_loss"), ("tp", "take_profit"), ("trail", "trailing_stop"),
                     ("reason", "exit_reason"), ("xprice", "exit_price"))}
    if spec.exits is not None:
        meta["x_armed"] = 1 << spec.state_index[spec.exits[0]]
        meta["x_trigger"] = spec.trigger_index[spec.exits[1]]
    return meta


def _create_step(what: str) -> None:
    if CREATE_HOOK is not None:
        CREATE_HOOK(what)


def _commit_words(reply: int) -> tuple[int, int]:
    """The (old, new) state words, as C lays them out, of a committed() reply."""
    info = reply - _COMMITTED
    gen, a, b = info >> 10, (info >> 5) & 31, info & 31
    old = (1 << (a - 1) if a else 0) | ((gen - 1) & SW_GEN_MASK) << SW_GEN_SHIFT
    return old, (1 << (b - 1) if b else 0) | gen << SW_GEN_SHIFT


def _shards_for(conn: _Conn, shards: int | None) -> int:
    if shards is None:
        return 16 if conn.cluster else 1
    return shards


class RedisStore:
    """An attached engine on Redis: the ``eng_*`` calls of the C library.

    Each method has the C function's name, arguments (the first, the
    ``eng_seg``, is this object itself) and status codes, and fills the same
    cffi out-parameters, so ``Engine`` cannot tell the two apart."""

    def __init__(self, conn: _Conn, name: str, meta: dict[bytes, bytes]) -> None:
        self.conn = conn
        self.name = name
        self.url = conn.url
        self.shards = int(meta[b"shards"])
        self.capacity = int(meta[b"cap"])
        self.kpp = int(meta[b"kpp"])
        self.max_accounts = int(meta[b"nacct"])
        self.n_words = int(meta[b"nwords"])
        #: the keys of a position a batch price write declares (a fire touches more)
        self._price_keys = _FIRE_KEYS if b"x_armed" in meta else ("p",)
        self.n_triggers = int(meta[b"ntrig"])
        self.roles = {r: int(meta[b"r_" + r.encode()]) for r in
                      ("entry", "amount", "side", "token", "opened", "account")}
        self.meta_keys = [f"eng:{{{name}:{s}}}:m" for s in range(self.shards)]
        #: the engine's incarnation (set at create): every call carries it
        self.inc: bytes = meta[b"inc"]
        self.incarnation = int(self.inc)
        self.prefixes = [k[:-1] for k in self.meta_keys]
        self._books = ffi.new("eng_books *")
        self.last_books = self._books[0]
        #: the books of the account this store's last close_account closed
        #: (a close made again after a lost reply returns them: Engine.close_account)
        self.last_closed = ffi.new("eng_account_row *")
        self._initial = int(meta[b"initial"]).bit_length()   # state index + 1
        self._last = _COMMITTED   # the last commit's committed() reply
        self.last_amount = 0
        self._next = 0
        self._token = secrets.token_hex(8)
        #: per shard: the meta key, the metrics hash, this client's request record
        self._fixed = [(P + "m", P + "s", P + "r:" + self._token) for P in self.prefixes]
        # (meta and metrics; a writing call's request record, then its shard's journal)
        self._fixed_packed = [(_packed_keys(f[:2]), _packed_keys((f[2], f[0][:-1] + "j")))
                              for f in self._fixed]
        #: per (function, slot): its slot's keys, packed (see _call; bounded)
        self._slot_keys: dict[tuple[str, int], tuple[bytes, int]] = {}
        self._seq = 0   # the last request number (see _fn)
        #: the last writing call that raised, as (what it was, its number, its
        #: arguments, when it was first sent): made again as the next call, it
        #: is sent with the same (within the request window)
        self._pending: tuple[Any, int, tuple[Any, ...], float] | None = None
        #: keys learned from NEED answers: per slot (the account, token set and
        #: key records of its opening), per (shard, token) (the token's positions)
        self._learned: dict[Any, list[Any]] = {}
        #: per shard: the free slot (and free account) an open declares, and
        #: its pick (0: the head of the free list; random once openers collide)
        self._hint: dict[tuple[str, int], str] = {}
        self._pick: dict[tuple[str, int], int] = {}
        #: a call over several shards (update_prices, transition_many,
        #: update_token_price) that raised: (what, the replies of the shards
        #: that answered); made again as the next writing call, only the other
        #: shards' parts are sent (see _parts)
        self._multi: tuple[Any, dict[int, Any]] | None = None
        self._in_multi = False
        #: a guarded transition that raised: (what, lock token, verdict sent or None)
        self._guard_pending: tuple[Any, str, int | None] | None = None
        #: the shard an open (open_account) raised ServerError on: the next
        #: one made starts there (made again, it is sent as the same request)
        self._raised: dict[str, int | None] = {"open": None, "aopen": None}
        self._closed = False
        self._forked = False   # set in a fork child (closed there too, see _after_fork)
        self._calls = 0
        self._sample_mask = DEFAULT_SAMPLE_MASK
        self._metrics_on = True
        self._hist = np.zeros((OP_COUNT, HIST_BUCKETS), dtype=np.int64)
        self._max_ns = [0] * OP_COUNT
        #: reads counted here, not on the server: a reader is a no-writes
        #: function, so a full server (maxmemory) or a replica still answers it
        self._reads = {"read": 0, "lookup": 0}
        _LIVE.add(self)

    # -- create, attach, destroy ------------------------------------------------------
    @classmethod
    def create(cls, url: str, name: str, spec: MachineSpec, capacity: int, kpp: int,
               max_accounts: int, shards: int | None,
               journal_records: int = lib.ENG_REDIS_JOURNAL_RECORDS,
               journal_prices: bool = False) -> RedisStore:
        """``journal_records``: records each shard's journal stream keeps (0:
        no journal); ``journal_prices``: price writes are journaled too."""
        if (not isinstance(journal_records, int) or isinstance(journal_records, bool)
                or not 0 <= journal_records <= lib.ENG_REDIS_JOURNAL_MAX):
            raise ArgumentError(f"journal_records must be an int in [0, "
                                f"{lib.ENG_REDIS_JOURNAL_MAX}], got {journal_records!r:.40}")
        conn = _Conn(url)
        try:
            _no_eviction(conn)
            n = _shards_for(conn, shards)
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= min(capacity, 4096):
                raise ArgumentError(f"shards must be an int in [1, {min(capacity, 4096)}], "
                                    f"got {n!r}")
            rec = spec.record
            roles = {"entry": "entry_price", "amount": "amount", "side": "side",
                     "token": "token", "opened": "opened_ns", "account": "account"}
            meta: dict[str, Any] = {
                "magic": _MAGIC, "layout": _LAYOUT, "fp": str(spec.fingerprint), "name": name,
                "shards": n, "cap": capacity, "kpp": kpp, "nacct": max_accounts,
                "nwords": rec.n_words, "ntrig": len(spec.triggers), "table": spec.table_bytes(),
                "closed": spec.closed_mask, "initial": 1 << spec.state_index[spec.initial],
                "halted": "0", "metrics": "1", "created_ns": time.time_ns(),
                "jrec": journal_records, "jprices": 1 if journal_prices else 0,
                **{"r_" + k: rec.roles.get(v, -1) for k, v in roles.items()},
                **_exit_meta(spec)}
            inc = _Creator(conn, name, url, _create_step).create(meta, n, capacity, max_accounts)
            if conn.wait:
                conn.replicate(f"eng:{{{name}:0}}:m")
            return cls._attached(conn, name, spec, url, inc)
        except BaseException:
            conn.close()
            raise

    @classmethod
    def attach(cls, url: str, name: str, spec: MachineSpec,
               incarnation: int | None = None) -> RedisStore:
        """Attach to the engine ``name``; with ``incarnation`` (a handle's),
        only to that incarnation of it."""
        conn = _Conn(url)
        try:
            _no_eviction(conn)
            return cls._attached(conn, name, spec, url, incarnation)
        except BaseException:
            conn.close()
            raise

    @classmethod
    def _attached(cls, conn: _Conn, name: str, spec: MachineSpec, url: str,
                  incarnation: int | None = None) -> RedisStore:
        key = f"eng:{{{name}:0}}:m"
        try:
            raw = conn.command("HGETALL", key, key=key)
        except ServerError as e:
            if "WRONGTYPE" not in str(e):
                raise
            raise SegmentError(f"{key} on {url} is not an engine's: {e}") from None
        meta = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else \
            {k: v for k, v in raw.items()}
        if not meta:
            raise SegmentNotFoundError(f"no engine named {name!r} on {url}")
        if meta.get(b"magic") != _MAGIC.encode():
            raise SegmentError(f"{key} on {url} is not an engine's (magic "
                               f"{meta.get(b'magic')!r})")
        if meta.get(b"layout") != _LAYOUT.encode():
            raise SegmentError(f"engine {name!r} on {url} has layout "
                               f"{meta.get(b'layout')!r}; this version reads {_LAYOUT}: use the "
                               f"version that made it, or {_how_to_remove(name)}")
        if meta.get(b"ready") != b"1":
            lease = conn.command("PTTL", f"eng:{{{name}:0}}:lease", key=key)
            if meta.get(b"dropping"):
                why = "it is being removed"
            elif int(lease) > 0:
                why = f"its creator is building it (its lease has {int(lease)} ms left)"
            else:
                why = "its creator died while creating it: a create of the name clears it"
            raise SegmentError(f"engine {name!r} on {url} is not ready: {why}; "
                               f"{_how_to_remove(name)}")
        if incarnation is not None and meta.get(b"inc") != str(incarnation).encode():
            raise SegmentNotFoundError(
                f"engine {name!r} on {url} is another incarnation ({meta.get(b'inc')!r}) than "
                f"{incarnation}: the engine this handle named was unlinked or lost, and the "
                "name was created again; attach by name to reach the new one")
        if meta.get(b"fp") != str(spec.fingerprint).encode():
            raise SpecMismatchError(f"engine {name!r} on {url} runs another machine spec than "
                                    f"{spec.name!r} (fingerprint differs)")
        return cls(conn, name, meta)

    def destroy(self) -> int:
        """Delete every key of this incarnation of the engine (see ``remove``)."""
        if self._forked:
            raise_closed(True)   # the connection is the parent's
        return _Creator(self.conn, self.name, self.url, _create_step).remove(self.inc)

    @staticmethod
    def remove(url: str, name: str, force: bool = False) -> int:
        """Delete every key of the engine ``name`` on ``url``, ready or not,
        without attaching (``python -m engine rm``); one a creator is still
        building (its lease lives) only with ``force``.  The number of keys."""
        conn = _Conn(url)
        try:
            return _Creator(conn, name, url, _create_step).remove(b"", force)
        finally:
            conn.close()

    # -- plumbing ---------------------------------------------------------------------
    def _key(self, slot: int) -> str:
        return self.meta_keys[slot % self.shards]

    def _split(self, id: int) -> tuple[int, int] | int:
        """(slot, opening) of an id, or the error code of a bad one."""
        if not 0 <= id < 2**64:
            raise OverflowError(f"id {id} does not fit uint64_t")   # as cffi says it
        if id > ID_MAX:
            return EBADSLOT
        slot, op = id & ID_SLOT_MASK, id >> ID_SLOT_BITS
        if slot >= self.capacity:
            return EBADSLOT
        if op == 0:
            return ENOTOPEN
        return slot, op

    def _call(self, slot: int, fn: str, *args: Any, keys: Sequence[Any] = ()) -> Any:
        """``fn`` on the position in ``slot``, its slot's keys declared (and
        ``keys``, and what was learned for the slot)."""
        packed = self._slot_keys.get((fn, slot))
        if packed is None:
            if len(self._slot_keys) >= 1 << 16:
                self._slot_keys.clear()
            P = self.prefixes[slot % self.shards]
            names = _SLOT_KEYS[fn]
            packed = self._slot_keys[fn, slot] = (
                _packed_keys([f"{P}{x}:{slot}" for x in names]), len(names))
        if keys:
            packed = (packed[0] + _packed_keys(keys), packed[1] + len(keys))
        return self._fn(slot % self.shards, fn, slot, *args, packed=packed,
                        learn=slot if fn in _LEARNS else None)

    def _fn(self, shard: int, fn: str, *args: Any, keys: Sequence[Any] = (),
            packed: tuple[bytes, int] | None = None, learn: Any = None,
            need: bool = False) -> Any:
        """``_fn_held`` under the connection's lock: threads sharing this
        Engine take turns, each call with its own request number and reply."""
        if self._closed:   # (before the lock: a fork child's copy may be held for good)
            raise_closed(self._forked)
        with self.conn.lock:
            self.conn.refuse_nested()   # (before this store's request state changes)
            return self._fn_held(shard, fn, *args, keys=keys, packed=packed, learn=learn,
                                 need=need)

    def _fn_held(self, shard: int, fn: str, *args: Any, keys: Sequence[Any] = (),
                 packed: tuple[bytes, int] | None = None, learn: Any = None,
                 need: bool = False) -> Any:
        """One function call on ``shard``, ``keys`` declared after the
        shard's meta key, metrics hash and (a writing function) this client's
        request record, with this engine's incarnation (the server refuses it
        for any other); one in ``sample_every`` is timed into this Engine's
        latency histogram (the server counts every call).

        A writing call gets the next request number, unless it is the call
        that last raised made again (same function, shard and arguments):
        that one is sent with its number and its first arguments (its time),
        so the server applies it at most once.  A NEED answer (keys to
        declare, nothing applied) is returned when ``need``; else the call is
        sent again with those keys too (remembered under ``learn``)."""
        if self._closed:
            raise_closed(self._forked)
        ms, r = self._fixed_packed[shard]
        if packed is None:
            packed = (_packed_keys(keys), len(keys))
        once = fn in _ONCE
        if once:
            if not self._in_multi:
                self._multi = None   # another writing call: a partial one is not resumed
            what = (fn, shard, args)
            pending = self._pending
            if pending is not None and pending[0] == what:
                seq, args, first = pending[1], pending[2], pending[3]
                # its record may be gone before this try ends: it could apply twice
                if time.monotonic() - first + self.conn.timeout >= REDIS_REQUEST_WINDOW_MS / 1e3:
                    self._pending = None
                    raise ServerError(
                        f"{self.url}: {fn} was made again {time.monotonic() - first:.0f} s after "
                        f"it was first sent, past the {REDIS_REQUEST_WINDOW_MS / 1e3:g} s request "
                        "window: the server no longer knows whether it applied, so it was not "
                        "sent; read the state to see, and make it again (a new call) if needed")
            else:
                first = time.monotonic()
                self._seq += 1
                seq = self._seq
                if _TS in args:
                    ts = _Q.pack(time.time_ns())
                    args = tuple(ts if a is _TS else a for a in args)
            full, nk = ms + r + packed[0], 4 + packed[1]
            sent: tuple[Any, ...] = (self.inc, seq, *args)
        else:
            full, nk, sent = ms + packed[0], 2 + packed[1], (self.inc, *args)
        if learn is not None:
            more = self._learned.get(learn)
            if more:
                full, nk = full + _packed_keys(more), nk + len(more)
        route = self._fixed[shard][0]
        for _ in range(REDIS_BUSY_TRIES):
            if once:
                self._pending = (what, seq, args, first)
            reply = self._timed(route, full, nk, fn, sent)
            if once:
                self._pending = None
            if need or not _needs(reply):
                return reply
            more = reply[2:]
            if learn is not None:
                self._learned[learn] = more
            full, nk = full + _packed_keys(more), nk + len(more)
        raise ServerError(f"{self.url}: {fn} kept needing other keys (the data it touches "
                          f"changed {REDIS_BUSY_TRIES} times in a row)")

    @contextlib.contextmanager
    def _parts(self, what: Any) -> Any:
        """A writing call over several shards, ``what`` (function and all its
        arguments), under the connection's lock: yields the replies of the
        shards that answered when the same call raised as the last writing
        call (the caller sends only the others' parts, the one that raised
        as the same request), and fills it in; whole, it is forgotten."""
        if self._closed:
            raise_closed(self._forked)
        with self.conn.lock:
            self.conn.refuse_nested()
            m = self._multi
            if m is None or m[0] != what:
                m = self._multi = (what, {})
            self._in_multi = True
            try:
                yield m[1]
            finally:
                self._in_multi = False
            self._multi = None

    def _timed(self, route: str, keys: bytes, nk: int, fn: str, args: Sequence[Any]) -> Any:
        self._calls += 1
        try:   # (a NEED answer applied nothing: no WAIT for it)
            if self._calls & self._sample_mask or not self._metrics_on:
                r = self.conn.fcall(route, keys, nk, fn, args)
                if self.conn.wait and fn in _MUTATING and not _needs(r):
                    self.conn.replicate(route)
                return r
            t0 = time.perf_counter_ns()
            r = self.conn.fcall(route, keys, nk, fn, args)
            if self.conn.wait and fn in _MUTATING and not _needs(r):
                self.conn.replicate(route)
        except ServerError as e:
            raise self._gone(e) from None
        ns = time.perf_counter_ns() - t0
        op = _OP_OF.get(fn)
        if op is not None:
            if fn == "tx" and int(args[5]):   # (inc, seq, slot, op, trigger, mask, upd)
                op = OP_TRANSITION_CTX
            self._hist[op, min(ns.bit_length(), HIST_BUCKETS - 1)] += 1
            self._max_ns[op] = max(self._max_ns[op], ns)
        return r

    def _gone(self, e: ServerError) -> EngineError:
        """SegmentNotFoundError for a call the server refused as meant for
        another incarnation (ENGINE_CHECK in functions.lua); else ``e``."""
        text = str(e)
        if "ENGINE_GONE" in text:
            return SegmentNotFoundError(
                f"engine {self.name!r} on {self.url} no longer exists (unlinked, or lost with "
                "the server's data); nothing was changed")
        if "ENGINE_OTHER" in text:
            return SegmentNotFoundError(
                f"engine {self.name!r} on {self.url} was unlinked or lost and created again: "
                f"this Engine's incarnation {self.incarnation} is gone; nothing was changed. "
                "Attach again by name to reach the new engine")
        return e

    @property
    def last_old_word(self) -> int:
        """The state word before this store's last APPLIED commit (as C's eng_seg)."""
        return _commit_words(self._last)[0]

    @property
    def last_new_word(self) -> int:
        """The state word after this store's last APPLIED commit (as C's eng_seg)."""
        return _commit_words(self._last)[1]

    def _applied(self, reply: Any) -> int:
        """The code of a tx / gcommit / release reply (keeping a commit's words)."""
        rc = int(reply)
        if rc >= _COMMITTED:
            self._last = rc
            return APPLIED
        return rc

    def _key_shard(self, key: bytes) -> int:
        return zlib.crc32(key) % self.shards

    # -- the eng_* calls --------------------------------------------------------------
    def eng_check(self, seg: Any) -> int:
        return self._closed_code() if self._closed else 0

    def _closed_code(self) -> int:
        """The code of a closed store: ECLOSED, or EFORKED in a fork child."""
        return EFORKED if self._forked else ECLOSED

    def eng_detach(self, seg: Any) -> None:
        if not self._closed:
            self._closed = True
            _LIVE.discard(self)
            self.conn.close()

    def eng_id_of(self, seg: Any, slot: int, out: Any) -> int:
        st, _gen, _locked, op = self._call(slot, "word")
        if st == 0:
            return ENOTOPEN if op == 0 else ESTALE
        out[0] = op << ID_SLOT_BITS | slot
        return 0

    def _word(self, words: Any, role: str) -> int:
        w = self.roles[role]
        return int(words[w]) if w >= 0 else 0

    def eng_open(self, seg: Any, words: Any, key: Any, key_len: int, out: Any,
                 out_word: Any) -> int:
        rec = bytes(ffi.buffer(words, self.n_words * 8))
        token = self._word(words, "token")
        token = token - (1 << 64) if token >= 1 << 63 else token
        acct = self._word(words, "account")
        k = b"" if key == ffi.NULL or key is None else bytes(key[:key_len])
        an, aop = (acct & ID_SLOT_MASK, acct >> ID_SLOT_BITS) if acct else (0, 0)
        if acct:
            if isinstance(self._acct(acct), int):
                return EBADACCOUNT
            shards = [an % self.shards]
            if k and self.shards > 1 and self._key_shard(k) != shards[0]:
                # lookup and uniqueness live in the key's shard: one call cannot touch two
                raise ArgumentError(
                    f"key {k!r} belongs to shard {self._key_shard(k)} of this sharded Redis "
                    f"engine, and account {acct} to shard {shards[0]}: on a sharded engine a "
                    "position opened on an account takes only a key of the account's shard")
        elif k and self.shards > 1:
            shards = [self._key_shard(k)]
        else:
            if self._raised["open"] is None:
                self._next += 1
            shards = self._from_raised("open", [(self._next + i) % self.shards
                                                for i in range(self.shards)])
        entry = self.roles["entry"]
        if entry >= 0 and not _positive(_F8.unpack_from(rec, 8 * entry)[0]):
            return EBADPRICE
        rc = EFULL
        for s in shards:
            self._raised["open"] = s
            P = self.prefixes[s]
            # what a closing and a release of this opening touch besides its slot
            dyn = [f"{P}t:{token}", *([P.encode() + b"k:" + k] if k else []),
                   *([f"{P}a:{an}"] if aop else [])]
            r = self._take(s, "open", [P + "free", P + "open", *dyn],
                           lambda h, P=P: [f"{P}p:{h}", f"{P}pk:{h}"], rec, token, _TS, k, an,
                           aop)
            rc = int(r[0])
            if rc == 0:
                out[0] = int(r[2]) << ID_SLOT_BITS | int(r[1])
                out_word[0] = 0
                self._last = _COMMITTED + (int(r[3]) & SW_GEN_MASK) * 1024 + self._initial
                self._learned[int(r[1])] = dyn
                self._raised["open"] = None
                return 0
            if len(r) > 2:
                self._keep_books(r[1], r[2:])
            if rc != EFULL:
                break
        self._raised["open"] = None
        if rc == EFULL and self.shards > 1 and (acct or k):   # it could open on one shard only
            self._shard_full("position", k, shards[0], acct)
        return rc

    def _from_raised(self, fn: str, shards: list[int]) -> list[int]:
        """``shards`` from the one ``fn`` last raised on (if any)."""
        s = self._raised[fn]
        return shards[shards.index(s):] if s in shards else shards

    def _take(self, s: int, fn: str, keys: list[Any], keys_of: Any, *args: Any) -> Any:
        """``fn`` (open, aopen) on shard ``s``, which takes an entry of a free
        list: the call declares ``keys`` and ``keys_of(entry)`` of the entry
        it offers to take (the one the last such call named); the server
        names another (NEED) when that one is gone."""
        P = self.prefixes[s]
        for _ in range(REDIS_BUSY_TRIES):
            hint, pick = self._hint.get((fn, s), ""), self._pick.get((fn, s), 0)
            r = self._fn(s, fn, *args, hint, pick,
                         keys=[*keys, *keys_of(hint)] if hint else keys, need=True)
            if r[0] != _NEED:
                if r[0] == 0:
                    self._hint[fn, s] = r[-1].decode()
                return r
            if hint:   # another client took it: pick among the first free ones from now on
                self._pick[fn, s] = secrets.randbelow(REDIS_FREE_SCAN * 1024) + 1
            self._hint[fn, s] = r[1].decode()
        raise ServerError(f"{self.url}: {fn} on {P}: the free entry it offered to take was "
                          f"taken by others {REDIS_BUSY_TRIES} times in a row")

    def _keep_books(self, amount: bytes, b: list[bytes]) -> None:
        """What a refused opening or withdrawal was checked against (the
        error message reads it, as C leaves it in eng_seg)."""
        (cash, reserved, realized, opening, deposits, withdrawals, max_exposure, max_loss,
         max_positions, open_positions, halted, _version, _op, gain, loss) = b
        bk = self.last_books
        bk.worst_gain, bk.worst_loss = int(gain or 0), int(loss or 0)
        bk.cash, bk.reserved, bk.realized = int(cash), int(reserved), int(realized)
        bk.opening_cash, bk.deposits, bk.withdrawals = int(opening), int(deposits), int(withdrawals)
        bk.max_exposure, bk.max_loss = int(max_exposure), int(max_loss)
        bk.max_positions, bk.open_positions = int(max_positions), int(open_positions)
        bk.halted = int(halted)
        self.last_amount = int(amount)

    def eng_abandon_open(self, seg: Any, id: int, word: int) -> int:
        return 0   # a Redis open is whole or nothing; the opening stays (see snapshot)

    def eng_bind_key(self, seg: Any, id: int, key: Any, key_len: int) -> int:
        sp = self._split(id)
        if isinstance(sp, int):
            return sp
        k = bytes(key[:key_len])
        if not 1 <= len(k) <= KEY_MAX:
            return EBADKEY
        if self.shards > 1 and self._key_shard(k) != sp[0] % self.shards:
            st = int(self._call(sp[0], "state", sp[1]))
            if st < 0:
                return st   # a stale or never-issued id says so first, as on one shard
            raise ArgumentError(
                f"key {k!r} belongs to shard {self._key_shard(k)} of this sharded Redis engine, "
                f"and id {id} to shard {sp[0] % self.shards}: on a sharded engine a key is "
                "bound by open(key=...) or to a position of its own shard")
        kk = self.prefixes[sp[0] % self.shards].encode() + b"k:" + k
        rc = int(self._call(sp[0], "bind", sp[1], k, keys=[kk]))
        if rc == 0:   # its release clears the key's record
            self._learned[sp[0]] = [*self._learned.get(sp[0], ()), kk]
        return rc

    def eng_lookup(self, seg: Any, key: bytes, key_len: int) -> int:
        if not 1 <= key_len <= KEY_MAX:
            return EBADKEY
        if self._closed:
            return self._closed_code()
        k = bytes(key[:key_len])
        s = self._key_shard(k)
        r = self._fn(s, "lookup", k, keys=[self.prefixes[s].encode() + b"k:" + k])
        self._reads["lookup"] += self._metrics_on
        return 0 if len(r) == 1 else int(r[1]) << ID_SLOT_BITS | int(r[0])

    def eng_keys(self, seg: Any, id: int, out: Any, n_max: int, n: Any) -> int:
        sp = self._split(id)
        if isinstance(sp, int):
            return sp
        r = self._call(sp[0], "keys", sp[1])
        if r[0]:
            return int(r[0])
        for i, k in enumerate(r[1][:n_max]):
            out[i].len = len(k)
            ffi.memmove(out[i].key, k, len(k))
        n[0] = min(len(r[1]), n_max)
        return 0

    def eng_release_position(self, seg: Any, id: int) -> int:
        sp = self._split(id)
        if isinstance(sp, int):
            return sp
        P = self.prefixes[sp[0] % self.shards]
        return self._applied(self._call(sp[0], "release", sp[1], keys=[P + "open", P + "free"]))

    def _trigger(self, trigger: int) -> int:
        """The trigger as C takes it: a uint32 (else OverflowError, as cffi)."""
        trigger = int(trigger)
        if not 0 <= trigger < 2**32:
            raise OverflowError(f"trigger {trigger} does not fit uint32_t")
        return trigger

    def _tx(self, id: int, trigger: int, mask: int, upd: bytes) -> int:
        trigger = self._trigger(trigger)
        sp = self._split(id)
        if sp == ENOTOPEN and trigger >= self.n_triggers:
            return EBADTRIGGER   # C checks the trigger before the opening
        if isinstance(sp, int):
            return sp
        if trigger >= self.n_triggers:
            return EBADTRIGGER
        for attempt in range(REDIS_BUSY_TRIES):
            rc = self._applied(self._call(sp[0], "tx", sp[1], trigger, mask, upd))
            if rc != EBUSY:
                return rc
            time.sleep(min(50e-6 * 2 ** min(attempt, 6), 2e-3))
        return CONFLICT   # a guard held it throughout (as C's bounded wait)

    def eng_transition(self, seg: Any, id: int, trigger: int) -> int:
        return self._tx(id, trigger, 0, b"")

    def _update(self, u: Any) -> tuple[int, bytes]:
        if u == ffi.NULL or u is None:
            return 0, b""
        return int(u.mask), bytes(ffi.buffer(u.w, self.n_words * 8))

    def eng_transition_ctx(self, seg: Any, id: int, trigger: int, u: Any) -> int:
        return self._tx(id, trigger, *self._update(u))

    def eng_guard_transition(self, seg: Any, id: int, trigger: int, u: Any, guard: Any,
                             user: Any) -> int:
        """The guard runs here, between a lock script and a commit script; the
        lock is a key with an expiry, so a client that dies or stalls past it
        can never commit (the commit checks the lock is still its own)."""
        sp = self._split(id)
        if isinstance(sp, int):
            return sp
        slot, op = sp
        trigger = self._trigger(trigger)
        if trigger >= self.n_triggers:
            return EBADTRIGGER
        mask, upd = self._update(u)
        what = (id, trigger, mask, upd)
        # made again after a ServerError: the same lock token, and the same
        # commit if it was sent (so the server answers with the first reply)
        gp = self._guard_pending
        if gp is not None and gp[0] == what:
            token, verdict = gp[1], gp[2]
            if verdict is not None:
                return self._applied(self._call(slot, "gcommit", op, trigger, token, verdict,
                                                mask, upd))
        else:
            token = f"{self._token}:{time.monotonic_ns()}"
        self._guard_pending = (what, token, None)
        for attempt in range(REDIS_BUSY_TRIES):
            r = self._call(slot, "glock", op, trigger, token, REDIS_GUARD_TTL_MS)
            if int(r[0]) != EBUSY:
                break
            time.sleep(min(50e-6 * 2 ** min(attempt, 6), 2e-3))
        else:
            self._guard_pending = None
            return CONFLICT
        if int(r[0]) != APPLIED:
            self._guard_pending = None
            return int(r[0])
        try:
            verdict = guard(user, id, int(r[1]), trigger)
        except BaseException:
            self._guard_pending = None
            self._call(slot, "gunlock", token)
            raise
        if verdict not in (0, 1):
            self._guard_pending = None
            self._call(slot, "gunlock", token)
            return EGUARDFAIL
        self._guard_pending = (what, token, verdict)
        rc = self._applied(self._call(slot, "gcommit", op, trigger, token, verdict, mask, upd))
        self._guard_pending = None
        return rc

    def eng_state(self, seg: Any, id: int) -> int:
        sp = self._split(id)
        return sp if isinstance(sp, int) else int(self._call(sp[0], "state", sp[1]))

    def eng_state_word(self, seg: Any, slot: int, out: Any) -> int:
        st, gen, locked, _op = self._call(slot, "word")
        out[0] = (int(st) | (SW_LOCK if locked else 0)
                  | (int(gen) & SW_GEN_MASK) << SW_GEN_SHIFT)
        return 0

    def eng_update_price(self, seg: Any, id: int, price: float) -> int:
        sp = self._split(id)
        if isinstance(sp, int):
            return sp
        if not _positive(price):
            return EBADPRICE
        return int(self._call(sp[0], "upd", sp[1], _F8.pack(price), _TS))

    def eng_read_price(self, seg: Any, id: int, out: Any) -> int:
        sp = self._split(id)
        if isinstance(sp, int):
            return sp
        r = self._call(sp[0], "price", sp[1])
        if r[0]:
            return int(r[0])
        self._reads["read"] += self._metrics_on
        ffi.buffer(out)[:] = _PRICE_OUT.pack(r[1], int(r[2]))
        return 0

    def eng_read_context(self, seg: Any, id: int, out: Any) -> int:
        sp = self._split(id)
        if isinstance(sp, int):
            return sp
        r = self._call(sp[0], "context", sp[1])
        if r[0]:
            return int(r[0])
        self._reads["read"] += self._metrics_on
        ffi.memmove(out.w, r[1], len(r[1]))
        out.version = int(r[2])
        return 0

    # -- batches: one round trip per shard (pipelined on a cluster's nodes) ---------------
    def _ids(self, ids: Any, n: int) -> np.ndarray:
        return np.frombuffer(ffi.buffer(ids, n * 8), dtype=np.uint64).copy()

    def _check_ids(self, a: np.ndarray) -> tuple[int, int] | None:
        """(index, code) of the first id out of range or never issuable."""
        slot = a & np.uint64(ID_SLOT_MASK)
        bad = (a > np.uint64(ID_MAX)) | (slot >= np.uint64(self.capacity))
        if bad.any():
            return int(np.argmax(bad)), EBADSLOT
        zero = (a >> np.uint64(ID_SLOT_BITS)) == 0
        if zero.any():
            return int(np.argmax(zero)), ENOTOPEN
        return None

    def _by_shard(self, a: np.ndarray) -> list[tuple[int, np.ndarray]]:
        slots = (a & np.uint64(ID_SLOT_MASK)).astype(np.int64)
        shard = slots % self.shards
        return [(s, np.flatnonzero(shard == s)) for s in range(self.shards)
                if (shard == s).any()]

    @staticmethod
    def _packed(a: np.ndarray, idx: np.ndarray) -> tuple[bytes, bytes]:
        sub = a[idx]
        return ((sub & np.uint64(ID_SLOT_MASK)).astype("<u4").tobytes(),
                (sub >> np.uint64(ID_SLOT_BITS)).astype("<u4").tobytes())

    def eng_update_prices(self, seg: Any, ids: Any, prices: Any, n: int, out: Any,
                          out_n: Any) -> int:
        a = self._ids(ids, n)
        p = np.frombuffer(ffi.buffer(prices, n * 8), dtype=np.float64)
        bad = self._check_ids(a)
        if bad:
            out[0], out_n[0] = bad[0], 0
            return bad[1]
        badp = ~(np.isfinite(p) & (p > 0))
        if badp.any():
            out[0], out_n[0] = int(np.argmax(badp)), 0
            return EBADPRICE
        written = 0
        with self._parts(("upds", a.tobytes(), p.tobytes())) as done:
            for s, idx in self._by_shard(a):
                slots, ops = self._packed(a, idx)
                r = done.get(s)
                if r is None:
                    r = done[s] = self._fn(s, "upds", slots, ops, p[idx].astype("<f8").tobytes(),
                                           _TS, keys=self._pos_keys(s, a[idx], self._price_keys))
                written += int(r[1])
                if r[0]:   # as C: the pass stops at the busy element, with its index
                    out[0], out_n[0] = int(idx[int(r[2])]), written
                    return int(r[0])
        out[0], out_n[0] = 0, written
        return 0

    def _pos_keys(self, s: int, ids: np.ndarray, parts: tuple[str, ...]) -> list[str]:
        """The keys ``parts`` of the slots of ``ids`` (all in shard ``s``)."""
        P = self.prefixes[s]
        slots = (ids & np.uint64(ID_SLOT_MASK)).tolist()
        return [f"{P}{x}:{slot}" for slot in slots for x in parts]

    def _vector(self, fn: str, ids: Any, n: int, bad: Any,
                extra: np.ndarray | None = None) -> list[tuple[np.ndarray, bytes]] | int:
        a = self._ids(ids, n)
        b = self._check_ids(a)
        if b:
            bad[0] = b[0]
            return b[1]
        results = []
        what = (fn, a.tobytes(), b"" if extra is None else extra.tobytes())
        parts: Any = self._parts(what) if fn in _ONCE else contextlib.nullcontext({})
        with parts as done:
            for s, idx in self._by_shard(a):
                r = done.get(s)
                if r is None:
                    slots, ops = self._packed(a, idx)
                    args: tuple[bytes, ...] = (slots, ops)
                    if extra is not None:
                        args += (extra[idx].astype("<u4").tobytes(),)
                    r = done[s] = self._fn(s, fn, *args, keys=self._pos_keys(
                        s, a[idx], ("p", "g", "wf", "w") if fn == "txmany" else ("p",)))
                if r[0]:
                    bad[0] = int(idx[int(r[1])])
                    return int(r[0])
                results.append((idx, r[1]))
        return results

    def eng_states(self, seg: Any, ids: Any, n: int, out: Any, bad: Any) -> int:
        r = self._vector("states", ids, n, bad)
        if isinstance(r, int):
            return r
        dst = np.frombuffer(ffi.buffer(out, n * 2), dtype=np.uint16)
        for idx, data in r:
            dst[idx] = np.frombuffer(data, dtype="<u2")
        return 0

    def eng_prices(self, seg: Any, ids: Any, n: int, out: Any, bad: Any) -> int:
        r = self._vector("prices", ids, n, bad)
        if isinstance(r, int):
            return r
        size = ffi.sizeof("eng_price_out")
        dst = np.frombuffer(ffi.buffer(out, n * size), dtype=np.uint8).reshape(n, size)
        for idx, data in r:
            dst[idx] = np.frombuffer(data, dtype=np.uint8).reshape(len(idx), size)
        return 0

    def eng_transition_many(self, seg: Any, ids: Any, triggers: Any, n: int, out: Any,
                            bad: Any) -> int:
        t = np.frombuffer(ffi.buffer(triggers, n * 4), dtype=np.uint32)
        r = self._vector("txmany", ids, n, bad, t)
        if isinstance(r, int):
            return r
        dst = np.frombuffer(ffi.buffer(out, n), dtype=np.uint8)
        for idx, data in r:
            dst[idx] = np.frombuffer(data, dtype=np.uint8)
        failed = np.flatnonzero(dst >= MANY_ERROR)   # as C: the first that failed, or n
        bad[0] = int(failed[0]) if len(failed) else n
        return 0

    def eng_update_token_price(self, seg: Any, token: int, price: float) -> int:
        if self._closed:
            return self._closed_code()
        if not _positive(price):
            return EBADPRICE
        total, busy = 0, False
        with self._parts(("tokp", token, price)) as done:
            for s, P in enumerate(self.prefixes):
                r = done.get(s)
                if r is None:
                    r = done[s] = self._fn(s, "tokp", token, _F8.pack(price), _TS,
                                           keys=[f"{P}t:{token}"], learn=(s, token))
                busy = busy or int(r) == EBUSY   # as C: the others written, then EBUSY
                total += max(int(r), 0)
        return EBUSY if busy else total

    # -- accounts ---------------------------------------------------------------------
    def _acct(self, id: int) -> tuple[int, int] | int:
        n, op = id & ID_SLOT_MASK, id >> ID_SLOT_BITS
        if not 1 <= id <= ACCOUNT_ID_MAX or n >= self.max_accounts or op == 0:
            return EBADACCOUNT
        return n, op

    def _acall(self, n: int, fn: str, *args: Any) -> Any:
        s = n % self.shards
        P = self.prefixes[s]
        return self._fn(s, fn, n, *args, keys=[f"{P}a:{n}", *([P + "afree", P + "akeys"]
                                                         if fn == "aclose" else [])])

    def eng_open_account(self, seg: Any, cash: int, max_exposure: int, max_positions: int,
                         max_loss: int, key: Any, key_len: int, out: Any) -> int:
        if min(cash, max_exposure, max_loss) < 0:
            return EBADMONEY
        k = b"" if key == ffi.NULL or key is None else bytes(key[:key_len])
        if k and not 1 <= key_len <= KEY_MAX:
            return EBADKEY
        if self._closed:
            return self._closed_code()
        if self._raised["aopen"] is None:
            self._next += 1
        # A keyed account opens on its key's shard: its index entry (akeys, on
        # the key's shard, where lookup_account finds it) and its record
        # change in one function call, so the key's uniqueness and "a key
        # names only an open account" are one atomic step.  Taking another
        # shard's free record would split that into calls on two nodes of a
        # cluster: a crash, a lost reply or a failover (asynchronous
        # replication: one node's half lost, the other's kept) between them
        # leaves a key naming a closed or missing account, or an account
        # whose key a second open takes again.  So a full key shard refuses
        # the key (ShardFullError, with the numbers) even when other shards
        # have free records; see docs/accounts.md.
        shards = [self._key_shard(k)] if k else [(self._next + i) % self.shards
                                                 for i in range(self.shards)]
        for s in self._from_raised("aopen", shards):
            self._raised["aopen"] = s
            P = self.prefixes[s]
            r = self._take(s, "aopen", [P + "afree", P + "akeys"], lambda h, P=P: [f"{P}a:{h}"],
                           cash, max_exposure, max_positions, max_loss, k)
            if r[0] == EKEYEXISTS:
                self._raised["aopen"] = None
                return EKEYEXISTS
            if r[0] == 0:
                out[0] = int(r[2]) << ID_SLOT_BITS | int(r[1])
                self._raised["aopen"] = None
                return 0
        self._raised["aopen"] = None
        if k and self.shards > 1:
            self._shard_full("account", k, shards[0])
        return EACCTFULL

    def _shard_full(self, kind: str, k: bytes, s: int, acct: int = 0) -> None:
        """Raise ShardFullError: a keyed account, or a keyed or booked position
        (``kind``), must open on shard ``s``, which has no free record of that
        kind; with how many the other shards have (read now: a hint)."""
        total = self.max_accounts if kind == "account" else self.capacity
        records = len(range(s, total, self.shards))
        free: int | None = 0
        try:
            for o in range(self.shards):
                if o != s:
                    P = self.prefixes[o]
                    n = self._fn(o, "nfree", keys=[P + "free", P + "afree"])
                    free = (free or 0) + int(n[kind == "account"])
        except ServerError:
            free = None
        things = "account records" if kind == "account" else "position slots"
        why = (f"account key {k!r} belongs to shard {s}" if kind == "account" else
               f"a position on account {acct} opens on that account's shard {s}" if acct else
               f"position key {k!r} belongs to shard {s}")
        where = (f"{why} of this {self.shards}-shard Redis engine, whose {records} {things} "
                 "are all taken")
        if free is None:
            room = f"; another shard did not answer, so its free {things} are not known"
        elif free:
            room = (f"; the other shards have {free} free {things}, which it cannot take "
                    "(the key's index or the account's books change in the same call as "
                    "the record, on one node)")
        else:
            room = f" (all {total} {things} are taken)"
        raise ShardFullError(
            f"{where}{room}; free one on shard {s}, open it with another key, or create the "
            f"engine with more (now {total}); nothing was changed",
            kind=kind, key=k, account=acct, shard=s, shards=self.shards, records=records,
            total=total, free_elsewhere=free)

    def eng_lookup_account(self, seg: Any, key: bytes, key_len: int) -> int:
        if not 1 <= key_len <= KEY_MAX:
            return EBADKEY
        if self._closed:
            return self._closed_code()
        k = bytes(key[:key_len])
        s = self._key_shard(k)
        r = self._fn(s, "alookup", k, keys=[self.prefixes[s] + "akeys"])
        self._reads["lookup"] += self._metrics_on
        return 0 if len(r) == 1 else int(r[2]) << ID_SLOT_BITS | int(r[1])

    def _books_row(self, id: int, b: list[bytes], row: Any) -> None:
        (cash, reserved, realized, opening, deposits, withdrawals, max_exposure, max_loss,
         max_positions, open_positions, halted, version, _op, gain, loss) = b
        row.id, row.version, row.index = id, int(version), id & ID_SLOT_MASK
        bk = row.b
        bk.worst_gain, bk.worst_loss = int(gain or 0), int(loss or 0)
        bk.open, bk.opening = 1, id >> ID_SLOT_BITS
        bk.cash, bk.reserved, bk.realized = int(cash), int(reserved), int(realized)
        bk.opening_cash, bk.deposits, bk.withdrawals = int(opening), int(deposits), int(withdrawals)
        bk.max_exposure, bk.max_loss = int(max_exposure), int(max_loss)
        bk.max_positions, bk.open_positions, bk.halted = (int(max_positions),
                                                          int(open_positions), int(halted))

    def eng_read_account(self, seg: Any, id: int, row: Any) -> int:
        sp = self._acct(id)
        if isinstance(sp, int):
            return sp
        r = self._acall(sp[0], "aread", sp[1])
        if r[0]:
            return int(r[0])
        self._books_row(id, r[1], row)
        _key_row(row, r[2] if len(r) > 2 else None)
        return 0

    def _cash(self, id: int, kind: str, units: int) -> int:
        sp = self._acct(id)
        if isinstance(sp, int):
            return sp
        if units < 0:
            return EBADMONEY
        r = self._acall(sp[0], "acash", sp[1], kind, units)
        if len(r) > 1:
            self._keep_books(r[1], r[2:])
        return int(r[0])

    def eng_deposit(self, seg: Any, id: int, units: int) -> int:
        return self._cash(id, "deposit", units)

    def eng_withdraw(self, seg: Any, id: int, units: int) -> int:
        return self._cash(id, "withdraw", units)

    def eng_halt_account(self, seg: Any, id: int, on: int) -> int:
        sp = self._acct(id)
        if isinstance(sp, int):
            return sp
        return int(self._acall(sp[0], "aset", sp[1], "", 0, "halted", on))

    def eng_update_account(self, seg: Any, id: int, version: int, max_exposure: int,
                           max_positions: int, max_loss: int, halted: int, attempt: int) -> int:
        sp = self._acct(id)
        if isinstance(sp, int):
            return sp
        if min(max_exposure, max_loss) < 0:
            return EBADMONEY
        return int(self._acall(sp[0], "aset", sp[1], version, attempt, "max_exposure", max_exposure,
                               "max_positions", max_positions, "max_loss", max_loss,
                               "halted", halted))

    def eng_close_account(self, seg: Any, id: int) -> int:
        sp = self._acct(id)
        if isinstance(sp, int):
            return sp
        r = self._acall(sp[0], "aclose", sp[1])
        if isinstance(r, list):   # closed: its last books (a resend gets the first reply's)
            self._books_row(id, r[1], self.last_closed)
            return int(r[0])
        return int(r)

    def eng_accounts(self, seg: Any, rows: Any, max_rows: int, n: Any) -> int:
        if self._closed:
            return self._closed_code()
        found = []
        for s, P in enumerate(self.prefixes):
            accounts = range(s, self.max_accounts, self.shards)
            for num, b, *key in self._fn(s, "alist", s, self.max_accounts, self.shards,
                                         keys=[f"{P}a:{n}" for n in accounts]):
                found.append((int(num), b, key[0] if key else None))
        found.sort(key=lambda f: f[0])
        for i, (num, b, key) in enumerate(found[:max_rows]):
            self._books_row(int(b[12]) << ID_SLOT_BITS | num, b, rows[i])
            _key_row(rows[i], key)
        n[0] = min(len(found), max_rows)
        return 0

    # -- waits, snapshot, control -----------------------------------------------------
    def eng_wait_change(self, seg: Any, id: int, since: int, left_ns: int, out: Any) -> int:
        """Block on the position's stream (XREAD BLOCK) until a commit
        after the call began, or the time is up.  No polling: each round
        trip blocks on the server, up to a slice so a dead server is noticed."""
        sp = self._split(id)
        if isinstance(sp, int):
            return sp
        slot, op = sp
        # a slice well inside the socket's timeout (the url's), or the read times out first
        slice_ms = max(1, min(_WAIT_SLICE_MS, int(self.conn.timeout * 1000) // 2))
        # commits write the stream while the flag lives: all of this wait, and then some
        r = self._call(slot, "wprep", op, left_ns // 1_000_000 + 2 * slice_ms)
        if r[0]:
            return int(r[0])
        last = r[1]
        stream = self.prefixes[slot % self.shards] + f"w:{slot}"
        deadline = time.monotonic() + left_ns / 1e9
        while True:
            ms = max(0, int((deadline - time.monotonic()) * 1000))
            got = self.conn.block_read(stream, last, min(ms, slice_ms))
            if got:
                return APPLIED
            if ms <= slice_ms:
                return ETIMEDOUT

    def journal_source(self, spec: MachineSpec) -> RedisJournal:
        """This engine's journal (a stream per shard; see engine/store/redis/journal.py)."""
        return RedisJournal(self, spec)

    def wait_slice_ms(self) -> int:
        """A blocking read's slice: well inside the url's socket timeout."""
        return max(1, min(_WAIT_SLICE_MS, int(self.conn.timeout * 1000) // 2))

    def wait_probe(self, id: int, ttl_ms: int | None = None) -> tuple[int, int, int, str, bytes]:
        """(code, state, generation, stream, last id), read in one step
        (wprep) that arms the slot's waiting flag for ``ttl_ms`` (default
        three slices): a commit after it adds an entry past that id."""
        sp = self._split(id)
        if isinstance(sp, int):
            return sp, 0, 0, "", b""
        slot, op = sp
        r = self._call(slot, "wprep", op, ttl_ms or 3 * self.wait_slice_ms())
        if r[0]:
            return int(r[0]), 0, 0, "", b""
        return 0, int(r[2]), int(r[3]), self.prefixes[slot % self.shards] + f"w:{slot}", r[1]

    def eng_wait_for(self, seg: Any, id: int, mask: int, left_ns: int, out: Any) -> int:
        """Until the state is in ``mask`` (APPLIED, the state in out[0]) or the
        time is up (ETIMEDOUT): check and arm in one step (wprep), then
        block on the stream past the id it read, a slice at a time."""
        deadline = time.monotonic() + left_ns / 1e9
        slice_ms = self.wait_slice_ms()
        while True:
            rc, st, _gen, stream, last = self.wait_probe(id)
            if rc:
                return rc
            if st & mask:
                out[0] = st
                return APPLIED
            ms = int((deadline - time.monotonic()) * 1000)
            if ms <= 0:
                return ETIMEDOUT
            self.conn.block_read(stream, last, min(ms, slice_ms))

    def eng_snapshot(self, seg: Any, rows: Any, max_rows: int, n: Any) -> int:
        """Each shard in pages of about ENG_REDIS_SNAPSHOT_PAGE open
        positions, one call each: no call holds the server long, and other
        clients' calls run between pages.  Each row is one opening, read in
        one step; the rows are not one instant (as on shared memory)."""
        if self._closed:
            return self._closed_code()
        found: dict[int, bytes] = {}   # by slot: a slot SSCAN gives twice is read twice
        for s in range(self.shards):
            cursor = b"0"
            while True:   # pages (one call each): SSCAN ends, whatever opens and closes
                page = self._fn(s, "snap", cursor, REDIS_SNAPSHOT_PAGE)
                for item in page[1:]:
                    slot, op, st, locked, gen, ctr, pv = _SNAP.unpack_from(item)
                    cv = _F8.unpack_from(item, _SNAP.size)[0]
                    base = _SNAP.size + 8
                    pr, rec = item[base:base + 32], item[base + 32:]
                    head = _ROW_HEAD.pack(op << ID_SLOT_BITS | slot, slot, st,
                                          int(gen) & 0xFFFF, locked, int(ctr), pr, int(pv),
                                          int(cv))
                    found[slot] = head + rec
                cursor = page[0]
                if cursor == b"0":
                    break
        out = sorted(found.items())
        size = ffi.sizeof("eng_row")
        for i, (_slot, data) in enumerate(out[:max_rows]):
            ffi.memmove(rows + i, data.ljust(size, b"\0"), size)
        n[0] = min(len(out), max_rows)
        return 0

    def eng_set_halt(self, seg: Any, on: int) -> int:
        """Every shard at once (each server on a connection of its own):
        within about the url's timeout however many servers do not answer.
        A shard that could not be reached is named in one ServerError; the
        others are switched (a partial halt: ``inspect --url`` shows each
        shard's flag; halt again once the servers answer)."""
        if self._closed:
            return self._closed_code()
        # the commands as call() would send them (with the incarnation), each on its shard
        failed = self.conn.call_every({k: self.conn._cmd(k, "halt", (self.inc, 1 if on else 0),
                                                         (k[:-1] + "j",))   # its journal
                                       for k in self.meta_keys})
        gone = next((w for w in failed.values() if "ENGINE_GONE" in w or "ENGINE_OTHER" in w),
                    None)
        if gone is not None:   # unlinked, or another incarnation: nothing to halt
            raise self._gone(ServerError(gone))
        if failed:
            by_why: dict[str, list[int]] = {}
            for k, w in failed.items():
                by_why.setdefault(w, []).append(self.meta_keys.index(k))
            why = "; ".join(f"shards {sorted(s)}: {w}" for w, s in by_why.items())
            bad = sorted(self.meta_keys.index(k) for k in failed)
            off = sorted(self.meta_keys.index(k) for k, w in failed.items()
                         if not w.startswith(_ON_PRIMARY))
            state = "halted" if on else "running"
            if len(off) == self.shards:
                rest = "no shard was switched"
            elif off:
                rest = (f"the other {self.shards - len(off)} shards are {state}: a partial halt, "
                        f"transitions on shards {off} {'still apply' if on else 'stay halted'}")
            else:
                rest = (f"every shard is {state} on its primary, not known to be on the "
                        "replicas (a failover may lose it)")
            raise ServerError(
                f"{self.url}: halt({bool(on)}) of engine {self.name!r}: shards {bad} of "
                f"{self.shards} failed ({why}); {rest}.  Each shard's flag: "
                f"`python -m engine inspect {self.name} --url URL`; call halt again when "
                "they answer")
        return 0

    def eng_set_metrics(self, seg: Any, enabled: int, mask: int) -> int:
        self._metrics_on, self._sample_mask = bool(enabled), mask
        for s in range(self.shards):
            self._fn(s, "setmetrics", 1 if enabled else 0)
        return 0

    def eng_recover(self, seg: Any, out: Any) -> int:
        """Nothing to release: a server-side function never leaves a lock,
        and a guard's lock expires by itself."""
        return self._closed_code() if self._closed else 0

    def eng_set_faults(self, seg: Any, flags: int, pause_ns: int) -> int:
        return EBADARG

    def latency(self) -> tuple[np.ndarray, list[int]]:
        """This Engine's sampled round trips: a log2 histogram per operation
        (``ENG_OP_COUNT`` x ``ENG_HIST_BUCKETS``, as C's shards) and the
        maximum per operation, in ns.  Nothing on the server holds them: a
        tool that wants every process's latency collects these."""
        return self._hist.copy(), list(self._max_ns)

    def metrics(self) -> Metrics:
        """Counts per operation, summed over the shards (every client's
        calls), except reads (``read``, ``lookup``): this Engine's, counted
        here so that a full server still answers them; latency percentiles
        are of this Engine's sampled round trips."""
        totals: dict[str, dict[str, int]] = {op: {} for op in OPS}
        for op, n in self._reads.items():
            totals[op]["applied"] = n
        for s, key in enumerate(self.meta_keys):
            self._fn(s, "alive")
            raw = self.conn.command("HGETALL", key[:-1] + "s", key=key)
            items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
            for f, v in items:
                op, _, what = f.decode().partition(":")
                if op in totals:
                    totals[op][what] = totals[op].get(what, 0) + int(v)
        out: Metrics = {}
        for op, c in totals.items():
            kinds = ("applied", "invalid", "conflicts", "rejected", "halted", "errors")
            i = OPS.index(op)
            hist, max_ns = self._hist[i], self._max_ns[i]
            p50, p99, p999 = (min(percentile(hist, q), float(max_ns)) for q in (0.5, 0.99, 0.999))
            out[op] = OpMetrics(attempts=sum(c.get(k, 0) for k in kinds),
                                **{k: c.get(k, 0) for k in kinds}, retries=c.get("retries", 0),
                                takeovers=0,
                                rolled_forward=0, rolled_back=0, samples=int(hist.sum()),
                                p50_ns=p50, p99_ns=p99, p999_ns=p999, max_ns=max_ns)
        return out


def raise_closed(forked: bool = False) -> None:
    if forked:
        raise ClosedError("this Engine was inherited through fork(): its connection is the "
                          "parent's; this process must attach its own, with "
                          "Engine.attach(handle)")
    raise ClosedError("this Engine was closed: attach again from the handle")


#: every store not yet closed: a fork child closes its copies (see _after_fork)
_LIVE: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _after_fork() -> None:
    """In a fork child: every inherited store is closed, as an inherited
    shared-memory Engine is.  Its connection is the parent's socket: a
    child that sent on it would read the parent's replies (and the parent
    the child's).  Nothing is sent or shut down here; the child's copy of
    the socket is closed by redis-py when collected (it checks the pid)."""
    for store in list(_LIVE):
        store._forked = store._closed = True
        store.conn.lock = threading.RLock()   # a parent's thread may have held it at the fork
    _LIVE.clear()


os.register_at_fork(after_in_child=_after_fork)


def _positive(price: float) -> bool:
    return math.isfinite(price) and price > 0



if TYPE_CHECKING:
    from engine.store import Store

    def _is_a_store(store: RedisStore) -> Store:
        """mypy checks RedisStore against every call of the store interface
        (engine/store/__init__.py), as it checks lib."""
        return store


def _key_row(row: Any, key: bytes | None) -> None:
    """An account row's key (``open_account(key=)``) from the hash's ``key``
    field (None or empty: no key)."""
    data = bytes(key or b"")[: len(row.key)]
    row.key_len = len(data)
    ffi.memmove(row.key, data.ljust(len(row.key), b"\0"), len(row.key))
