"""The key index (native/engine.c, "keys: unique, lock-free to look up")
under races and kills: index cells, stripe locks and key records.

Properties: a key is held by at most one open opening and lookup finds it;
lookup answers open openings only; a dead inserter's stripe lock or record
never blocks a key for good.  Each class docstring gives the interleaving and
says exactly which step, if any, is simulated by writing to the segment
through cffi (the C core has no hook that stops a process at that
instruction).

  TestCellABA             a reuse CAS (cell_place / keys_sweep) that judged a
                          stale cell dead lands on the SAME value re-published
                          for a live key
  TestCellABASameOpening  the same for a retried bind in the same opening
                          (after a killed binder)
  TestWrappedIncarnation  a dead inserter's stripe lock / BUSY records vs. its
                          registry entry's wrapped incarnation
  TestUnfencedStripe      an inserter declared dead (its liveness descriptor
                          replaced) publishing after another took its stripe
  TestLookupAfterKilledRelease  a release killed before dropping its keys
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

import pytest
from procs import JOIN_TIMEOUT, READY_TIMEOUT

from engine import (
    ORDER_SPEC,
    BusyError,
    Engine,
    KeyExistsError,
    Outcome,
    StaleIdError,
)
from engine._native import lib
from engine.store import shm as segment

ANSWER_BOUND = 2.0                   # an insert over a dead process's leftovers answers within this
INC_PERIOD = lib.ENG_TOKEN_INC_MASK  # incarnations 1 .. 2^17 - 1
KR_HELD = lib.ENG_KR_HELD
KR_BUSY = lib.ENG_KR_BUSY


# -- helpers ------------------------------------------------------------------------------
def close_order(eng: Engine, pos: int) -> None:
    trig = "DENY" if eng.state(pos) is ORDER_SPEC.State.INITIALIZED else "CANCEL"
    assert eng.transition(pos, trig) is Outcome.APPLIED


def n_cells(eng: Engine) -> int:
    return int(eng._seg.key_buckets) * lib.ENG_KEY_BUCKET


def used_cells(eng: Engine) -> dict[int, int]:
    """index -> cell value of every used index cell."""
    return {j: int(eng._seg.keyidx[j]) for j in range(n_cells(eng)) if eng._seg.keyidx[j]}


def keyrec_tag(eng: Engine, slot: int, r: int) -> int:
    return int(eng._seg.keyrecs[slot * eng.keys_per_position + r].tag)


def set_keyrec_tag(eng: Engine, slot: int, r: int, tag: int) -> None:
    """SIMULATION ONLY: store a key record's tag (what another process's CAS would do)."""
    eng._seg.keyrecs[slot * eng.keys_per_position + r].tag = tag


def cell_slot(c: int) -> int:
    return (c >> lib.ENG_KC_SLOT_SHIFT) & lib.ENG_ID_SLOT_MASK


def cell_r(c: int) -> int:
    return (c >> lib.ENG_KC_R_SHIFT) & 7


def held_stripes(eng: Engine) -> dict[int, int]:
    return {b: int(eng._seg.stripes[b]) for b in range(eng._seg.key_buckets)
            if eng._seg.stripes[b]}


def registry_in_use(eng: Engine) -> int:
    return sum(1 for i in range(lib.ENG_MAX_PROCS) if eng._seg.registry[i].pid)


def attach_raw_until_token(eng: Engine, token: int, limit: int) -> Any:
    """Attach raw views of ``eng``'s mapping until one gets ``token``."""
    from engine._native import ffi
    path = os.path.join(segment.SHM_DIR, eng.name)
    for _ in range(limit):
        seg = ffi.new("eng_seg *")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        rc = lib.eng_attach(seg, eng._buf, len(eng._mm), 0, fd)
        assert rc == 0, rc
        if int(seg.token) == token:
            return seg
        lib.eng_detach(seg)
    raise AssertionError(f"token {token:#x} never handed out in {limit} claims")


# -- workers (module level: spawn) ----------------------------------------------------------
def _die_after_release_cas(handle: Any, pos: int, ready: Any) -> None:
    """release_position(pos); ENG_FAULT_DIE_AFTER_CAS kills this process right
    after the release CAS, before keys_drop (a release killed mid-way)."""
    eng = Engine.attach(handle)
    ready.set()
    eng._set_fault(lib.ENG_FAULT_DIE_AFTER_CAS)
    eng.release_position(pos)
    raise AssertionError("the fault did not kill this process")


