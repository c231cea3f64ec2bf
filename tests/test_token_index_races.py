"""The token index (native/engine.c, "the token index: positions by token")
under races, kills, fork and signals: per-token bucket chains whose bucket
words are locks with fencing tokens, walked by update_token_price.

Each class names the attack and, in its docstring, the outcome that is
FORBIDDEN; a test fails exactly when that outcome happens.  Where a step
cannot be reached by a real process at a chosen instruction, the docstring
says what is SIMULATED by writing to the segment through cffi.

  TestWrappedIncarnation   a dead linker's bucket lock vs. attach's take-over of
                           its registry entry and the entry's wrapped incarnation
  TestStoppedBucketHolder  a SIGSTOPped walker holding a bucket lock vs. opens,
                           releases, updates and recover()
  TestStuckPriceLatch      a live process sitting on one position's price latch
                           vs. update_token_price of that position's token
  TestKilledWalker         a walker SIGKILLed holding its bucket lock
  TestKillsAtEveryStep     SIGKILL between the steps of link and unlink in open,
                           release and reopen, with and without recover()
  TestReleaseReopenRace    slots released and reopened on other (colliding)
                           tokens while walkers run; more processes than cores;
                           recover() racing the live linkers
  TestFork                 a child forked while the parent walks a chain
  TestSignals              exceptions raised by a signal handler at any point
  TestCorruptChain         chains corrupted under the engine, then walked

Mutations each class was seen to catch: TestKilledWalker and
TestKillsAtEveryStep, tb_lock never taking a dead holder's lock over
(BusyError); TestReleaseReopenRace, a walk taking no bucket lock (a count that
missed a pinned position) or writing any open position it meets (a band price
on another token's opening); TestFork, a forked view not refused (the child's
calls act); TestSignals, eng_abandon_open not unlinking (free slots left on
chains); TestCorruptChain, a walk without a step bound (it never returns).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from typing import Any

from journal_audit import wait_stopped
from procs import JOIN_TIMEOUT, READY_TIMEOUT, collect, sigkill

from engine import (
    BusyError,
    ClosedError,
    Engine,
    EngineError,
    Outcome,
    SegmentError,
    State,
    Trigger,
)
from engine._native import lib

JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)

CLOSE = (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
         Trigger.EXIT_COMPLETED)
INC_PERIOD = lib.ENG_TOKEN_INC_MASK   # incarnations 1 .. 2^17 - 1
TOKEN_MASK = int(lib.ENG_TOKEN_MASK)
M64 = (1 << 64) - 1
# One wait for a busy bucket lock or price latch is ENG_MAX_WAIT_STEPS back-off
# steps: ~7 ms of sleeps, 10-30 ms on a loaded host.  A call that may wait
# once for a busy lock answers well within this:
ONE_WAIT = 0.5


# -- helpers ------------------------------------------------------------------------------
def close(eng: Engine, pos: int) -> None:
    """CREATED or MONITORING -> CLOSED."""
    start = 1 if eng.state(pos) is State.MONITORING else 0
    for trig in CLOSE[start:]:
        assert eng.transition(pos, trig) is Outcome.APPLIED


def bucket_of(eng: Engine, token: int) -> int:
    """The token's bucket, as tb_of_token computes it (fmix64(token ^ seed))."""
    k = (token & M64) ^ int(eng._seg.key_seed)
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & M64
    k ^= k >> 33
    return k & (int(eng._seg.tindex_buckets) - 1)


def tokens_in_other_buckets(eng: Engine, token: int, n: int) -> list[int]:
    b = bucket_of(eng, token)
    return [t for t in range(token + 1, token + 10_000) if bucket_of(eng, t) != b][:n]


def colliding_token(eng: Engine, token: int) -> int:
    b = bucket_of(eng, token)
    return next(t for t in range(token + 1, token + 100_000) if bucket_of(eng, t) == b)


def held_buckets(eng: Engine) -> dict[int, int]:
    """bucket -> holder token of every bucket lock that is held."""
    words = eng._seg.tindex
    return {b: int(words[b]) & TOKEN_MASK for b in range(int(eng._seg.tindex_buckets))
            if int(words[b]) & TOKEN_MASK}


def registry_in_use(eng: Engine) -> int:
    return sum(1 for i in range(lib.ENG_MAX_PROCS) if eng._seg.registry[i].pid)


def attach_raw_until_token(eng: Engine, token: int, limit: int) -> Any:
    """Attach raw views of ``eng``'s mapping until one gets ``token``."""
    from engine._native import ffi
    path = os.path.join("/dev/shm", eng.name)
    for _ in range(limit):
        seg = ffi.new("eng_seg *")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        rc = lib.eng_attach(seg, eng._buf, len(eng._mm), 0, fd)
        assert rc == 0, rc
        if int(seg.token) == token:
            return seg
        lib.eng_detach(seg)
    raise AssertionError(f"token {token:#x} never handed out in {limit} claims")


