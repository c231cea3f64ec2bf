"""Adversary of the journal's append: readers racing the wrap of the smallest ring.

More writer processes than cores flip their own ids through a ring of
ENG_JOURNAL_MIN_RECORDS; two readers in other processes follow it, and a
third is SIGSTOPped and SIGCONTed at random moments (a reader preempted
mid-copy while the ring laps it).

Forbidden outcomes: a seq delivered twice or out of order; a seq skipped
without a JournalLappedError (no writer dies or gives up here: there is no
abandoned claim to skip); a lap whose resume_seq is not past what the reader
had; a torn record (its trigger disagrees with its state); an id whose
states do not alternate (its records out of its commit order); records that
do not add up to the commits.
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import pytest
from journal_audit import (
    gen_of,
    journal_on,  # noqa: F401 (the make_engine fixture, journal on)
)

from engine import Engine, Outcome, State, Trigger
from engine._native import lib
from engine.errors import EngineError, JournalLappedError

pytestmark = pytest.mark.shm_only


def writer(handle: str, ids: list[int], n: int, ready: Any, go: Any, out: Any) -> None:
    """Child: ``n`` fast transitions over its own ids; sends how many applied."""
    eng = Engine.attach(handle)
    ready.set()
    go.wait(60)
    applied = refused = 0
    for i in range(n):
        pos = ids[i % len(ids)]
        t = Trigger.PAUSE if eng.state(pos) is State.MONITORING else Trigger.RESUME
        try:
            o = eng.transition(pos, t)
        except EngineError:
            refused += 1
            continue
        if o is Outcome.APPLIED:
            applied += 1
        else:
            refused += 1
    out.send((applied, refused))


WANT = {Trigger.PAUSE: State.PAUSED, Trigger.RESUME: State.MONITORING}


def reader(handle: str, start: int, ready: Any, stop: Any, out: Any) -> None:
    """Child: follow from ``start`` until ``stop`` and caught up; send what went wrong."""
    eng = Engine.attach(handle)
    ready.set()
    after, got, laps = start, 0, 0
    bad: list[str] = []
    last: dict[int, State] = {}
    while len(bad) < 10:
        try:
            for ev in eng.events(since=after, timeout=0.05):
                if ev.seq != after + 1:
                    bad.append(f"seq {ev.seq} after {after}: a silent gap or a repeat")
                if ev.kind != "transition" or WANT.get(ev.trigger) is not ev.state:
                    bad.append(f"torn or foreign record {ev}")
                if last.get(ev.id) is ev.state:
                    bad.append(f"id {ev.id}: {ev.state} twice in a row (order)")
                last[ev.id] = ev.state
                after = ev.seq
                got += 1
        except JournalLappedError as e:
            laps += 1
            if not after + 1 < e.resume_seq:
                bad.append(f"lap at {after} with resume_seq {e.resume_seq}")
            after = e.resume_seq - 1
            last.clear()
        if stop.is_set() and after >= eng.journal_seq:
            break
    out.send((bad, got, laps))


class TestWrapRace:
    @pytest.mark.parametrize("writers,n", [(4, 3000),
                                           pytest.param(8, 30000, marks=pytest.mark.slow)])
    def test_readers_race_the_smallest_ring(self, make_engine: Any, spawner: Any,
                                            writers: int, n: int) -> None:
        """Readers (one stopped at random) on the smallest ring: in order, whole, or a real lap."""
        eng = make_engine(capacity=4 * writers + 4, journal_records=lib.ENG_JOURNAL_MIN_RECORDS)
        ids = [[eng.open_position(10.0, 1.0) for _ in range(2)] for _ in range(writers)]
        for mine in ids:
            for p in mine:
                eng.transition(p, Trigger.POSITION_OPENED)
        start = eng.journal_seq
        ctx = spawner.ctx
        go, stop = ctx.Event(), ctx.Event()
        pipes = []
        readies = []
        readers = []
        for _ in range(3):
            rx, tx = ctx.Pipe(duplex=False)
            r = ctx.Event()
            readers.append(spawner.start(reader, eng.handle, start, r, stop, tx))
            pipes.append(rx)
            readies.append(r)
        wpipes = []
        for mine in ids:
            rx, tx = ctx.Pipe(duplex=False)
            r = ctx.Event()
            spawner.start(writer, eng.handle, mine, n, r, go, tx)
            wpipes.append(rx)
            readies.append(r)
        for r in readies:
            assert r.wait(60)
        go.set()
        rng = random.Random(7)
        victim = readers[2].pid
        applied = refused = 0
        for rx in wpipes:
            while not rx.poll(0):
                os.kill(victim, signal.SIGSTOP)
                time.sleep(rng.uniform(0.0005, 0.005))
                os.kill(victim, signal.SIGCONT)
                time.sleep(rng.uniform(0.0001, 0.002))
            a, f = rx.recv()
            applied += a
            refused += f
        stop.set()
        results = []
        for rx in pipes:
            assert rx.poll(120), "a reader never caught up"
            results.append(rx.recv())
        spawner.join_all(120)
        for bad, _, _ in results:
            assert not bad, bad
        print(f"wrap race: {applied} applied, {refused} refused; readers (got, laps): "
              f"{[(g, lp) for _, g, lp in results]}")
        assert eng.journal_seq - start == applied, "records != applied commits"
        span = lib.ENG_SW_GEN_MASK + 1
        gens = sum(gen_of(eng, s) for s in range(eng.capacity))
        assert (gens - eng.journal_seq) % span == 0
