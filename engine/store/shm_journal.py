"""The shared-memory journal's reader: the ring in the segment (native/journal.c).

``SegmentJournal`` implements ``engine.journal.JournalSource`` for an Engine
on shared memory: ``read`` copies whole records out in one C call (a record
a writer was refilling meanwhile is never returned: the reader is told it was
lapped), ``wait`` sleeps in C on the journal's futex word with the GIL
released, through the Engine's close gate.
"""

from __future__ import annotations

import struct
from typing import Any

from engine._native import ffi, lib
from engine.accounts import account_from_row
from engine.errors import JournalLappedError, raise_for
from engine.journal import KINDS, Event
from engine.records import PriceSnapshot

__all__ = ["SegmentJournal"]

_W_OFF = ffi.offsetof("eng_jrec", "w")
_W_END = ffi.offsetof("eng_jrec", "version") + 8
_STATE_MASK = lib.ENG_SW_STATE_MASK
_SLOT_KINDS = (lib.ENG_JK_OPEN, lib.ENG_JK_TRANSITION)
_PRICE = struct.Struct("<dqdd")


class SegmentJournal:
    """The journal of one attached Engine (one per reader: it owns a buffer)."""

    def __init__(self, engine: Any, batch: int = 256) -> None:
        self._eng = engine
        self._n = batch
        self._buf = ffi.new("eng_jrec[]", batch)
        self._view = ffi.buffer(self._buf)
        self._size = ffi.sizeof("eng_jrec")
        self._out_n = ffi.new("uint32_t *")
        self._out_resume = ffi.new("uint64_t *")

    def seq(self) -> int:
        eng = self._eng
        eng._check_open()
        return int(lib.eng_journal_seq(eng._seg))

    def read(self, after: int, limit: int) -> list[Event]:
        eng = self._eng
        rc = lib.eng_journal_read(eng._seg, after, self._buf, min(limit, self._n), self._out_n,
                                  self._out_resume)
        if rc == lib.ENG_ELAPPED:
            resume = int(self._out_resume[0])
            raise JournalLappedError(
                f"journal of {eng.name!r}: the records after seq {after} were overwritten "
                f"before they were read (the ring holds {eng.journal_records} records); "
                f"the oldest retained is seq {resume}: resync from snapshot(), then "
                f"events(since={resume - 1})", resume)
        if rc:
            raise_for(rc, name=eng.name)
        n = self._out_n[0]
        return [self._event(i) for i in range(n)]

    def _event(self, i: int) -> Event:
        r = self._buf[i]
        eng = self._eng
        kind = int(r.kind)
        base = i * self._size
        record: Any
        if kind == lib.ENG_JK_PRICE:
            price, ts, pct, usd = _PRICE.unpack_from(self._view, base + _W_OFF)
            record = PriceSnapshot(price, ts, pct, usd, int(r.version))
        elif kind == lib.ENG_JK_HALT:
            record = bool(r.word)
        elif kind == lib.ENG_JK_KEY:
            n = min(int(r.version), lib.ENG_KEY_MAX)
            record = bytes(self._view[base + _W_OFF:base + _W_OFF + n])
        elif kind == lib.ENG_JK_ACCOUNT:
            row = ffi.new("eng_account_row *")
            row.id, row.version = int(r.id), int(r.version)
            row.index = int(r.id) & lib.ENG_ID_SLOT_MASK
            ffi.memmove(ffi.addressof(row[0], "b"), ffi.addressof(self._buf[i], "w"),
                        ffi.sizeof("eng_books"))
            record = account_from_row(row)
        else:
            record = tuple.__new__(eng._rec.Context, eng._rec.unpack(
                memoryview(self._view)[base + _W_OFF:base + _W_END]))
        state: Any = None
        trigger: Any = None
        if kind in _SLOT_KINDS:
            state = eng._states.get(int(r.word) & _STATE_MASK)
        if kind == lib.ENG_JK_TRANSITION:
            trigger = eng.spec.Trigger(int(r.trigger))
        return Event(int(r.seq), int(r.ts_ns), KINDS[kind], int(r.id), state, trigger, record)

    def wait(self, after: int, timeout: float) -> bool:
        eng = self._eng
        out = ffi.new("uint64_t *")
        rc = eng._lib.eng_journal_wait(eng._seg, after, max(0, int(timeout * 1e9)), out)
        if rc == lib.ENG_APPLIED:
            return True
        if rc in (lib.ENG_ETIMEDOUT, lib.ENG_EINTR):   # EINTR: handlers run as we return
            return False
        raise_for(rc, name=eng.name)
