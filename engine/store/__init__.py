"""The store under an Engine: the seam between ``Engine`` and its two backends.

``Engine`` talks to its store through one interface: the ``eng_*`` functions
of the compiled module, with their arguments, out-parameters and status
codes.  On shared memory (``engine.store.shm``) the store is
``engine._native.lib`` itself, so a hot call is one C call with no wrapper
frame; on Redis (``engine.store.redis``) a ``RedisStore`` implements the
same functions, each as one round trip.  A public method is written once,
in ``Engine``, above this seam.

``backend(url)`` is the one place that chooses: None is shared memory, a
``redis://``, ``rediss://``, ``unix://`` or ``redis+cluster://`` url is
Redis.  ``engine.core`` imports this package only (the factory, the
interface, the name checks), never a backend module.

``Store`` is the interface: mypy checks ``engine._native.lib`` against it
through ``engine/_native.pyi`` (generated from the cdef by
native/gen_stub.py, run by ``make``), and ``RedisStore`` against it in its
module, so a signature that drifts on either side fails ``make typecheck``.
"""

from __future__ import annotations

import mmap
import re
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from engine.errors import ArgumentError

if TYPE_CHECKING:
    from engine.journal import JournalSource
    from engine.spec import MachineSpec

__all__ = ["Attached", "Backend", "Seg", "Store", "backend", "check_name", "create",
           "journal_source", "random_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise ArgumentError(
            f"segment name must be 1-200 characters of [A-Za-z0-9_.-], got {name!r}")
    return name


def random_name() -> str:
    return "eng_" + secrets.token_hex(8)


#: the first argument of every call: an attachment's ``eng_seg *`` (cffi
#: cdata) on shared memory, the RedisStore itself on Redis
Seg = Any


class Store(Protocol):
    """The ``eng_*`` calls ``Engine`` makes on its store, as native/engine.h
    declares them: positional arguments, the first the ``Seg``; results
    through out-parameters (cffi cdata the caller made: ``out[0]``, a
    struct, an array); a status code returned (0 or an ``ENG_*`` outcome
    >= 0, or a negative ``ENG_E*`` code, except where said).  A RedisStore
    may also raise the engine's exception where C returns a code (a closed
    store: ClosedError; a server that does not answer: ServerError).

    ``engine._native.lib`` is one (mypy checks it through the stub
    generated from the cdef, see native/gen_stub.py); ``RedisStore`` is the
    other (checked in engine/store/redis/store.py)."""

    # -- life cycle
    def eng_check(self, s: Seg, /) -> int:
        """0 while usable; ENG_ECLOSED, or ENG_EFORKED in a fork child."""
        ...

    def eng_detach(self, s: Seg, /) -> None:
        """Leave: idempotent, never fails."""
        ...

    # -- positions
    def eng_id_of(self, s: Seg, slot: int, out_id: Any, /) -> int:
        """The id of ``slot``'s current opening into ``out_id[0]``."""
        ...

    def eng_open(self, s: Seg, words: Any, key: Any, key_len: int, out_id: Any,
                 out_word: Any, /) -> int:
        """Open with the record ``words`` and ``key`` (or NULL); the id and its
        state word into ``out_id[0]``, ``out_word[0]``."""
        ...

    def eng_abandon_open(self, s: Seg, id: int, word: int, /) -> int:
        """Give back an opening no caller was told of, if still untouched."""
        ...

    def eng_release_position(self, s: Seg, id: int, /) -> int:
        """Free a closed position's slot: an Outcome or a code."""
        ...

    def eng_transition(self, s: Seg, id: int, trigger: int, /) -> int:
        """Fire ``trigger``: an Outcome (APPLIED, INVALID, ...) or a code."""
        ...

    def eng_transition_ctx(self, s: Seg, id: int, trigger: int, u: Any, /) -> int:
        """``eng_transition`` setting the record words of ``u`` with the state."""
        ...

    def eng_guard_transition(self, s: Seg, id: int, trigger: int, u: Any, guard: Any,
                             user: Any, /) -> int:
        """``eng_transition_ctx`` that runs ``guard(user, id, source, trigger)``
        (the def_extern callback) with the slot locked first."""
        ...

    def eng_state(self, s: Seg, id: int, /) -> int:
        """The state bit (> 0) or a code."""
        ...

    def eng_state_word(self, s: Seg, slot: int, out_word: Any, /) -> int:
        """The slot's raw state word into ``out_word[0]``."""
        ...

    def eng_update_price(self, s: Seg, id: int, price: float, /) -> int:
        """Publish ``price``: 0 or a code."""
        ...

    def eng_read_price(self, s: Seg, id: int, out: Any, /) -> int:
        """A consistent price record into the ``eng_price_out *``."""
        ...

    def eng_read_context(self, s: Seg, id: int, out: Any, /) -> int:
        """State, record and versions, read together, into the ``eng_ctx_out *``."""
        ...

    # -- vector calls (arrays of n; the first failing index into out_bad_index[0])
    def eng_update_prices(self, s: Seg, ids: Any, prices: Any, n: int, out_bad_index: Any,
                          out_written: Any, /) -> int: ...

    def eng_states(self, s: Seg, ids: Any, n: int, out: Any, out_bad_index: Any, /) -> int: ...

    def eng_prices(self, s: Seg, ids: Any, n: int, out: Any, out_bad_index: Any, /) -> int: ...

    def eng_transition_many(self, s: Seg, ids: Any, triggers: Any, n: int, out: Any,
                            out_bad_index: Any, /) -> int:
        """Outcomes into ``out``; a failed element holds ENG_MANY_ERROR | -code."""
        ...

    def eng_update_token_price(self, s: Seg, token: int, price: float, /) -> int:
        """The positions written (>= 0) or a code."""
        ...

    # -- keys
    def eng_bind_key(self, s: Seg, id: int, key: Any, key_len: int, /) -> int: ...

    def eng_lookup(self, s: Seg, key: Any, key_len: int, /) -> int:
        """The id (> 0), 0 for none, or a code."""
        ...

    def eng_keys(self, s: Seg, id: int, out: Any, max: int, out_n: Any, /) -> int:
        """Up to ``max`` ``eng_key`` into ``out``, their count into ``out_n[0]``."""
        ...

    # -- accounts (money in int64 units of 1 / ENG_MONEY_SCALE)
    def eng_open_account(self, s: Seg, cash: int, max_exposure: int, max_positions: int,
                         max_loss: int, key: Any, key_len: int, out_id: Any, /) -> int:
        """``key``: NULL for none, else unique among open accounts
        (ENG_EKEYEXISTS, and nothing changes)."""
        ...

    def eng_lookup_account(self, s: Seg, key: Any, key_len: int, /) -> int:
        """The id of the open account with the key, 0 if none, or a code."""
        ...

    def eng_close_account(self, s: Seg, id: int, /) -> int: ...

    def eng_read_account(self, s: Seg, id: int, out: Any, /) -> int: ...

    def eng_deposit(self, s: Seg, id: int, amount: int, /) -> int: ...

    def eng_withdraw(self, s: Seg, id: int, amount: int, /) -> int: ...

    def eng_halt_account(self, s: Seg, id: int, on: int, /) -> int: ...

    def eng_update_account(self, s: Seg, id: int, version: int, max_exposure: int,
                           max_positions: int, max_loss: int, halted: int, attempt: int,
                           /) -> int:
        """Applies only at ``version``: else ENG_EVERSION."""
        ...

    def eng_accounts(self, s: Seg, rows: Any, max_rows: int, out_n: Any, /) -> int: ...

    # -- waiting, snapshots, switches, recovery
    def eng_wait_change(self, s: Seg, id: int, since: int, timeout_ns: int, out_since: Any,
                        /) -> int:
        """APPLIED once the state word moves from ``since`` (-1: the word at
        entry), ENG_EINTR with the word to pass again in ``out_since[0]``,
        ENG_ETIMEDOUT, or a code."""
        ...

    def eng_snapshot(self, s: Seg, rows: Any, max_rows: int, out_n: Any, /) -> int: ...

    def eng_set_halt(self, s: Seg, on: int, /) -> int: ...

    def eng_set_metrics(self, s: Seg, on: int, sample_mask: int, /) -> int: ...

    def eng_recover(self, s: Seg, out: Any, /) -> int:
        """What was released into the ``eng_recover_report *``."""
        ...

    def eng_set_faults(self, s: Seg, flags: int, pause_ns: int, /) -> int: ...


