"""Adversary of the journal's append: same-process re-entry, the ring's arithmetic at its
lap boundaries, and crafted record headers.

Forbidden outcomes: a guard or a signal handler that commits while its own
thread is mid-append (holding an object's lock, perhaps a claimed record)
deadlocking, crashing, or leaving a record without its commit (or a commit
without its record), even when its commits wrap the smallest ring onto that
record; a reader at seq N-1, N, N+1, 2N.. of a ring of N that gets a wrong
record, a silent gap, a lap where nothing was lost, or a resume_seq that is
not the oldest record still readable; a crafted record header that crashes
or hangs a reader or a committer, or a lap error whose resume_seq does not
move a follower past the bad record (it would loop forever).
"""

from __future__ import annotations

import json
import os
import signal
import struct
from typing import Any

import numpy as np
import pytest
from journal_audit import (
    Segment,
    check_seqs,
    drain,
    forked,
    journal_on,  # noqa: F401 (the make_engine fixture, journal on)
)
from procs import exit_guarded_spec

from engine import Engine, Outcome, State, Trigger
from engine._native import ffi, lib
from engine.errors import EngineError, JournalLappedError

pytestmark = pytest.mark.shm_only


# -- re-entry: a guard (and a signal handler inside it) commits mid-append ------------------

REENTRY: dict[str, Any] = {}


def committing_guard(ctx: Any, price: Any) -> bool:
    """EXIT_STARTED's guard: runs REENTRY["fn"] (commits elsewhere) with the lock held."""
    fn = REENTRY.get("fn")
    if fn is not None:
        REENTRY["fn"] = None   # once per guarded call
        fn()
    return True


REENTRY_SPEC = exit_guarded_spec(committing_guard, "jadv_reentry")


def flip(eng: Engine, pos: int) -> Outcome:
    return eng.transition(pos, Trigger.PAUSE if eng.state(pos) is State.MONITORING
                          else Trigger.RESUME)


class TestReentry:
    @pytest.mark.parametrize("records", [lib.ENG_JOURNAL_MIN_RECORDS, 64])
    def test_guard_commits_while_its_transition_appends(self, make_engine: Any,
                                                        records: int) -> None:
        """A guard committing 3 rings' worth elsewhere: each commit, its own too, recorded once."""
        eng = make_engine(capacity=16, max_accounts=2, journal_records=records,
                          spec=REENTRY_SPEC)
        acct = eng.open_account(cash=1000, max_exposure=500, max_positions=4, max_loss=100)
        pos = eng.open_position(10.0, 1.0)
        others = [eng.open_position(10.0, 1.0) for _ in range(2)]
        for p in (pos, *others):
            eng.transition(p, Trigger.POSITION_OPENED)
        eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=1)
        outs: list[str] = []
        deposits = [0]

        def commit_elsewhere() -> None:
            for i in range(3 * records):
                try:
                    if i % 3 == 0:
                        outs.append(flip(eng, others[i % 2]).name)
                    elif i % 3 == 1:
                        eng.deposit(acct, 1)
                        outs.append("APPLIED")
                        deposits[0] += 1
                    else:   # its own id, locked by this very call: refused within a bound
                        outs.append(eng.transition(pos, Trigger.EXIT_CANCELLED).name)
                except EngineError as e:   # a typed refusal is allowed; a hang is not
                    outs.append(type(e).__name__)

        REENTRY["fn"] = commit_elsewhere
        seq0 = eng.journal_seq
        out = eng.transition(pos, Trigger.EXIT_STARTED)
        assert out is Outcome.APPLIED and eng.state(pos) is State.EXITING, out
        assert set(outs) <= {"APPLIED", "CONFLICT", "BusyError"}, outs
        applied = outs.count("APPLIED")
        assert eng.journal_seq - seq0 == applied + 1, \
            f"{applied} commits + the guarded one, {eng.journal_seq - seq0} records"
        assert eng.account(acct).version == 1 + deposits[0]
        assert_sum(eng, others=1 + deposits[0])
        tail = drain(eng, eng.journal_seq - records + 1)
        check_seqs(tail, eng.journal_seq, first=eng.journal_seq - records + 2)
        print(f"guard re-entry, ring {records}: {applied} applied, "
              f"{len(outs) - applied} refused")

    def test_signal_handler_commits_inside_a_guard(self, make_engine: Any) -> None:
        """A signal handler inside a guard commits elsewhere: no deadlock, records == commits."""
        eng = make_engine(capacity=16, max_accounts=2,
                          journal_records=lib.ENG_JOURNAL_MIN_RECORDS, spec=REENTRY_SPEC)
        acct = eng.open_account(cash=1000, max_exposure=500, max_positions=4, max_loss=100)
        pos = eng.open_position(10.0, 1.0)
        other = eng.open_position(10.0, 1.0)
        for p in (pos, other):
            eng.transition(p, Trigger.POSITION_OPENED)
        eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=1)
        outs: list[str] = []
        deposits = [0]

        def handler(signum: int, frame: Any) -> None:
            for _ in range(2 * lib.ENG_JOURNAL_MIN_RECORDS):
                try:
                    outs.append(flip(eng, other).name)
                    eng.deposit(acct, 1)
                    outs.append("APPLIED")
                    deposits[0] += 1
                except EngineError as e:
                    outs.append(type(e).__name__)

        def raise_signal() -> None:
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):   # bytecodes: the handler runs at one of them
                if outs:
                    break

        old = signal.signal(signal.SIGUSR1, handler)
        try:
            REENTRY["fn"] = raise_signal
            seq0 = eng.journal_seq
            assert eng.transition(pos, Trigger.EXIT_STARTED) is Outcome.APPLIED
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert outs, "the handler never ran inside the guard"
        assert set(outs) <= {"APPLIED", "CONFLICT", "BusyError"}, outs
        assert eng.journal_seq - seq0 == outs.count("APPLIED") + 1
        assert_sum(eng, others=1 + deposits[0])


