"""The shared-memory journal's reader: the ring in the segment (native/journal.c).

``SegmentJournal`` implements ``engine.journal.JournalSource`` for an Engine
on shared memory: ``read`` copies whole records out in one C call (a record
a writer was refilling meanwhile is never returned: the reader is told it was
lapped), ``wait`` sleeps in C on the journal's futex word with the GIL
released, through the Engine's close gate.
"""

from __future__ import annotations

import struct
from typing import Any, NoReturn

import numpy as np

from engine._native import ffi, lib
from engine.accounts import account_from_row
from engine.errors import JournalLappedError, SegmentError, raise_for
from engine.journal import EVENT_DTYPE, KINDS, Event
from engine.records import PriceSnapshot

__all__ = ["SegmentJournal"]

_W_OFF = ffi.offsetof("eng_jrec", "w")
_W_END = ffi.offsetof("eng_jrec", "version") + 8
_STATE_MASK = lib.ENG_SW_STATE_MASK
_PRICE_KIND, _HALT_KIND, _KEY_KIND = lib.ENG_JK_PRICE, lib.ENG_JK_HALT, lib.ENG_JK_KEY
_ACCOUNT_KIND, _RELEASE_KIND = lib.ENG_JK_ACCOUNT, lib.ENG_JK_RELEASE
_ACCT_KEY_OFF = _W_OFF + lib.ENG_DJ_ACCT_KEY_WORD * 8
_ACCT_KEYLEN_OFF = _W_OFF + lib.ENG_DJ_ACCT_KEYLEN_WORD * 8
_TRANSITION_KIND, _OPEN_KIND = lib.ENG_JK_TRANSITION, lib.ENG_JK_OPEN
#: seq, ts_ns, id, word, kind, trigger (the latch word between seq and ts_ns skipped)
_HEAD = struct.Struct("<Q8xqQQII")
_U64 = struct.Struct("<Q")
_VERSION_OFF = ffi.offsetof("eng_jrec", "version")
_PRICE = struct.Struct("<dqdd")
#: records one C read of read_array copies at most
ARRAY_CHUNK = 4096


#: the record's state word, beside EVENT_DTYPE's columns of the same buffer
_RAW = np.dtype({"names": ["word"], "formats": ["<u8"],
                 "offsets": [ffi.offsetof("eng_jrec", "word")], "itemsize": ffi.sizeof("eng_jrec")})


def _row_struct(record: struct.Struct) -> struct.Struct | None:
    """One record of the ring as one struct: the header (``_HEAD``) then the
    spec's fields and version at ``w`` (the record's ``eng_ctx_out`` layout),
    then the padding; None if that does not make exactly one ``eng_jrec``."""
    fmt = _HEAD.format + record.format.lstrip("<@=!>")
    pad = ffi.sizeof("eng_jrec") - struct.calcsize(fmt)
    if _HEAD.size != _W_OFF or _W_OFF + record.size != _W_END or pad < 0:
        return None
    return struct.Struct(fmt + "x" * pad)


