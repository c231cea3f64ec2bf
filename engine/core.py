"""The Engine: a typed API over one shared-memory segment.

Hot calls (``transition``, ``update_price``, ``price``, ``state``) are one C
call each.  cffi converts and range-checks the argument types, C checks the
values; Python only maps a failure to its exception, so the success path stays
thin.

An Engine object belongs to the thread that uses it: it owns one metrics shard
and one output buffer.  Attach one Engine per thread (they are cheap).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import logging
import math
import mmap
import numbers
import operator
import os
import random
import threading
import time
import typing
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn, overload

import numpy as np
import numpy.typing as npt

from engine import aio as _aio
from engine._native import ffi, lib
from engine.accounts import (
    LIMITS,
    UNITS_MAX,
    Account,
    account_from_row,
    from_units,
    key_value,
    money_of,
    to_units,
)
from engine.durable.writer import Writer, durable_args, journal_dir, prepare_dir, write_meta
from engine.errors import (
    ArgumentError,
    BusyError,
    ClosedError,
    EngineError,
    EngineTypeError,
    FieldError,
    KeyExistsError,
    MoneyError,
    PriceError,
    RiskLimitError,
    SegmentNotFoundError,
    ServerError,
    SlotError,
    SpecError,
    StaleAccountError,
    TriggerError,
    WaitTimeout,
    raise_for,
    redact,
    shown,
)
from engine.journal import Event, JournalSource, JournalWaker, follow, follow_async, read_array
from engine.metrics import Metrics, merge_shards, read_metrics, read_shards, shard_histograms
from engine.records import ACCOUNT_ROW_DTYPE, PRICE_STRUCT, PRICES_DTYPE, Context, PriceSnapshot
from engine.spec import POSITION_SPEC, MachineSpec, Outcome, Side, State, TriggerName
from engine.store import (
    Attached,
    Seg,
    Store,
    backend,
    check_name,
    journal_source,
    random_name,
)

if TYPE_CHECKING:
    from typing_extensions import Self, TypeVar
else:
    def TypeVar(name: str, *, default: object = None, **kw: Any) -> Any:
        """typing.TypeVar takes ``default`` only from 3.13: the type checkers
        read it (through typing_extensions); at run time it is not needed."""
        return typing.TypeVar(name, **kw)

#: An Engine's types, for type checkers: its states, its records and its
#: trigger names.  ``Engine`` alone is the default position spec's
#: (``State``, ``Context``, ``TriggerName``); an engine of a custom spec is
#: ``Engine[Any, Any, Any]`` (its states are ``spec.State`` members, its
#: records named tuples of its fields, its triggers any of its names).
S = TypeVar("S", bound=enum.IntEnum, default=State)
C = TypeVar("C", default=Context)
T = TypeVar("T", bound=str, default=TriggerName)

__all__ = ["Engine", "Handle", "RecoveryReport"]


def _load_fastpath() -> Any:
    """The hot calls in C (native/fastpath.c); None: the Python methods serve."""
    try:
        return importlib.import_module("engine._fastpath")
    except ImportError:   # pragma: no cover - a build without the extension
        return None


_fastpath = _load_fastpath()

_OUTCOMES = tuple(sorted(Outcome, key=int))
_unpack_price = PRICE_STRUCT.unpack_from
_tuple_new = tuple.__new__

_INT64 = (-(2**63), 2**63 - 1)
_KEY_MAX = lib.ENG_KEY_MAX
_DEFAULT_KEYS = 2
_DEFAULT_ACCOUNTS = 64
_DEFAULT_JOURNAL_RECORDS = lib.ENG_JOURNAL_DEFAULT_RECORDS
_DEFAULT_SYNC_MS = lib.ENG_DJ_SYNC_NS / 1e6
_DEFAULT_CKPT_RECORDS = int(lib.ENG_DJ_CKPT_RECORDS)
_DEFAULT_CKPT_S = lib.ENG_DJ_CKPT_NS / 1e9
_ACCOUNT_TRIES = 32          # update_account: tries before BusyError


def _same_fn(f: Any, g: Any) -> bool:
    """``f`` and ``g`` are the same update_account fn: one object, or one
    function expression (the same code) with equal defaults and captured values."""
    if f is g:
        return True
    code = getattr(f, "__code__", None)
    if code is None or code is not getattr(g, "__code__", None):
        return False
    try:
        cells = [tuple(c.cell_contents for c in (h.__closure__ or ())) for h in (f, g)]
        return bool(f.__defaults__ == g.__defaults__ and cells[0] == cells[1])
    except Exception:   # an empty cell, or values that do not compare: not the same
        return False
_ACCOUNT_BACKOFF_S = 20e-6   # first back-off; doubles per try, capped at 2 ms
_RISK_LIMITS = {lib.ENG_ERISK_HALTED: "halted", lib.ENG_ERISK_EXPOSURE: "exposure",
                lib.ENG_ERISK_COUNT: "count", lib.ENG_ERISK_CASH: "cash"}
# what cffi raises for an argument it cannot convert (NaN to int: ValueError)
_CONVERSION_ERRORS = (TypeError, OverflowError, ValueError)
_SLOT_MASK = lib.ENG_ID_SLOT_MASK
_MANY_ERROR = lib.ENG_MANY_ERROR
_MAX_TIMEOUT_S = lib.ENG_MAX_TIMEOUT_NS / 1e9 / 2   # C clamps too; this keeps floats exact
_CLOSE_WAIT_S = lib.ENG_CLOSE_WAIT_NS / 1e9   # close(): bound on calls in flight elsewhere
_CLOSE_POLL_S = lib.ENG_CLOSE_POLL_NS / 1e9   # ... looked at this often (at most)
#: what an operator must know (an account that halted itself, what recover()
#: did), logged off the hot path: see docs/monitoring.md
_log = logging.getLogger("engine")
#: (segment, account) of self-halted accounts already logged by this process
_HALTS_LOGGED: set[tuple[str, int]] = set()


@dataclass(frozen=True)
class Handle(Generic[S, C, T]):
    """What a worker needs to attach: picklable, small."""

    name: str
    spec: MachineSpec | None = None   # None: the default position lifecycle
    url: str | None = None            # None: shared memory; else the Redis server
    #: Redis: the engine's incarnation (random, set at create); attach(handle)
    #: reaches only that one, never an engine created again under the name
    incarnation: int | None = None

    def __repr__(self) -> str:
        """The url's password is carried (a worker needs it to attach: pickle
        a handle only to your own workers) but never shown."""
        url = None if self.url is None else redact(self.url)
        return f"Handle(name={self.name!r}, spec={self.spec!r}, url={url!r})"


@dataclass(frozen=True)
class RecoveryReport:
    """What ``Engine.recover`` released."""

    rolled_forward: int
    rolled_back: int
    price_latches: int
    removed_pids: tuple[int, ...]
    keys_cleared: int = 0   # key records, cells and stripe locks left by the dead
    accounts_forward: int = 0   # account changes of dead holders completed
    accounts_back: int = 0      # account changes of dead holders undone
    tindex_repaired: int = 0    # token index: dead bucket locks and free slots unlinked

    @property
    def changed(self) -> bool:
        return bool(self.rolled_forward or self.rolled_back or self.price_latches
                    or self.removed_pids or self.keys_cleared or self.accounts_forward
                    or self.accounts_back or self.tindex_repaired)


def _log_halted(name: str, account: int, realized: int, max_loss: int) -> None:
    """Log that an account refused an opening because it halted itself
    (realized losses reached max_loss), once per account and process: a
    refused opening is common under a halt and must stay cheap.  A halt by
    halt_account or update_account is the operator's own act: not logged."""
    if not (realized < 0 and realized <= -max_loss) or (name, account) in _HALTS_LOGGED:
        return
    if len(_HALTS_LOGGED) >= 4096:   # bounded: a long-lived process forgets old ones
        _HALTS_LOGGED.clear()
    _HALTS_LOGGED.add((name, account))
    _log.warning("engine %s: account %d halted itself: realized %s reached max_loss %s; "
                 "openings on it are refused until an operator resumes it", name, account,
                 from_units(realized), from_units(max_loss))


def _remove_temporary(name: str, remove: Callable[[], None], pid: int) -> None:
    """Remove a ``create(temporary=True)`` engine with its backend's
    ``remover`` (the segment, if the name still names the file created; on
    Redis, this incarnation's keys).  Only in the creating process: a fork
    child's exit leaves the parent's engine alone."""
    if os.getpid() != pid:
        return
    try:
        remove()
    except (FileNotFoundError, SegmentNotFoundError):
        pass   # removed already (unlink(), rm, or an engine created again under the name)
    except (EngineError, OSError) as e:
        _log.warning("engine %s: the temporary engine could not be removed: %s", name, e)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: float) -> bool:
    """math.isfinite that also says False for ints too large for a double."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _new_out(ctype: str) -> tuple[Any, memoryview]:
    """An output struct for C and a view of its bytes."""
    out = ffi.new(ctype)
    return out, memoryview(ffi.buffer(out))


def _check_spec(spec: object) -> MachineSpec:
    if spec is None:
        return POSITION_SPEC
    if not isinstance(spec, MachineSpec):
        raise EngineTypeError(f"spec must be a MachineSpec or None, got {spec!r:.80}")
    return spec


def _key_bytes(key: Any) -> bytes:
    """A str (UTF-8) or bytes key of 1 to ENG_KEY_MAX bytes."""
    if isinstance(key, str):
        try:
            data = key.encode()
        except UnicodeEncodeError as e:
            raise ArgumentError(f"a str key must encode as UTF-8: {key!r:.60} "
                                f"({e.reason})") from None
    elif isinstance(key, (bytes, bytearray, memoryview)):
        data = bytes(key)
    else:
        raise EngineTypeError(f"a key is a str or bytes, got {shown(key)} "
                              f"({type(key).__name__})")
    if not 1 <= len(data) <= _KEY_MAX:
        raise ArgumentError(f"a key is 1 to {_KEY_MAX} bytes (UTF-8 for a str), got "
                            f"{len(data)} bytes: {key!r:.60}")
    return data


# -- guards ----------------------------------------------------------------------------
# eng_guard_transition calls _engine_guard with the slot locked.  Whatever the
# guard does (False, raise, or a signal handler raising while it runs), C
# releases the lock before it returns: an exception makes the callback return
# -1 (cffi's onerror, or error=-1 if onerror itself is interrupted) and is
# kept here, per thread (an Engine belongs to one thread), to be raised after
# the C call.  ``inside``: the Engines whose guard this thread is running
# (close() must not wait for a call of its own thread).
_guard_failure = threading.local()


def _keep_guard_failure(exc_type: Any, exc: BaseException | None, tb: Any) -> int:
    _guard_failure.exc = exc
    return -1


@ffi.def_extern(error=-1, onerror=_keep_guard_failure)   # type: ignore[untyped-decorator]
def _engine_guard(user: Any, pos: int, source: int, trigger: int) -> int:
    eng: Engine = ffi.from_handle(user)
    guard = eng.spec.guards.get((source, trigger))
    return 1 if guard is None or guard(eng.context(pos), eng.price(pos)) else 0


def _take_guard_failure() -> BaseException | None:
    exc: BaseException | None = getattr(_guard_failure, "exc", None)
    _guard_failure.exc = None
    return exc


if TYPE_CHECKING:
    _EngineBase = object
else:   # the C part of an Engine: the view its hot calls use (native/fastpath.c)
    _EngineBase = object if _fastpath is None else _fastpath.EngineBase


def _journal_args(journal: Any, records: Any, prices: Any) -> tuple[int, int]:
    """create()'s journal options, checked: (records in the ring or 0, flags)."""
    if journal is False:
        journal = None
    if journal is not None and journal is not True:
        raise EngineTypeError(f"journal must be True, False or None (off), got {shown(journal)}")
    if not isinstance(records, int) or isinstance(records, bool):
        raise EngineTypeError(f"journal_records must be an int, got {shown(records)}")
    lo, hi = lib.ENG_JOURNAL_MIN_RECORDS, lib.ENG_JOURNAL_MAX_RECORDS
    if not (lo <= records <= hi and records & (records - 1) == 0):
        raise ArgumentError(f"journal_records must be a power of two in [{lo}, {hi}], "
                            f"got {shown(records)}")
    if not isinstance(prices, bool):
        raise EngineTypeError(f"journal_prices must be a bool, got {shown(prices)}")
    if prices and journal is None:
        raise ArgumentError("journal_prices=True needs the journal (journal=True)")
    return (records if journal else 0), (lib.ENG_JOURNAL_PRICES if prices else 0)


