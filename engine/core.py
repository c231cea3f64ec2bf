"""The Engine: a typed API over one shared-memory segment.

Hot calls (``transition``, ``update_price``, ``price``, ``state``) are one C
call each.  cffi converts and range-checks the argument types, C checks the
values; Python only maps a failure to its exception, so the success path stays
thin.

An Engine object belongs to the thread that uses it: it owns one metrics shard
and one output buffer.  Attach one Engine per thread (they are cheap).
"""

from __future__ import annotations

import math
import mmap
import operator
import os
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from engine import segment
from engine._native import ffi, lib
from engine.errors import (
    ArgumentError,
    BusyError,
    CapacityError,
    ClosedError,
    EngineError,
    EngineTypeError,
    NotOpenError,
    PriceError,
    SegmentError,
    SlotError,
    SpecMismatchError,
    TriggerError,
    WaitTimeout,
)
from engine.metrics import Metrics, read_metrics
from engine.records import CONTEXT_STRUCT, PRICE_STRUCT, ROW_DTYPE, Context, PriceSnapshot
from engine.spec import POSITION_SPEC, MachineSpec, Outcome

__all__ = ["Engine", "Handle", "RecoveryReport"]

_OUTCOMES = tuple(sorted(Outcome, key=int))
_transition = lib.eng_transition
_update_price = lib.eng_update_price
_read_price = lib.eng_read_price
_state = lib.eng_state
_unpack_price = PRICE_STRUCT.unpack_from
_unpack_context = CONTEXT_STRUCT.unpack_from
_tuple_new = tuple.__new__

_CTX_FIELDS = {"exit_reason": lib.ENG_CTX_EXIT_REASON, "stop_loss": lib.ENG_CTX_STOP_LOSS,
               "take_profit": lib.ENG_CTX_TAKE_PROFIT}
_INT32 = (-(2**31), 2**31 - 1)
# what cffi raises for an argument it cannot convert (NaN to int: ValueError)
_CONVERSION_ERRORS = (TypeError, OverflowError, ValueError)
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Handle:
    """What a worker needs to attach: picklable, small."""

    name: str
    spec: MachineSpec | None = None   # None: the default position lifecycle


@dataclass(frozen=True)
class RecoveryReport:
    """What ``Engine.recover`` released."""

    rolled_forward: int
    rolled_back: int
    price_latches: int
    removed_pids: tuple[int, ...]

    @property
    def changed(self) -> bool:
        return bool(self.rolled_forward or self.rolled_back or self.price_latches
                    or self.removed_pids)