def assert_index_matches_snapshot(eng: Engine) -> dict[int, int]:
    """Chains hold exactly the openings not released, each on its token's
    chain; returns token -> open (not closed) positions, from a snapshot."""
    expected: dict[int, set[int]] = {}
    open_count: dict[int, int] = {}
    for row in eng.snapshot():
        token = int(eng.context(int(row["id"])).token)
        expected.setdefault(token, set()).add(int(row["slot"]))
        if State(int(row["state"])) is not State.CLOSED:
            open_count[token] = open_count.get(token, 0) + 1
    missing, free_linked, misplaced, entries = eng._tindex_check()
    assert (missing, free_linked, misplaced) == (0, 0, 0), eng._tindex_check()
    assert entries == sum(len(v) for v in expected.values())
    for token, slots in expected.items():
        assert set(eng._tindex_slots(token)) == slots, token
    assert not held_buckets(eng), held_buckets(eng)
    return open_count


def stop_holding_bucket(eng: Engine, p: Any, bucket: int) -> int:
    """SIGSTOP ``p`` at a moment it holds ``bucket``'s lock; returns its token."""
    for _ in range(2000):
        os.kill(p.pid, signal.SIGSTOP)
        # kill() returns before the stop lands: a fixed sleep may end first on a loaded
        # host, and a feeder still running lets go of the lock it was just seen holding
        assert wait_stopped(p.pid, READY_TIMEOUT), "the feeder never stopped"
        holder = held_buckets(eng).get(bucket)
        if holder:
            return holder
        os.kill(p.pid, signal.SIGCONT)
        time.sleep(random.random() * 0.002)
    raise AssertionError("never stopped the walker holding its bucket lock")


def timed_call(fn: Any, *args: Any) -> tuple[Any, float]:
    """(result or the EngineError raised, seconds taken)."""
    t0 = time.monotonic()
    try:
        out: Any = fn(*args)
    except EngineError as e:
        out = e
    return out, time.monotonic() - t0


# -- workers (module level: spawn) ----------------------------------------------------------
def _feed(handle: Any, token: int, ready: Any) -> None:
    """update_token_price(token) in a tight loop (a price feeder)."""
    eng = Engine.attach(handle)
    ready.set()
    while True:
        with contextlib.suppress(BusyError):
            eng.update_token_price(token, 101.0)


def _die_opening(handle: Any, fault: int, token: int, conn: Any) -> None:
    """Report this process's token, then open on ``token`` under ``fault``."""
    eng = Engine.attach(handle)
    conn.send(int(eng._seg.token))
    eng._set_fault(fault)
    eng.open_position(100.0, 1.0, 1, token=token)
    raise AssertionError("the fault did not kill this process")


def _die_releasing(handle: Any, fault: int, pos: int, conn: Any) -> None:
    eng = Engine.attach(handle)
    conn.send(int(eng._seg.token))
    eng._set_fault(fault)
    eng.release_position(pos)
    raise AssertionError("the fault did not kill this process")


def _hold_latch(handle: Any, pos: int, ready: Any) -> None:
    """Take pos's price latch and keep it (a live writer that stopped)."""
    eng = Engine.attach(handle)
    assert lib.eng_test_hold(eng._seg, 1, pos) == 0
    ready.set()
    time.sleep(600)


def _walker(handle: Any, token: int, band: float, pinned: list[int], secs: float,
            q: Any) -> None:
    """The only writer of token's prices: each call gets a price of its own
    in [band, band + 1000); after a call that returns a count, every pinned
    position (open on token for the whole run) must hold that price."""
    try:
        eng = Engine.attach(handle)
        ok = busy = 0
        i = 0
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            i += 1
            price = band + (i % 900_000) * 0.001
            try:
                n = eng.update_token_price(token, price)
            except BusyError:
                busy += 1
                continue
            ok += 1
            assert n >= len(pinned), (token, n, len(pinned))
            for pos in pinned:
                got = eng.price(pos).price
                assert got == price, (f"pinned {pos:#x} on token {token} missed: holds {got}, "
                                      f"the call that returned {n} wrote {price}")
        q.put(("walker", token, ok, busy))
    except BaseException as e:   # reported to the parent
        import traceback
        q.put(("error", f"walker {token}: {e!r}\n{traceback.format_exc()}"))



