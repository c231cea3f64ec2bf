"""The journal of an engine on Redis: one stream per shard.

Every committing server-side function appends its record to its shard's
stream ``eng:{name:shard}:j`` in the same call as the change (see "the
journal" in functions.lua), so a record exists iff its change
committed, a resend that the exactly-once request record answers adds
nothing, and the call is still one round trip.

Order and seq.  Each shard numbers its records 1, 2, 3, ... in its commit
order: ``Event.seq`` is that shard's seq.  A position's and an account's
records all live on one shard, so order per id and per account holds; no
order holds across shards.  ``shard_of(event, shards)`` says which shard.

Resuming.  With one shard (the default on one server) a seq is a cursor as
on shared memory: ``read(after)`` / ``events(since=N)``.  With several, the
cursor is one seq per shard, a tuple (``RedisJournal.seqs()`` now,
``Cursor.after`` as read): ``read_cursor(cursor, limit)`` returns the records
after it and the cursor after them.  A single int cannot name a place in
several independent orders, so ``read(after)`` on several shards is refused
rather than guessed.

Retention.  Each stream keeps the newest ``journal_records`` records (XADD
MAXLEN); a reader whose next record was trimmed gets ``JournalLappedError``
with ``resume_seq`` (that shard's oldest retained seq), never a silent gap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine._native import ffi, lib
from engine.accounts import account_from_row
from engine.errors import ArgumentError, JournalLappedError, ServerError
from engine.journal import EVENT_DTYPE, KINDS, Event
from engine.records import PRICE_STRUCT, PriceSnapshot
from engine.spec import MachineSpec

__all__ = ["RedisJournal", "ShardJournal", "shard_of"]

_ID_SLOT_BITS = lib.ENG_ID_SLOT_BITS
_ID_SLOT_MASK = lib.ENG_ID_SLOT_MASK
#: entries one jread of read_array asks for at most
ARRAY_CHUNK = 4096
#: where an account record's key starts in its words (after the books), as on shm
_ACCT_KEY_OFF = lib.ENG_DJ_ACCT_KEY_WORD * 8
_POSITION_KINDS = frozenset(("open", "transition", "release", "key", "price"))


def shard_of(event: Event, shards: int) -> int | None:
    """The shard whose journal holds ``event`` (None for ``halt``: each
    shard records its own)."""
    if event.kind == "halt":
        return None
    return int(event.id & _ID_SLOT_MASK) % shards


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class ShardJournal:
    """One shard's stream, as a ``JournalSource`` (engine/journal.py)."""

    def __init__(self, store: Any, spec: MachineSpec, shard: int) -> None:
        self._store = store
        self._spec = spec
        self.shard = shard
        #: the stream's key (what a blocking read waits on)
        self.stream = store.prefixes[shard] + "j"
        self._states = {1 << i: spec.State(1 << i) for i in range(len(spec.states))}
        self._local = threading.local()   # each thread's blocking connection (see wait)

    def _jread(self, after: int, limit: int) -> list[Any]:
        return list(self._store._fn(self.shard, "jread", after, limit, keys=[self.stream]))

    def seq(self) -> int:
        """The shard's last seq (0: nothing recorded yet)."""
        return int(self._jread(2**62, 0)[0])

    def read(self, after: int, limit: int) -> list[Event]:
        """Up to ``limit`` records with seq > ``after``, in seq order;
        JournalLappedError if the next one was trimmed."""
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ArgumentError(f"after must be an int seq >= 0, got {after!r:.40}")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1 << 20:
            raise ArgumentError(f"limit must be an int in [1, {1 << 20}], got {limit!r:.40}")
        return [self._event(e) for e in self._entries(after, limit)]

    def _entries(self, after: int, limit: int) -> list[Any]:
        """The stream entries of up to ``limit`` records after ``after``
        (JournalLappedError if the next one was trimmed)."""
        r = self._jread(after, limit)
        last, oldest = int(r[0]), int(r[1])
        if after < last and (oldest == 0 or oldest > after + 1):
            raise JournalLappedError(
                f"journal of shard {self.shard}: the records after seq {after} were trimmed "
                f"(retained: {oldest} to {last}); resync from snapshot() and resume from "
                f"seq {max(oldest, 1) - 1}", resume_seq=max(oldest, 1))
        return r[2:]

    def read_array(self, after: int, limit: int) -> Any:
        """``read`` as an ``EVENT_DTYPE`` array (``Engine.read_events``): the
        same columns as on shared memory, built from the stream entries
        (``w`` holds the words the entry carries: a position's record, an
        account's books, a price, a key's bytes, a halt's flag), read
        ``ARRAY_CHUNK`` entries per call."""
        parts = []
        got = 0
        while got < limit:
            ask = min(limit - got, ARRAY_CHUNK)
            try:
                entries = self._entries(after, ask)
            except JournalLappedError:
                if got:
                    break   # what was read first; the next call reports the lap
                raise
            if not entries:
                break
            arr = np.zeros(len(entries), EVENT_DTYPE)
            for i, e in enumerate(entries):
                self._row(e, arr[i:i + 1])
            parts.append(arr)
            got += len(entries)
            after = int(arr["seq"][-1])
            if len(entries) < ask:
                break
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, EVENT_DTYPE)

    def _row(self, entry: Any, row: Any) -> None:
        """One stream entry into one ``EVENT_DTYPE`` row (a view of length 1)."""
        eid, flat = entry[0], entry[1]
        f = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        kind = _text(f["k"])
        if kind not in KINDS:
            raise ServerError(f"journal of shard {self.shard}: entry {_text(eid)} is corrupt: "
                              f"kind {kind!r} (one of {KINDS})")
        row["seq"] = int(_text(eid).split("-")[0])
        row["ts_ns"] = int(f["ts"])
        row["kind"] = KINDS.index(kind)
        words = row["w"].view(np.uint8).reshape(-1)
        if kind == "halt":
            row["w"][0, 0] = _text(f["r"]) == "1"
            return
        ident = int(f["o"]) << _ID_SLOT_BITS | int(f["s"])
        row["id"] = ident
        if kind == "account":
            acct = ffi.new("eng_account_row *")
            self._store._books_row(ident, _text(f["r"]).split(","), acct)
            b = bytes(ffi.buffer(ffi.addressof(acct[0], "b"), ffi.sizeof("eng_books")))
            words[:len(b)] = np.frombuffer(b, np.uint8)
            key = bytes(f.get("key") or b"")[:lib.ENG_KEY_MAX]   # then the key, as on shm
            words[_ACCT_KEY_OFF:_ACCT_KEY_OFF + len(key)] = np.frombuffer(key, np.uint8)
            row["w"][0, lib.ENG_DJ_ACCT_KEYLEN_WORD] = len(key)
            row["version"] = int(acct.version)
            return
        if kind in ("open", "transition"):
            st = int(f.get("st") or 0)
            row["state"] = st if st in self._states else 0
        if kind == "transition":
            row["trigger"] = int(f["t"])
        raw = bytes(f.get("r") or b"")
        words[:len(raw)] = np.frombuffer(raw, np.uint8)
        row["version"] = len(raw) if kind == "key" else int(f.get("v") or 0)

    def wait(self, after: int, timeout: float) -> bool:
        """Block (a slice at a time, on the server) until the shard holds a
        seq > ``after`` or ``timeout`` seconds pass; True if it does.

        The block is on a connection of the calling thread's own, so the
        Engine's other calls (on its shared connection) never queue behind
        it, and a helper thread may wait while the Engine's thread works."""
        deadline = time.monotonic() + timeout
        slice_ms = self._store.wait_slice_ms()
        while True:
            if self.seq() > after:
                return True
            ms = int((deadline - time.monotonic()) * 1000)
            if ms <= 0:
                return False
            self._block(f"{after}-1", min(ms, slice_ms))

    def _block(self, last: str, ms: int) -> None:
        conns = self._local.__dict__.setdefault("conns", {})
        name, conn, _cid = self._store.conn.blocking_connection(self.stream, conns)
        try:
            conn.send_command("XREAD", "BLOCK", ms, "STREAMS", self.stream, last)
            conn.read_response()
        except BaseException as e:   # a reply may be in flight: never read it as the next one's
            conn.disconnect()
            conns.pop(name, None)
            if isinstance(e, self._store.conn.errors):
                raise ServerError(f"{self._store.url}: journal wait failed: {e}") from None
            raise

    def probe(self, after: int) -> Any:
        """An engine.aio probe: done (the shard's seq) once a record past
        ``after`` exists; else sleep on the stream past it."""
        def check(eng: Any) -> tuple[bool, Any]:
            last = int(eng._seg._fn(self.shard, "jread", after, 0, keys=[self.stream])[0])
            if last > after:
                return True, last
            return False, (self.stream, f"{after}-1".encode())
        return check

    def _event(self, entry: Any) -> Event:
        eid, flat = entry[0], entry[1]
        f = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        seq = int(_text(eid).split("-")[0])
        kind = _text(f["k"])
        ts = int(f["ts"])
        if kind == "halt":
            return Event(seq, ts, kind, 0, None, None, _text(f["r"]) == "1")
        num, op = int(f["s"]), int(f["o"])
        ident = op << _ID_SLOT_BITS | num
        if kind == "account":
            row = ffi.new("eng_account_row *")
            self._store._books_row(ident, _text(f["r"]).split(","), row)
            key = bytes(f.get("key") or b"")[:lib.ENG_KEY_MAX]   # its key, as aread reads it
            row.key_len = len(key)
            ffi.memmove(row.key, key, len(key))
            return Event(seq, ts, kind, ident, None, None, account_from_row(row))
        st = int(f.get("st") or 0)
        state = self._states.get(st)
        trigger = None
        record: Any = None
        if kind in ("open", "transition"):
            if kind == "transition":
                trigger = self._spec.Trigger(int(f["t"]))
            out = ffi.new("eng_ctx_out *")
            w = f["r"]
            ffi.memmove(out.w, w, len(w))
            out.version = int(f["v"])
            rec = self._spec.record
            record = rec.Context(*rec.unpack(memoryview(ffi.buffer(out))))
        elif kind == "key":
            record = bytes(f["r"])
        elif kind == "price":
            record = PriceSnapshot(*PRICE_STRUCT.unpack(bytes(f["r"]) + int(f["v"]).to_bytes(8,
                                                                                    "little")))
        return Event(seq, ts, kind, ident, state, trigger, record)