_SEGMENT_ERRORS = {
    lib.ENG_EMAGIC: "is not an engine segment (bad magic number)",
    lib.ENG_ELAYOUT: "has another layout version",
    lib.ENG_ESIZE: "is truncated or its sizes disagree with its header",
    lib.ENG_ENOTREADY: "is not ready (its creator has not finished formatting it)",
    lib.ENG_ECORRUPT: "has a corrupt header",
}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: float) -> bool:
    """math.isfinite that also says False for ints too large for a double."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _check_spec(spec: object) -> MachineSpec:
    if spec is None:
        return POSITION_SPEC
    if not isinstance(spec, MachineSpec):
        raise EngineTypeError(f"spec must be a MachineSpec or None, got {spec!r:.80}")
    return spec


def _detach(seg: Any, buf: Any, mm: mmap.mmap) -> None:
    """Leave the registry, then unmap (the cffi buffer must go first)."""
    lib.eng_detach(seg)
    ffi.release(buf)
    mm.close()


class Engine:
    """One attached view of a shared-memory segment of positions."""

    # -- life cycle ------------------------------------------------------------------
    def __init__(self, name: str, mm: mmap.mmap, spec: MachineSpec, *, check_spec: bool) -> None:
        self.name = name
        self.spec = spec
        self._mm = mm
        self._buf = ffi.from_buffer(mm)
        self._seg = ffi.new("eng_seg *")
        rc = lib.eng_attach(self._seg, self._buf, len(mm), spec.fingerprint if check_spec else 0)
        if rc:
            ffi.release(self._buf)
            mm.close()
            raise self._attach_error(rc)
        self.capacity: int = self._seg.capacity
        self._pid = os.getpid()
        self._price_out = ffi.new("eng_price_out *")
        self._price_view = memoryview(ffi.buffer(self._price_out))
        self._ctx_out = ffi.new("eng_ctx_out *")
        self._ctx_view = memoryview(ffi.buffer(self._ctx_out))
        self._u32 = ffi.new("uint32_t *")
        self._u64 = ffi.new("uint64_t *")
        self._update = ffi.new("eng_ctx_update *")
        self._trigger_types = frozenset((int, spec.Trigger))
        self._states = {1 << i: spec.State(1 << i) for i in range(len(spec.states))}
        self._finalizer = weakref.finalize(self, _detach, self._seg, self._buf, mm)

    def _attach_error(self, rc: int) -> EngineError:
        if rc == lib.ENG_ESPEC:
            return SpecMismatchError(
                f"segment {self.name!r} runs another machine spec than {self.spec!r} "
                f"(fingerprint {self.spec.fingerprint:#x}); attach with the creator's spec")
        if rc == lib.ENG_ENOPROC:
            return CapacityError(f"segment {self.name!r}: all {lib.ENG_MAX_PROCS} registry "
                                 "entries are taken; close unused Engines or run recover()")
        why = _SEGMENT_ERRORS.get(rc, f"was refused (code {rc})")
        return SegmentError(f"segment {self.name!r} {why}")

    @classmethod
    def create(cls, capacity: int = 10_000, *, name: str | None = None,
               spec: MachineSpec | None = None) -> Engine:
        """Create a new segment for ``capacity`` positions and attach to it."""
        spec = _check_spec(spec)
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise EngineTypeError(f"capacity must be an int, got {capacity!r}")
        if not 1 <= capacity <= lib.ENG_MAX_CAPACITY:
            raise ArgumentError(
                f"capacity must be in [1, {lib.ENG_MAX_CAPACITY}], got {capacity}")
        name = segment.check_name(name) if name is not None else segment.random_name()
        size = lib.eng_segment_size(capacity)
        mm = segment.create(name, size)
        table = spec.table_bytes()
        with ffi.from_buffer(mm) as buf:
            rc = lib.eng_format(buf, size, capacity, table, len(spec.states),
                                len(spec.triggers), spec.state_index[spec.initial],
                                spec.closed_mask, spec.fingerprint, os.getpid())
        if rc:
            mm.close()
            segment.unlink(name)
            raise ArgumentError(f"cannot format segment {name!r} (code {rc})")
        return cls(name, mm, spec, check_spec=True)

    @classmethod
    def attach(cls, target: Handle | str, *, spec: MachineSpec | None = None) -> Engine:
        """Attach to an existing segment by handle or by name.

        The segment's machine spec must equal ``spec`` (or the handle's spec,
        or the default position lifecycle); anything else is refused.
        """
        if isinstance(target, Handle):
            name, spec = target.name, spec or target.spec
        elif isinstance(target, str):
            name = target
        else:
            raise EngineTypeError(f"attach takes a Handle or a segment name, got {target!r}")
        spec = _check_spec(spec)
        return cls(name, segment.open_existing(name), spec, check_spec=True)

    @property
    def handle(self) -> Handle:
        """Picklable handle for spawned workers."""
        return Handle(self.name, None if self.spec == POSITION_SPEC else self.spec)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Detach: leave the registry and unmap.  The segment lives on."""
        if self._finalizer.alive:
            self._finalizer()
            self._seg = ffi.new("eng_seg *")   # zeroed: every C call says ENG_ECLOSED

    def unlink(self) -> None:
        """Destroy the segment (attached processes keep their mappings)."""
        segment.unlink(self.name)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"capacity={self.capacity}"
        return f"<Engine {self.name!r} {state} spec={self.spec.name}>"

    def __reduce__(self) -> Any:
        raise TypeError("an Engine cannot be pickled: send engine.handle and call "
                        "Engine.attach(handle) in the worker")

    # -- errors ------------------------------------------------------------------------
    def _fail(self, rc: int, slot: Any = None, trigger: Any = None, price: Any = None) -> Any:
        """Raise the exception for C status ``rc`` (never returns)."""
        cap = self.capacity
        if rc == lib.ENG_EBADSLOT:
            raise SlotError(f"slot {slot!r} out of range [0, {cap})")
        if rc == lib.ENG_ENOTOPEN:
            raise NotOpenError(f"slot {slot} is not open (never opened, or released)")
        if rc == lib.ENG_EBADTRIGGER:
            raise TriggerError(f"trigger {trigger!r} out of range [0, {len(self.spec.triggers)})"
                               f" of spec {self.spec.name!r}")
        if rc == lib.ENG_EBADPRICE:
            raise PriceError(f"price must be finite and > 0, got {price!r}")
        if rc == lib.ENG_EBUSY:
            raise BusyError(f"slot {slot}: a live writer held the record past the bound; "
                            "nothing was changed")
        if rc == lib.ENG_EFULL:
            raise CapacityError(f"all {cap} slots are in use; release closed positions "
                                "or create a larger engine")
        if rc == lib.ENG_ECLOSED:
            raise ClosedError(f"engine {self.name!r} is closed")
        if rc == lib.ENG_EBADARG:
            raise ArgumentError("argument out of range")
        raise EngineError(f"engine call failed with code {rc}")

    def _bad_types(self, slot: Any, **values: Any) -> EngineError:
        if not isinstance(slot, int) and not hasattr(slot, "__index__"):
            return EngineTypeError(f"slot must be an int in [0, {self.capacity}), "
                                   f"got {slot!r} ({type(slot).__name__})")
        if isinstance(slot, int) and not 0 <= slot < self.capacity:
            return SlotError(f"slot {slot!r} out of range [0, {self.capacity})")
        for key, v in values.items():
            if key == "trigger":
                if not isinstance(v, int):
                    return EngineTypeError(f"trigger must be an int or a trigger name of spec "
                                           f"{self.spec.name!r}, got {v!r}")
                return TriggerError(f"trigger {v!r} out of range "
                                    f"[0, {len(self.spec.triggers)})")
            if key == "price" and not isinstance(v, (int, float)):
                return EngineTypeError(f"price must be a float, got {v!r} ({type(v).__name__})")
            if key == "price":   # an int too large for a double
                return PriceError(f"price must be finite and > 0, got {v!r:.40}")
        return EngineTypeError(f"bad argument types: slot={slot!r}, {values}")

    def _trigger_index(self, trigger: Any) -> int:
        if isinstance(trigger, str):
            try:
                return self.spec.trigger_index[trigger]
            except KeyError:
                raise TriggerError(f"unknown trigger {trigger!r}; spec {self.spec.name!r} has "
                                   f"{list(self.spec.triggers)}") from None
        return self._index(trigger, "trigger")

    def _index(self, value: Any, what: str) -> Any:
        """An exact int for an integer-like value (numpy ints, IntEnum);
        anything else (floats included) is refused, never truncated."""
        if isinstance(value, int):
            return value
        try:
            return operator.index(value)
        except TypeError:
            bound = self.capacity if what == "slot" else len(self.spec.triggers)
            raise EngineTypeError(f"{what} must be an int in [0, {bound}), got {value!r:.40} "
                                  f"({type(value).__name__})") from None

    # -- positions -------------------------------------------------------------------
    def open_position(self, entry_price: float, amount: float, side: int = 1,
                      token: int = 0) -> int:
        """Allocate a free slot atomically; it starts in the spec's initial state."""
        for key, v in (("entry_price", entry_price), ("amount", amount)):
            if not _is_number(v):
                raise EngineTypeError(f"{key} must be a float, got {v!r}")
            if not (_finite(v) and v > 0):
                err = PriceError if key == "entry_price" else ArgumentError
                raise err(f"{key} must be finite and > 0, got {v!r}")
        if not isinstance(side, int) or isinstance(side, bool):
            raise EngineTypeError(f"side must be the int 1 (long) or -1 (short), got {side!r}")
        if side not in (1, -1):
            raise ArgumentError(f"side must be 1 (long) or -1 (short), got {side!r}")
        if not isinstance(token, int) or not _INT64[0] <= token <= _INT64[1]:
            raise ArgumentError(f"token must be an int in [{_INT64[0]}, {_INT64[1]}], "
                                f"got {token!r}")
        rc = lib.eng_open_position(self._seg, entry_price, amount, side, token, self._u32)
        if rc:
            self._fail(rc, price=entry_price)
        return int(self._u32[0])

    def release_position(self, slot: int) -> Outcome:
        """Return a closed position's slot to the free pool."""
        if slot.__class__ is not int:   # cffi would truncate a numpy float
            slot = self._index(slot, "slot")
        try:
            rc = lib.eng_release_position(self._seg, slot)
        except _CONVERSION_ERRORS:
            raise self._bad_types(slot) from None
        return _OUTCOMES[rc] if rc >= 0 else self._fail(rc, slot)

    # -- transitions -------------------------------------------------------------------
    def transition(self, slot: int, trigger: int | str, exit_reason: int | None = None,
                   stop_loss: float | None = None, take_profit: float | None = None) -> Outcome:
        """Fire ``trigger`` on ``slot``.  ``exit_reason``, ``stop_loss`` and
        ``take_profit`` update the context atomically with the state change."""
        if exit_reason is not None or stop_loss is not None or take_profit is not None:
            context = {k: v for k, v in (("exit_reason", exit_reason), ("stop_loss", stop_loss),
                                         ("take_profit", take_profit)) if v is not None}
            return self._transition_slow(slot, trigger, context)
        if slot.__class__ is not int:   # cffi would truncate a numpy float
            slot = self._index(slot, "slot")
        if trigger.__class__ not in self._trigger_types:
            trigger = self._trigger_index(trigger)
        try:
            rc = _transition(self._seg, slot, trigger)
        except _CONVERSION_ERRORS:
            raise self._bad_types(slot, trigger=trigger) from None
        if rc >= 0:
            return _OUTCOMES[rc]
        if rc == lib.ENG_EGUARDED:
            return self._transition_slow(slot, trigger, {})
        return self._fail(rc, slot, trigger)  # type: ignore[no-any-return]

    def _fill_update(self, context: Mapping[str, Any]) -> Any:
        u = self._update
        u.mask = 0
        for key, value in context.items():
            bit = _CTX_FIELDS.get(key)
            if bit is None:
                raise ArgumentError(f"unknown context field {key!r}; "
                                    f"a transition may set {sorted(_CTX_FIELDS)}")
            if key == "exit_reason":
                if not isinstance(value, int) or not _INT32[0] <= value <= _INT32[1]:
                    raise ArgumentError(f"exit_reason must be an int in [{_INT32[0]}, "
                                        f"{_INT32[1]}], got {value!r}")
            elif not (_is_number(value) and _finite(value) and value >= 0):
                raise ArgumentError(f"{key} must be a finite float >= 0, got {value!r}")
            setattr(u, key, value)
            u.mask |= bit
        return u

    def _transition_slow(self, slot: Any, trigger: Any, context: Mapping[str, Any]) -> Outcome:
        trigger = self._trigger_index(trigger)
        update = self._fill_update(context) if context else ffi.NULL
        if slot.__class__ is not int:   # cffi would truncate a numpy float
            slot = self._index(slot, "slot")
        if trigger.__class__ not in self._trigger_types:
            trigger = self._trigger_index(trigger)
        try:
            rc = lib.eng_transition_ctx(self._seg, slot, trigger, update)
        except _CONVERSION_ERRORS:
            raise self._bad_types(slot, trigger=trigger) from None
        if rc == lib.ENG_EGUARDED:
            return self._transition_guarded(slot, trigger, update)
        return _OUTCOMES[rc] if rc >= 0 else self._fail(rc, slot, trigger)  # type: ignore[no-any-return]

    def _transition_guarded(self, slot: int, trigger: int, update: Any) -> Outcome:
        rc = lib.eng_guard_lock(self._seg, slot, trigger)
        if rc != lib.ENG_APPLIED:
            return _OUTCOMES[rc] if rc >= 0 else self._fail(rc, slot, trigger)  # type: ignore[no-any-return]
        commit = 0
        try:
            lib.eng_state_word(self._seg, slot, self._u64)
            source = (int(self._u64[0]) & lib.ENG_SW_STATE_MASK).bit_length() - 1
            guard = self.spec.guards.get((source, trigger))
            commit = 1 if guard is None or guard(self.context(slot), self.price(slot)) else 0
        finally:
            rc = lib.eng_guard_finish(self._seg, slot, commit, update)
        return _OUTCOMES[rc] if rc >= 0 else self._fail(rc, slot, trigger)  # type: ignore[no-any-return]

    def state(self, slot: int) -> Any:
        """The slot's current state (a ``State`` for the default lifecycle)."""
        if slot.__class__ is not int:   # cffi would truncate a numpy float
            slot = self._index(slot, "slot")
        try:
            rc = _state(self._seg, slot)
        except _CONVERSION_ERRORS:
            raise self._bad_types(slot) from None
        return self._states[rc] if rc > 0 else self._fail(rc, slot)

    def state_word(self, slot: int) -> int:
        """The raw 64-bit state word (bit layout in native/engine.h)."""
        if slot.__class__ is not int:   # cffi would truncate a numpy float
            slot = self._index(slot, "slot")
        try:
            rc = lib.eng_state_word(self._seg, slot, self._u64)
        except _CONVERSION_ERRORS:
            raise self._bad_types(slot) from None
        if rc:
            self._fail(rc, slot)
        return int(self._u64[0])

    # -- prices and context ---------------------------------------------------------
    def update_price(self, slot: int, price: float) -> None:
        """Publish a new price; PnL is computed in C from the context."""
        if slot.__class__ is not int:   # cffi would truncate a numpy float
            slot = self._index(slot, "slot")
        try:
            rc = _update_price(self._seg, slot, price)
        except _CONVERSION_ERRORS:
            raise self._bad_types(slot, price=price) from None
        if rc:
            self._fail(rc, slot, price=price)

    def price(self, slot: int) -> PriceSnapshot:
        """A consistent price record (never torn)."""
        if slot.__class__ is not int:   # cffi would truncate a numpy float
            slot = self._index(slot, "slot")
        try:
            rc = _read_price(self._seg, slot, self._price_out)
        except _CONVERSION_ERRORS:
            raise self._bad_types(slot) from None
        if rc:
            self._fail(rc, slot)
        return _tuple_new(PriceSnapshot, _unpack_price(self._price_view))

    def context(self, slot: int) -> Context:
        """A consistent context record."""
        if slot.__class__ is not int:   # cffi would truncate a numpy float
            slot = self._index(slot, "slot")
        try:
            rc = lib.eng_read_context(self._seg, slot, self._ctx_out)
        except _CONVERSION_ERRORS:
            raise self._bad_types(slot) from None
        if rc:
            self._fail(rc, slot)
        return _tuple_new(Context, _unpack_context(self._ctx_view))

    def update_prices(self, slots: npt.ArrayLike, prices: npt.ArrayLike) -> None:
        """Publish many prices in one C call.  Every slot and price is checked
        first; one bad value refuses the whole batch."""
        try:
            s = np.asarray(slots)
            p = np.asarray(prices)
        except (TypeError, ValueError) as e:
            raise EngineTypeError(f"slots and prices must be 1-D numeric arrays: {e}") from None
        if s.ndim != 1 or p.ndim != 1:
            raise ArgumentError(f"slots and prices must be 1-D, got shapes {s.shape} and {p.shape}")
        if len(s) != len(p):
            raise ArgumentError(f"slots and prices differ in length: {len(s)} != {len(p)}")
        if s.dtype.kind not in "iu":
            raise EngineTypeError(f"slots must be an integer array, got dtype {s.dtype}")
        if p.dtype.kind != "f":
            raise EngineTypeError(f"prices must be a float array, got dtype {p.dtype}")
        if len(s) == 0:
            return
        if s.dtype != np.uint32:
            lo, hi = int(s.min()), int(s.max())
            if lo < 0 or hi >= self.capacity:
                bad = lo if lo < 0 else hi
                raise SlotError(f"slot {bad} out of range [0, {self.capacity}) "
                                f"at index {int(np.flatnonzero(s == bad)[0])}")
        s = np.ascontiguousarray(s, dtype=np.uint32)
        p = np.ascontiguousarray(p, dtype=np.float64)
        bad = self._u64
        rc = lib.eng_update_prices(self._seg, ffi.from_buffer("uint32_t[]", s),
                                   ffi.from_buffer("double[]", p), len(s), bad)
        if rc:
            if rc in (lib.ENG_ECLOSED, lib.ENG_EBADARG):   # out_bad_index not set
                self._fail(rc)
            i = int(bad[0])
            done = ("slots before it were written" if rc == lib.ENG_EBUSY
                    else "nothing in the batch was written")
            try:
                self._fail(rc, int(s[i]), price=float(p[i]))
            except EngineError as e:
                raise type(e)(f"{e} (at index {i}; {done})") from None

    def update_token_price(self, token: int, price: float) -> int:
        """Publish ``price`` to every open position on ``token``; returns the count."""
        if not isinstance(token, int) or not _INT64[0] <= token <= _INT64[1]:
            raise ArgumentError(f"token must be an int in [{_INT64[0]}, {_INT64[1]}], "
                                f"got {token!r}")
        try:
            n = lib.eng_update_token_price(self._seg, token, price)
        except _CONVERSION_ERRORS:
            raise self._bad_types(0, price=price) from None
        return int(n) if n >= 0 else self._fail(int(n), price=price)  # type: ignore[no-any-return]

    # -- waiting, snapshots, metrics, recovery ---------------------------------------
    def wait_for_change(self, slot: int, timeout: float = 1.0) -> Any:
        """Block until a transition commits on ``slot``; return the new state.

        Raises ``WaitTimeout`` (a ``TimeoutError``) when ``timeout`` seconds pass
        first.  Ctrl-C and other signals are handled while waiting.
        """
        if not (_is_number(timeout) and _finite(timeout) and timeout >= 0):
            raise ArgumentError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
        deadline = time.monotonic() + timeout
        since = -1   # C: the counter's value at entry
        while True:
            left = max(0, int((deadline - time.monotonic()) * 1e9))
            if slot.__class__ is not int:   # cffi would truncate a numpy float
                slot = self._index(slot, "slot")
            try:
                rc = lib.eng_wait_change(self._seg, slot, since, left, self._u32)
            except _CONVERSION_ERRORS:
                raise self._bad_types(slot) from None
            if rc == lib.ENG_APPLIED:
                return self.state(slot)
            if rc == lib.ENG_EINTR:      # signal handlers run here, between calls
                since = int(self._u32[0])
                continue
            if rc == lib.ENG_ETIMEDOUT:
                raise WaitTimeout(f"slot {slot}: no change within {timeout} s")
            self._fail(rc, slot)

    def snapshot(self) -> np.ndarray:
        """Every open slot as one row of a structured array; each record in a
        row (state, price, context) is read consistently."""
        rows = np.zeros(self.capacity, dtype=ROW_DTYPE)
        rc = lib.eng_snapshot(self._seg, ffi.from_buffer("eng_row[]", rows, require_writable=True),
                              self.capacity, self._u32)
        if rc:
            self._fail(rc)
        return rows[: int(self._u32[0])]

    def metrics(self) -> Metrics:
        """Counters and latency percentiles per operation, merged over every
        attached (and departed) Engine."""
        if self.closed:
            raise ClosedError(f"engine {self.name!r} is closed")
        return read_metrics(self._mm, self._seg.hdr.shards_off)

    def set_metrics(self, enabled: bool = True, sample_every: int = 64) -> None:
        """Turn metrics on or off and set the latency sampling period (a power
        of two: 1 samples every operation)."""
        if (not isinstance(sample_every, int) or isinstance(sample_every, bool)
                or not 1 <= sample_every <= 2**31 or sample_every & (sample_every - 1)):
            raise ArgumentError(f"sample_every must be a power of two >= 1, got {sample_every}")
        hdr = self._header()
        hdr.sample_mask = sample_every - 1
        hdr.metrics_on = 1 if enabled else 0

    def recover(self) -> RecoveryReport:
        """Release what dead processes hold and drop them from the registry."""
        out = ffi.new("eng_recover_report *")
        rc = lib.eng_recover(self._seg, out)
        if rc:
            self._fail(rc)
        return RecoveryReport(out.rolled_forward, out.rolled_back, out.price_latches,
                              tuple(out.removed_pids[i] for i in range(out.procs_removed)))

    def halt(self, on: bool = True) -> None:
        """Emergency stop: while on, every transition returns ``Outcome.HALTED``."""
        self._header().halted = 1 if on else 0

    def _header(self) -> Any:
        if self.closed:
            raise ClosedError(f"engine {self.name!r} is closed")
        return self._seg.hdr

    def _set_fault(self, flags: int = 0, pause_ns: int = 0) -> None:
        """Test hooks: ENG_FAULT_* switches and a pause inside the slow path."""
        hdr = self._header()
        hdr.fault_flags = flags
        hdr.test_pause_ns = pause_ns

    @property
    def pid(self) -> int:
        return self._pid