class Attached(NamedTuple):
    """What a backend hands the Engine it created or attached."""

    #: answers the ``eng_*`` calls: ``engine._native.lib``, or a RedisStore
    store: Store
    #: their first argument: this attachment's ``eng_seg *``, or the RedisStore
    seg: Any
    #: detaches, once: called by ``close()``, or run when the Engine is collected
    finalizer: Any   # weakref.finalize
    #: shared memory: the segment's mapping and the cffi buffer over it
    mm: mmap.mmap | None = None
    buf: Any = None


class Backend(Protocol):
    """How an engine is made, reached and destroyed on one kind of store.

    ``owner`` is the Engine being built: the finalizer is registered on it
    before anything is attached, so an exception at any point later (a
    signal handler's included) still detaches."""

    #: None for shared memory, else the server's url
    url: str | None

    def create(self, owner: object, name: str, spec: MachineSpec, capacity: int,
               keys_per_position: int, max_accounts: int, shards: int | None) -> Attached: ...

    def attach(self, owner: object, name: str, spec: MachineSpec,
               incarnation: int | None) -> Attached: ...

    def unlink(self, name: str, seg: Any) -> None: ...

    def remover(self, name: str, seg: Any) -> Callable[[], None]:
        """What removes the engine just created (``create(temporary=True)``),
        however much later: the segment only while the name still names the
        file created; on Redis, this incarnation's keys only."""
        ...


def backend(url: str | None) -> Backend:
    """The backend for ``url``: shared memory for None, else Redis (an
    ``ArgumentError`` for a url of another scheme)."""
    if url is None:
        from engine.store.shm import SHARED_MEMORY
        return SHARED_MEMORY
    from engine.store.redis import RedisBackend, check_url
    return RedisBackend(check_url(url))


def create(store: Backend, owner: object, name: str, spec: MachineSpec, capacity: int,
           keys_per_position: int, max_accounts: int, shards: int | None,
           journal_records: int, journal_flags: int) -> Attached:
    """``store.create`` with the journal's options: a ring of
    ``journal_records`` records (0: none) in a segment on shared memory; an
    engine on Redis keeps its journal in its streams."""
    if store.url is None:
        from engine.store.shm import SHARED_MEMORY
        return SHARED_MEMORY.create(owner, name, spec, capacity, keys_per_position,
                                    max_accounts, shards, journal_records=journal_records,
                                    journal_flags=journal_flags)
    return store.create(owner, name, spec, capacity, keys_per_position, max_accounts, shards)


def journal_source(engine: Any) -> JournalSource:
    """A reader of ``engine``'s journal (a new one per caller: it owns a
    buffer): the ring in the segment, or the Redis store's streams
    (``RedisStore.journal()``)."""
    if engine.url is not None:
        return engine.seg.journal()  # type: ignore[no-any-return]
    from engine.store.shm_journal import SegmentJournal
    return SegmentJournal(engine)