def _die_in_bind(handle: Any, pos: int, key: str, conn: Any) -> None:
    """Report this Engine's token (a pipe: synchronous, survives the SIGKILL),
    then bind_key(pos, key) and die mid-insert (ENG_FAULT_DIE_IN_KEY: stripe
    lock held, record BUSY, cell placed)."""
    eng = Engine.attach(handle)
    conn.send(int(eng._seg.token))
    eng._set_fault(lib.ENG_FAULT_DIE_IN_KEY)
    eng.bind_key(pos, key)
    conn.send("survived")


def _declared_dead_binder(handle: Any, pos: int, key: str, conn: Any, go: Any) -> None:
    """A live process whose liveness descriptor was replaced by code outside
    the engine (dup2 over it: the OFD lock drops, so every other process
    proves this one dead), then bind_key(pos, key).  Reports its token, then
    the outcome of the bind; exits without detaching (its entry is 'dead')."""
    eng = Engine.attach(handle)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, int(eng._seg.fd))   # the foreign code
    conn.send(int(eng._seg.token))
    go.wait(READY_TIMEOUT)
    try:
        eng.bind_key(pos, key)
        out = "bound"
    except Exception as e:   # reported to the parent
        out = type(e).__name__
    conn.send(out)
    conn.close()
    os._exit(0)


# =========================================================================================
class TestCellABA:
    """Defect 1: ABA on index cell values.

    cell_place does ``cur = load(b[j]); if (cur == 0 || cell_dead(cur)) CAS(b[j], cur, c)``
    and keys_sweep does ``c = load(cell); if (cell_dead(c)) CAS(cell, c, 0)``.  A
    cell's value is (slot, r, fingerprint) only, so when the same key is inserted
    again into the same slot and record (a reopened account / order with the same
    key, capacity small or the slot reused) the re-published live cell has the
    exact value of the stale one.  Interleaving (B = recover()'s keys_sweep cell
    loop, or any cell_place of another key sharing the bucket):

      B   loads cell j = c = (S, 0, fp(K)); cell_dead(c) = 1 (record HELD by the
          released opening a)                                 ... B is preempted
      R   keys_drop / A's keyrec_take: key_unindex clears cell j -> 0
      A   open(key=K) lands on slot S, claims record 0, cell_place picks the first
          free cell of the emptier bucket: j; CAS 0 -> c; I6 HELD(b); commits
      B   CAS(cell j, c -> 0 / c_B) succeeds: b's only cell is gone

    After that lookup(K) is None while b is open with K, and a second
    open(key=K) succeeds: two open openings hold K (properties 1 and 2).

    SIMULATED: only B's delayed CAS (the test stores 0 into cell j if it still
    holds c, which is exactly what B's pending CAS does).  Everything else runs
    the real code; with 'killed_releaser' the stale state is left by a real
    release SIGKILLed after its CAS (ENG_FAULT_DIE_AFTER_CAS), so cell_dead's
    verdict can be checked on a state that stays put."""

    @pytest.mark.parametrize("how", ["live_release", "killed_releaser"])
    def test_reused_cell_value_erases_a_live_key(self, make_engine, spawner, how):
        """A key reopened on its old slot stays found and unique past a delayed cell sweep."""
        eng = make_engine(capacity=2, spec=ORDER_SPEC, keys_per_position=1)
        a = eng.open(key="K", account=1)
        filler = eng.open(account=2)            # keeps the reopen on a's slot
        slot = eng.slot_of(a)
        cells = used_cells(eng)
        assert len(cells) == 1
        (j, c), = cells.items()
        assert (cell_slot(c), cell_r(c)) == (slot, 0)
        close_order(eng, a)
        if how == "live_release":
            # B's load and verdict fall in release's window [release CAS, keys_drop)
            assert eng.release_position(a) is Outcome.APPLIED
        else:
            ready = spawner.ctx.Event()
            p = spawner.start(_die_after_release_cas, eng.handle, a, ready)
            p.join(READY_TIMEOUT)
            eng._set_fault()
            assert ready.is_set() and p.exitcode == -signal.SIGKILL, p.exitcode
            # the state B judged: cell j = c, record HELD by a, a released
            assert int(eng._seg.keyidx[j]) == c
            assert keyrec_tag(eng, slot, 0) == (a << 8) | KR_HELD
            with pytest.raises(StaleIdError):
                eng.state(a)
        # B has loaded c from cell j and cell_dead(c) said dead; B is preempted.
        b = eng.open(key="K", account=3)        # A: real open, same key, same slot
        assert eng.slot_of(b) == slot and eng.keys(b) == ("K",)
        # B resumes: its CAS(cell j, c -> 0) (simulated: a store only if j still
        # holds exactly c, which is when the CAS succeeds).  A's cell value equals
        # c -- same slot, record, fingerprint -- and, placed in the first free cell,
        # lands at j: the CAS succeeds and erases it.
        if int(eng._seg.keyidx[j]) == c:
            eng._seg.keyidx[j] = 0
        found = eng.lookup("K")
        close_order(eng, filler)
        assert eng.release_position(filler) is Outcome.APPLIED
        duplicate = None
        with contextlib.suppress(KeyExistsError):
            duplicate = eng.open(key="K", account=4)
        assert found == b and duplicate is None, (
            f"live key K of {b:#x} lost its index cell: lookup -> {found}, and a second "
            f"open(key='K') -> {duplicate if duplicate is None else hex(duplicate)} "
            f"(keys: {eng.keys(b)} / {eng.keys(duplicate) if duplicate else ()})")