def _churner(handle: Any, bands: dict[int, float], seed: int, secs: float, q: Any) -> None:
    """Open on the walkers' tokens (and an unwalked one), close and release
    at random, so slots move between (colliding) tokens while walks run.
    Every price an opening ever shows must be its entry price or in its own
    token's band."""
    try:
        eng = Engine.attach(handle)
        rng = random.Random(seed)
        tokens = [*bands, -1]
        mine: dict[int, int] = {}
        opened = released = 0
        deadline = time.monotonic() + secs

        def check(pos: int) -> None:
            token = mine[pos]
            got = eng.price(pos).price
            band = bands.get(token)
            ok = got == 100.0 or (band is not None and band <= got < band + 1000)
            assert ok, (f"opening {pos:#x} (slot {eng.slot_of(pos)}) on token {token} "
                        f"holds {got}: another token's price")

        while time.monotonic() < deadline:
            if mine and (rng.random() < 0.5 or len(mine) >= 4):
                pos = rng.choice(list(mine))
                check(pos)
                for trig in CLOSE:
                    eng.transition(pos, trig)
                check(pos)
                with contextlib.suppress(BusyError):
                    assert eng.release_position(pos) is Outcome.APPLIED
                    del mine[pos]
                    released += 1
            else:
                token = rng.choice(tokens)
                try:
                    pos = eng.open_position(100.0, 1.0, 1, token=token)
                except EngineError:   # full, or a bucket busy past the bound
                    continue
                mine[pos] = token
                opened += 1
                eng.transition(pos, Trigger.POSITION_OPENED)
            for pos in list(mine):
                check(pos)
        q.put(("churner", seed, opened, released))
    except BaseException as e:   # reported to the parent
        import traceback
        q.put(("error", f"churner {seed}: {e!r}\n{traceback.format_exc()}"))


def _recoverer(handle: Any, secs: float, q: Any) -> None:
    """recover() in a loop while every process is alive: it may unlink free
    slots, never take a live process's lock."""
    try:
        eng = Engine.attach(handle)
        runs = 0
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            try:
                r = eng.recover()
            except EngineError:
                continue
            runs += 1
            assert (r.rolled_forward, r.rolled_back, r.price_latches, r.removed_pids) == \
                (0, 0, 0, ()), f"recover() took a live process's lock: {r}"
            time.sleep(0.001)
        q.put(("recoverer", runs))
    except BaseException as e:   # reported to the parent
        import traceback
        q.put(("error", f"recoverer: {e!r}\n{traceback.format_exc()}"))