class Engine(_EngineBase, Generic[S, C, T]):
    """One attached view of a shared-memory segment of positions.

    Positions are named by ids: ``open_position`` returns an id naming that
    opening of a slot, and every per-position call refuses an id whose
    opening was released (``StaleIdError``).
    """

    _mm: mmap.mmap | None     # shared memory: the segment's mapping
    _buf: Any                 # ... and the cffi buffer over it
    _seg: Seg                 # the first argument of every eng_* call (see engine.store)
    _finalizer: Any           # detaches, once (weakref.finalize)
    #: update_account's try that raised ServerError: (account, fn, what it sent)
    _update_again: tuple[int, Any, tuple[int, ...]] | None = None

    # -- life cycle ------------------------------------------------------------------
    @classmethod
    def _made(cls, name: str, spec: MachineSpec, url: str | None,
              make: Callable[[Engine[Any, Any, Any]], Attached]) -> Engine[Any, Any, Any]:
        """An Engine on what ``make(engine)`` attached (the store, its first
        argument, the finalizer that detaches, and on shared memory the mapping)."""
        self = cls.__new__(cls)
        att = make(self)
        self._mm, self._buf, self._seg = att.mm, att.buf, att.seg
        self._finalizer = att.finalizer
        self._bind(name, spec, att.store, url)
        if _fastpath is not None and url is None:   # the hot calls' view (see _install_fastpath)
            _fastpath.bind(self, int(ffi.cast("uintptr_t", self._seg)), self._seg)
        if url is None and self._seg.durable != ffi.NULL:   # the journal on disk: a writer
            self._durable = Writer(self._seg, name)
            # after the store's finalizer: runs before it (the thread stops before the unmap)
            weakref.finalize(self, self._durable.shutdown)
        return self

    def _bind(self, name: str, spec: MachineSpec, impl: Store, url: str | None) -> None:
        """What both backends share: ``impl`` answers the ``eng_*`` calls
        (the C library, or a ``RedisStore``) on ``self._seg``."""
        self.name = name
        self.spec = spec
        #: the Redis server's url; None for shared memory
        self.url = url
        self._lib = impl
        self._transition = impl.eng_transition
        self._update_price = impl.eng_update_price
        self._read_price = impl.eng_read_price
        self._state = impl.eng_state
        self._lookup = impl.eng_lookup
        #: wait_for's step: the backend's own, or the futex one over eng_wait_change
        self._wait_for: Any = getattr(impl, "eng_wait_for", None) or functools.partial(
            _wait_for_futex, impl)
        self._aio_waiter: Any = None   # engine.aio.Waiter, started by the first awaiting wait
        self.capacity: int = self._seg.capacity
        #: keys one opening may have (set at create)
        self.keys_per_position: int = self._seg.kpp
        #: account records (set at create)
        self.max_accounts: int = self._seg.max_accounts
        #: records the journal's ring holds (0: no journal)
        self.journal_records: int = int(getattr(self._seg, "jrecords", 0))
        self._pid = os.getpid()
        self._rec = spec.record
        self._price_buf: tuple[Any, memoryview] | None = _new_out("eng_price_out *")
        self._ctx_buf: tuple[Any, memoryview] | None = _new_out("eng_ctx_out *")
        self._trigger_types = frozenset((int, spec.Trigger))
        self._states = {1 << i: spec.State(1 << i) for i in range(len(spec.states))}
        #: create(temporary=True): removes the segment (or the Redis keys) once
        self._temporary: weakref.finalize[Any, Any] | None = None
        #: the journal on disk: this Engine's writer (None: not durable)
        self._durable: Writer | None = None
        #: Engine.restore: what the restore did (engine.durable.restore.RestoreReport)
        self.restore_report: Any = None

    @overload
    @classmethod
    def create(cls, capacity: int = ..., *, name: str | None = ..., spec: None = ...,
               keys_per_position: int = ..., max_accounts: int = ..., url: str | None = ...,
               shards: int | None = ..., temporary: bool = ...,
               journal: bool | str | os.PathLike[str] | None = ...,
               journal_records: int = ..., journal_prices: bool = ...,
               journal_sync_ms: float = ..., checkpoint_records: int = ...,
               checkpoint_s: float = ...) -> Engine: ...

    @overload
    @classmethod
    def create(cls, capacity: int = ..., *, name: str | None = ..., spec: MachineSpec,
               keys_per_position: int = ..., max_accounts: int = ..., url: str | None = ...,
               shards: int | None = ..., temporary: bool = ...,
               journal: bool | str | os.PathLike[str] | None = ...,
               journal_records: int = ..., journal_prices: bool = ...,
               journal_sync_ms: float = ..., checkpoint_records: int = ...,
               checkpoint_s: float = ...) -> Engine[Any, Any, Any]: ...

    @classmethod
    def create(cls, capacity: int = 10_000, *, name: str | None = None,
               spec: MachineSpec | None = None,
               keys_per_position: int = _DEFAULT_KEYS,
               max_accounts: int = _DEFAULT_ACCOUNTS, url: str | None = None,
               shards: int | None = None, temporary: bool = False,
               journal: bool | str | os.PathLike[str] | None = True,
               journal_records: int = _DEFAULT_JOURNAL_RECORDS,
               journal_prices: bool = False,
               journal_sync_ms: float = _DEFAULT_SYNC_MS,
               checkpoint_records: int = _DEFAULT_CKPT_RECORDS,
               checkpoint_s: float = _DEFAULT_CKPT_S) -> Engine[Any, Any, Any]:
        """Create a new segment for ``capacity`` positions and attach to it.

        ``temporary=True``: the segment is removed (unlinked) when this
        Engine closes, or when its process exits without closing it (at
        interpreter exit, or when the Engine is garbage-collected); Engines
        attached elsewhere keep working until they close, as after
        ``unlink()``.  A creator killed by a signal cannot remove it:
        ``python -m engine rm --stale`` does.  On Redis the engine's keys
        are deleted then, and Engines attached elsewhere get
        ``SegmentNotFoundError`` from their next call (Redis keeps nothing
        alive for them).

        ``keys_per_position`` (0 to ``ENG_MAX_KEYS_PER_POSITION``) is how many
        unique keys (``open(key=)``, ``bind_key``) one opening may have;
        ``max_accounts`` (0 to ``ENG_MAX_ACCOUNTS``) how many accounts can be
        open at once.

        With ``url`` (``redis://host:port/db``, ``rediss://...``,
        ``unix:///path.sock`` or ``redis+cluster://host:port``) the engine
        lives on that Redis server instead, behind the same API; ``shards``
        hash tags spread its positions over a cluster's nodes (default 1 on
        one server, 16 on a cluster).

        ``journal=True`` (the default) records every committed change in a
        ring of ``journal_records`` records (a power of two in
        [``ENG_JOURNAL_MIN_RECORDS``, ``ENG_JOURNAL_MAX_RECORDS``]) in the
        segment (on Redis: a stream per shard), read with ``events()``;
        ``journal_prices`` records every price write too.  ``journal=None``
        (or False) turns it off.  On shared memory every commit passes
        through one journal latch: a process stopped while it holds it
        (SIGSTOP, a debugger; the latch is held for the ~40 ns of an append)
        stalls every other commit until it runs again, each waiting
        ``ENG_JOURNAL_WAIT_STEPS`` before CONFLICT or BusyError, and a
        transition costs about twice as much as without it: see
        docs/journal.md.

        ``journal="/path/dir"`` (shared memory only) also writes the journal
        to files in that directory (made 0700 if absent; files 0600; one that
        holds another engine's journal is refused): ``flush()``,
        ``durable_seq``, ``checkpoint()``, ``Engine.restore``.  Every
        process attached runs a writer thread; one holds the writer lease
        and writes, and fdatasyncs every ``journal_sync_ms`` (default
        ``ENG_DJ_SYNC_NS``: what a power failure can lose at most); a crash
        of processes loses nothing committed.  A checkpoint is written every
        ``checkpoint_records`` records or ``checkpoint_s`` seconds (0:
        never).  Fail-stop: a change the writer cannot keep up with
        (``JournalFullError``) or cannot write (``DurabilityError``) is
        refused; see docs/durability.md."""
        spec = _check_spec(spec)
        for what, v, hi in (("capacity", capacity, lib.ENG_MAX_CAPACITY),
                            ("keys_per_position", keys_per_position,
                             lib.ENG_MAX_KEYS_PER_POSITION),
                            ("max_accounts", max_accounts, lib.ENG_MAX_ACCOUNTS)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise EngineTypeError(f"{what} must be an int, got {shown(v)}")
            if not (1 if what == "capacity" else 0) <= v <= hi:
                raise ArgumentError(f"{what} must be in [{1 if what == 'capacity' else 0}, "
                                    f"{hi}], got {shown(v)}")
        if not isinstance(temporary, bool):
            raise EngineTypeError(f"temporary must be a bool, got {shown(temporary)}")
        jdir = journal_dir(journal)
        durable = durable_args(journal_sync_ms, checkpoint_records, checkpoint_s)
        if jdir is not None:
            if url is not None:
                raise ArgumentError("journal=DIR writes the journal of shared memory to files; "
                                    "on Redis durability is the server's (AOF, replicas)")
            journal = True
        n_records, flags = _journal_args(journal, journal_records, journal_prices)
        name = check_name(name) if name is not None else random_name()
        if jdir is not None:
            flags |= lib.ENG_JOURNAL_DURABLE
            prepare_dir(jdir)
        store = backend(url)
        eng = cls._made(name, spec, store.url, lambda eng: store.create(
            eng, name, spec, capacity, keys_per_position, max_accounts, shards,
            journal_records=n_records, journal_flags=flags))
        if jdir is not None:
            try:
                write_meta(jdir, name, capacity, spec, {
                    "keys_per_position": keys_per_position, "max_accounts": max_accounts,
                    "journal": jdir, "journal_records": journal_records,
                    "journal_prices": journal_prices, "journal_sync_ms": journal_sync_ms,
                    "checkpoint_records": checkpoint_records, "checkpoint_s": checkpoint_s,
                    "temporary": temporary})
                rc = lib.eng_durable_setup(eng._seg, jdir.encode(), durable[0],
                                           lib.ENG_DJ_FILE_RECORDS, durable[1], durable[2])
                if rc:
                    raise_for(rc, name=name, what="journal settings")
                assert eng._durable is not None
                eng._durable.hold(jdir)
                eng._durable.flush(5.0)   # the first file reserved: a full disk fails here
            except BaseException:
                eng.close()
                store.unlink(name, None)
                raise
        if temporary:
            eng._temporary = weakref.finalize(eng, _remove_temporary, name,
                                              store.remover(name, eng._seg), os.getpid())
        return eng

    @classmethod
    def restore(cls, directory: str | os.PathLike[str],
                name: str | None = None) -> Engine[Any, Any, Any]:
        """A new segment from the journal directory ``directory`` (shared
        memory; see docs/journal.md): the name (or ``name``), spec, capacity
        and options of meta.json, and every open position with its id,
        state, record, keys and last journaled price, the accounts, the halt
        flag; released ids stay stale; the journal continues at the next seq.
        Refused (``SegmentError``, nothing changes) if the name exists; a
        torn tail is cut and reported, corruption in the middle raises
        ``RestoreError`` naming the file and offset.  The report:
        ``eng.restore_report`` (``engine.durable.restore.RestoreReport``)."""
        if not isinstance(directory, (str, os.PathLike)) or not isinstance(
                os.fspath(directory), str):
            raise EngineTypeError(f"directory must be a str or an os.PathLike path, "
                                  f"got {shown(directory)}")
        from engine.durable.restore import restore
        return restore(cls, directory, name)  # type: ignore[no-any-return]

    @overload
    @classmethod
    def attach(cls, target: Handle[S, C, T], *, spec: None = ...,
               url: str | None = ...) -> Engine[S, C, T]: ...

    @overload
    @classmethod
    def attach(cls, target: str, *, spec: None = ..., url: str | None = ...) -> Engine: ...

    @overload
    @classmethod
    def attach(cls, target: Handle[Any, Any, Any] | str, *, spec: MachineSpec,
               url: str | None = ...) -> Engine[Any, Any, Any]: ...

    @classmethod
    def attach(cls, target: Handle[Any, Any, Any] | str, *, spec: MachineSpec | None = None,
               url: str | None = None) -> Engine[Any, Any, Any]:
        """Attach to an existing segment by handle or by name (and ``url``
        for an engine on Redis; a handle carries its url).

        The segment's machine spec must equal ``spec`` (or the handle's spec,
        or the default position lifecycle); anything else is refused.
        """
        incarnation = None
        if isinstance(target, Handle):
            name, spec, url = target.name, spec or target.spec, url or target.url
            incarnation = target.incarnation
        elif isinstance(target, str):
            name = target
        else:
            raise EngineTypeError(f"attach takes a Handle or a segment name, got {target!r}")
        spec = _check_spec(spec)
        store = backend(url)
        return cls._made(name, spec, store.url,
                         lambda eng: store.attach(eng, name, spec, incarnation))

    @property
    def store(self) -> Store:
        """The store this Engine's calls go to (see ``engine.store``):
        ``engine._native.lib`` on shared memory, a ``RedisStore`` on Redis.
        For tools: ``eng.store.eng_state(eng.seg, pos)`` is the raw call,
        with its status code and no exception."""
        return self._lib

    @property
    def seg(self) -> Seg:
        """The first argument of every ``store`` call: this attachment's
        ``eng_seg *`` on shared memory (zeroed once closed, so every call
        says ENG_ECLOSED; C writes it, read it only), the ``RedisStore``
        itself on Redis."""
        return self._seg

    @property
    def handle(self) -> Handle[S, C, T]:
        """Picklable handle for spawned workers."""
        return Handle(self.name, None if self.spec == POSITION_SPEC else self.spec, self.url,
                      None if self.url is None else self._seg.incarnation)

    @property
    def closed(self) -> bool:
        """True once closed, and in a child that inherited this Engine through fork()."""
        return not self._finalizer.alive or self._lib.eng_check(self._seg) != 0

    def close(self) -> None:
        """Detach: leave the registry and unmap.  The segment lives on.

        An Engine belongs to one thread; if another thread is inside one of
        the calls that run with the GIL released (``update_prices``,
        ``prices``, ``transition_many``, ``update_token_price``,
        ``snapshot``, ``accounts``, ``recover``, ``wait_for_change``, a
        guarded ``transition``), close waits for it, up to
        ``ENG_CLOSE_WAIT_NS``: a ``wait_for_change`` in flight ends with
        ``ClosedError`` within ``ENG_WAIT_SLICE_NS``, and such calls that
        start once close began raise ``ClosedError``.  Past the bound, close
        raises ``ClosedError`` and nothing is closed.

        An Engine made by ``create(temporary=True)`` removes its segment
        here (see ``create``)."""
        if any(e is self for e in getattr(_guard_failure, "inside", ())):
            raise ClosedError(f"engine {self.name!r} cannot be closed from inside one of its "
                              "own guards; close it after the transition returns")
        shm = self.url is None and self._finalizer.alive
        temporary = self._temporary
        if self._aio_waiter is not None:   # awaiting tasks end with ClosedError
            self._aio_waiter.close()
        if shm and self._durable is not None and self._pid == os.getpid():
            self._durable.stop()   # the writer thread first: it runs inside the close gate
            with contextlib.suppress(EngineError):   # a failed writer: what is on disk stays
                self._durable.release()   # written and fdatasynced; the lease given back
        try:
            if shm:
                self._shut_gate()
            if _fastpath is not None and self.url is None:
                _fastpath.bind(self, 0, None)   # the hot calls take the Python methods
            # the registry entry goes first, in one C call (idempotent): an
            # exception from a signal handler anywhere below can no longer leave
            # this live process holding it; at worst the unmapping waits for GC
            if temporary is not None and self.url is not None:
                temporary()   # Redis: the keys go while the connection is open
            self._lib.eng_detach(self._seg)
        except BaseException:
            # interrupted before the detach (a signal handler's exception):
            # nothing closed, so nothing half-closed either -- the gate open
            # again and the hot calls on their C view
            if shm and lib.eng_check(self._seg) == 0:
                lib.eng_gate_open(self._seg)
                if self._durable is not None:
                    self._durable.start()   # still attached: it writes (or watches) again
                if _fastpath is not None:
                    _fastpath.bind(self, int(ffi.cast("uintptr_t", self._seg)), self._seg)
            raise
        if self._finalizer.alive:
            self._finalizer()
            if self.url is None:
                self._seg = ffi.new("eng_seg *")   # zeroed: every C call says ENG_ECLOSED
        if temporary is not None:
            temporary()   # once: a finalizer runs at most once

    def _shut_gate(self) -> None:
        """Shut the close gate (native/segment.c) and wait, bounded, until no
        call is in it; on any exception the gate is open again."""
        seg, pause = self._seg, _CLOSE_POLL_S / 64
        deadline = time.monotonic() + _CLOSE_WAIT_S
        try:
            while n := lib.eng_gate_shut(seg):
                if time.monotonic() >= deadline:
                    raise ClosedError(
                        f"engine {self.name!r}: {n} call(s) in another thread did not return "
                        f"within {_CLOSE_WAIT_S:g} s (ENG_CLOSE_WAIT_NS); nothing was closed. "
                        "An Engine belongs to one thread: close it there")
                time.sleep(pause)   # releases the GIL: the calls can return
                pause = min(2 * pause, _CLOSE_POLL_S)
        except BaseException:
            lib.eng_gate_open(seg)
            raise

    def unlink(self) -> None:
        """Destroy the segment (attached processes keep their mappings).  On
        Redis: delete every key of this incarnation of the engine; every
        other Engine attached to it gets SegmentNotFoundError from then on
        (and this one too if it was unlinked or created again meanwhile)."""
        backend(self.url).unlink(self.name, self._seg)
        if self._temporary is not None:
            self._temporary.detach()   # removed: close() leaves the name alone

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"capacity={self.capacity}"
        where = f" url={redact(self.url)!r}" if self.url else ""
        return f"<Engine {self.name!r} {state} spec={self.spec.name}{where}>"

    def __reduce__(self) -> Any:
        raise TypeError("an Engine cannot be pickled: send engine.handle and call "
                        "Engine.attach(handle) in the worker")

    # -- errors ------------------------------------------------------------------------
    def _fail(self, rc: int, pos: Any = None, trigger: Any = None, price: Any = None,
              **more: Any) -> NoReturn:
        """Raise the exception for C status ``rc``."""
        slot = pos & _SLOT_MASK if isinstance(pos, int) and pos >= 0 else "?"
        if rc == lib.ENG_EBADMONEY and "money" not in more and isinstance(pos, int):
            more["money"] = self._close_money(pos)
        raise_for(rc, id=pos, slot=slot, capacity=self.capacity, trigger=trigger,
                  n_triggers=len(self.spec.triggers), spec=self.spec.name, price=price,
                  name=self.name, **more)

    def _close_money(self, pos: int, fill: float | None = None) -> str:
        """Why a booked close of ``pos`` was refused: its price (the fill
        given as exit_price, else the last price) is above the band its
        opening kept room for (see ENG_BOOK_PRICE_MULT)."""
        try:
            c: Any = self.context(pos)
            price = self.price(pos).price
            entry, amount = float(c.entry_price), float(c.amount)
        except (EngineError, AttributeError):
            return f"id {pos}: a booked close could not be booked"
        top = entry * lib.ENG_BOOK_PRICE_MULT
        what = "its last price" if fill is None else "the fill it was given (exit_price)"
        price = price if fill is None else float(fill)
        return (f"id {pos}: a booked close books {what}, {price!r}, which is above "
                f"the band its opening kept room for: (0, ENG_BOOK_PRICE_MULT "
                f"{lib.ENG_BOOK_PRICE_MULT} x entry_price {entry!r} = {top!r}] (its value "
                f"there, x amount {amount!r}, is {from_units(money_of(top, amount))}); "
                "nothing changed: " + ("write a price within the band, then close"
                                       if fill is None else "close at a fill within the band"))

    def _open_money(self, fields: Mapping[str, Any]) -> str:
        """Why an opening on an account was refused as money: the worst case
        of its close cannot be booked (see ENG_BOOK_PRICE_MULT)."""
        entry, amount = float(fields["entry_price"]), float(fields["amount"])
        side = fields.get("side", 1)
        top = entry * lib.ENG_BOOK_PRICE_MULT
        band = (f"a close is booked at a price up to ENG_BOOK_PRICE_MULT "
                f"{lib.ENG_BOOK_PRICE_MULT} x entry_price {entry!r} = {top!r}")
        try:
            notional, high = money_of(entry, amount), money_of(top, amount)
        except MoneyError:
            return (f"{band}; the position's value there, x amount {amount!r}, is beyond "
                    f"the money range [0, {from_units(UNITS_MAX)}]")
        gain, loss = (high - notional, notional) if side > 0 else (notional, high - notional)
        b = self._seg.last_books
        lo, hi = from_units(-UNITS_MAX - 1), from_units(UNITS_MAX)
        return (f"{band}, so its close may add up to {from_units(gain)} to cash and realized, "
                f"or take {from_units(loss)}; with the open positions' worst cases (gains "
                f"{from_units(b.worst_gain)}, losses {from_units(b.worst_loss)}), cash "
                f"{from_units(b.cash)} and realized {from_units(b.realized)} would leave "
                f"[{lo}, {hi}]: no room to book it; nothing changed")

    def _bad_types(self, pos: Any, **values: Any) -> EngineError:
        """The error for arguments cffi refused to convert."""
        if not isinstance(pos, int):
            return EngineTypeError(f"id must be an int from open_position, got {shown(pos)} "
                                   f"({type(pos).__name__})")
        if not 0 <= pos <= lib.ENG_ID_MAX:
            return SlotError(f"id {shown(pos)} out of range [1, {lib.ENG_ID_MAX:#x}]")
        for key, v in values.items():
            if key == "trigger":
                if not isinstance(v, int):
                    return EngineTypeError(f"trigger must be an int or a trigger name of spec "
                                           f"{self.spec.name!r}, got {shown(v)}")
                return TriggerError(f"trigger {shown(v)} out of range "
                                    f"[0, {len(self.spec.triggers)})")
            if key == "price":   # an int too large for a double
                return PriceError(f"price must be finite and > 0, got {shown(v)}")
        shown_values = ", ".join(f"{k}={shown(v)}" for k, v in values.items())
        return EngineTypeError(f"bad argument types: id={shown(pos)}, {shown_values}")

    def _trigger_index(self, trigger: Any) -> int:
        if isinstance(trigger, str):
            try:
                return self.spec.trigger_index[trigger]
            except KeyError:
                raise TriggerError(f"unknown trigger {shown(trigger)}; spec {self.spec.name!r} has "
                                   f"{list(self.spec.triggers)}") from None
        return self._index(trigger, "trigger")

    def _index(self, value: Any, what: str = "id") -> int:
        """An exact int for an integer-like value (numpy ints, IntEnum);
        anything else (floats included) is refused, never truncated."""
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        try:
            if isinstance(value, bool):
                raise TypeError
            return operator.index(value)
        except TypeError:
            allowed = {"id": "an int from open_position",
                       "slot": f"an int in [0, {self.capacity})",
                       "trigger": f"an int in [0, {len(self.spec.triggers)}) or a trigger name"}
            raise EngineTypeError(f"{what} must be {allowed[what]}, got {shown(value)} "
                                  f"({type(value).__name__})") from None

    @staticmethod
    def _price_arg(price: Any) -> float:
        """A real number as a float; complex, bool, str and the rest are refused."""
        if isinstance(price, numbers.Real) and not isinstance(price, bool):
            try:
                return float(price)
            except OverflowError:
                raise PriceError(f"price must be finite and > 0, got {shown(price)}") from None
        raise EngineTypeError(f"price must be a real number, got {shown(price)} "
                              f"({type(price).__name__})")

    # -- ids ---------------------------------------------------------------------------
    def slot_of(self, pos: int) -> int:
        """The slot index an id names (ids of one slot share it)."""
        pos = self._index(pos)
        if not 0 <= pos <= lib.ENG_ID_MAX or pos & _SLOT_MASK >= self.capacity:
            self._fail(lib.ENG_EBADSLOT, pos)
        return pos & int(_SLOT_MASK)

    def id_of(self, slot: int) -> int:
        """The id of ``slot``'s current opening (NotOpenError if it is free)."""
        slot = self._index(slot, "slot")
        if not 0 <= slot < self.capacity:
            raise SlotError(f"slot {slot} out of range [0, {self.capacity})")
        out = ffi.new("uint64_t *")
        rc = self._lib.eng_id_of(self._seg, slot, out)
        if rc:
            self._fail(rc, slot)
        return int(out[0])

    # -- positions -------------------------------------------------------------------
    def open(self, /, key: str | bytes | None = None, **fields: Any) -> int:
        """Open a position (an order, ...) on a free slot, in the spec's
        initial state, with its record ``fields`` (those not given start at
        0) and optionally a unique ``key``.  Returns its id.

        A key already held by an open position raises ``KeyExistsError``;
        any error changes nothing.  A field given as None starts at 0."""
        return self._open(key, {k: v for k, v in fields.items() if v is not None})

    def _open(self, key: str | bytes | None, fields: dict[str, Any]) -> int:
        rec = self._rec
        if rec.pnl:
            self._check_pnl_fields(fields)
        if self.spec.reopens and fields.get("account") and "account" in rec.roles:
            raise SpecError(f"spec {self.spec.name!r} lets a closed state be left "
                            f"({self.spec.reopens}): a position booked on an account is "
                            "booked at its closing once, so open it without account=")
        words = ffi.new("uint64_t[]", lib.ENG_MAX_FIELD_WORDS)
        rec.pack(fields, words)
        k = ffi.NULL if key is None else _key_bytes(key)
        out = ffi.new("uint64_t[2]")   # per call (a signal handler may open too): id, word
        try:
            rc = self._lib.eng_open(self._seg, words, k, len(k) if k else 0, out, out + 1)
            if rc:
                if "account" in rec.roles:
                    money = (self._open_money(fields) if rc == lib.ENG_EBADMONEY and rec.pnl
                             else f"entry_price x amount of {fields}")
                    self._fail_account(rc, fields.get("account"), price=fields.get("entry_price"),
                                       key=key, fields=fields, money=money)
                self._fail(rc, price=fields.get("entry_price"), key=key, fields=fields,
                           keys_per_position=self.keys_per_position)
            return int(out[0])
        except BaseException:
            # an exception (a signal handler's) after C opened it: the id
            # never reaches the caller, so give the slot back if untouched
            if out[0]:
                self._lib.eng_abandon_open(self._seg, out[0], out[1])
            raise

    def open_position(self, entry_price: float, amount: float, side: Side | int = Side.BUY,
                      token: int = 0, key: str | bytes | None = None,
                      account: int | None = None, *, stop_loss: float | None = None,
                      take_profit: float | None = None,
                      trailing_stop: float | None = None) -> int:
        """Open a position of the position spec: ``open`` with its fields.

        With ``account``, its notional |entry_price x amount| is reserved on
        that account atomically with the opening, or ``RiskLimitError`` is
        raised and nothing changes.  ``stop_loss``, ``take_profit`` and
        ``trailing_stop`` (0 or None: off) arm the exits a price write fires
        once the position is in the spec's armed state (MONITORING)."""
        if not self._rec.pnl or "token" not in self._rec.roles:
            raise ArgumentError(f"open_position needs entry_price, amount, side and token "
                                f"fields; spec {self.spec.name!r} has "
                                f"{[f.name for f in self._rec.fields]}: use open(**fields)")
        fields = {"entry_price": entry_price, "amount": amount, "side": side, "token": token}
        for name, level in (("stop_loss", stop_loss), ("take_profit", take_profit),
                            ("trailing_stop", trailing_stop)):
            if level is None:
                continue
            if name not in self._rec.types:
                raise FieldError(f"spec {self.spec.name!r} has no f8 field {name!r}; its "
                                 f"record has {[f.name for f in self._rec.fields]}")
            fields[name] = level
        if account is not None:
            if "account" not in self._rec.roles:
                raise FieldError(f"spec {self.spec.name!r} has no i8 field 'account': positions "
                                 "of it cannot be booked on an account")
            fields["account"] = self._account_id(account)
        return self._open(key, fields)

    @staticmethod
    def _check_pnl_fields(fields: dict[str, Any]) -> None:
        """The values C computes PnL from: clear errors before any packing."""
        for key in ("entry_price", "amount"):
            v = fields.get(key)
            if v is None or not _is_number(v):
                raise EngineTypeError(f"{key} must be a float, got {shown(v)}")
            if not (_finite(v) and v > 0):
                err = PriceError if key == "entry_price" else ArgumentError
                raise err(f"{key} must be finite and > 0, got {shown(v)}")
        side = fields.get("side", 1)
        if not isinstance(side, int) or isinstance(side, bool):
            raise EngineTypeError("side must be the int 1 (long) or -1 (short), "
                                  f"got {shown(side)}")
        if side not in (1, -1):
            raise ArgumentError(f"side must be 1 (long) or -1 (short), got {shown(side)}")
        fields.setdefault("side", 1)

    # -- keys --------------------------------------------------------------------------
    def bind_key(self, pos: int, key: str | bytes) -> None:
        """Give open position ``pos`` another unique key (up to
        ``keys_per_position``).  ``KeyExistsError`` if an open position
        has it, ``KeyLimitError`` if ``pos`` has all its keys; either way
        nothing changes."""
        if pos.__class__ is not int:
            pos = self._index(pos)
        k = _key_bytes(key)
        try:
            rc = self._lib.eng_bind_key(self._seg, pos, k, len(k))
        except EngineError:
            raise   # the backend's own refusal (an ArgumentError is a ValueError too)
        except _CONVERSION_ERRORS:
            raise self._bad_types(pos) from None
        if rc:
            self._fail(rc, pos, key=key, keys_per_position=self.keys_per_position)

    def lookup(self, key: str | bytes) -> int | None:
        """The id of the open position that has ``key``, or None.  Never
        blocks, never takes a lock, never returns a released opening."""
        try:
            k = key.encode() if key.__class__ is str else _key_bytes(key)
        except UnicodeEncodeError:
            k = _key_bytes(key)   # raises the engine's error
        rc = self._lookup(self._seg, k, len(k))
        if rc > 0:
            return rc
        if rc == 0:
            return None
        _key_bytes(key)   # a bad key (too long, empty) raises its own error first
        self._fail(rc, key=key)

    def keys(self, pos: int) -> tuple[str | bytes, ...]:
        """The keys of open position ``pos``, in the order they were bound
        (str where the bytes are UTF-8, else bytes)."""
        if pos.__class__ is not int:
            pos = self._index(pos)
        n_max = max(self.keys_per_position, 1)
        out = ffi.new("eng_key[]", n_max)
        n = ffi.new("uint32_t *")
        try:
            rc = self._lib.eng_keys(self._seg, pos, out, n_max, n)
        except _CONVERSION_ERRORS:
            raise self._bad_types(pos) from None
        if rc:
            self._fail(rc, pos)
        return tuple(key_value(ffi.buffer(out[i].key)[:out[i].len]) for i in range(n[0]))

    def release_position(self, pos: int) -> Outcome:
        """Return a closed position's slot to the free pool; ``pos`` goes stale."""
        if pos.__class__ is not int:   # cffi would truncate a numpy float
            pos = self._index(pos)
        try:
            rc = self._lib.eng_release_position(self._seg, pos)
        except _CONVERSION_ERRORS:
            raise self._bad_types(pos) from None
        return _OUTCOMES[rc] if rc >= 0 else self._fail(rc, pos)

    # -- transitions -------------------------------------------------------------------
    def transition(self, pos: int, trigger: int | T, /, **fields: Any) -> Outcome:
        """Fire ``trigger`` on position ``pos``.  ``fields`` (record fields of
        the spec, e.g. ``exit_reason=3``) are set atomically with the state
        change: every reader sees both or neither."""
        if fields:
            return self._transition_slow(pos, trigger, fields)
        if pos.__class__ is not int:   # cffi would truncate a numpy float
            pos = self._index(pos)
        if trigger.__class__ not in self._trigger_types:
            trigger = self._trigger_index(trigger)
        try:   # (a str trigger is its index by now: mypy cannot see the __class__ test)
            rc = self._transition(self._seg, pos, trigger)  # type: ignore[arg-type]
        except _CONVERSION_ERRORS:
            raise self._bad_types(pos, trigger=trigger) from None
        if rc >= 0:
            return _OUTCOMES[rc]
        if rc == lib.ENG_EGUARDED:
            return self._transition_slow(pos, trigger, {})
        self._fail(rc, pos, trigger)

    def _transition_failed(self, rc: int, pos: int, trigger: int) -> Outcome:
        """The fast path's transition that did not simply finish."""
        if rc == lib.ENG_EGUARDED:
            return self._transition_slow(pos, trigger, {})
        self._fail(rc, pos, trigger)

    def _update_price_failed(self, rc: int, pos: int, price: float) -> None:
        self._fail(rc, pos, price=price)

    def _price_failed(self, rc: int, pos: int) -> PriceSnapshot:
        self._fail(rc, pos)

    def _fill_update(self, fields: Mapping[str, Any]) -> Any:
        """The update for ``fields`` (a field given as None is left as it is)."""
        rec = self._rec
        fields = {k: v for k, v in fields.items() if v is not None}
        if not rec.fixed.isdisjoint(fields):
            raise FieldError(f"{sorted(rec.fixed.intersection(fields))} are set at open only; "
                             f"a transition may set "
                             f"{[f.name for f in rec.fields if f.name not in rec.fixed]}")
        u = ffi.new("eng_ctx_update *")   # per call: a signal handler may transition too
        u.mask = rec.pack(fields, u.w)
        return u

    def _transition_slow(self, pos: Any, trigger: Any, fields: Mapping[str, Any]) -> Outcome:
        if pos.__class__ is not int:   # cffi would truncate a numpy float
            pos = self._index(pos)
        if trigger.__class__ not in self._trigger_types:
            trigger = self._trigger_index(trigger)
        update = self._fill_update(fields) if fields else ffi.NULL
        try:
            rc = self._lib.eng_transition_ctx(self._seg, pos, trigger, update)
        except _CONVERSION_ERRORS:
            raise self._bad_types(pos, trigger=trigger) from None
        if rc == lib.ENG_EGUARDED:
            _take_guard_failure()   # drop one left by a call a signal interrupted
            inside = _guard_failure.__dict__.setdefault("inside", [])
            inside.append(self)
            try:
                rc = self._lib.eng_guard_transition(self._seg, pos, trigger, update,
                                              lib._engine_guard, ffi.new_handle(self))
            finally:
                inside.pop()
            failure = _take_guard_failure()
            if failure is not None:
                raise failure
        if rc == lib.ENG_EBADMONEY and _is_number(fields.get("exit_price")) \
                and fields["exit_price"] > 0:   # booked at the fill given: name it
            self._fail(rc, pos, trigger, money=self._close_money(pos, fields["exit_price"]))
        return _OUTCOMES[rc] if rc >= 0 else self._fail(rc, pos, trigger)

    def state(self, pos: int) -> S:
        """The position's current state (a ``State`` for the default lifecycle)."""
        if pos.__class__ is not int:   # cffi would truncate a numpy float
            pos = self._index(pos)
        try:
            rc = self._state(self._seg, pos)
        except _CONVERSION_ERRORS:
            raise self._bad_types(pos) from None
        return self._states[rc] if rc > 0 else self._fail(rc, pos)  # type: ignore[return-value]

    def state_word(self, slot: int) -> int:
        """The raw 64-bit state word of a SLOT (bit layout in native/engine.h)."""
        slot = self._index(slot, "slot")
        if not 0 <= slot < self.capacity:
            raise SlotError(f"slot {slot} out of range [0, {self.capacity})")
        out = ffi.new("uint64_t *")
        rc = self._lib.eng_state_word(self._seg, slot, out)
        if rc:
            self._fail(rc, slot)
        return int(out[0])

    # -- prices and context ---------------------------------------------------------
    def update_price(self, pos: int, price: float) -> None:
        """Publish a new price; PnL is computed in C from the context."""
        if pos.__class__ is not int:   # cffi would truncate a numpy float
            pos = self._index(pos)
        if price.__class__ is not float:
            price = self._price_arg(price)
        try:
            rc = self._update_price(self._seg, pos, price)
        except _CONVERSION_ERRORS:
            raise self._bad_types(pos, price=price) from None
        if rc:
            self._fail(rc, pos, price=price)

    def price(self, pos: int) -> PriceSnapshot:
        """A consistent price record of this opening (never torn)."""
        if pos.__class__ is not int:   # cffi would truncate a numpy float
            pos = self._index(pos)
        # take the Engine's buffer; a signal handler's nested call makes its own
        out, view = self._price_buf or _new_out("eng_price_out *")
        self._price_buf = None
        try:
            rc = self._read_price(self._seg, pos, out)
            values = None if rc else _unpack_price(view)   # read before the buffer is given back
        except _CONVERSION_ERRORS:
            raise self._bad_types(pos) from None
        finally:
            self._price_buf = out, view
        if rc:
            self._fail(rc, pos)
        return _tuple_new(PriceSnapshot, values)  # type: ignore[arg-type]

    def context(self, pos: int) -> C:
        """A consistent record of this opening: a named tuple of the spec's
        fields and its ``version`` (``Context`` for the position spec)."""
        if pos.__class__ is not int:   # cffi would truncate a numpy float
            pos = self._index(pos)
        # take the Engine's buffer; a signal handler's nested call makes its own
        out, view = self._ctx_buf or _new_out("eng_ctx_out *")
        self._ctx_buf = None
        try:
            rc = self._lib.eng_read_context(self._seg, pos, out)
            values = None if rc else self._rec.unpack(view)   # read before the buffer is given back
        except _CONVERSION_ERRORS:
            raise self._bad_types(pos) from None
        finally:
            self._ctx_buf = out, view
        if rc or values is None:
            self._fail(rc, pos)
        return _tuple_new(self._rec.Context, values)  # type: ignore[return-value]

    def update_prices(self, ids: npt.ArrayLike, prices: npt.ArrayLike) -> int:
        """Publish many prices in one C call; returns how many were written.

        The arrays are checked first, without reading a position: one id out
        of range or never issued (opening 0), or one price not finite and
        > 0, refuses the whole batch with its index.  Then each id is written
        as ``update_price`` would, except that an id whose opening is not
        open when its turn comes (released, even if its slot was reopened;
        or not issued yet) is skipped: nothing is written to its slot, and
        it is not counted."""
        try:
            s = np.asarray(ids)
            p = np.asarray(prices)
        except (TypeError, ValueError) as e:
            raise EngineTypeError(f"ids and prices must be 1-D numeric arrays: {e}") from None
        if s.ndim != 1 or p.ndim != 1:
            raise ArgumentError(f"ids and prices must be 1-D, got shapes {s.shape} and {p.shape}")
        if len(s) != len(p):
            raise ArgumentError(f"ids and prices differ in length: {len(s)} != {len(p)}")
        if s.dtype.kind not in "iu":
            raise EngineTypeError(f"ids must be an integer array, got dtype {s.dtype}")
        if p.dtype.kind != "f":
            raise EngineTypeError(f"prices must be a float array, got dtype {p.dtype}")
        if len(s) == 0:
            return 0
        if s.dtype.kind == "i" and int(s.min()) < 0:
            i = int(np.argmin(s))
            raise SlotError(f"id {int(s[i])} out of range [1, {lib.ENG_ID_MAX:#x}] at index {i}")
        s = np.ascontiguousarray(s, dtype=np.uint64)
        p = np.ascontiguousarray(p, dtype=np.float64)
        out = ffi.new("uint64_t[2]")
        rc = self._lib.eng_update_prices(self._seg, ffi.from_buffer("uint64_t[]", s),
                                   ffi.from_buffer("double[]", p), len(s), out, out + 1)
        if rc:
            if rc in (lib.ENG_ECLOSED, lib.ENG_EFORKED, lib.ENG_EBADARG):
                self._fail(rc)
            i = int(out[0])
            done = (f"{int(out[1])} before it were written" if rc == lib.ENG_EBUSY
                    else "nothing in the batch was written")
            try:
                self._fail(rc, int(s[i]), price=float(p[i]))
            except EngineError as e:
                raise type(e)(f"{e} (at index {i}; {done})") from None
        return int(out[1])

    # -- vector calls: one C call per array ----------------------------------------------
    def _id_array(self, ids: npt.ArrayLike, name: str = "ids") -> np.ndarray:
        """ids as a contiguous uint64 array; a negative id is refused with its index."""
        try:
            s = np.asarray(ids)
        except (TypeError, ValueError) as e:
            raise EngineTypeError(f"{name} must be a 1-D integer array: {e}") from None
        if s.ndim != 1:
            raise ArgumentError(f"{name} must be 1-D, got shape {s.shape}")
        if s.dtype.kind not in "iu":
            if s.size == 0:
                return np.zeros(0, dtype=np.uint64)
            raise EngineTypeError(f"{name} must be an integer array, got dtype {s.dtype}")
        if s.dtype.kind == "i" and len(s) and int(s.min()) < 0:
            i = int(np.argmin(s))
            raise SlotError(f"id {int(s[i])} out of range [1, {lib.ENG_ID_MAX:#x}] at index {i}")
        return np.ascontiguousarray(s, dtype=np.uint64)

    def _fail_at(self, rc: int, i: int, ids: np.ndarray, **values: Any) -> NoReturn:
        """Raise for element i of a refused vector call (nothing was applied)."""
        if rc in (lib.ENG_ECLOSED, lib.ENG_EFORKED, lib.ENG_EBADARG):
            self._fail(rc)
        try:
            self._fail(rc, int(ids[i]), **values)
        except EngineError as e:
            raise type(e)(f"{e} (at index {i}; the call was refused as a whole)") from None

    def states(self, ids: npt.ArrayLike) -> np.ndarray:
        """The one-hot state codes (uint16) of many open positions, in one C call.

        One bad, stale or never-issued id refuses the whole call; the error
        names its index."""
        s = self._id_array(ids)
        out = np.empty(len(s), dtype=np.uint16)
        bad = ffi.new("uint64_t *")
        rc = self._lib.eng_states(self._seg, ffi.from_buffer("uint64_t[]", s), len(s),
                            ffi.from_buffer("uint16_t[]", out, require_writable=True), bad)
        if rc:
            self._fail_at(rc, int(bad[0]), s)
        return out

    def prices(self, ids: npt.ArrayLike) -> np.ndarray:
        """Consistent price records of many open positions, in one C call: a
        structured array with fields price, ts_ns, pnl_pct, pnl_usd, version
        (each row as ``price(id)`` gives it).  One bad id refuses the call."""
        s = self._id_array(ids)
        out = np.zeros(len(s), dtype=PRICES_DTYPE)
        bad = ffi.new("uint64_t *")
        buf = ffi.cast("eng_price_out *", ffi.from_buffer(out, require_writable=True))
        rc = self._lib.eng_prices(self._seg, ffi.from_buffer("uint64_t[]", s), len(s),
                                     buf, bad)
        if rc:
            self._fail_at(rc, int(bad[0]), s)
        return out

    def transition_many(self, ids: npt.ArrayLike, triggers: Any) -> np.ndarray:
        """Fire ``triggers[i]`` on ``ids[i]`` for every i in one C call; returns
        the outcomes as uint8 codes of ``Outcome``.  ``triggers`` is an integer
        array of the same length, or one trigger (int or name) for all.

        Every element is checked first (id open, trigger in range, its rule
        from the current state not guarded); one bad element refuses the whole
        call with its index and nothing applied.  Then each element is applied
        independently, as ``transition`` would: a position released meanwhile
        gets ``Outcome.INVALID``, one moved meanwhile to a state where its rule
        is guarded gets ``Outcome.CONFLICT`` (use ``transition`` for guards).
        An element that fails with an error (a booked close refused,
        ``BusyError``, ...) raises that error after every element was tried,
        naming the first such index; the exception's ``outcomes`` holds every
        element's outcome (a failed one: ``ENG_MANY_ERROR | -code``)."""
        s = self._id_array(ids)
        n_trig = len(self.spec.triggers)
        if isinstance(triggers, (str, int)) and not isinstance(triggers, bool):
            t = np.full(len(s), self._trigger_index(triggers), dtype=np.int64)
        else:
            try:
                t = np.asarray(triggers)
            except (TypeError, ValueError) as e:
                raise EngineTypeError(f"triggers must be a 1-D integer array: {e}") from None
            if t.ndim != 1 or len(t) != len(s):
                raise ArgumentError(f"triggers must be 1-D with the length of ids ({len(s)}), "
                                    f"got shape {t.shape}")
            if t.dtype.kind not in "iu" and len(t):
                raise EngineTypeError(f"triggers must be an integer array, got dtype {t.dtype}")
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= n_trig):
            i = int(np.argmin(t)) if int(t.min()) < 0 else int(np.argmax(t))
            raise TriggerError(f"trigger {int(t[i])} out of range [0, {n_trig}) at index {i}")
        t = np.ascontiguousarray(t, dtype=np.uint32)
        out = np.empty(len(s), dtype=np.uint8)
        bad = ffi.new("uint64_t *")
        rc = self._lib.eng_transition_many(
            self._seg, ffi.from_buffer("uint64_t[]", s), ffi.from_buffer("uint32_t[]", t),
            len(s), ffi.from_buffer("uint8_t[]", out, require_writable=True), bad)
        if rc == lib.ENG_EGUARDED:
            i = int(bad[0])
            raise ArgumentError(f"trigger {self.spec.triggers[int(t[i])]!r} has a guarded rule "
                                f"from the current state of id {int(s[i])} (at index {i}): "
                                f"use transition(); the call was refused as a whole")
        if rc:
            self._fail_at(rc, int(bad[0]), s, trigger=int(t[int(bad[0])]))
        if bad[0] < len(s):   # C names the first element that failed (n: none)
            self._many_failed(out, s, t)
        return out

    def _many_failed(self, out: np.ndarray, ids: np.ndarray, triggers: np.ndarray) -> NoReturn:
        """Raise for the first element of transition_many that failed with an
        error; ``outcomes`` on the exception holds every element's."""
        failed = np.flatnonzero(out >= _MANY_ERROR)
        i = int(failed[0])
        try:
            self._fail(-(int(out[i]) & ~_MANY_ERROR), int(ids[i]), int(triggers[i]))
        except EngineError as e:
            e.args = (f"transition_many: element {i} (id {int(ids[i])}, trigger "
                      f"{self.spec.triggers[int(triggers[i])]!r}) failed: {e}; {len(failed)} "
                      f"element(s) failed (indexes {failed[:10].tolist()}), every other was "
                      "applied as its outcome says: see .outcomes, where a failed element "
                      "holds ENG_MANY_ERROR | -code",)
            e.outcomes = out
            raise

    def _tindex_check(self) -> tuple[int, int, int, int]:
        """Token index audit (exact at a quiescent point): (open slots missing
        from their chain, chain entries of free slots, misplaced or corrupt
        entries, entries in all chains)."""
        out = ffi.new("uint64_t[4]")
        rc = lib.eng_tindex_check(self._seg, out)
        if rc:
            self._fail(rc)
        return int(out[0]), int(out[1]), int(out[2]), int(out[3])

    def _tindex_slots(self, token: int) -> list[int]:
        """The slots on ``token``'s chain whose token is ``token`` (free ones too)."""
        out = ffi.new("uint32_t[]", self.capacity)
        n = ffi.new("uint32_t *")
        rc = lib.eng_tindex_slots(self._seg, token, out, self.capacity, n)
        if rc:
            self._fail(rc)
        return [int(out[i]) for i in range(n[0])]

    def update_token_price(self, token: int, price: float) -> int:
        """Publish ``price`` to every open position on ``token``; returns the count.

        ``BusyError`` if a live writer held the token's chain or one of its
        positions past the bound: every other open position on it got the price."""
        if not isinstance(token, int) or isinstance(token, bool):
            raise EngineTypeError(f"token must be an int, got {shown(token)} "
                                  f"({type(token).__name__})")
        if not _INT64[0] <= token <= _INT64[1]:
            raise ArgumentError(f"token must be an int in [{_INT64[0]}, {_INT64[1]}], "
                                f"got {shown(token)}")
        if price.__class__ is not float:
            price = self._price_arg(price)
        if "token" not in self._rec.roles:
            raise FieldError(f"spec {self.spec.name!r} has no i8 field 'token'")
        n = self._lib.eng_update_token_price(self._seg, token, price)
        if n == lib.ENG_EBUSY:
            raise BusyError(f"update_token_price({token}): a live writer held the token's chain "
                            "or a position on it past the bound; every other open position on "
                            "it got the price (none if the chain was held)")
        return int(n) if n >= 0 else self._fail(int(n), price=price)

    # -- accounts --------------------------------------------------------------------
    def _account_id(self, account: Any) -> int:
        """An account id as an exact int; out of range: UnknownAccountError."""
        if isinstance(account, bool) or not isinstance(account, int):
            try:
                if isinstance(account, bool):
                    raise TypeError
                account = operator.index(account)
            except TypeError:
                raise EngineTypeError(f"account must be an int from open_account, got "
                                      f"{shown(account)} ({type(account).__name__})") from None
        account = int(account)
        if not 1 <= account <= lib.ENG_ACCOUNT_ID_MAX or account & _SLOT_MASK >= self.max_accounts:
            self._fail_account(lib.ENG_EBADACCOUNT, account)
        return int(account)

    def _fail_account(self, rc: int, account: Any, **more: Any) -> NoReturn:
        """Raise for an account call's status; a RiskLimitError names the
        limit and the numbers it was checked against (C keeps them)."""
        numbers = ""
        limit = _RISK_LIMITS.get(rc)
        if limit:
            b, need = self._seg.last_books, from_units(self._seg.last_amount)
            if limit == "halted":
                numbers = (f" (realized {from_units(b.realized)}, max_loss "
                           f"{from_units(b.max_loss)})")
                _log_halted(self.name, int(account), int(b.realized), int(b.max_loss))
            elif limit == "exposure":
                numbers = (f": reserved {from_units(b.reserved)} + notional {need} > "
                           f"max_exposure {from_units(b.max_exposure)}")
            elif limit == "count":
                numbers = (f": open_positions {b.open_positions} + 1 > max_positions "
                           f"{b.max_positions}")
            else:
                cash, reserved = from_units(b.cash), from_units(b.reserved)
                numbers = (f": needs {need}, available = cash {cash} - reserved {reserved} "
                           f"= {cash - reserved}")
        try:
            raise_for(rc, account=account, numbers=numbers, max_accounts=self.max_accounts,
                      name=self.name, capacity=self.capacity, **more)
        except RiskLimitError as e:
            e.limit = limit or ""
            e.books = self._seg.last_books and account_from_row(
                ffi.new("eng_account_row *", {"id": account, "b": self._seg.last_books}))
            raise

    def _account_call(self, rc: int, account: int | None, **more: Any) -> None:
        if rc:
            self._fail_account(rc, account, **more)

    def open_account(self, cash: Any, max_exposure: Any, max_positions: int, max_loss: Any,
                     key: str | bytes | None = None) -> int:
        """Open an account with ``cash`` and its limits; returns its id.

        ``max_exposure``: the most its open positions may reserve in all;
        ``max_positions``: how many may be open; ``max_loss``: realized losses
        reaching it halt the account.  ``key`` (str or bytes, as a position
        key) names it for other processes (``lookup_account``): unique among
        open accounts, ``KeyExistsError`` if an open account has it, and then
        nothing changes."""
        units = [to_units(v, what) for v, what in ((cash, "cash"), (max_exposure, "max_exposure"),
                                                  (max_loss, "max_loss"))]
        if isinstance(max_positions, bool) or not isinstance(max_positions, int):
            raise EngineTypeError(f"max_positions must be an int, got {shown(max_positions)}")
        if not 0 <= max_positions <= 2**32 - 1:
            raise ArgumentError(f"max_positions must be in [0, {2**32 - 1}], "
                                f"got {shown(max_positions)}")
        k = ffi.NULL if key is None else _key_bytes(key)
        out = ffi.new("uint64_t *")
        rc = self._lib.eng_open_account(self._seg, units[0], units[1], max_positions, units[2],
                                        k, len(k) if k else 0, out)
        if rc == lib.ENG_EKEYEXISTS and key is not None:
            raise KeyExistsError(f"account key {key!r} already names open account "
                                 f"{self.lookup_account(key)}; nothing was changed")
        self._account_call(rc, None, money=f"cash={shown(cash)}, "
                                            f"max_exposure={shown(max_exposure)}, "
                                            f"max_loss={shown(max_loss)}")
        return int(out[0])

    def lookup_account(self, key: str | bytes) -> int | None:
        """The id of the open account that has ``key`` (``open_account(key=)``),
        or None.  Never blocks, never takes a lock; a closed account's key
        names nothing."""
        k = _key_bytes(key)
        rc = self._lib.eng_lookup_account(self._seg, k, len(k))
        if rc > 0:
            return int(rc)
        if rc == 0:
            return None
        self._fail(int(rc), key=key)

    def close_account(self, account: int) -> Account:
        """Close an account with no open position; its id goes stale.
        Returns its last books."""
        try:
            last: Account | None = self.account(account)
        except StaleAccountError:
            last = None   # closed already; on Redis maybe by this call's first try (below)
        account = self._account_id(account)
        self._account_call(self._lib.eng_close_account(self._seg, account), account)
        if last is None:   # Redis: made again after a lost reply, its first reply's books
            last = account_from_row(self._seg.last_closed)
        return last

    def account(self, account: int) -> Account:
        """A consistent read of the account's books; never waits.  A position
        booking shows exactly when its state change does."""
        account = self._account_id(account)
        row = ffi.new("eng_account_row *")
        self._account_call(self._lib.eng_read_account(self._seg, account, row), account)
        return account_from_row(row)

    def deposit(self, account: int, amount: Any) -> None:
        """Add ``amount`` (>= 0) to the account's cash."""
        account = self._account_id(account)
        units = to_units(amount, "amount")
        rc = self._lib.eng_deposit(self._seg, account, units)
        if rc == lib.ENG_EBADMONEY:
            b = self._seg.last_books
            cash, room, dep = b.cash + units, b.cash + units + b.worst_gain, b.deposits + units
            what = (f"deposits {from_units(b.deposits)} + amount = {from_units(dep)}"
                    if cash <= UNITS_MAX and room <= UNITS_MAX else
                    f"cash {from_units(b.cash)} + amount + the open positions' worst-case "
                    f"gains {from_units(b.worst_gain)} = {from_units(room)}")
            self._fail_account(rc, account, money=f"amount {shown(amount)}: {what} is beyond the "
                                                  f"money range's top {from_units(UNITS_MAX)}; "
                                                  "nothing changed")
        self._account_call(rc, account, money=f"amount={shown(amount)}")

    def withdraw(self, account: int, amount: Any) -> None:
        """Take ``amount`` (>= 0) from the account's cash; never below what is
        reserved (RiskLimitError, limit "cash")."""
        account = self._account_id(account)
        units = to_units(amount, "amount")
        self._account_call(self._lib.eng_withdraw(self._seg, account, units), account,
                           money=f"amount={shown(amount)}")

    def halt_account(self, account: int, on: bool = True) -> None:
        """Halt (or resume) openings against the account; closings go on."""
        account = self._account_id(account)
        if not isinstance(on, bool):
            raise EngineTypeError(f"on must be a bool, got {shown(on)}")
        self._account_call(self._lib.eng_halt_account(self._seg, account, 1 if on else 0), account)

    def update_account(self, account: int, fn: Any) -> Account:
        """Optimistic versioned update of the account's limits and halt flag.

        ``fn(Account)`` returns a new ``Account`` (``_replace``) or a dict of
        changed ``max_exposure``, ``max_positions``, ``max_loss``, ``halted``.
        The change applies only if the version is still the one ``fn`` saw;
        otherwise ``fn`` runs again on a fresh read, with back-off, up to
        32 tries (then BusyError).  Conflicts and retries show in
        ``metrics()["account"]``.  Returns the books after the change."""
        account = self._account_id(account)
        if not callable(fn):
            raise EngineTypeError(f"fn must be callable, got {shown(fn)}")
        # Redis: the same call made again after ServerError (same account, the
        # same fn: one object, or one expression with equal captured values)
        # first sends its lost try as it was, the same request: the server
        # answers with its first reply if it ran (fn is not applied twice), or
        # runs it now against the version that fn saw
        again, self._update_again = self._update_again, None
        if again is not None and again[0] == account and _same_fn(again[1], fn):
            try:
                rc = self._lib.eng_update_account(self._seg, account, *again[2])
            except ServerError:
                self._update_again = again   # still not known: made again, it is sent again
                raise
            if rc == 0:
                return self.account(account)
            if rc != lib.ENG_EVERSION:
                self._fail_account(rc, account)
        for attempt in range(_ACCOUNT_TRIES):
            seen = self.account(account)
            new = fn(seen)
            if isinstance(new, Account):
                moved = [f for f in Account._fields if f not in LIMITS
                         and getattr(new, f) != getattr(seen, f)]
                if moved:
                    raise ArgumentError(f"update_account changes only {list(LIMITS)}; fn "
                                        f"changed {moved} (cash moves by deposit/withdraw)")
                change = {f: getattr(new, f) for f in LIMITS}
            elif isinstance(new, Mapping):
                unknown = sorted(set(new) - set(LIMITS))
                if unknown:
                    raise ArgumentError(f"update_account changes only {list(LIMITS)}, got "
                                        f"{unknown}")
                change = {f: new.get(f, getattr(seen, f)) for f in LIMITS}
            else:
                raise EngineTypeError(f"fn must return an Account or a dict, got {new!r:.60}")
            mp, halted = change["max_positions"], change["halted"]
            if isinstance(mp, bool) or not isinstance(mp, int) or not 0 <= mp <= 2**32 - 1:
                raise ArgumentError(f"max_positions must be an int in [0, {2**32 - 1}], "
                                    f"got {shown(mp)}")
            if not isinstance(halted, bool):
                raise EngineTypeError(f"halted must be a bool, got {shown(halted)}")
            exposure = to_units(change["max_exposure"], "max_exposure")
            loss = to_units(change["max_loss"], "max_loss")
            sent = (seen.version, exposure, mp, loss, 1 if halted else 0, attempt)
            try:
                rc = self._lib.eng_update_account(self._seg, account, *sent)
            except ServerError:
                self._update_again = (account, fn, sent)
                raise
            if rc == 0:
                return self.account(account)
            if rc != lib.ENG_EVERSION:
                self._fail_account(rc, account)
            time.sleep(min(_ACCOUNT_BACKOFF_S * 2**attempt, 2e-3) * (0.5 + random.random()))
        raise BusyError(f"update_account({account}): the version moved on each of "
                        f"{_ACCOUNT_TRIES} tries; nothing was changed")

    def accounts(self) -> np.ndarray:
        """Every open account as one row of a structured array (``id``,
        ``version``, ``latched`` and the books; money columns in int64 units
        of 1 / ENG_MONEY_SCALE).  Each row is one consistent read."""
        rows = np.zeros(self.max_accounts, dtype=ACCOUNT_ROW_DTYPE)
        n = ffi.new("uint32_t *")
        rc = self._lib.eng_accounts(self._seg, ffi.from_buffer("eng_account_row[]", rows,
                                                         require_writable=True),
                              self.max_accounts, n)
        if rc:
            self._fail(rc)
        return rows[: int(n[0])]

    # -- waiting, snapshots, metrics, recovery ---------------------------------------
    def wait_for_change(self, pos: int, timeout: float = 1.0) -> S:
        """Block until a transition commits on ``pos``; return the new state.

        Raises ``WaitTimeout`` (a ``TimeoutError``) when ``timeout`` seconds pass
        first, ``StaleIdError`` if the position was released meanwhile.  Ctrl-C
        and other signals are handled while waiting.
        """
        if not (_is_number(timeout) and _finite(timeout) and timeout >= 0):
            raise ArgumentError("timeout must be a finite number of seconds >= 0, "
                                f"got {shown(timeout)}")
        if pos.__class__ is not int:   # cffi would truncate a numpy float
            pos = self._index(pos)
        deadline = time.monotonic() + min(timeout, _MAX_TIMEOUT_S)
        since = -1   # C: the state word at entry
        out = ffi.new("int64_t *")
        while True:   # close() from another thread ends it: ENG_ECLOSED
            left = max(0, int((deadline - time.monotonic()) * 1e9))
            try:
                rc = self._lib.eng_wait_change(self._seg, pos, since, left, out)
            except _CONVERSION_ERRORS:
                raise self._bad_types(pos) from None
            if rc == lib.ENG_APPLIED:
                return self.state(pos)
            if rc == lib.ENG_EINTR:      # signal handlers run here, between calls
                since = int(out[0])
                continue
            self._fail(rc, pos, timeout=timeout)

    # -- the journal on disk --------------------------------------------------------
    def _writer(self) -> Writer:
        w = self._durable
        if w is None:
            raise ArgumentError(f"engine {self.name!r} has no journal directory (create it with "
                                "journal='/path/dir')")
        return w

    def flush(self, timeout: float = 5.0) -> int:
        """fdatasync every change committed before the call to the journal
        files; returns the journal seq of the last of them (every record <= it
        is on disk, and it ends a commit: a restore gives every change up to
        it back).  Any process may call it.  ``WaitTimeout`` if the writer did not write
        them within ``timeout`` s; ``DurabilityError`` if it failed."""
        if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                or not 0 <= timeout < float("inf")):
            raise ArgumentError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
        return self._writer().flush(float(timeout))

    @property
    def durable_seq(self) -> int:
        """Every change with journal seq <= it is fdatasynced to the files,
        whole: it ends a commit (a restore keeps a commit whole or not at
        all), so a power cut gives back every change up to it."""
        return int(self._writer().info().durable_seq)

    def checkpoint(self) -> int:
        """Write a checkpoint now (one frame per object); returns its start
        seq: a restore applies it, then replays every record after it."""
        return self._writer().checkpoint()

    # -- the journal ---------------------------------------------------------------
    def _journal_source(self) -> JournalSource:
        """This backend's journal reader (a new one per caller: it owns a buffer)."""
        return journal_source(self)

    @property
    def journal_seq(self) -> int:
        """The seq of the last committed record (0: none yet)."""
        return self._journal_source().seq()

    def events(self, since: int | None = None, timeout: float | None = None,
               spin_us: float | None = None) -> Iterator[Event]:
        """Every committed change as an ``Event``, in seq order.

        ``since=None`` starts at the next change; ``since=N`` yields every
        retained record with seq > N (``JournalLappedError``, with
        ``resume_seq``, if one of them was overwritten: never a silent gap).
        The iterator ends after ``timeout`` seconds with nothing new;
        ``timeout=None`` waits forever.  Ctrl-C and other signals are handled
        while it waits.  With nothing to read it keeps looking for
        ``spin_us`` microseconds before it sleeps (None: the default,
        ``ENG_JOURNAL_SPIN_US``, on Redis 0: a look there is a round trip;
        0: sleep at once; at most ``ENG_JOURNAL_SPIN_MAX_US``): a commit
        inside that window is seen without a wake-up, at the price of a busy
        core (docs/journal.md)."""
        if spin_us is None and self.url is not None:
            spin_us = 0
        return follow(self._journal_source(), since, timeout, spin_us)

    def events_async(self, since: int | None = None,
                     timeout: float | None = None) -> AsyncIterator[Event]:
        """``events`` for asyncio (``async for ev in eng.events_async()``).
        Reads never block the loop; every subscriber of this Engine is woken
        by one shared helper thread, whatever their number."""
        waker = self.__dict__.get("_journal_waker")
        if waker is None:
            waker = self._journal_waker = JournalWaker(self._journal_source())
        return follow_async(self._journal_source(), waker, since, timeout)

    def read_events(self, since: int, max: int = 4096) -> Any:
        """Up to ``max`` retained records with seq > ``since`` as one numpy
        structured array (``engine.journal.EVENT_DTYPE``: columns ``seq``,
        ``ts_ns``, ``kind`` (an index into ``KINDS``), ``id``, ``state``,
        ``trigger``, and the record's words ``w`` and ``version``), in seq
        order; empty when there is nothing after ``since``.  Never blocks
        (``events()`` waits).  For consumers that want columns: no Python
        object per record.  ``JournalLappedError`` (with ``resume_seq``) if
        a record after ``since`` was overwritten, as ``events()``."""
        reader = self.__dict__.get("_journal_reader")   # its buffer, kept between calls
        if reader is None:
            reader = self._journal_reader = self._journal_source()
        return read_array(reader, since, max)

    def wait_for(self, pos: int, states: Any, timeout: float | None = None) -> Any:
        """Block until the position's state is one of ``states``; return it.

        ``states``: a state (``State.CLOSED``, its one-hot int, or its name)
        or an iterable of them.  The state is checked before every sleep, and
        the sleep ends at the first commit after that check (on the state
        word it read), so a change that lands between the check and the
        sleep is never missed -- unlike ``while eng.state(pos) is not X:
        eng.wait_for_change(pos)``.  A state passed through meanwhile
        (``X`` and out again before this process looked) is not seen: follow
        ``events()`` for every change.  ``timeout=None`` waits forever.

        Raises ``WaitTimeout`` (a ``TimeoutError``) when ``timeout`` seconds
        pass first, ``StaleIdError`` if the position is released meanwhile.
        Ctrl-C and other signals are handled while waiting.
        """
        mask = self._state_mask(states)
        limit = self._wait_timeout(timeout)
        if pos.__class__ is not int:   # cffi would truncate a numpy float
            pos = self._index(pos)
        deadline = time.monotonic() + limit
        out = ffi.new("int64_t *")
        while True:   # close() from another thread ends it: ENG_ECLOSED
            left = max(0, int((deadline - time.monotonic()) * 1e9))
            try:
                rc = self._wait_for(self._seg, pos, mask, left, out)
            except _CONVERSION_ERRORS:
                raise self._bad_types(pos) from None
            if rc == lib.ENG_APPLIED:
                return self._states[int(out[0])]
            if rc == lib.ENG_EINTR:      # signal handlers run here, between calls
                continue
            if rc == lib.ENG_ETIMEDOUT:
                raise WaitTimeout(f"id {pos!r}: not in {self._state_names(mask)} within "
                                  f"{timeout} s")
            self._fail(rc, pos, timeout=timeout)

    async def wait_for_change_async(self, pos: int, timeout: float = 1.0) -> Any:
        """``wait_for_change`` for asyncio: the commit after this call, with
        no thread per awaiting task (one waiter thread per Engine serves them
        all, see ``engine.aio``).  Cancelling the task removes its wait;
        ``close()`` ends it with ``ClosedError``."""
        limit = self._wait_timeout(timeout, none_ok=False)
        if pos.__class__ is not int:
            pos = self._index(pos)
        since = self._committed(pos)
        return await self._waiter().wait(_aio.changed(pos, since), limit,
                                         lambda: WaitTimeout(f"id {pos!r}: no change within "
                                                             f"{timeout} s"))

    async def wait_for_async(self, pos: int, states: Any, timeout: float | None = None) -> Any:
        """``wait_for`` for asyncio (no lost wake, no thread per awaiting
        task); cancelling the task removes its wait, ``close()`` ends it
        with ``ClosedError``."""
        mask = self._state_mask(states)
        limit = self._wait_timeout(timeout)
        if pos.__class__ is not int:
            pos = self._index(pos)
        st = self.state(pos)   # already there: no waiter needed
        if int(st) & mask:
            return st
        return await self._waiter().wait(_aio.reaches(pos, mask), limit,
                                         lambda: WaitTimeout(
                                             f"id {pos!r}: not in {self._state_names(mask)} "
                                             f"within {timeout} s"))

    def _waiter(self) -> Any:
        """This Engine's waiter thread (started at the first awaiting wait)."""
        self._check_open()
        if self._aio_waiter is None or self._aio_waiter.closed:
            handle = self.handle
            self._aio_waiter = _aio.start(lambda: Engine.attach(handle), self.name,
                                          self.url is not None)
            weakref.finalize(self, self._aio_waiter.close)   # dropped unclosed: it ends too
        return self._aio_waiter

    def _committed(self, pos: int) -> int | None:
        """The committed bits of the position's state word (the id checked)."""
        self.state(pos)   # the id's checks and errors
        return _aio.committed_of(self, pos)

    def _wait_timeout(self, timeout: Any, none_ok: bool = True) -> float:
        """A wait's bound in seconds (None: forever, as far as C counts)."""
        if timeout is None and none_ok:
            return float(_MAX_TIMEOUT_S)
        if not (_is_number(timeout) and _finite(timeout) and timeout >= 0):
            raise ArgumentError("timeout must be a finite number of seconds >= 0"
                                + (" or None" if none_ok else "") + f", got {shown(timeout)}")
        return min(float(timeout), float(_MAX_TIMEOUT_S))

    def _state_mask(self, states: Any) -> int:
        """The one-hot mask of ``states``: a state, its name, or an iterable of them."""
        items = (states,) if isinstance(states, (str, int)) else states
        try:
            items = tuple(items)
        except TypeError:
            raise EngineTypeError(f"states must be a state, a state name or an iterable of "
                                  f"them, got {shown(states)}") from None
        mask = 0
        for s in items:
            if isinstance(s, str):
                if s not in self.spec.state_index:
                    raise ArgumentError(f"unknown state {shown(s)}; spec {self.spec.name!r} "
                                        f"has {list(self.spec.states)}")
                mask |= 1 << self.spec.state_index[s]
            elif isinstance(s, int) and not isinstance(s, bool) and int(s) in self._states:
                mask |= int(s)
            else:
                raise ArgumentError(f"states: {shown(s)} is not a state of spec "
                                    f"{self.spec.name!r} (one of {list(self.spec.states)}, "
                                    f"by name or value)")
        if not mask:
            raise ArgumentError("states is empty: give at least one state to wait for")
        return mask

    def _state_names(self, mask: int) -> list[str]:
        return [self._states[b].name for b in sorted(self._states) if b & mask]

    def snapshot(self) -> np.ndarray:
        """Every open position as one row of a structured array (``id`` and
        ``slot`` columns first); each row's state, context and price belong to
        one opening and were read together."""
        rows = np.zeros(self.capacity, dtype=self._rec.row_dtype)
        n = ffi.new("uint32_t *")   # per call: a signal handler may snapshot too
        rc = self._lib.eng_snapshot(
            self._seg, ffi.from_buffer("eng_row[]", rows, require_writable=True), self.capacity, n)
        if rc:
            self._fail(rc)
        return rows[: int(n[0])]

    def metrics(self) -> Metrics:
        """Counters and latency percentiles per operation, merged over every
        attached (and departed) Engine."""
        self._check_open()
        if self._mm is None:
            return self._seg.metrics()  # type: ignore[no-any-return]
        # where attach placed the shards (from its checked copy of the header),
        # not the live header word another process may have written since
        shards_off = int(ffi.cast("uintptr_t", self._seg.shards)) - int(
            ffi.cast("uintptr_t", self._seg.base))
        return read_metrics(self._mm, shards_off)

    def _metrics_with_latency(self) -> tuple[Metrics, np.ndarray]:
        """``metrics()`` and the merged latency histograms it was computed
        from (``ENG_OP_COUNT`` x ``ENG_HIST_BUCKETS`` sample counts, bucket b
        = [2^(b-1), 2^b) ns, the last one open-ended), from one copy of the
        shards; on Redis, this Engine's own sampled round trips."""
        self._check_open()
        if self._mm is None:
            return self._seg.metrics(), self._seg.latency()[0]
        shards_off = int(ffi.cast("uintptr_t", self._seg.shards)) - int(
            ffi.cast("uintptr_t", self._seg.base))
        shards = read_shards(self._mm, shards_off)
        return merge_shards(shards), shard_histograms(shards)

    def set_metrics(self, enabled: bool = True,
                    sample_every: int = lib.ENG_DEFAULT_SAMPLE_MASK + 1) -> None:
        """Turn metrics on or off and set the latency sampling period (a power
        of two: 1 samples every operation)."""
        if (not isinstance(sample_every, int) or isinstance(sample_every, bool)
                or not 1 <= sample_every <= 2**31 or sample_every & (sample_every - 1)):
            raise ArgumentError("sample_every must be a power of two >= 1, "
                                f"got {shown(sample_every)}")
        rc = self._lib.eng_set_metrics(self._seg, 1 if enabled else 0, sample_every - 1)
        if rc:
            self._fail(rc, what=f"sample_every={sample_every}")

    def recover(self) -> RecoveryReport:
        """Release what proven-dead processes hold and drop them from the registry."""
        out = ffi.new("eng_recover_report *")
        rc = self._lib.eng_recover(self._seg, out)
        if rc:
            self._fail(rc)
        report = RecoveryReport(out.rolled_forward, out.rolled_back, out.price_latches,
                                tuple(out.removed_pids[i] for i in range(out.procs_removed)),
                                out.keys_cleared, out.accounts_forward, out.accounts_back,
                                out.tindex_repaired)
        if report.changed:
            _log.warning("engine %s: recover() released what dead processes held: %s",
                         self.name, report)
        return report

    def halt(self, on: bool = True) -> None:
        """Emergency stop: while on, every transition returns ``Outcome.HALTED``."""
        rc = self._lib.eng_set_halt(self._seg, 1 if on else 0)
        if rc:
            self._fail(rc)

    def _check_open(self) -> None:
        rc = self._lib.eng_check(self._seg)
        if rc:
            self._fail(rc)

    def _set_fault(self, flags: int = 0, pause_ns: int = 0) -> None:
        """Test hooks: ENG_FAULT_* switches and a pause inside the slow path."""
        rc = self._lib.eng_set_faults(self._seg, flags, pause_ns)
        if rc == lib.ENG_EBADARG and self.url is None and (flags or pause_ns) and \
                lib.eng_test_faults(-1) != 1:
            raise ArgumentError("test faults are off in this process: set ENGINE_TEST_FAULTS=1 "
                                "in its environment (or call lib.eng_test_faults(1)) first; "
                                "every process that attaches the segment needs it too")
        if rc:
            self._fail(rc, what=f"flags={flags}, pause_ns={pause_ns}")

    # -- raw views for tests and tools --------------------------------------------------
    def _slot(self, slot: int) -> Any:
        """The ``eng_slot *`` of a slot (read-only use: C writes the segment)."""
        return ffi.cast("eng_slot *", self._seg.slots + slot * self._seg.slot_size)

    def _rec_copy(self, slot: int, copy: int) -> Any:
        """Record copy 0 or 1 of a slot, as ``eng_ctx_rec *`` (its first
        ``rec_size`` bytes exist)."""
        return ffi.cast("eng_ctx_rec *", self._seg.slots + slot * self._seg.slot_size
                        + ffi.sizeof("eng_slot") + copy * self._seg.rec_size)

    @property
    def pid(self) -> int:
        return self._pid