class TestCellABASameOpening:
    """Defect 1b: the cell's opening bits (the working-tree fix of defect 1) do
    not make a re-published cell differ from a stale one when the key is
    inserted again into the SAME opening: a bind_key whose process was killed
    mid-insert (after I4; or one that failed after placing its cell, e.g. I5's
    EBUSY / EKEYEXISTS in a race) left / retracted cell (S, r, opening, fp(K));
    the retry of that bind -- the
    documented way out ("the next insert of that key clears it") -- claims the
    same record r of the same opening and publishes the identical value, in the
    first free cell, i.e. the same index j.  A reuse CAS (cell_place of another
    key in the bucket, or keys_sweep) that loaded the first cell at j and judged
    it dead (record CLEARING / free / BUSY by the dead binder) and was then
    delayed, erases the live cell: lookup(K) is None while w is open with K, and
    another open(key=K) succeeds (properties 1, 2).  The header's "2^16 openings
    of one slot during one delayed CAS" bound does not hold: one retry suffices.

    SIMULATED: only the delayed CAS of that other process (a store of 0 into
    cell j if it still holds c).  The killed bind (ENG_FAULT_DIE_IN_KEY) and the
    retry are real."""

    def test_retried_bind_republishes_the_same_cell(self, make_engine, spawner):
        """A bind retried after a killed one stays found and unique past a delayed cell sweep."""
        eng = make_engine(capacity=2, spec=ORDER_SPEC, keys_per_position=1)
        w = eng.open(account=1)
        parent_conn, child_conn = spawner.ctx.Pipe(duplex=False)
        p = spawner.start(_die_in_bind, eng.handle, w, "K", child_conn)
        assert parent_conn.poll(READY_TIMEOUT), "worker did not start"
        dead = parent_conn.recv()
        p.join(READY_TIMEOUT)
        eng._set_fault()
        assert p.exitcode == -signal.SIGKILL, p.exitcode
        cells = used_cells(eng)
        assert len(cells) == 1, cells
        (j, c), = cells.items()
        # the state the delayed process judged: cell j = c, its record BUSY(dead)
        assert cell_slot(c) == eng.slot_of(w)
        assert keyrec_tag(eng, eng.slot_of(w), cell_r(c)) == (dead << 8) | KR_BUSY
        # ... it loaded c at j, cell_dead(c) said dead, and it is preempted
        eng.bind_key(w, "K")                            # the retry: real, succeeds
        assert eng.keys(w) == ("K",)
        republished = int(eng._seg.keyidx[j]) == c
        # the delayed CAS(cell j, c -> 0): succeeds exactly when j holds c again
        if republished:
            eng._seg.keyidx[j] = 0
        found = eng.lookup("K")
        duplicate = None
        with contextlib.suppress(KeyExistsError):
            duplicate = eng.open(key="K", account=9)
        assert found == w and duplicate is None, (
            f"retried bind re-published cell {c:#x} at {j} (same value: {republished}); the "
            f"delayed reuse CAS erased it: lookup('K') -> {found}, second open(key='K') -> "
            f"{duplicate if duplicate is None else hex(duplicate)}")


