"""Adversary of the journal's append: SIGKILL at every fault site of every kind of commit.

Every ENG_FAULT_DIE_* switch the build has (whatever the append's steps are
named) is tried on every kind of commit: open, a booked + keyed + indexed
open, fast and slow transitions, a booked close, release, bind_key, an account
change, halt, a journaled price write, an exit fired by a price, and a
takeover's roll forward killed in its own append.  After each death a reader
reads first (it may resolve the dead writer's record), then another process
commits, then recover() runs.

Forbidden outcomes: a record without its commit or a commit without its
record (per slot, per account, per price, per key, for the halt flag); a seq
twice, out of order or skipped silently; a record a reader got before the
resolution that differs from (or is missing in) what it reads after; a hang.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from journal_audit import (
    DIE_FAULTS,
    KILLED,
    KINDS,
    NOT_FIRED,
    SHORT,
    SLOT_MASK,
    Segment,
    World,
    die_at,
    drain,
    forked,
    journal_on,  # noqa: F401 (the make_engine fixture, journal on)
    locked,
)

from engine import Engine, Trigger
from engine._native import lib

pytestmark = pytest.mark.shm_only


def after_death(eng: Engine, world: World, seg: Segment, kind: str, order: str) -> None:
    """Reader first (or the dead writer's object committed again first, by its next holder),
    then a commit elsewhere, then recover(): the books balance, and the records a reader got
    early are exactly the final ones."""
    if order == "same_first":
        world.again(kind, eng)
    early = drain(eng)
    if order == "read_first":
        world.again(kind, eng)
    other = eng.open_position(20.0, 1.0)
    eng.transition(other, Trigger.POSITION_OPENED)
    eng.recover()
    final = {e.seq: e for e in drain(eng)}
    for e in early:
        assert final.get(e.seq) == e, f"a record read before the resolution changed: " \
                                      f"{e} -> {final.get(e.seq)}"
    world.check(eng, seg)


def kill_round(make_engine: Any, kind: str, faults: list[str], order: str) -> list[str]:
    fired = []
    for name in faults:
        eng = make_engine(capacity=8, max_accounts=2, journal_prices=kind in ("price",
                                                                              "exit_fire"))
        world = World(eng)
        seg = Segment(eng)
        try:
            code = forked(die_at, eng.handle, getattr(lib, name), world, kind)
            eng._set_fault(0)
            assert code in (KILLED, NOT_FIRED), f"{kind}/{name}: child ended with {code}"
            if code == KILLED:
                fired.append(name)
            after_death(eng, world, seg, kind, order)
        except AssertionError as e:
            raise AssertionError(f"{kind} killed at {name}: {e}") from e
        finally:
            seg.close()
            eng.close()
    return fired


class TestKillEveryStep:
    @pytest.mark.parametrize("order", ["read_first", "same_first"])
    @pytest.mark.parametrize("kind", KINDS)
    def test_record_iff_commit_at_each_journal_step(self, make_engine: Any, kind: str,
                                                    order: str) -> None:
        """A commit of each kind SIGKILLed at each journal step: records == commits, no gap."""
        fired = kill_round(make_engine, kind, SHORT, order)
        print(f"{kind}: fired {fired}")
        assert len(fired) >= min(3, len(SHORT)), f"{kind}: only {fired} of {SHORT} fired"

    @pytest.mark.slow
    @pytest.mark.parametrize("order", ["read_first", "same_first"])
    @pytest.mark.parametrize("kind", KINDS)
    def test_record_iff_commit_at_every_fault_site(self, make_engine: Any, kind: str,
                                                   order: str) -> None:
        """A commit of each kind SIGKILLed at every fault site: records == commits, no gap."""
        fired = kill_round(make_engine, kind, DIE_FAULTS, order)
        print(f"{kind}: fired {fired}")
        assert len(fired) >= 3


def slow_dies(handle: str, fault: int, pos: int) -> int:
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    eng.transition(pos, Trigger.EXIT_CONDITION_MET, exit_reason=3)
    return NOT_FIRED


def taker_dies(handle: str, fault: int, pos: int) -> int:
    eng = Engine.attach(handle)
    eng._set_fault(fault)
    eng.transition(pos, Trigger.EXIT_STARTED)   # takes the dead owner's lock over first
    return NOT_FIRED


def takeover_round(make_engine: Any, first: list[str], second: list[str]) -> int:
    """A slow transition dies holding its lock (each of ``first``); the process that takes
    it over dies in its own append (each of ``second``).  Returns the pairs tried."""
    tried = 0
    for a in first:
        for b in second:
            eng = make_engine(capacity=8, max_accounts=2)
            world = World(eng)
            seg = Segment(eng)
            try:
                code = forked(slow_dies, eng.handle, getattr(lib, a), world.plain)
                assert code in (KILLED, NOT_FIRED)
                if code != KILLED or not locked(eng, world.plain & SLOT_MASK):
                    eng._set_fault(0)
                    continue   # the slot is not left locked: no takeover to attack
                code = forked(taker_dies, eng.handle, getattr(lib, b), world.plain)
                eng._set_fault(0)
                assert code in (KILLED, NOT_FIRED, 0), f"taker ended with {code}"
                tried += 1
                after_death(eng, world, seg, "slow", "same_first")
            except AssertionError as e:
                raise AssertionError(f"owner killed at {a}, taker at {b}: {e}") from e
            finally:
                seg.close()
                eng.close()
    return tried


class TestKillTheTaker:
    def test_roll_forward_killed_in_its_append(self, make_engine: Any) -> None:
        """A takeover's roll forward SIGKILLed at each journal step: its record iff its commit."""
        tried = takeover_round(make_engine, SHORT, SHORT)
        print(f"takeover pairs tried: {tried}")
        assert tried >= 1

    @pytest.mark.slow
    def test_roll_forward_killed_at_every_fault_site(self, make_engine: Any) -> None:
        """The same for every pair of fault sites (the owner's, the taker's)."""
        assert takeover_round(make_engine, DIE_FAULTS, DIE_FAULTS) >= 1


def test_fault_sites_exist() -> None:
    """The build has the journal's fault sites this file attacks (else it attacks nothing)."""
    assert len(SHORT) >= 3, DIE_FAULTS
    assert os.environ.get("ENGINE_TEST_FAULTS") == "1"