class SegmentJournal:
    """The journal of one attached Engine (one per reader: it owns a buffer)."""

    def __init__(self, engine: Any, batch: int = 256) -> None:
        self._eng = engine
        self._n = batch
        self._buf = ffi.new("eng_jrec[]", batch)
        self._view = ffi.buffer(self._buf)
        self._mv = memoryview(self._view)
        self._size = ffi.sizeof("eng_jrec")
        self._out_n = ffi.new("uint32_t *")
        self._out_resume = ffi.new("uint64_t *")
        self._triggers = {int(t): t for t in engine.spec.Trigger}
        # lookup tables for read_array (np.isin costs ~15 us a call): a trigger
        # in the spec (the last entry stands for any out of range), a one-hot state
        self._trigger_ok = np.zeros(lib.ENG_MAX_TRIGGERS + 1, bool)
        self._trigger_ok[list(self._triggers)] = True
        self._state_ok = np.zeros(_STATE_MASK + 1, bool)
        self._state_ok[list(engine._states)] = True
        self._rows = _row_struct(engine._rec._struct)
        #: the decoder of open / transition records from one row (None: the
        #: record has bytes fields, stripped of their padding by _event)
        self._plain = self._rows is not None and not engine._rec._bytes_at

    def seq(self) -> int:
        eng = self._eng
        eng._check_open()
        return int(lib.eng_journal_seq(eng._seg))

    def read(self, after: int, limit: int) -> list[Event]:
        eng = self._eng
        rc = lib.eng_journal_read(eng._seg, after, self._buf, min(limit, self._n), self._out_n,
                                  self._out_resume)
        if rc == lib.ENG_ELAPPED:
            self._lapped(after)
        if rc:
            raise_for(rc, name=eng.name)
        n = self._out_n[0]
        if not self._plain:
            return [self._event(self._mv, i * self._size) for i in range(n)]
        return self._decode(n)

    def _decode(self, n: int) -> list[Event]:
        """The first ``n`` records of the buffer as Events: every record
        unpacked in one ``iter_unpack`` pass (header and the spec's fields
        together); open and transition records (the many) built here
        straight from the row, the other kinds (and anything that fails a
        check) by ``_event``, which raises on a corrupt record."""
        out: list[Event] = []
        add = out.append
        new = tuple.__new__
        ev_cls, ctx_cls = Event, self._eng._rec.Context
        states, triggers = self._eng._states, self._triggers
        mask, size, mv = _STATE_MASK, self._size, self._mv
        rows = self._rows
        assert rows is not None
        for i, r in enumerate(rows.iter_unpack(mv[:n * size])):
            kind = r[4]
            if kind == _TRANSITION_KIND:
                trig = triggers.get(r[5])
                if trig is not None:
                    add(new(ev_cls, (r[0], r[1], "transition", r[2], states.get(r[3] & mask),
                                     trig, new(ctx_cls, r[6:]))))
                    continue
            elif kind == _OPEN_KIND:
                add(new(ev_cls, (r[0], r[1], "open", r[2], states.get(r[3] & mask), None,
                                 new(ctx_cls, r[6:]))))
                continue
            add(self._event(mv, i * size))
        return out

    def _event(self, view: memoryview, base: int) -> Event:
        eng = self._eng
        seq, ts, pid, word, kind, trigger = _HEAD.unpack_from(view, base)
        if kind >= len(KINDS) or (kind == _TRANSITION_KIND and trigger not in self._triggers):
            raise SegmentError(
                f"journal of {eng.name!r}: record seq {seq} is corrupt: kind {kind} "
                f"(in [0, {len(KINDS)})), trigger {trigger} (one of the spec's "
                f"{sorted(self._triggers)} for a transition)")
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
            # then the account's key and its length (ENG_DJ_ACCT_KEY_WORD): the
            # Account an event carries is the account's, key and all
            n = min(int.from_bytes(view[base + _ACCT_KEYLEN_OFF:base + _ACCT_KEYLEN_OFF + 8],
                                   "little"), lib.ENG_KEY_MAX)
            row.key_len = n
            ffi.memmove(row.key, view[base + _ACCT_KEY_OFF:base + _ACCT_KEY_OFF + n], n)
            record = account_from_row(row)
        else:
            record = tuple.__new__(eng._rec.Context,
                                   eng._rec.unpack(view[base + _W_OFF:base + _W_END]))
            if kind != _RELEASE_KIND:
                state = eng._states.get(word & _STATE_MASK)
        return Event(seq, ts, KINDS[kind], pid, state,
                     self._triggers[trigger] if kind == _TRANSITION_KIND else None, record)

    def read_array(self, after: int, limit: int) -> Any:
        """Up to ``limit`` records with seq > ``after`` as an ``EVENT_DTYPE``
        array (empty: nothing new).  C copies up to ``ARRAY_CHUNK`` records
        at a time straight into the array returned (its dtype is laid over
        ``eng_jrec``), numpy then fills ``state`` and clears what a kind does
        not have: no Python object per record.  JournalLappedError as
        ``read`` (for the first record; a lap met after some were read ends
        the array there, and the next call reports it); a corrupt record
        raises SegmentError."""
        eng = self._eng
        out_n = self._out_n
        parts = []
        got = 0
        while got < limit:
            # no more than the journal holds now: an idle poll allocates nothing
            ask = min(limit - got, ARRAY_CHUNK, int(lib.eng_journal_seq(eng._seg)) - after)
            if ask <= 0:
                if not got:   # nothing new, or no journal: the C read says which
                    rc = lib.eng_journal_read(eng._seg, after, self._buf, 0, out_n,
                                              self._out_resume)
                    if rc:
                        raise_for(rc, name=eng.name)
                break
            arr = np.empty(ask, EVENT_DTYPE)
            rc = lib.eng_journal_read(eng._seg, after, ffi.from_buffer("eng_jrec[]", arr), ask,
                                      out_n, self._out_resume)
            if rc == lib.ENG_ELAPPED:
                if got:
                    break
                self._lapped(after)
            if rc:
                raise_for(rc, name=eng.name)
            n = out_n[0]
            if not n:
                break
            arr = arr[:n]
            self._fill(arr)   # first: a copy keeps the named columns only
            parts.append(arr if 2 * n >= ask else arr.copy())   # a few: not the whole buffer
            got += n
            after = int(arr["seq"][n - 1])
            if n < ask:
                break   # read up to the journal's seq
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, EVENT_DTYPE)

    def _fill(self, arr: Any) -> None:
        """Whole records as copied by C, checked, made ``EVENT_DTYPE`` rows
        in place: ``state`` from the state word (open, transition), 0 where
        a kind has no state or trigger, a halt's flag in ``w[0]``.  Tables
        and counts, not np.isin or any(): a call returning a few rows pays
        numpy's per-call cost a dozen times, not its sort."""
        raw = arr.view(_RAW)
        kind = arr["kind"]
        trig = arr["trigger"]
        tr = kind == _TRANSITION_KIND
        known = self._trigger_ok[np.minimum(trig, lib.ENG_MAX_TRIGGERS)]
        bad = (kind >= len(KINDS)) | (tr & ~known)
        if np.count_nonzero(bad):
            at = int(np.argmax(bad))
            raise SegmentError(
                f"journal of {self._eng.name!r}: record seq {int(arr['seq'][at])} is corrupt: "
                f"kind {int(kind[at])} (in [0, {len(KINDS)})), trigger {int(trig[at])} (one of "
                f"the spec's {sorted(self._triggers)} for a transition)")
        word = raw["word"]
        state = word & _STATE_MASK
        arr["state"] = state * ((tr | (kind == _OPEN_KIND)) & self._state_ok[state])
        np.multiply(trig, tr, out=trig)   # 0 but for a transition
        halt = kind == _HALT_KIND
        if np.count_nonzero(halt):
            arr["w"][halt, 0] = word[halt] != 0

    def _lapped(self, after: int) -> NoReturn:
        eng = self._eng
        resume = int(self._out_resume[0])
        raise JournalLappedError(
            f"journal of {eng.name!r}: the records after seq {after} were overwritten "
            f"before they were read (the ring holds {eng.journal_records} records); "
            f"the oldest retained is seq {resume}: resync from snapshot(), then "
            f"events(since={resume - 1})", resume)

    def wait(self, after: int, timeout: float) -> bool:
        eng = self._eng
        out = ffi.new("uint64_t *")
        rc = eng._lib.eng_journal_wait(eng._seg, after, max(0, int(timeout * 1e9)), out)
        if rc == lib.ENG_APPLIED:
            return True
        if rc in (lib.ENG_ETIMEDOUT, lib.ENG_EINTR):   # EINTR: handlers run as we return
            return False
        raise_for(rc, name=eng.name)