# =========================================================================================
class TestWrappedIncarnation:
    """Defect 2: claim_entry(take_dead) runs sweep_dead (slot locks, price
    latches) before giving the dead entry a new incarnation -- "a wrapped
    incarnation must never meet its locks" -- but not the key part: a dead
    inserter's stripe lock and BUSY key record keep its token.  When that
    entry's incarnation comes round (2^17 - 1 claims later) a live Engine
    carries the dead token: the stripe lock now names a live owner, so every
    insert of every key of that stripe (and recover()) sees a live holder ->
    BusyError for as long as that Engine stays attached (property 5: "the next
    insert of that key or recover() clears it, within bounded time").

    SIMULATED: the 2^17 - 3 intermediate claims of the entry, by storing its
    incarnation (as tests/test_owners.py::TestIncarnationWrap does); the
    dead inserter (ENG_FAULT_DIE_IN_KEY), the registry-full take-over and the
    final claim are real."""

    def test_wrapped_token_revives_dead_inserters_stripe(self, make_engine, spawner):
        """A dead inserter's stripe lock does not survive into its entry's wrapped incarnation."""
        eng = make_engine(capacity=4, spec=ORDER_SPEC, keys_per_position=2)
        a = eng.open(account=1)
        b = eng.open(account=2)
        parent_conn, child_conn = spawner.ctx.Pipe(duplex=False)
        p = spawner.start(_die_in_bind, eng.handle, a, "K", child_conn)
        assert parent_conn.poll(READY_TIMEOUT), "worker did not start"
        dead = parent_conn.recv()
        p.join(READY_TIMEOUT)
        eng._set_fault()
        assert p.exitcode == -signal.SIGKILL, p.exitcode
        assert dead in held_stripes(eng).values(), "the dead inserter holds K's stripe"
        index, inc = dead & lib.ENG_TOKEN_ENTRY_MASK, dead >> lib.ENG_TOKEN_ENTRY_BITS
        fillers: list[Engine] = []
        wrapped = None
        try:
            while registry_in_use(eng) < lib.ENG_MAX_PROCS:   # every other entry live
                fillers.append(Engine.attach(eng.handle))
            taker = Engine.attach(eng.handle)     # registry full: takes the dead entry over
            fillers.append(taker)
            assert int(taker._seg.proc_index) == index
            still = dead in held_stripes(eng).values()
            taker.close()
            eng._seg.registry[index].incarnation = (inc - 2) % INC_PERIOD + 1   # simulated churn
            wrapped = attach_raw_until_token(eng, dead, 2)
            err = None
            t0 = time.monotonic()
            try:
                eng.bind_key(b, "K")
            except BusyError as e:
                err = e
            took = time.monotonic() - t0
            err2 = None
            if err is not None:   # recover() must clear it then
                eng.recover()
                try:
                    eng.bind_key(b, "K")
                except BusyError as e:
                    err2 = e
        finally:
            if wrapped is not None:
                lib.eng_detach(wrapped)
            for f in fillers:
                f.close()
        assert err is None and err2 is None and took < ANSWER_BOUND, (
            f"dead inserter's stripe lock survived the take-over of its entry "
            f"(still held after it: {still}) and its wrapped token {dead:#x} blocks key K: "
            f"bind_key -> {err!r} after {took:.3f} s; after recover() -> {err2!r}")