_SW_COMMITTED = (lib.ENG_SW_STATE_MASK | lib.ENG_SW_CTX
                 | (lib.ENG_SW_GEN_MASK << lib.ENG_SW_GEN_SHIFT))


def _wait_for_futex(impl: Any, seg: Any, pos: int, mask: int, timeout_ns: int, out: Any) -> int:
    """``wait_for``'s step on shared memory, over ``eng_wait_change``:
    ENG_APPLIED with the state (in ``mask``) in ``out[0]``, ENG_ETIMEDOUT,
    ENG_EINTR (a signal: call again) or the id's error.

    Check, then sleep on the word checked: the state is read with the id's
    checks, then the raw state word; if that word still holds the state,
    the sleep is ``eng_wait_change(pos, that word)``, which returns at once
    if the committed bits moved since (or at the first commit after), so a
    commit between the check and the sleep ends the sleep."""
    word = ffi.new("uint64_t *")
    deadline = time.monotonic_ns() + timeout_ns
    while True:
        st = impl.eng_state(seg, pos)
        if st < 0:
            return int(st)
        if st & mask:
            out[0] = st
            return int(lib.ENG_APPLIED)
        rc = impl.eng_state_word(seg, pos & _SLOT_MASK, word)
        if rc:
            return int(rc)
        seen = int(word[0]) & _SW_COMMITTED
        if seen & lib.ENG_SW_STATE_MASK != st:
            continue   # it moved between the two reads: check again
        left = deadline - time.monotonic_ns()
        if left <= 0:
            return int(lib.ENG_ETIMEDOUT)
        rc = impl.eng_wait_change(seg, pos, seen, left, out)
        if rc != lib.ENG_APPLIED:
            return int(rc)


def _install_fastpath() -> None:
    """Engine.transition / update_price / price become their C method
    descriptors (native/fastpath.c): the same behaviour -- anything but plain
    success, and an Engine with no view (closed, on Redis), comes back to
    the Python methods above (``__wrapped__``) -- at about the cost of an
    empty Python call.  ``eng.price`` taken as a value holds its Engine, as
    a bound Python method does."""
    for kind, name, fn, fail, results in (
            (_fastpath.TRANSITION, "transition", "eng_transition", Engine._transition_failed,
             _OUTCOMES),
            (_fastpath.UPDATE_PRICE, "update_price", "eng_update_price",
             Engine._update_price_failed, None),
            (_fastpath.PRICE, "price", "eng_read_price", Engine._price_failed, PriceSnapshot)):
        addr = int(ffi.cast("uintptr_t", ffi.addressof(lib, fn)))
        setattr(Engine, name, _fastpath.FastMethod(kind, addr, Engine.__dict__[name], fail,
                                                   results))


if _fastpath is not None:
    _install_fastpath()