# =========================================================================================
class TestWrappedIncarnation:
    """A linker SIGKILLed holding its bucket lock (ENG_FAULT_DIE_IN_TINDEX_ADD);
    the registry is full, so the next attach takes its entry over in a new
    incarnation.  claim_entry resolves the dead owner's slot locks, price
    latches and key stripes first ("a wrapped incarnation must never meet its
    locks").  FORBIDDEN: the dead linker's bucket lock surviving that, so that
    when the entry's incarnation comes round (2^17 - 1 claims later) a live
    Engine carries the dead token: every update and open on the token's chain
    then meets a "live" holder -> BusyError, recover() cannot clear it, and the
    wrapped Engine itself can never take the lock.

    SIMULATED: the 2^17 - 3 intermediate claims of the entry, by storing its
    incarnation (as tests/test_key_index.py does); 131070 real claims of
    the entry (raw attach/detach) reproduce it too, in ~15 s.  The dead
    linker, the registry-full take-over and the final claim are real."""

    def test_wrapped_token_meets_dead_linkers_bucket_lock(self, make_engine, spawner):
        """A dead linker's bucket lock does not survive into its entry's wrapped incarnation."""
        eng = make_engine(capacity=8)
        live = eng.open_position(100.0, 1.0, 1, token=3)
        eng.transition(live, Trigger.POSITION_OPENED)
        b = bucket_of(eng, 3)
        parent_conn, child_conn = spawner.ctx.Pipe(duplex=False)
        p = spawner.start(_die_opening, eng.handle, lib.ENG_FAULT_DIE_IN_TINDEX_ADD, 3,
                          child_conn)
        assert parent_conn.poll(READY_TIMEOUT), "worker did not start"
        dead = parent_conn.recv()
        p.join(READY_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL, p.exitcode
        assert held_buckets(eng) == {b: dead}, "the dead linker holds token 3's bucket"
        index, inc = dead & lib.ENG_TOKEN_ENTRY_MASK, dead >> lib.ENG_TOKEN_ENTRY_BITS
        fillers: list[Engine] = []
        wrapped = None
        try:
            while registry_in_use(eng) < lib.ENG_MAX_PROCS:   # every other entry live
                fillers.append(Engine.attach(eng.handle))
            taker = Engine.attach(eng.handle)      # registry full: takes the dead entry over
            fillers.append(taker)
            assert int(taker._seg.proc_index) == index
            survived = held_buckets(eng).get(b) == dead
            taker.close()
            eng._seg.registry[index].incarnation = (inc - 2) % INC_PERIOD + 1   # simulated churn
            wrapped = attach_raw_until_token(eng, dead, 2)
            got, took = timed_call(eng.update_token_price, 3, 101.0)
            after = None
            if not isinstance(got, int):
                eng.recover()
                after, _ = timed_call(eng.update_token_price, 3, 101.0)
            own = lib.eng_update_token_price(wrapped, 3, 102.0)
        finally:
            if wrapped is not None:
                lib.eng_detach(wrapped)
            for f in fillers:
                f.close()
        assert got == 1 and took < ONE_WAIT and own == 1, (
            f"the dead linker's bucket lock survived the take-over of its entry (still held "
            f"after it: {survived}); its wrapped token {dead:#x} now names a live Engine: "
            f"update_token_price(3) -> {got!r} after {took:.3f} s, after recover() -> "
            f"{after!r}; from the wrapped Engine -> {own}")
        eng.recover()
        assert_index_matches_snapshot(eng)


# =========================================================================================
class TestStoppedBucketHolder:
    """A price feeder SIGSTOPped while it holds its token's bucket lock (a live
    holder: never taken over).  Allowed: BusyError after one bounded wait for
    that chain; a release that leaves its free slot linked.  FORBIDDEN: a call
    that waits for the same busy chain again and again (an open that tries
    every free slot against the token's busy bucket, or every free slot still
    linked on the busy chain: seconds, with the GIL held), a hang, an error
    for a token on another chain, an index that is not exact after SIGCONT and
    recover()."""

    @staticmethod
    def _stopped_feeder(eng: Engine, spawner: Any, token: int) -> Any:
        ready = spawner.ctx.Event()
        p = spawner.start(_feed, eng.handle, token, ready)
        assert ready.wait(READY_TIMEOUT), "feeder did not start"
        time.sleep(0.05)
        stop_holding_bucket(eng, p, bucket_of(eng, token))
        return p

    def test_open_on_the_busy_chain_waits_once(self, make_engine, spawner):
        """An open on a busy token chain raises BusyError after one wait, not one per slot.

        Capacity 512, 200 open on token 7: an open on token 7 needs 7's
        chain whatever slot it picks; it must say BusyError after one wait,
        not after one wait per free slot (312 x ~20 ms).
        """
        eng = make_engine(capacity=512)
        ids = [eng.open_position(100.0, 1.0, 1, token=7) for _ in range(200)]
        other = tokens_in_other_buckets(eng, 7, 1)[0]
        p = self._stopped_feeder(eng, spawner, 7)
        try:
            got, took = timed_call(eng.open_position, 100.0, 1.0, 1, 7)
            upd, upd_took = timed_call(eng.update_token_price, 7, 99.0)
            side, side_took = timed_call(eng.open_position, 100.0, 1.0, 1, other)
            rec, rec_took = timed_call(eng.recover)
        finally:
            os.kill(p.pid, signal.SIGCONT)
            sigkill(p)
        assert isinstance(got, BusyError) and took < ONE_WAIT, (
            f"open_position(token=7) while 7's chain is held by a stopped feeder: {got!r} "
            f"after {took:.2f} s (one wait per free slot)")
        assert isinstance(upd, BusyError) and upd_took < ONE_WAIT, (upd, upd_took)
        assert isinstance(side, int) and side_took < ONE_WAIT, (side, side_took)
        assert not isinstance(rec, EngineError) and rec_took < ONE_WAIT, (rec, rec_took)
        eng.recover()
        assert eng.update_token_price(7, 105.0) == 200
        assert all(eng.price(pos).price == 105.0 for pos in ids)
        assert_index_matches_snapshot(eng)

    def test_slots_left_on_the_busy_chain_cost_one_wait(self, make_engine, spawner):
        """Free slots left linked on a busy chain cost another token's open one wait in all.

        Releases while the chain is held leave their free slots linked on it
        (allowed).  When those are the only free slots, an open on another
        token must give up after one wait for that chain, not one (or two) per
        linked slot.
        """
        eng = make_engine(capacity=160)
        ids = [eng.open_position(100.0, 1.0, 1, token=7) for _ in range(120)]
        other = tokens_in_other_buckets(eng, 7, 1)[0]
        while True:   # fill every other slot: the freed ones will be the only free slots
            try:
                eng.open_position(100.0, 1.0, 1, token=other)
            except EngineError:
                break
        for pos in ids[:100]:
            close(eng, pos)
        p = self._stopped_feeder(eng, spawner, 7)
        try:
            t0 = time.monotonic()
            for pos in ids[:100]:   # each waits once for the chain, then leaves the slot linked
                assert eng.release_position(pos) is Outcome.APPLIED
            release_took = (time.monotonic() - t0) / 100
            linked_free = eng._tindex_check()[1]
            got, took = timed_call(eng.open_position, 100.0, 1.0, 1, other)
        finally:
            os.kill(p.pid, signal.SIGCONT)
            sigkill(p)
        assert release_took < ONE_WAIT, release_took
        assert linked_free == 100, linked_free
        assert isinstance(got, BusyError) and took < ONE_WAIT, (
            f"open_position(token={other}) with only slots linked on a stopped holder's chain "
            f"free: {got!r} after {took:.2f} s (a wait per linked slot)")
        eng.recover()
        assert eng._tindex_check()[1] == 0
        assert isinstance(eng.open_position(100.0, 1.0, 1, token=other), int)
        assert eng.update_token_price(7, 105.0) == 20
        assert_index_matches_snapshot(eng)


# =========================================================================================
class TestStuckPriceLatch:
    """A live process sits on the price latch of ONE position of token 7
    (a writer stopped mid-update).  Allowed: that position is not written and
    the call says BusyError.  FORBIDDEN: every update_token_price(7) stopping
    at that position, so that the other open positions of token 7 (free
    latches, open for the whole call) are never written while it sits there."""

    def test_other_positions_of_the_token_still_get_the_price(self, make_engine, spawner):
        """A latch held on one position does not keep the token's price from the others."""
        eng = make_engine(capacity=64)
        ids = [eng.open_position(100.0, 1.0, 1, token=7) for _ in range(10)]
        for pos in ids:
            eng.transition(pos, Trigger.POSITION_OPENED)
        stuck = ids[5]
        ready = spawner.ctx.Event()
        p = spawner.start(_hold_latch, eng.handle, stuck, ready)
        assert ready.wait(READY_TIMEOUT), "holder did not start"
        try:
            got, took = timed_call(eng.update_token_price, 7, 101.0)
            prices = {pos: eng.price(pos).price for pos in ids}
        finally:
            sigkill(p)
        missed = [hex(pos) for pos in ids if pos != stuck and prices[pos] != 101.0]
        assert isinstance(got, BusyError) and took < ONE_WAIT, (got, took)
        assert prices[stuck] == 100.0
        assert not missed, (f"update_token_price(7) -> {got!r}: positions with free latches "
                            f"never written: {missed}")
        assert eng.update_token_price(7, 102.0) == 10   # the dead holder's latch is taken over


# =========================================================================================
class TestKilledWalker:
    """A feeder SIGKILLed while it holds its bucket lock.  FORBIDDEN: the next
    open / update / release on that chain needing recover() (or failing),
    recover() finding anything but the dead lock."""

    def test_dead_walkers_lock_is_taken_over(self, make_engine, spawner):
        """A walker killed holding its bucket lock: the next call on the chain takes it over."""
        eng = make_engine(capacity=256)
        ids = [eng.open_position(100.0, 1.0, 1, token=7) for _ in range(150)]
        ready = spawner.ctx.Event()
        p = spawner.start(_feed, eng.handle, 7, ready)
        assert ready.wait(READY_TIMEOUT)
        time.sleep(0.05)
        b = bucket_of(eng, 7)
        holder = stop_holding_bucket(eng, p, b)
        sigkill(p)
        assert held_buckets(eng) == {b: holder}
        pos, took = timed_call(eng.open_position, 100.0, 1.0, 1, 7)
        assert isinstance(pos, int) and took < ONE_WAIT, (pos, took)
        close(eng, ids[0])
        assert eng.release_position(ids[0]) is Outcome.APPLIED
        assert eng.update_token_price(7, 103.0) == 150
        r = eng.recover()
        assert r.tindex_repaired == 0 and r.rolled_back == r.rolled_forward == 0, r
        assert_index_matches_snapshot(eng)


# =========================================================================================
class TestKillsAtEveryStep:
    """SIGKILL between the steps of link and unlink, on every path that takes
    them: open (fresh slot), open of a slot still linked elsewhere (its unlink
    step), release (before its unlink).  FORBIDDEN: a walk writing a free or
    half-open slot, a wrong count, a live process needing recover() to use the
    chain (a dead holder is taken over), and after recover(): an open position
    missing from its chain, a free slot on a chain, a held bucket lock."""

    def _run_to_death(self, eng: Engine, spawner: Any, target: Any, *args: Any) -> int:
        parent_conn, child_conn = spawner.ctx.Pipe(duplex=False)
        p = spawner.start(target, eng.handle, *args, child_conn)
        assert parent_conn.poll(READY_TIMEOUT), "worker did not start"
        token = parent_conn.recv()
        p.join(READY_TIMEOUT)
        eng._set_fault()
        assert p.exitcode == -signal.SIGKILL, f"worker exit code {p.exitcode}"
        return int(token)

    def test_killed_after_the_slot_lock_before_the_link(self, make_engine, spawner):
        """An open killed after its slot lock, before its link: rolled back, index exact."""
        eng = make_engine(capacity=4)
        a = eng.open_position(100.0, 1.0, 1, token=4)
        eng.transition(a, Trigger.POSITION_OPENED)
        self._run_to_death(eng, spawner, _die_opening, lib.ENG_FAULT_DIE_AFTER_LOCK, 4)
        assert eng.update_token_price(4, 101.0) == 1
        r = eng.recover()
        assert r.rolled_back == 1, r
        assert_index_matches_snapshot(eng)

    def test_killed_mid_link_then_used_without_recover(self, make_engine, spawner):
        """A chain whose holder died mid-link is taken over; the half-linked slot is never written.

        Dead holder of 4's chain with a half-linked slot: the next open and
        update take the lock over; the half-linked slot is never written.
        """
        eng = make_engine(capacity=4)
        a = eng.open_position(100.0, 1.0, 1, token=4)
        eng.transition(a, Trigger.POSITION_OPENED)
        dead = self._run_to_death(eng, spawner, _die_opening,
                                  lib.ENG_FAULT_DIE_IN_TINDEX_ADD, 4)
        assert held_buckets(eng) == {bucket_of(eng, 4): dead}
        b, took = timed_call(eng.open_position, 100.0, 1.0, 1, 4)
        assert isinstance(b, int) and took < ONE_WAIT, (b, took)
        eng.transition(b, Trigger.POSITION_OPENED)
        assert eng.update_token_price(4, 101.0) == 2
        assert not held_buckets(eng)
        r = eng.recover()
        assert r.rolled_back == 1, r
        assert_index_matches_snapshot(eng)

    def test_killed_releasing_before_the_unlink(self, make_engine, spawner):
        """A release killed before its unlink leaves a slot that walks skip and a reopen moves.

        Killed right after the release CAS (ENG_FAULT_DIE_AFTER_CAS): its
        free slot stays on 4's chain; walks skip it; its reopen on token 9
        moves it without recover().
        """
        eng = make_engine(capacity=2)
        a = eng.open_position(100.0, 1.0, 1, token=4)
        eng.transition(a, Trigger.POSITION_OPENED)
        gone = eng.open_position(100.0, 1.0, 1, token=4)
        close(eng, gone)
        self._run_to_death(eng, spawner, _die_releasing, lib.ENG_FAULT_DIE_AFTER_CAS, gone)
        assert eng._tindex_check()[1] == 1, "the free slot is still linked"
        assert eng.update_token_price(4, 101.0) == 1
        c = eng.open_position(100.0, 1.0, 1, token=9)
        eng.transition(c, Trigger.POSITION_OPENED)
        assert eng.slot_of(c) == eng.slot_of(gone)
        assert eng.update_token_price(4, 102.0) == 1 and eng.update_token_price(9, 102.0) == 1
        assert eng.price(a).price == 102.0 and eng.price(c).price == 102.0
        assert_index_matches_snapshot(eng)

    def test_killed_in_the_unlink_step_of_a_reopen(self, make_engine, spawner):
        """A reopen killed in its unlink: walks take its lock over, recover() rolls it back.

        A free slot left on 4's chain is reopened on token 9 by a process
        killed inside its unlink (ENG_FAULT_DIE_IN_TINDEX_DEL: off the chain,
        tbucket not cleared, bucket and slot locks held).
        """
        eng = make_engine(capacity=2)
        a = eng.open_position(100.0, 1.0, 1, token=4)
        eng.transition(a, Trigger.POSITION_OPENED)
        gone = eng.open_position(100.0, 1.0, 1, token=4)
        close(eng, gone)
        self._run_to_death(eng, spawner, _die_releasing, lib.ENG_FAULT_DIE_AFTER_CAS, gone)
        dead = self._run_to_death(eng, spawner, _die_opening, lib.ENG_FAULT_DIE_IN_TINDEX_DEL, 9)
        assert held_buckets(eng) == {bucket_of(eng, 4): dead}
        n, took = timed_call(eng.update_token_price, 4, 101.0)
        assert n == 1 and took < ONE_WAIT, (n, took)
        assert eng.update_token_price(9, 101.0) == 0
        r = eng.recover()
        assert r.rolled_back == 1, r
        assert_index_matches_snapshot(eng)
        c = eng.open_position(100.0, 1.0, 1, token=9)
        eng.transition(c, Trigger.POSITION_OPENED)
        assert eng.update_token_price(9, 103.0) == 1 and eng.update_token_price(4, 103.0) == 1
        assert_index_matches_snapshot(eng)


# =========================================================================================
class TestReleaseReopenRace:
    """Seven processes on this host's cores (more than cores here): one walker
    per token A, B (colliding with A: one chain), C (another chain), each the
    only writer of its token with prices of its own band; three churners that
    open, close, release and reopen slots on A, B, C and an unwalked token in
    a small segment, so released slots are reopened on another token while
    walks run; one recover() loop.  FORBIDDEN: a price of one token's band on
    an opening of another token (a walk writing a position not on its token,
    or writing the new opening of a slot with the old token's price); a call
    that returns a count without writing a position pinned open on its token
    for the whole run; recover() taking a live process's lock; and at the
    end, an index that is not exact."""

    def test_walks_race_releases_and_reopens(self, make_engine, spawner):
        """Walks racing releases and reopens never put one token's price on another's opening."""
        eng = make_engine(capacity=24)
        a = 11
        b = colliding_token(eng, a)
        c = tokens_in_other_buckets(eng, a, 1)[0]
        bands = {a: 1000.0, b: 2000.0, c: 3000.0}
        pinned: dict[int, list[int]] = {}
        for token in bands:
            pinned[token] = [eng.open_position(100.0, 1.0, 1, token=token) for _ in range(2)]
            for pos in pinned[token]:
                eng.transition(pos, Trigger.POSITION_OPENED)
        secs = 4.0
        q = spawner.ctx.Queue()
        for token, band in bands.items():
            spawner.start(_walker, eng.handle, token, band, pinned[token], secs, q)
        for seed in range(3):
            spawner.start(_churner, eng.handle, bands, seed, secs, q)
        spawner.start(_recoverer, eng.handle, secs, q)
        got = collect(q, 7, spawner, timeout=READY_TIMEOUT + secs + 30)
        spawner.join_all(JOIN_TIMEOUT)
        walks = {g[1]: g[2] for g in got if g[0] == "walker"}
        churn = [g for g in got if g[0] == "churner"]
        assert all(n > 50 for n in walks.values()), f"walks that returned a count: {walks}"
        assert sum(g[3] for g in churn) > 50, f"too little reuse: {churn}"
        eng.recover()
        open_count = assert_index_matches_snapshot(eng)
        for token in (*bands, -1):
            assert eng.update_token_price(token, 50.0) == open_count.get(token, 0)


# =========================================================================================
class TestFork:
    """fork() while another thread of the parent walks a chain (the GIL is
    released during the walk).  FORBIDDEN: any index call in the child doing
    anything but ClosedError (it would act with the parent's token); the
    child's exit freeing or otherwise touching the parent's registry entry or
    making the parent look dead to other processes; a bucket lock left held."""

    def test_child_of_a_walking_parent_is_closed(self, make_engine):
        """A fork child of a walking parent gets ClosedError and leaves the parent's entry alone."""
        eng = make_engine(capacity=256)
        ids = [eng.open_position(100.0, 1.0, 1, token=7) for _ in range(200)]
        pos = ids[0]
        close(eng, ids[1])
        stop = threading.Event()
        walks = [0]

        def walk() -> None:
            while not stop.is_set():
                eng.update_token_price(7, 101.0)
                walks[0] += 1

        th = threading.Thread(target=walk)
        th.start()
        codes = []
        try:
            for _ in range(20):
                time.sleep(0.002)
                pid = os.fork()
                if pid == 0:   # the child: every call must refuse
                    code = 0
                    for call in (lambda: eng.update_token_price(7, 1.0),
                                 lambda: eng.open_position(100.0, 1.0, 1, token=7),
                                 lambda: eng.release_position(ids[1]),
                                 lambda: eng.recover(),
                                 eng._tindex_check):
                        try:
                            call()
                            code = 1
                        except ClosedError:
                            pass
                        except BaseException:
                            code = 2
                    with contextlib.suppress(BaseException):
                        eng.close()
                    os._exit(code)
                _, status = os.waitpid(pid, 0)
                codes.append(os.waitstatus_to_exitcode(status))
        finally:
            stop.set()
            th.join()
        assert codes == [0] * 20, f"child exit codes (1: a call acted, 2: other error): {codes}"
        assert walks[0] > 0
        other = Engine.attach(eng.handle)
        try:
            token = int(eng._seg.token)
            assert lib.eng_owner_alive(other._seg, token) == 1, "the parent looks dead"
            assert int(eng._seg.registry[int(eng._seg.proc_index)].pid) == os.getpid()
            assert not held_buckets(eng)
            assert other.update_token_price(7, 102.0) == 199
            assert eng.price(pos).price == 102.0
        finally:
            other.close()
        assert eng.release_position(ids[1]) is Outcome.APPLIED
        assert_index_matches_snapshot(eng)


# =========================================================================================
class _Tick(Exception):
    pass


class TestSignals:
    """A signal handler raising at any point of open / transition / release /
    update_token_price (an interval timer at ~0.2 ms), including between an
    open's C call and its return (the opening is abandoned: counted).
    FORBIDDEN: a bucket lock left held by this live process, a free slot left
    on a chain, an open slot missing from its chain, recover() finding
    anything to repair (no process died)."""

    def test_exceptions_from_a_signal_handler(self, make_engine):
        """A handler raising anywhere in an index call leaves no lock held and every chain exact."""
        eng = make_engine(capacity=32)
        rng = random.Random(5)
        mine: list[int] = []

        armed = [False]
        after_open = [0]

        def tick(signum: int, frame: Any) -> None:
            if armed[0]:   # raise only inside the try below, once per arming
                armed[0] = False
                out = frame.f_locals.get("out") if frame.f_code.co_name == "_open" else None
                if out is not None and out[0]:
                    after_open[0] += 1   # C opened it; the id has not reached the caller
                raise _Tick

        def step() -> None:
            if mine and (rng.random() < 0.5 or len(mine) > 20):
                pos = mine[-1]
                with contextlib.suppress(EngineError):
                    for trig in CLOSE:
                        eng.transition(pos, trig)
                    eng.release_position(pos)
                mine.pop()
            else:
                with contextlib.suppress(EngineError):
                    mine.append(eng.open_position(100.0, 1.0, 1, token=rng.randrange(5)))
            eng.update_token_price(rng.randrange(5), 100.0 + rng.random())

        old = signal.signal(signal.SIGALRM, tick)
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        ticks = 0
        deadline = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline:
                try:
                    armed[0] = True
                    step()
                    armed[0] = False
                except _Tick:
                    ticks += 1
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, old)
        assert ticks > 100 and after_open[0] > 0, (ticks, after_open)
        assert not held_buckets(eng), held_buckets(eng)
        assert eng._tindex_check()[:3] == (0, 0, 0), eng._tindex_check()
        r = eng.recover()
        assert r.tindex_repaired == 0 and r.rolled_back == r.rolled_forward == 0, r
        assert_index_matches_snapshot(eng)


