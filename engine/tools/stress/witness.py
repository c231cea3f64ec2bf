"""The journal as a second, independent witness of every commit.

The stress workers log what they committed (links, see ``codec``) and
``verify_chains`` checks those chains against the segment's final state.
The journal (``engine.journal``) records every committed change once, in
order, written by the engine itself in the same call as the change.  This
module reads an engine's whole journal and checks it against both:

* per slot (so per id, in commit order): the journal's records form one
  chain -- an ``open`` first, each ``transition`` a move the spec's table
  allows from the state before it with the trigger it names, a ``release``
  back to free, the generation one more per record (shared memory: the
  record carries the state word it published) -- ending at the slot's final
  state word, with one record per commit the slot's ``transitions`` counter
  counts (no record for a refused call, none missing), and the records of
  one opening carrying one id;
* per slot, against the workers' links: the same number of commits, the
  same states in the same order (and the same generations);
* per account: the books walked from record to record (each ``account``
  record, and each booked ``open`` / close the account's version counts)
  end at the account read at the end;
* the journal itself: seq 1, 2, 3, ... each once (per shard on Redis), no
  lap (a reader a whole ring behind is a failure of the cross-check, never
  a silent pass), no gap but where the journal says so (records of a kind
  ``ENG_JK_VOID``, if the engine defines one).

``JournalRecords`` holds what was read (``read_shm`` / ``read_redis``, or a
``follower_main`` process on shared memory that follows the ring live and
writes it to a file); ``verify_journal`` is the check.  ``JournalWitness``
is the same check for a chaos run: it follows the journal between kill
rounds and checks "record iff committed" against the engine at rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from engine._native import ffi, lib
from engine.journal import KINDS, Event
from engine.tools.stress.verify import ChainReport, _state_name, chain_order

__all__ = ["JREC_DTYPE", "JournalRecords", "JournalWitness", "follower_main", "read_redis",
           "read_shm", "verify_journal"]

_SIZE = int(ffi.sizeof("eng_jrec"))
#: one ring record as numpy sees it (every field the reader's API names)
JREC_DTYPE = np.dtype({
    "names": ["seq", "ts_ns", "id", "word", "kind", "trigger", "w", "version"],
    "formats": ["<u8", "<i8", "<u8", "<u8", "<u4", "<u4", ("<u8", int(lib.ENG_MAX_FIELD_WORDS)),
                "<u8"],
    "offsets": [int(ffi.offsetof("eng_jrec", f)) for f in
                ("seq", "ts_ns", "id", "word", "kind", "trigger", "w", "version")],
    "itemsize": _SIZE})

_OPEN, _TRANSITION, _RELEASE = (int(lib.ENG_JK_OPEN), int(lib.ENG_JK_TRANSITION),
                                int(lib.ENG_JK_RELEASE))
_ACCOUNT = int(lib.ENG_JK_ACCOUNT)
#: a record the journal hands out to say "this seq carries no change" (if the
#: append defines one): the only gap in seq the check accepts
_VOID = getattr(lib, "ENG_JK_VOID", None)
_SLOT_MASK = int(lib.ENG_ID_SLOT_MASK)
_STATE_MASK = int(lib.ENG_SW_STATE_MASK)
_GEN_SHIFT, _GEN_MASK = int(lib.ENG_SW_GEN_SHIFT), int(lib.ENG_SW_GEN_MASK)
_GEN_MOD = _GEN_MASK + 1
READ_BATCH = 4096           # records one C read copies out

#: the violation categories this check adds, and what each means
CATEGORIES = {
    "journal_lapped": "the journal's reader fell a whole ring behind: records were lost "
                      "before the cross-check read them (never counted as a pass)",
    "journal_seq": "a seq missing (not a VOID record) or seen twice",
    "journal_chain": "a slot's records do not form one chain: a transition the spec does not "
                     "allow from the state before it, a generation that did not advance by "
                     "one, an open that did not start from a free slot, or one opening's "
                     "records under two ids",
    "journal_count": "a slot's records differ in number from its commits (transitions "
                     "counter, or the workers' links): a record for a refused call, or a "
                     "commit without its record",
    "journal_links": "a slot's records and the workers' links disagree on a commit's state "
                     "or generation, in commit order",
    "journal_final": "a slot's last record disagrees with its final state word (or id)",
    "journal_books": "an account's books after its records differ from the account read at "
                     "the end (or its version from the commits recorded on it)",
}


# -- reading ---------------------------------------------------------------------------------
@dataclass
class JournalRecords:
    """An engine's journal as read: ``rows`` (``JREC_DTYPE`` on shared memory;
    on Redis the same fields, ``word`` holding the state only), each shard's
    rows in seq order; ``shard`` per row (0 on shared memory); ``has_gen``:
    the words carry generations (shared memory); ``lapped``: why reading
    stopped short (None: read whole); ``event(i)``: row ``i`` as an
    ``Event`` (its record decoded), for the checks that need a record."""

    rows: np.ndarray
    shard: np.ndarray
    has_gen: bool
    event: Callable[[int], Event]
    lapped: str | None = None
    shards: int = 1

    def __len__(self) -> int:
        return len(self.rows)


def _shm_event(eng: Any, rows: np.ndarray) -> Callable[[int], Event]:
    from engine.store.shm_journal import SegmentJournal

    src = SegmentJournal(eng, batch=1)

    def event(i: int) -> Event:
        return src._event(memoryview(rows[i:i + 1].tobytes()), 0)
    return event


def _read_ring(eng: Any, after: int, out: list[bytes]) -> tuple[int, str | None]:
    """Append to ``out`` every record after ``after`` (raw ``JREC_DTYPE`` bytes);
    returns the last seq read and, if the ring was lapped, why."""
    buf = ffi.new("eng_jrec[]", READ_BATCH)
    n = ffi.new("uint32_t *")
    resume = ffi.new("uint64_t *")
    while True:
        rc = lib.eng_journal_read(eng._seg, after, buf, READ_BATCH, n, resume)
        if rc == lib.ENG_ELAPPED:
            return after, (f"lapped after seq {after}: the oldest retained record is seq "
                           f"{int(resume[0])} (ring of {eng.journal_records} records)")
        if rc:
            from engine.errors import raise_for
            raise_for(rc, name=eng.name)
        k = int(n[0])
        if not k:
            return after, None
        out.append(bytes(ffi.buffer(buf, k * _SIZE)))
        after = int(buf[k - 1].seq)


def _rows(parts: list[bytes]) -> np.ndarray:
    """Raw records as one ``JREC_DTYPE`` array (with its padding: a record is
    ``_SIZE`` bytes, as the reader's ``_event`` expects)."""
    return np.frombuffer(b"".join(parts), dtype=JREC_DTYPE)


def read_shm(eng: Any, after: int = 0) -> JournalRecords:
    """Every retained record of a shared-memory engine with seq > ``after``."""
    parts: list[bytes] = []
    _, lapped = _read_ring(eng, after, parts)
    rows = _rows(parts)
    return JournalRecords(rows, np.zeros(len(rows), np.int64), True, _shm_event(eng, rows),
                          lapped)


def follower_main(handle: Any, path: str, stop: Any, target: Any, status: Any) -> None:
    """A dedicated reader process: follow the engine's journal from seq 0 as
    it is written, appending every record to ``path`` (``JREC_DTYPE``), until
    ``stop`` is set and the records up to ``target`` are read.  ``status``:
    [records read, last seq, lapped (1), the oldest retained seq on a lap]."""
    import signal

    # the parent decides when to stop (a process's main: the handler is put
    # back at the end, for a caller that runs it in its own process)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _follow(handle, path, stop, target, status)
    finally:
        signal.signal(signal.SIGINT, before)


def _follow(handle: Any, path: str, stop: Any, target: Any, status: Any) -> None:
    from engine.core import Engine

    eng = Engine.attach(handle)
    buf = ffi.new("eng_jrec[]", READ_BATCH)
    n = ffi.new("uint32_t *")
    resume = ffi.new("uint64_t *")
    seq_out = ffi.new("uint64_t *")
    after = 0
    try:
        with open(path, "wb") as f:
            while True:
                rc = lib.eng_journal_read(eng._seg, after, buf, READ_BATCH, n, resume)
                if rc == lib.ENG_ELAPPED:
                    status[2], status[3] = 1, int(resume[0])
                    return
                if rc:
                    from engine.errors import raise_for
                    raise_for(rc, name=eng.name)
                k = int(n[0])
                if k:
                    f.write(ffi.buffer(buf, k * _SIZE))
                    after = int(buf[k - 1].seq)
                    status[0] += k
                    status[1] = after
                    continue
                if stop.value and after >= target.value:
                    return
                lib.eng_journal_wait(eng._seg, after, 20_000_000, seq_out)   # (no other thread)
    finally:
        eng.close()


def load_followed(eng: Any, path: str, status: Any) -> JournalRecords:
    """What ``follower_main`` wrote (and whether it was lapped)."""
    rows = (np.fromfile(path, dtype=JREC_DTYPE) if os.path.exists(path)
            else np.empty(0, JREC_DTYPE))
    lapped = None
    if status[2]:
        lapped = (f"the follower was lapped after seq {int(status[1])}: the oldest retained "
                  f"record was seq {int(status[3])} (ring of {eng.journal_records} records)")
    return JournalRecords(rows, np.zeros(len(rows), np.int64), True, _shm_event(eng, rows),
                          lapped)


def read_redis(eng: Any) -> JournalRecords:
    """Every retained record of an engine on Redis, shard by shard (each in
    its seq order).  The records carry states, not generations."""
    from engine.errors import JournalLappedError
    from engine.store.redis.journal import ShardJournal

    store = eng.store
    events: list[Event] = []
    shard_of: list[int] = []
    lapped = None
    for sh in range(store.shards):
        src = ShardJournal(store, eng.spec, sh)
        after = 0
        while True:
            try:
                batch = src.read(after, 1024)
            except JournalLappedError as e:
                lapped = (f"shard {sh}: lapped after seq {after}, the oldest retained is "
                          f"seq {e.resume_seq}")
                break
            if not batch:
                break
            events += batch
            shard_of += [sh] * len(batch)
            after = batch[-1].seq
    rows = np.zeros(len(events), JREC_DTYPE)
    states = {s: 1 << i for i, s in enumerate(eng.spec.states)}
    for i, ev in enumerate(events):
        rows["seq"][i] = ev.seq
        rows["id"][i] = ev.id
        rows["kind"][i] = KINDS.index(ev.kind)
        rows["trigger"][i] = int(ev.trigger) if ev.trigger is not None else 0
        rows["word"][i] = states[ev.state.name] if ev.state is not None else 0
        rows["version"][i] = getattr(ev.record, "version", 0) or 0
    return JournalRecords(rows, np.asarray(shard_of, np.int64), False, events.__getitem__,
                          lapped, store.shards)


# -- the check -------------------------------------------------------------------------------
def _legal_table(spec: Any) -> np.ndarray:
    """``table[state index, trigger]``: the one-hot target (0: not allowed)."""
    ns, nt = len(spec.states), len(spec.triggers)
    table = np.zeros((ns + 1, nt + 1), dtype=np.int64)
    for r in spec.rules:
        t = int(spec.Trigger[r.trigger])
        for src in r.sources:
            table[spec.states.index(src), t] = 1 << spec.states.index(r.target)
    return table


def _index_of(onehot: np.ndarray, ns: int) -> np.ndarray:
    """The state index of one-hot states (``ns`` for 0 or a word that is not one-hot)."""
    out = np.full(len(onehot), ns, dtype=np.int64)
    ok = (onehot > 0) & ((onehot & (onehot - 1)) == 0)
    out[ok] = np.log2(onehot[ok]).astype(np.int64)
    out[out > ns] = ns
    return out


@dataclass
class JournalReport(ChainReport):
    """``ChainReport`` for the journal: ``links`` is the records checked;
    ``triggers``: transition records per trigger name; ``accounts``: the
    accounts whose books were walked."""

    triggers: dict[str, int] = field(default_factory=dict)
    accounts: int = 0
    lapped: str | None = None


def verify_journal(jr: JournalRecords, spec: Any, *, final_words: np.ndarray,
                   counters: np.ndarray | None = None, links: np.ndarray | None = None,
                   final_ids: Mapping[int, int] | None = None,
                   books: Mapping[int, Any] | None = None,
                   start: tuple[int, np.ndarray, np.ndarray] | None = None) -> JournalReport:
    """Check a journal read from seq 0 of a fresh engine (see the module's docstring).

    ``final_words[s]``: slot ``s``'s state word at the end (quiescent);
    ``counters[s]``: its transitions counter (None: not exact, as after
    SIGKILLs; the chain of generations is the count then); ``links``: the
    workers' ``LINK_DTYPE`` links (None: no workers' log); ``final_ids``:
    slot -> id of each open slot; ``books``: account id -> ``Account`` read
    at the end.  ``start``: (seq, word and id per slot) where ``jr`` begins,
    when it continues a journal checked up to that seq (``JournalWitness``);
    None: ``jr`` starts at seq 1 of a fresh engine.  Categories: ``CATEGORIES``.
    """
    rows = jr.rows
    cap = len(final_words)
    rep = JournalReport(links=len(rows), slots=cap, lapped=jr.lapped)
    if jr.lapped:
        rep.add("journal_lapped", 1, lambda _: str(jr.lapped), [0])
    kind = rows["kind"].astype(np.int64)
    seq = rows["seq"].astype(np.int64)

    # seq: 1, 2, 3, ... per shard, each once; a VOID record is the only gap allowed
    for sh in range(jr.shards):
        s = seq[jr.shard == sh]
        if not len(s):
            continue
        want_first = (start[0] + 1 if start is not None else 1) if not jr.lapped else int(s[0])
        d = np.diff(np.r_[want_first - 1, s])
        bad = np.flatnonzero(d != 1)
        prefix = f"shard {sh}: " if jr.shards > 1 else ""

        def seq_problem(i: int, s: np.ndarray = s, d: np.ndarray = d,
                        prefix: str = prefix) -> str:
            return prefix + (f"seq {s[i]} seen twice" if d[i] <= 0 else
                            f"seqs {s[i] - d[i] + 1}..{s[i] - 1} missing (no VOID record "
                            "says so)")
        rep.add("journal_seq", len(bad), seq_problem, bad)
    shard = jr.shard     # (a VOID record has none of the kinds checked below)

    # the position records, per slot in commit order
    pos = np.flatnonzero((kind == _OPEN) | (kind == _TRANSITION) | (kind == _RELEASE))
    pr = rows[pos]
    pslot = (pr["id"] & np.uint64(_SLOT_MASK)).astype(np.int64)
    order = np.lexsort((seq[pos], shard[pos], pslot))
    pos, pr, pslot = pos[order], pr[order], pslot[order]
    pk = kind[pos]
    st = (pr["word"] & np.uint64(_STATE_MASK)).astype(np.int64)
    gen = ((pr["word"] >> np.uint64(_GEN_SHIFT)) & np.uint64(_GEN_MASK)).astype(np.int64)
    trig = pr["trigger"].astype(np.int64)
    ids = pr["id"].astype(np.uint64)
    first = np.r_[True, pslot[1:] != pslot[:-1]] if len(pslot) else np.zeros(0, bool)
    last = np.r_[pslot[1:] != pslot[:-1], True] if len(pslot) else np.zeros(0, bool)
    states = spec.State

    def name(onehot: Any) -> str:
        return _state_name(onehot, states)

    for t in np.unique(trig[pk == _TRANSITION]):
        rep.triggers[spec.Trigger(int(t)).name] = int(((pk == _TRANSITION) & (trig == t)).sum())

    bad = np.flatnonzero(pslot >= cap)
    rep.add("journal_chain", len(bad), lambda i: f"record seq {seq[pos[i]]} names slot "
            f"{pslot[i]}, capacity is {cap}", bad)

    # the chain per slot: moves the spec allows, one generation per record
    ns = len(spec.states)
    table = _legal_table(spec)
    sw = np.zeros(cap + 1, dtype=np.uint64)
    sid = np.zeros(cap + 1, dtype=np.uint64)
    if start is not None:
        sw[:cap], sid[:cap] = start[1], start[2]
    cslot = np.minimum(pslot, cap)
    prev = np.r_[0, st[:-1]] if len(st) else st
    prev = np.where(first, (sw[cslot] & np.uint64(_STATE_MASK)).astype(np.int64), prev)
    pidx = _index_of(prev, ns)
    ntrig = len(spec.triggers)
    target = table[pidx, np.clip(trig, 0, ntrig)]
    initial = 1 << spec.states.index(spec.initial)
    ok = np.where(pk == _OPEN, (prev == 0) & (st == initial),
                  np.where(pk == _RELEASE, (prev != 0) & (st == 0),
                           (prev != 0) & (trig <= ntrig) & (target == st)))
    bad = np.flatnonzero(~ok)
    what = {_OPEN: "open", _RELEASE: "release", _TRANSITION: "transition"}
    rep.add("journal_chain", len(bad), lambda i: (
        f"slot {pslot[i]}: record seq {seq[pos[i]]} ({what[int(pk[i])]}"
        + (f" {spec.Trigger(int(trig[i])).name}" if pk[i] == _TRANSITION and trig[i] < ntrig
           else "") + f") goes from {name(prev[i])} to {name(st[i])}"), bad)
    if jr.has_gen:
        pgen = np.where(first, ((sw[cslot] >> np.uint64(_GEN_SHIFT))
                                & np.uint64(_GEN_MASK)).astype(np.int64),
                        np.r_[0, gen[:-1]] if len(gen) else gen)
        bad = np.flatnonzero(gen != (pgen + 1) % _GEN_MOD)
        rep.add("journal_chain", len(bad), lambda i: f"slot {pslot[i]}: record seq "
                f"{seq[pos[i]]} names generation {gen[i]} after {pgen[i]}", bad)
    # one opening, one id: every record after an open (to its release) carries its id
    pid = np.where(first, sid[cslot], np.r_[np.uint64(0), ids[:-1]] if len(ids) else ids)
    bad = np.flatnonzero((pk != _OPEN) & (ids != pid))
    rep.add("journal_chain", len(bad), lambda i: f"slot {pslot[i]}: record seq {seq[pos[i]]} "
            f"names id {int(ids[i]):#x}, the opening's records {int(pid[i]):#x}", bad)

    # one record per commit the slot counted
    counts = np.bincount(pslot[pslot < cap], minlength=cap)
    if counters is not None:
        c = np.asarray(counters, dtype=np.int64)
        bad = np.flatnonzero(counts != c)
        rep.add("journal_count", len(bad), lambda s: f"slot {s}: {counts[s]} records, "
                f"transitions counter says {c[s]}", bad)

    # the last record is the final word (and the open slot's id)
    fw = np.asarray(final_words, dtype=np.uint64)
    fstate = (fw & np.uint64(_STATE_MASK)).astype(np.int64)
    fgen = ((fw >> np.uint64(_GEN_SHIFT)) & np.uint64(_GEN_MASK)).astype(np.int64)
    tails = np.flatnonzero(last & (pslot < cap))
    ts = pslot[tails]
    wrong = (st[tails] != fstate[ts]) | ((gen[tails] != fgen[ts]) if jr.has_gen else False)
    bad = tails[wrong]
    rep.add("journal_final", len(bad), lambda i: f"slot {pslot[i]}: last record seq "
            f"{seq[pos[i]]} says ({name(st[i])}, gen {gen[i] if jr.has_gen else '?'}), the "
            f"final word is ({name(fstate[pslot[i]])}, gen {fgen[pslot[i]]})", bad)
    sstate = (sw[:cap] & np.uint64(_STATE_MASK)).astype(np.int64)
    empty = np.flatnonzero((counts == 0) & (fstate != sstate))
    rep.add("journal_final", len(empty), lambda s: f"slot {s}: no record, final word "
            f"{int(fw[s]):#x}", empty)
    if final_ids is not None:
        last_id = dict(zip(ts.tolist(), ids[tails].tolist(), strict=True))
        wrong_ids = [s for s, i in final_ids.items() if last_id.get(s) != i]
        rep.add("journal_final", len(wrong_ids), lambda s: f"slot {s}: open as id "
                f"{final_ids[s]:#x}, its last record names "
                f"{last_id.get(s)}", wrong_ids)

    # the workers' links, in chain order, against the records, in seq order
    if links is not None:
        lk, _ = chain_order(links[links["slot"] < cap])
        lslot = lk["slot"].astype(np.int64)
        lcounts = np.bincount(lslot, minlength=cap)
        bad = np.flatnonzero(lcounts != counts)
        rep.add("journal_count", len(bad), lambda s: f"slot {s}: {counts[s]} records, the "
                f"workers logged {lcounts[s]} commits", bad)
        same = (lcounts == counts)
        jm = same[pslot[pslot < cap]]
        lm = same[lslot]
        jst, jgen, jslot = st[pslot < cap][jm], gen[pslot < cap][jm], pslot[pslot < cap][jm]
        lst = lk["new_state"][lm].astype(np.int64)
        lgen = lk["new_gen"][lm].astype(np.int64)
        diff = (jst != lst) | ((jgen != lgen) if jr.has_gen else False)
        # one message per slot: its first difference
        dslots, at = np.unique(jslot[diff], return_index=True)
        where = np.flatnonzero(diff)[at]
        rep.add("journal_links", len(dslots), lambda i: f"slot {jslot[i]}: a commit the "
                f"journal records as ({name(jst[i])}, gen {jgen[i] if jr.has_gen else '?'}) "
                f"the workers logged as ({name(lst[i])}, gen {lgen[i]})", where)

    if books is not None:
        _verify_books(jr, rows, kind, seq, pos, pk, books, spec, rep)
    return rep


def _verify_books(jr: JournalRecords, rows: np.ndarray, kind: np.ndarray, seq: np.ndarray,
                  pos: np.ndarray, pk: np.ndarray, books: Mapping[int, Any], spec: Any,
                  rep: JournalReport) -> None:
    """Walk each account's records in commit order: an ``account`` record
    states its books; a booked ``open`` reserves the opening's notional, a
    booked close releases it and books a PnL into cash and realized (cash
    minus realized unchanged), each one version; the walk must end at the
    account read at the end."""
    from engine.accounts import from_units
    from engine.tools.stress.accounts import notional_of

    closed = {1 << spec.states.index(c) for c in spec.closed}
    rec = getattr(spec, "record", None)
    if rec is None or "account" not in getattr(rec, "roles", {}):
        booked: list[int] = []
    else:
        booked = [int(i) for i in pos[(pk == _OPEN) | (pk == _TRANSITION)]]
    # on Redis with several shards a position's records and its account's do
    # not share one order: walk the account's own records only
    ordered = jr.shards == 1
    if not ordered:
        booked = []
    acct_rows = [int(i) for i in np.flatnonzero(kind == _ACCOUNT)]
    # every record that may move books, in commit order (one shard per account on Redis)
    walk: dict[int, list[tuple[int, str, Any]]] = {}
    for i in acct_rows:
        ev = jr.event(i)
        walk.setdefault(int(ev.id), []).append((int(seq[i]), "account", ev.record))
    for i in booked:
        ev = jr.event(i)
        acct = int(getattr(ev.record, "account", 0) or 0)
        if not acct:
            continue
        w = int(rows["word"][i]) & _STATE_MASK
        if kind[i] == _OPEN:
            walk.setdefault(acct, []).append((int(seq[i]), "open", ev.record))
        elif w in closed:
            walk.setdefault(acct, []).append((int(seq[i]), "close", ev.record))
    for aid, final in books.items():
        steps = sorted(walk.get(aid, []), key=lambda x: x[0])
        rep.accounts += 1
        cur: Any = None
        version = opened = 0
        reserved = inv = Decimal(0)
        problems: list[str] = []
        booking = False
        for s, what, r in steps:
            if what == "account":
                # shared memory: a booking is part of its position's record;
                # Redis also writes the books it left as an account record
                # right after (the same version)
                if booking and r.version == version and r.reserved == reserved:
                    booking = False
                    cur, inv = r, r.cash - r.realized_pnl
                    continue
                booking = False
                if cur is not None and ordered and r.version != version + 1:
                    problems.append(f"record seq {s} has version {r.version}, the records "
                                    f"before it make {version + 1}")
                cur, version = r, r.version
                reserved, opened = r.reserved, r.open_positions
                inv = r.cash - r.realized_pnl
                continue
            if cur is None:
                problems.append(f"record seq {s} ({what}) books on it before its open")
                break
            version += 1
            booking = True
            n = from_units(notional_of(r.entry_price, r.amount))
            reserved += n if what == "open" else -n
            opened += 1 if what == "open" else -1
        if cur is None:
            if steps or final is not None:
                problems.append("no account record")
        else:
            want = {"deposits": cur.deposits,
                    "withdrawals": cur.withdrawals, "opening_cash": cur.opening_cash,
                    "max_exposure": cur.max_exposure, "max_positions": cur.max_positions,
                    "max_loss": cur.max_loss}
            if ordered:
                want.update({"version": version, "reserved": reserved,
                             "open_positions": opened, "cash - realized_pnl": inv})
            got = {k: (final.cash - final.realized_pnl if k == "cash - realized_pnl"
                       else getattr(final, k)) for k in want}
            problems += [f"{k} is {got[k]}, its records make {want[k]}"
                         for k in want if got[k] != want[k]]
        if problems:
            def book_problem(j: int, aid: int = aid, problems: list[str] = problems) -> str:
                return f"account {aid:#x}: {problems[j]}"
            rep.add("journal_books", len(problems), book_problem, list(range(len(problems))))


# -- the chaos run's witness --------------------------------------------------------------
class JournalWitness:
    """"Record iff committed" for a run whose processes are SIGKILLed.

    ``follow()`` (after every kill round: workers may be running) reads the
    records published since the last call and checks the prefix: seq one
    more each time, each slot's records one chain of allowed moves, one
    generation each.  ``check()`` (at rest: no worker running, ``recover()``
    done) checks the whole journal against the engine: each slot's chain of
    records ends at its state word (a commit without its record, or a record
    of a change rolled back, leaves them apart), each open slot's id and
    record are those of its last record, each account's books those its
    records make.  Both return a ``JournalReport``; ``assert_clean`` raises
    AssertionError with its messages.
    """

    def __init__(self, eng: Any) -> None:
        if not eng.journal_records:
            raise ValueError("the witness needs an engine created with journal=True")
        self.eng = eng
        self._parts: list[bytes] = []
        self.after = 0
        self.lapped: str | None = None
        self.rounds = 0
        self._words = np.zeros(eng.capacity, dtype=np.uint64)   # each slot's last record's
        self._ids = np.zeros(eng.capacity, dtype=np.uint64)

    @property
    def records(self) -> int:
        return sum(len(p) for p in self._parts) // _SIZE

    def _all(self) -> JournalRecords:
        if len(self._parts) > 1:
            self._parts = [b"".join(self._parts)]
        rows = _rows(self._parts)
        return JournalRecords(rows, np.zeros(len(rows), np.int64), True,
                              _shm_event(self.eng, rows), self.lapped)

    def follow(self) -> JournalReport:
        """Read what was published since the last call; check it as the
        continuation of what was read before (the records alone: mid-run the
        slots move on)."""
        self.rounds += 1
        if self.lapped is not None:
            return JournalReport(links=0, slots=self.eng.capacity, lapped=self.lapped)
        cap = self.eng.capacity
        start = (self.after, self._words.copy(), self._ids.copy())
        new: list[bytes] = []
        self.after, self.lapped = _read_ring(self.eng, self.after, new)
        self._parts += new
        rows = _rows(new)
        jr = JournalRecords(rows, np.zeros(len(rows), np.int64), True,
                            _shm_event(self.eng, rows), self.lapped)
        end_words, end_ids = _chain_end(jr, cap, self._words, self._ids)
        rep = verify_journal(jr, self.eng.spec, final_words=end_words, start=start)
        self._words, self._ids = end_words, end_ids
        return rep

    def check(self, *, books: Mapping[int, Any] | None = None) -> JournalReport:
        """At rest: the whole journal against the engine's slots (and ``books``)."""
        eng = self.eng
        rep0 = self.follow()
        words = np.array([eng.state_word(s) for s in range(eng.capacity)], dtype=np.uint64)
        rows = eng.snapshot()
        final_ids = {int(r["slot"]): int(r["id"]) for r in rows}
        rep = verify_journal(self._all(), eng.spec, final_words=words, final_ids=final_ids,
                             books=books)
        for k, n in rep0.by_category.items():
            rep.by_category[k] = rep.by_category.get(k, 0) + n
        rep.messages += rep0.messages
        # the open slot's record is the one its last record holds
        jr = self._all()
        last = _last_record_of(jr)
        for slot, pid in final_ids.items():
            i = last.get(slot)
            if i is None:
                continue
            ev = jr.event(i)
            ctx = eng.context(pid)
            if tuple(ev.record) != tuple(ctx):
                msg = (f"slot {slot}: last record seq {ev.seq} holds {ev.record}, the "
                       f"context is {ctx}")

                def final_problem(_: int, msg: str = msg) -> str:
                    return msg
                rep.add("journal_final", 1, final_problem, [0])
        return rep


def _chain_end(jr: JournalRecords, cap: int, words: np.ndarray,
               ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per slot, the state word and id its last record published (``words``,
    ``ids``: before ``jr``)."""
    out, out_ids = words.copy(), ids.copy()
    rows = jr.rows
    kind = rows["kind"]
    r = rows[(kind == _OPEN) | (kind == _TRANSITION) | (kind == _RELEASE)]
    slot = (r["id"] & np.uint64(_SLOT_MASK)).astype(np.int64)
    ok = slot < cap
    out[slot[ok]] = r["word"][ok]     # the last write wins: rows are in seq order
    out_ids[slot[ok]] = r["id"][ok]
    return out, out_ids


def _last_record_of(jr: JournalRecords) -> dict[int, int]:
    """Per slot, the row index of its last open or transition record
    (a slot whose last record is a release is left out)."""
    out: dict[int, int] = {}
    kind = jr.rows["kind"]
    slot = (jr.rows["id"] & np.uint64(_SLOT_MASK)).astype(np.int64)
    for i in np.flatnonzero((kind == _OPEN) | (kind == _TRANSITION) | (kind == _RELEASE)):
        if kind[i] == _RELEASE:
            out.pop(int(slot[i]), None)
        else:
            out[int(slot[i])] = int(i)
    return out


def assert_clean(rep: ChainReport, what: str = "journal cross-check") -> None:
    """Raise AssertionError naming every violation category and its messages."""
    if rep.violations:
        raise AssertionError(f"{what}: {rep.violations} violations {rep.by_category}\n"
                             + "\n".join(rep.messages[:40]))


# -- the stress runs' follower -----------------------------------------------------------------
#: the ring of a stress run's engine on shared memory (a follower reads it
#: live; this many records of lag before it is lapped: 256 MiB of ring)
STRESS_RING_RECORDS = 1 << 20
#: on Redis each shard's stream keeps this many (read after the run)
STRESS_REDIS_RECORDS = int(lib.ENG_JOURNAL_MAX_RECORDS)
FOLLOWER_TIMEOUT = 120.0      # s the follower gets to read the last records at the end


def journal_options(url: str | None) -> dict[str, Any]:
    """``Engine.create`` options of a stress run's journal."""
    return {"journal": True,
            "journal_records": STRESS_REDIS_RECORDS if url else STRESS_RING_RECORDS}


class JournalFollower:
    """The stress run's reader: on shared memory a process that follows the
    ring from seq 0 while the workers run (``start``), on Redis nothing until
    the end; ``finish`` (workers stopped) returns every record, or says why
    not (``JournalRecords.lapped``: a lap, or a follower that did not end)."""

    def __init__(self, ctx: Any, eng: Any, tmp: str) -> None:
        self.eng = eng
        self.ctx = ctx
        self.path = os.path.join(tmp, "journal.jrec")
        self.proc: Any = None
        self.stop = ctx.RawValue("B", 0)
        self.target = ctx.RawValue("Q", 0)
        self.status = ctx.RawArray("Q", 4)

    def start(self) -> None:
        if self.eng.url is not None:
            return
        self.proc = self.ctx.Process(target=follower_main, name="stress-journal-follower",
                                     args=(self.eng.handle, self.path, self.stop, self.target,
                                           self.status), daemon=True)
        self.proc.start()

    def finish(self) -> JournalRecords:
        if self.eng.url is not None:
            return read_redis(self.eng)
        self.target.value = self.eng.journal_seq
        self.stop.value = 1
        self.proc.join(FOLLOWER_TIMEOUT)
        stuck = None
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
            stuck = (f"the journal follower had read up to seq {int(self.status[1])} of "
                     f"{int(self.target.value)} after {FOLLOWER_TIMEOUT:g} s")
        elif self.proc.exitcode:
            stuck = f"the journal follower exited with code {self.proc.exitcode}"
        jr = load_followed(self.eng, self.path, self.status)
        if stuck and not jr.lapped:
            jr.lapped = stuck
        return jr

    def kill(self) -> None:
        """Stop the follower whatever happened (cleanup)."""
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def journal_summary(rep: JournalReport, jr: JournalRecords) -> dict[str, Any]:
    """The cross-check's figures for a stress result's ``verification``."""
    return {"records": len(jr), "checked": rep.links, "lapped": rep.lapped,
            "by_trigger": rep.triggers, "accounts": rep.accounts,
            "violations": {k: n for k, n in rep.by_category.items() if k in CATEGORIES},
            "meaning": {k: CATEGORIES[k] for k in rep.by_category if k in CATEGORIES},
            "per_shard": not jr.has_gen}


def add_to_result(res: Any, rep: JournalReport, jr: JournalRecords) -> None:
    """Count the cross-check's violations into a ``StressResult``."""
    by_category = res.verification["by_category"]
    for k, n in rep.by_category.items():
        by_category[k] = by_category.get(k, 0) + n
    res.violations += rep.violations
    res.violation_messages.extend(rep.messages)
    res.verification["journal"] = journal_summary(rep, jr)


#: ``Engine.create`` options of an engine a chaos run's witness follows
#: between kill rounds (64 MiB of ring: a round commits far fewer)
WITNESS_JOURNAL: dict[str, Any] = {"journal": True, "journal_records": 1 << 18}