def assert_sum(eng: Engine, others: int) -> None:
    """Slot commits + ``others`` non-slot records == journal_seq (past a wrap only the
    sum can be checked; the generation wraps)."""
    span = lib.ENG_SW_GEN_MASK + 1
    gens = sum((eng.state_word(s) >> lib.ENG_SW_GEN_SHIFT) & lib.ENG_SW_GEN_MASK
               for s in range(eng.capacity))
    assert (gens + others - eng.journal_seq) % span == 0, \
        f"{gens} slot commits + {others} others != {eng.journal_seq} records"


# -- the ring's arithmetic at its lap boundaries -----------------------------------------------

def advance(eng: Engine, pos: int, n: int) -> None:
    """Exactly ``n`` fast transitions on ``pos`` (PAUSE/RESUME), in one C call each 1M."""
    paused = eng.state(pos) is State.PAUSED
    while n:
        k = min(n, 1 << 20)
        trig = np.empty(k, dtype=np.uint32)
        trig[0::2] = int(Trigger.RESUME if paused else Trigger.PAUSE)
        trig[1::2] = int(Trigger.PAUSE if paused else Trigger.RESUME)
        outs = eng.transition_many(np.full(k, pos, dtype=np.uint64), trig)
        assert (outs == int(Outcome.APPLIED)).all()
        paused = paused if k % 2 == 0 else not paused
        n -= k


def check_ring_at(eng: Engine, pos: int, top: int) -> None:
    """At journal_seq == top: every since in [0, top] reads exactly since+1..top or laps
    with resume_seq the oldest readable record; the last records - ENG_JOURNAL_MAX_FILL
    always read."""
    n = eng.journal_records
    assert eng.journal_seq == top
    oldest = None
    for since in range(max(0, top - 2 * n - 2), top + 1):
        try:
            evs = drain(eng, since)
        except JournalLappedError as e:
            fill = lib.ENG_JOURNAL_MAX_FILL   # records a holder may fill past the top
            assert since < top - n + fill, f"top {top}: since {since} lapped, though within " \
                                           f"the last {n - fill} records"
            r = e.resume_seq
            assert since + 1 < r <= top - n + 1 + fill, f"top {top}, since {since}: resume {r}"
            if oldest is None:
                oldest = r
            assert r == oldest or r > oldest
            got = drain(eng, r - 1)   # resume_seq is readable
            check_seqs(got, top, first=r)
            continue
        check_seqs(evs, top, first=since + 1)
        for ev in evs:
            assert (ev.kind == "transition" and ev.id == pos) or ev.seq <= 2, ev
    if top > n:
        assert oldest is not None or top - n - 1 < 0, f"top {top}: no lap reported at all"


