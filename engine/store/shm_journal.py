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
_PRICE_KIND, _HALT_KIND, _KEY_KIND = lib.ENG_JK_PRICE, lib.ENG_JK_HALT, lib.ENG_JK_KEY
_ACCOUNT_KIND, _RELEASE_KIND = lib.ENG_JK_ACCOUNT, lib.ENG_JK_RELEASE
_TRANSITION_KIND = lib.ENG_JK_TRANSITION
#: seq, ts_ns, id, word, kind, trigger (the latch word between seq and ts_ns skipped)
_HEAD = struct.Struct("<Q8xqQQII")
_U64 = struct.Struct("<Q")
_VERSION_OFF = ffi.offsetof("eng_jrec", "version")
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
        self._triggers = {int(t): t for t in engine.spec.Trigger}

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
        view = memoryview(self._view)
        return [self._event(view, i * self._size) for i in range(self._out_n[0])]

    def _event(self, view: memoryview, base: int) -> Event:
        eng = self._eng
        seq, ts, pid, word, kind, trigger = _HEAD.unpack_from(view, base)
        version = _U64.unpack_from(view, base + _VERSION_OFF)[0]
        record: Any
        state: Any = None
        if kind == _PRICE_KIND:
            price, pts, pct, usd = _PRICE.unpack_from(view, base + _W_OFF)
            record = PriceSnapshot(price, pts, pct, usd, version)
        elif kind == _HALT_KIND:
            record = bool(word)
        elif kind == _KEY_KIND:
            record = bytes(view[base + _W_OFF:base + _W_OFF + min(version, lib.ENG_KEY_MAX)])
        elif kind == _ACCOUNT_KIND:
            row = ffi.new("eng_account_row *")
            row.id, row.version, row.index = pid, version, pid & lib.ENG_ID_SLOT_MASK
            ffi.memmove(ffi.addressof(row[0], "b"), view[base + _W_OFF:base + _W_END],
                        ffi.sizeof("eng_books"))
            record = account_from_row(row)
        else:
            record = tuple.__new__(eng._rec.Context,
                                   eng._rec.unpack(view[base + _W_OFF:base + _W_END]))
            if kind != _RELEASE_KIND:
                state = eng._states.get(word & _STATE_MASK)
        return Event(seq, ts, KINDS[kind], pid, state,
                     self._triggers[trigger] if kind == _TRANSITION_KIND else None, record)

    def wait(self, after: int, timeout: float) -> bool:
        eng = self._eng
        out = ffi.new("uint64_t *")
        rc = eng._lib.eng_journal_wait(eng._seg, after, max(0, int(timeout * 1e9)), out)
        if rc == lib.ENG_APPLIED:
            return True
        if rc in (lib.ENG_ETIMEDOUT, lib.ENG_EINTR):   # EINTR: handlers run as we return
            return False
        raise_for(rc, name=eng.name)