# =========================================================================================
class TestUnfencedStripe:
    """Defect 3: the stripe lock is not a fencing token for the publish.

    key_insert's I6 is CAS(record, BUSY(me) -> HELD(id)); it checks that the
    record is still ours but never that the STRIPE lock -- the only thing that
    made I2's uniqueness scan valid -- is still ours.  DESIGN "Crash safety":
    "a former owner that was declared dead can never publish".  Interleaving:

      W   (live; its liveness descriptor replaced by foreign code, so every
          other process proves it dead) bind_key(w, K): I1 stripe(K), I2 scan:
          K free, I3 waits for a record of w's slot that is BUSY ...
      X   bind_key(x, K): stripe_lock finds W's token, token_dead(W) = 1 ->
          takes the stripe over, I2 scan: K free (W has no record / cell yet),
          inserts K -> HELD(x), unlocks
      W   I3 gets its record, I4-I5, I6 CAS BUSY(W) -> HELD(w) succeeds
    Two open openings hold K (property 1, and the fencing rule of property 7).

    Real: W, its dup2'd descriptor, X's take-over and both inserts.
    SIMULATED: the BUSY key record that makes W wait in I3 (a concurrent live
    binder of another key on w, kpp=1: the test stores BUSY(parent token) and
    later 0, as that binder's keyrec_claim / keyrec_free would); W is SIGSTOPped
    while it waits only to make the interleaving deterministic."""

    def test_inserter_declared_dead_still_publishes(self, make_engine, spawner):
        """An inserter proven dead cannot publish a key after another took its stripe over."""
        eng = make_engine(capacity=4, spec=ORDER_SPEC, keys_per_position=1)
        w = eng.open(account=1)
        x = eng.open(account=2)
        wslot = eng.slot_of(w)
        set_keyrec_tag(eng, wslot, 0, (int(eng._seg.token) << 8) | KR_BUSY)   # simulated binder
        parent_conn, child_conn = spawner.ctx.Pipe(duplex=False)
        go = spawner.ctx.Event()
        p = spawner.start(_declared_dead_binder, eng.handle, w, "K", child_conn, go)
        assert parent_conn.poll(READY_TIMEOUT), "worker did not start"
        wtok = parent_conn.recv()
        stopped = False
        try:
            go.set()
            deadline = time.monotonic() + READY_TIMEOUT   # tight poll: W waits ~10 ms in I3
            while wtok not in held_stripes(eng).values():
                assert time.monotonic() < deadline and p.is_alive(), "W never took K's stripe"
            os.kill(p.pid, signal.SIGSTOP)           # W waits in I3 holding the stripe
            stopped = True
            assert wtok in held_stripes(eng).values(), "W gave up before it was stopped"
            assert eng.lookup("K") is None
            eng.bind_key(x, "K")                     # X: takes W's stripe over, inserts K
            assert eng.keys(x) == ("K",)
            set_keyrec_tag(eng, wslot, 0, 0)         # the simulated binder gives up (keyrec_free)
            os.kill(p.pid, signal.SIGCONT)
            stopped = False
            assert parent_conn.poll(READY_TIMEOUT), "W never answered"
            w_outcome = parent_conn.recv()
            p.join(JOIN_TIMEOUT)
        finally:
            if stopped:
                os.kill(p.pid, signal.SIGCONT)
        holders = [pos for pos in (w, x) if "K" in eng.keys(pos)]
        assert w_outcome != "bound" and holders == [x], (
            f"W, declared dead and its stripe taken over, still published: bind_key -> "
            f"{w_outcome}; open openings holding K: {[hex(h) for h in holders]}; "
            f"lookup('K') -> {eng.lookup('K')}")


class TestLookupAfterKilledRelease:
    """lookup answers open openings only: a key still indexed by a killed release is not found."""

    def test_lookup_is_none_between_killed_release_and_recover(self, make_engine, spawner):
        """A release SIGKILLed between its CAS and dropping its keys: lookup(K) is None."""
        eng = make_engine(capacity=2, spec=ORDER_SPEC, keys_per_position=1)
        a = eng.open(key="K", account=1)
        slot = eng.slot_of(a)
        close_order(eng, a)
        ready = spawner.ctx.Event()
        p = spawner.start(_die_after_release_cas, eng.handle, a, ready)
        p.join(READY_TIMEOUT)
        eng._set_fault()
        assert ready.is_set() and p.exitcode == -signal.SIGKILL, p.exitcode
        # the killed release left K indexed and its record HELD by the released a
        assert len(used_cells(eng)) == 1
        assert keyrec_tag(eng, slot, 0) == (a << 8) | KR_HELD
        with pytest.raises(StaleIdError):
            eng.state(a)
        assert eng.lookup("K") is None
        eng.recover()
        assert eng.lookup("K") is None
        b = eng.open(key="K", account=2)
        assert eng.lookup("K") == b
