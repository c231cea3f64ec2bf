"""Model-based test of the default position lifecycle, on both stores.

A plain-Python model of the design's transition table (written out here, by
state and trigger NAME, not derived from engine.spec) runs side by side with
a small engine.  Hypothesis opens and releases positions, fires random
triggers by enum, by name and through the context-update path, toggles the
emergency stop, and after every step compares outcomes, states, generations
(bits read from engine._native.lib), the per-slot transition counters and the
ids (``(opening << ENG_ID_SLOT_BITS) | slot``: an id names one opening of a
slot; a released opening's id is refused like a never-opened slot).
The same machine runs on shared memory and on Redis (the session's server).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import redis_url
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine import CapacityError, Engine, NotOpenError, Outcome, State, Trigger
from engine._native import lib

CAPACITY = 4
GEN_SHIFT = lib.ENG_SW_GEN_SHIFT
GEN_MASK = lib.ENG_SW_GEN_MASK

STATES = ["CREATED", "MONITORING", "EXIT_PENDING", "EXITING", "CLOSED", "ERROR", "PAUSED"]
TRIGGERS = ["POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_CANCELLED", "EXIT_STARTED",
            "EXIT_COMPLETED", "EXIT_FAILED", "PAUSE", "RESUME", "ERROR_OCCURRED", "RECOVER"]

# The design's table: (state, trigger) -> next state.  Anything absent is INVALID.
MODEL_TABLE: dict[tuple[str, str], str] = {
    ("CREATED", "POSITION_OPENED"): "MONITORING",
    ("MONITORING", "EXIT_CONDITION_MET"): "EXIT_PENDING",
    ("EXIT_PENDING", "EXIT_CANCELLED"): "MONITORING",
    ("EXIT_PENDING", "EXIT_STARTED"): "EXITING",
    ("EXITING", "EXIT_COMPLETED"): "CLOSED",
    ("EXITING", "EXIT_FAILED"): "EXIT_PENDING",
    ("MONITORING", "PAUSE"): "PAUSED",
    ("PAUSED", "RESUME"): "MONITORING",
    ("ERROR", "RECOVER"): "MONITORING",
}
for _s in STATES:
    if _s != "CLOSED":
        MODEL_TABLE[(_s, "ERROR_OCCURRED")] = "ERROR"


def path_to_closed(state: str | None) -> list[str] | None:
    """The shortest trigger sequence from ``state`` to CLOSED in the model."""
    if state is None:
        return None
    paths: dict[str, list[str]] = {state: []}
    frontier = [state]
    while frontier:
        nxt = []
        for s in frontier:
            for trig in TRIGGERS:
                target = MODEL_TABLE.get((s, trig))
                if target is not None and target not in paths:
                    paths[target] = [*paths[s], trig]
                    nxt.append(target)
        frontier = nxt
    return paths.get("CLOSED")


@dataclass
class ModelSlot:
    state: str | None = None       # None: free
    generation: int = 0            # the engine's 16-bit generation, mod 2**16
    commits: int = 0               # committed transitions (open and release included)
    exit_reason: int = 0
    openings: int = 0              # times the slot was opened
    id: int = 0                    # the id of its last opening (0: never opened)


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.eng = Engine.create(capacity=CAPACITY, url=self.url_of())
        self.model = [ModelSlot() for _ in range(CAPACITY)]
        self.halted = False

    def url_of(self) -> str | None:
        """The store: None for shared memory (RedisLifecycleMachine: the Redis url)."""
        return None

    def teardown(self) -> None:
        self.eng.unlink()
        self.eng.close()

    # -- helpers -------------------------------------------------------------------
    def _commit(self, m: ModelSlot) -> None:
        m.generation = (m.generation + 1) & GEN_MASK
        m.commits += 1

    def _free(self) -> list[int]:
        return [i for i, m in enumerate(self.model) if m.state is None]

    # -- rules ---------------------------------------------------------------------
    @rule(entry=st.floats(0.01, 1e6), side=st.sampled_from([1, -1]))
    def open_position(self, entry: float, side: int) -> None:
        free = self._free()
        if not free:
            with pytest.raises(CapacityError):
                self.eng.open_position(entry_price=entry, amount=1.0, side=side)
            return
        pos = self.eng.open_position(entry_price=entry, amount=1.0, side=side)
        slot = self.eng.slot_of(pos)
        assert slot in free, f"slot {slot} was not free"
        m = self.model[slot]
        m.openings += 1
        assert pos == (m.openings << lib.ENG_ID_SLOT_BITS) | slot, (pos, m.openings, slot)
        m.state, m.exit_reason, m.id = "CREATED", 0, pos
        self._commit(m)

    def _id(self, slot: int) -> int:
        """The id to call ``slot`` by: its current opening's, else the last
        (released) one's, else the never-issued id ``slot`` (opening 0)."""
        return self.model[slot].id or slot

    @rule(slot=st.integers(0, CAPACITY - 1), trigger=st.sampled_from(TRIGGERS),
          how=st.sampled_from(["enum", "name", "int", "ctx"]),
          reason=st.integers(-(2**31), 2**31 - 1))
    def fire(self, slot: int, trigger: str, how: str, reason: int) -> None:
        """Any trigger on any slot."""
        self._fire(slot, trigger, how, reason)

    @rule(slot=st.integers(0, CAPACITY - 1), choice=st.integers(0, 2**16),
          how=st.sampled_from(["enum", "name", "int", "ctx"]),
          reason=st.integers(-(2**31), 2**31 - 1))
    def advance(self, slot: int, choice: int, how: str, reason: int) -> None:
        """A trigger the model has a rule for (random ones rarely reach CLOSED)."""
        m = self.model[slot]
        valid = [t for t in TRIGGERS if (m.state, t) in MODEL_TABLE]
        if valid:
            self._fire(slot, valid[choice % len(valid)], how, reason)

    @rule(slot=st.integers(0, CAPACITY - 1), how=st.sampled_from(["enum", "name", "int", "ctx"]))
    def close_out(self, slot: int, how: str) -> None:
        """Walk the model's shortest path to CLOSED, one checked trigger at a time."""
        path = path_to_closed(self.model[slot].state)
        for trigger in path or ():
            self._fire(slot, trigger, how, len(trigger))

    def _fire(self, slot: int, trigger: str, how: str, reason: int) -> None:
        m = self.model[slot]
        arg = {"enum": Trigger[trigger], "name": trigger, "int": TRIGGERS.index(trigger),
               "ctx": trigger}[how]
        kwargs = {"exit_reason": reason} if how == "ctx" else {}
        if m.state is None:
            if self.halted:
                # Once a known engine bug: a free slot returned HALTED instead of
                # raising while halted.  test_halt.py pins the raise now
                # (TestHalt.test_never_opened_slot_raises_while_halted); not modelled here.
                return
            with pytest.raises(NotOpenError):
                self.eng.transition(self._id(slot), arg, **kwargs)
            return
        outcome = self.eng.transition(m.id, arg, **kwargs)
        target = MODEL_TABLE.get((m.state, trigger))
        if self.halted:
            expected = Outcome.HALTED
        elif target is None:
            expected = Outcome.INVALID
        else:
            expected = Outcome.APPLIED
        assert outcome is expected, (m.state, trigger, outcome)
        if expected is Outcome.APPLIED:
            m.state = target
            self._commit(m)
            if how == "ctx":
                m.exit_reason = reason

    @rule(slot=st.integers(0, CAPACITY - 1))
    def release(self, slot: int) -> None:
        m = self.model[slot]
        if m.state is None:
            with pytest.raises(NotOpenError):
                self.eng.release_position(self._id(slot))
            return
        outcome = self.eng.release_position(m.id)
        if m.state == "CLOSED":
            assert outcome is Outcome.APPLIED
            m.state = None
            self._commit(m)
        else:
            assert outcome is Outcome.INVALID

    @rule(on=st.sampled_from([False, False, True]))
    def halt(self, on: bool) -> None:
        self.eng.halt(on)
        self.halted = on

    # -- invariants ----------------------------------------------------------------
    @invariant()
    def states_generations_and_counters_match(self) -> None:
        rows = {int(r["slot"]): r for r in self.eng.snapshot()}
        assert set(rows) == {i for i, m in enumerate(self.model) if m.state is not None}
        for slot, m in enumerate(self.model):
            word = self.eng.state_word(slot)
            assert (word >> GEN_SHIFT) & GEN_MASK == m.generation, slot
            assert not word & lib.ENG_SW_LOCK
            if m.state is None:
                assert word & lib.ENG_SW_STATE_MASK == 0
                with pytest.raises(NotOpenError):
                    self.eng.id_of(slot)
                continue
            assert self.eng.id_of(slot) == m.id
            assert self.eng.state(m.id).name == m.state
            assert State(word & lib.ENG_SW_STATE_MASK).name == m.state
            row = rows[slot]
            assert int(row["id"]) == m.id
            assert int(row["generation"]) == m.generation
            assert int(row["transitions"]) == m.commits
            assert int(row["exit_reason"]) == m.exit_reason


class RedisLifecycleMachine(LifecycleMachine):
    """The same machine on an engine on Redis."""

    def url_of(self) -> str | None:
        return redis_url()


LifecycleMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=60,
                                              deadline=None)
TestLifecycleModel = LifecycleMachine.TestCase
TestLifecycleModel.__doc__ = ("Outcomes, states, generations (+1 per APPLIED) and transition "
                              "counters match a plain-Python model of the design's table.")
RedisLifecycleMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=60,
                                                   deadline=None)
TestLifecycleModelOnRedis = RedisLifecycleMachine.TestCase
TestLifecycleModelOnRedis.__doc__ = ("On Redis: outcomes, states, generations and transition "
                                     "counters match the same plain-Python model.")