# =========================================================================================
class TestCorruptChain:
    """A chain corrupted under the engine (no protocol step or crash leaves
    one: SIMULATED by storing a slot's tnext through cffi): a cycle, and a
    reference past the capacity.  FORBIDDEN: a walk, open, release, recover()
    or audit that hangs or crashes, a price written to a position of another
    token, a corrupt chain breaking updates of tokens on other chains."""

    def test_cycle_and_bad_reference_are_bounded(self, make_engine):
        """A cycle or a bad reference in a chain is refused within a bound; other chains work."""
        eng = make_engine(capacity=64)
        on = [eng.open_position(100.0, 1.0, 1, token=5) for _ in range(4)]
        other = tokens_in_other_buckets(eng, 5, 1)[0]
        off = [eng.open_position(100.0, 1.0, 1, token=other) for _ in range(3)]
        for pos in on + off:
            eng.transition(pos, Trigger.POSITION_OPENED)
        tail = eng._slot(eng.slot_of(on[0]))   # the first linked: the chain's tail
        for bad in (eng.slot_of(on[2]) + 1, eng.capacity + 7):
            tail.tnext = bad   # SIMULATED corruption
            got, took = timed_call(eng.update_token_price, 5, 111.0)
            assert isinstance(got, SegmentError) and took < ONE_WAIT, (got, took)
            assert eng._tindex_check()[2] >= 1
            assert eng.update_token_price(other, 112.0) == 3
            assert all(eng.price(pos).price == 112.0 for pos in off)
            close(eng, on[3])
            _, took = timed_call(eng.release_position, on[3])
            assert took < ONE_WAIT
            _, took = timed_call(eng.recover)
            assert took < ONE_WAIT
            _, took = timed_call(eng.open_position, 100.0, 1.0, 1, 5)
            assert took < ONE_WAIT
            tail.tnext = 0   # SIMULATED repair, for the next round
            on[3] = eng.open_position(100.0, 1.0, 1, token=5)
            eng.transition(on[3], Trigger.POSITION_OPENED)
            eng.recover()
        assert_index_matches_snapshot(eng)