class RedisJournal:
    """Every shard's journal of one engine on Redis.

    A ``JournalSource`` (seq, read, wait) when the engine has one shard;
    with several, follow it with ``read_cursor`` (see the module
    docstring: one seq per shard)."""

    def __init__(self, store: Any, spec: MachineSpec) -> None:
        self.shards = [ShardJournal(store, spec, s) for s in range(store.shards)]

    def _one(self) -> ShardJournal:
        if len(self.shards) != 1:
            raise ArgumentError(
                f"this engine's journal is {len(self.shards)} streams (one per shard), each "
                "with its own seq: follow it with a cursor of one seq per shard "
                "(RedisJournal.read_cursor / seqs), not one int")
        return self.shards[0]

    def seq(self) -> int:
        return self._one().seq()

    def read(self, after: int, limit: int) -> list[Event]:
        return self._one().read(after, limit)

    def wait(self, after: int, timeout: float) -> bool:
        return self._one().wait(after, timeout)

    def read_array(self, after: int, limit: int) -> Any:
        return self._one().read_array(after, limit)

    def seqs(self) -> tuple[int, ...]:
        """Each shard's last seq: the cursor of "now"."""
        return tuple(j.seq() for j in self.shards)

    def read_cursor(self, cursor: Sequence[int],
                    limit: int) -> tuple[list[Event], tuple[int, ...]]:
        """Up to ``limit`` records per shard after ``cursor`` (one seq per
        shard), shard by shard, and the cursor after them."""
        if len(cursor) != len(self.shards):
            raise ArgumentError(f"a cursor has one seq per shard ({len(self.shards)}), "
                                f"got {len(cursor)}")
        out: list[Event] = []
        after = list(cursor)
        for i, j in enumerate(self.shards):
            got = j.read(after[i], limit)
            if got:
                after[i] = got[-1].seq
            out += got
        return out, tuple(after)