class TestLapBoundaries:
    @pytest.mark.parametrize("records", [lib.ENG_JOURNAL_MIN_RECORDS, 8])
    def test_reads_at_seq_n_minus_1_n_n_plus_1_2n(self, make_engine: Any,
                                                  records: int) -> None:
        """At journal_seq N-1, N, N+1, 2N-1, 2N, 2N+1, 3N: exact reads or exact laps."""
        n = records
        for top in (n - 1, n, n + 1, 2 * n - 1, 2 * n, 2 * n + 1, 3 * n):
            eng = make_engine(capacity=4, journal_records=n)
            pos = eng.open_position(10.0, 1.0)
            eng.transition(pos, Trigger.POSITION_OPENED)
            for _ in range(top - 2):
                flip(eng, pos)
            check_ring_at(eng, pos, top)
            eng.close()

    def test_lap_bits_wrap(self, make_engine: Any) -> None:
        """Across 2^k laps of the smallest ring (k up to 16): reads stay exact at each boundary."""
        n = lib.ENG_JOURNAL_MIN_RECORDS
        eng = make_engine(capacity=4, journal_records=n)
        pos = eng.open_position(10.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        top = 2
        for k in range(1, 17):
            for target in ((n << k) - 1, n << k, (n << k) + 1):
                advance(eng, pos, target - top)
                top = target
                check_ring_at(eng, pos, top)

    @pytest.mark.slow
    def test_lap_bits_wrap_far(self, make_engine: Any) -> None:
        """The same up to 2^22 laps."""
        n = lib.ENG_JOURNAL_MIN_RECORDS
        eng = make_engine(capacity=4, journal_records=n)
        pos = eng.open_position(10.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        top = 2
        for k in range(1, 23):
            for target in ((n << k) - 1, n << k, (n << k) + 1):
                advance(eng, pos, target - top)
                top = target
                check_ring_at(eng, pos, top)


# -- crafted record headers --------------------------------------------------------------------

def read_and_commit(handle: str, pos: int, out: str) -> int:
    """Forked child: read everything, commit once, read again; report what happened."""
    eng = Engine.attach(handle)
    res: dict[str, Any] = {}
    for step in ("read", "commit", "read2"):
        try:
            if step == "commit":
                res[step] = flip(eng, pos).name
            else:
                res[step] = ["ok", [e.seq for e in drain(eng)]]
        except JournalLappedError as e:
            res[step] = ["lapped", e.resume_seq]
        except EngineError as e:
            res[step] = ["error", f"{type(e).__name__}: {e}"]
        except Exception as e:   # an untyped error is the finding
            res[step] = ["untyped", f"{type(e).__name__}: {e}"]
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


def header_words() -> list[tuple[str, int]]:
    """(name, offset) of the record's leading 64-bit words (its seq / header)."""
    names = [f for f in ("seq", "hdr", "head", "header", "state", "latch")
             if f in dict(ffi.typeof("eng_jrec").fields)]
    return [(f, ffi.offsetof("eng_jrec", f)) for f in names]


class TestCraftedHeaders:
    @pytest.mark.parametrize("victim", [1, 3, 5])
    def test_crafted_header_is_typed_never_a_hang(self, make_engine: Any, tmp_path: Any,
                                                  victim: int) -> None:
        """A record header set to crafted values: typed errors or the truth, never a hang."""
        n = 8
        findings = []
        values = [0, 1, 2**64 - 1, 2**63, 1 << 40]
        for name, off in header_words():
            for crafted in (*values, victim + n, victim - 1 if victim > 1 else 7,
                            victim + (n << 20), victim | (0xFFFFFF << 40)):
                eng = make_engine(capacity=4, journal_records=n)
                pos = eng.open_position(10.0, 1.0)
                eng.transition(pos, Trigger.POSITION_OPENED)
                for _ in range(4):
                    flip(eng, pos)
                top = eng.journal_seq
                seg = Segment(eng)
                seg.put_u64(seg.record(victim) + off, crafted & (2**64 - 1))
                seg.close()
                out = str(tmp_path / "r.json")
                code = forked(read_and_commit, eng.handle, pos, out, timeout=60)
                assert code == 0, f"{name}={crafted:#x}: the reader died ({code})"
                with open(out) as f:
                    res = json.load(f)
                for step in ("read", "read2"):
                    kind, what = res[step]
                    if kind == "untyped":
                        findings.append(f"{name}={crafted:#x} {step}: untyped {what}")
                    elif kind == "ok":
                        seqs = what
                        if seqs != list(range(1, len(seqs) + 1)) or \
                                (victim in range(1, top + 1) and victim not in seqs and
                                 seqs and seqs[-1] >= victim):
                            findings.append(f"{name}={crafted:#x} {step}: {seqs}")
                    elif kind == "lapped" and what <= victim:
                        findings.append(f"{name}={crafted:#x} {step}: lapped with resume_seq "
                                        f"{what} <= the bad record {victim}: a follower "
                                        f"resuming there loops forever")
                if res["commit"] != "APPLIED" and res["commit"][0] != "error":
                    findings.append(f"{name}={crafted:#x}: commit {res['commit']}")
                eng.close()
        assert not findings, "\n".join(findings)

    def test_header_words_known(self) -> None:
        """The record has a header word this file knows how to craft."""
        assert header_words(), dict(ffi.typeof("eng_jrec").fields).keys()


def test_struct_sizes() -> None:
    """The record is ENG_JREC_SIZE bytes (the crafted offsets stay inside one record)."""
    assert ffi.sizeof("eng_jrec") == lib.ENG_JREC_SIZE
    assert struct.calcsize("<Q") == 8
