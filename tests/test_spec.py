"""Machine specs: the default table, custom machines, guards, spec checks and
the refusal of an attach with a different spec."""

from __future__ import annotations

import pickle

import pytest

from engine import (
    POSITION_SPEC,
    Engine,
    EngineError,
    MachineSpec,
    Outcome,
    Rule,
    SegmentError,
    SpecError,
    SpecMismatchError,
    State,
    Trigger,
)
from engine._native import lib

GEN_SHIFT = lib.ENG_SW_GEN_SHIFT
GEN_MASK = lib.ENG_SW_GEN_MASK

#: The design's default lifecycle, written out here (not read from engine.spec).
DESIGN_RULES = {
    ("POSITION_OPENED", "CREATED"): "MONITORING",
    ("EXIT_CONDITION_MET", "MONITORING"): "EXIT_PENDING",
    ("EXIT_CANCELLED", "EXIT_PENDING"): "MONITORING",
    ("EXIT_STARTED", "EXIT_PENDING"): "EXITING",
    ("EXIT_COMPLETED", "EXITING"): "CLOSED",
    ("EXIT_FAILED", "EXITING"): "EXIT_PENDING",
    ("PAUSE", "MONITORING"): "PAUSED",
    ("RESUME", "PAUSED"): "MONITORING",
    ("RECOVER", "ERROR"): "MONITORING",
    **{("ERROR_OCCURRED", s): "ERROR" for s in
       ("CREATED", "MONITORING", "EXIT_PENDING", "EXITING", "ERROR", "PAUSED")},
}
DESIGN_CODES = {"CREATED": 0x01, "MONITORING": 0x02, "EXIT_PENDING": 0x04, "EXITING": 0x08,
                "CLOSED": 0x10, "ERROR": 0x20, "PAUSED": 0x40}


# ---- guards: module level, so specs holding them pickle -------------------------
def above_entry(ctx, price) -> bool:
    """Allow only when the last price is above the entry price."""
    return price.price > ctx.entry_price


def always_fails(ctx, price) -> bool:
    raise RuntimeError("guard exploded")


GUARD_CALLS: list[tuple[object, object]] = []


def recording_guard(ctx, price) -> bool:
    GUARD_CALLS.append((ctx, price))
    return True


def strategy_spec(guard=above_entry, name: str = "strategy") -> MachineSpec:
    """IDLE -> ANALYZING -> EXECUTING -> DONE, with EXECUTE guarded."""
    return MachineSpec(
        states=["IDLE", "ANALYZING", "EXECUTING", "DONE"],
        triggers=["START", "EXECUTE", "FINISH", "ABORT"],
        rules=[Rule.of("START", "IDLE", "ANALYZING"),
               Rule.of("EXECUTE", "ANALYZING", "EXECUTING", guard=guard),
               Rule.of("FINISH", "EXECUTING", "DONE"),
               Rule.of("ABORT", ["ANALYZING", "EXECUTING"], "IDLE")],
        initial="IDLE", closed=["DONE"], name=name)


def generation(word: int) -> int:
    return (word >> GEN_SHIFT) & GEN_MASK


def transitions(eng: Engine, pos: int) -> int:
    rows = eng.snapshot()
    return int(rows[rows["id"] == pos]["transitions"][0])


# ---------------------------------------------------------------------------------
class TestDefaultSpec:
    def test_state_codes_are_the_designs(self):
        """State members carry the design's one-hot codes."""
        assert {s.name: int(s) for s in State} == DESIGN_CODES

    def test_table_is_the_designs(self):
        """The compiled table has exactly the design's rules and nothing else."""
        table = POSITION_SPEC.table_bytes()
        states = list(DESIGN_CODES)
        found = {}
        for si, s in enumerate(states):
            for t in Trigger:
                entry = table[si * lib.ENG_MAX_TRIGGERS + int(t)]
                assert not entry & lib.ENG_RULE_GUARDED
                if entry & lib.ENG_RULE_TARGET_MASK:
                    found[(t.name, s)] = states[(entry & lib.ENG_RULE_TARGET_MASK) - 1]
        assert found == DESIGN_RULES

    def test_engine_follows_the_designs_table(self, make_engine):
        """From every reachable state every trigger does what the design says."""
        eng = make_engine(capacity=len(DESIGN_CODES) * len(Trigger))
        paths = {"CREATED": [], "MONITORING": ["POSITION_OPENED"],
                 "EXIT_PENDING": ["POSITION_OPENED", "EXIT_CONDITION_MET"],
                 "EXITING": ["POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED"],
                 "CLOSED": ["POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED",
                            "EXIT_COMPLETED"],
                 "ERROR": ["ERROR_OCCURRED"], "PAUSED": ["POSITION_OPENED", "PAUSE"]}
        for state, path in paths.items():
            for trig in Trigger:
                pos = eng.open_position(100.0, 1.0)
                for step in path:
                    assert eng.transition(pos, step) is Outcome.APPLIED
                assert eng.state(pos).name == state
                out = eng.transition(pos, trig)
                target = DESIGN_RULES.get((trig.name, state))
                assert out is (Outcome.APPLIED if target else Outcome.INVALID), (state, trig)
                assert eng.state(pos).name == (target or state)
                eng.transition(pos, "ERROR_OCCURRED")   # park it; slots are not reused

    def test_spec_equality_and_fingerprint(self):
        """Equal rules give equal specs and fingerprints; the default is stable."""
        assert MachineSpec.position() == POSITION_SPEC
        assert MachineSpec.position().fingerprint == POSITION_SPEC.fingerprint != 0
        assert hash(MachineSpec.position()) == hash(POSITION_SPEC)
        assert strategy_spec() != POSITION_SPEC

    def test_spec_pickles(self):
        """A spec (with a module-level guard) survives a pickle round trip."""
        spec = strategy_spec()
        back = pickle.loads(pickle.dumps(spec))
        assert back == spec and back.fingerprint == spec.fingerprint
        assert back.guards[(1, 1)] is above_entry


# ---------------------------------------------------------------------------------
class TestCustomMachine:
    def test_custom_states_and_triggers(self, make_engine):
        """A custom spec's positions start in its initial state and follow its rules."""
        spec = strategy_spec(guard=None)
        eng = make_engine(capacity=4, spec=spec)
        pos = eng.open_position(100.0, 1.0)
        assert eng.state(pos) == spec.State.IDLE and eng.state(pos).name == "IDLE"
        assert eng.transition(pos, "START") is Outcome.APPLIED
        assert eng.state(pos).name == "ANALYZING"
        assert eng.transition(pos, spec.Trigger.EXECUTE) is Outcome.APPLIED
        assert eng.transition(pos, "START") is Outcome.INVALID
        assert eng.transition(pos, "FINISH") is Outcome.APPLIED
        assert eng.state(pos).name == "DONE"
        assert eng.release_position(pos) is Outcome.APPLIED   # DONE is its closed state

    def test_custom_state_codes_are_one_hot_by_index(self, make_engine):
        """State i of a custom spec is 1 << i in the state word."""
        spec = strategy_spec(guard=None)
        eng = make_engine(capacity=2, spec=spec)
        pos = eng.open_position(1.0, 1.0)
        eng.transition(pos, "START")
        assert eng.state_word(eng.slot_of(pos)) & lib.ENG_SW_STATE_MASK == 1 << 1 == eng.state(pos)

    def test_sixteen_states_is_allowed(self, make_engine):
        """A spec with exactly ENG_MAX_STATES states works up to its last state."""
        n = lib.ENG_MAX_STATES
        names = [f"S{i}" for i in range(n)]
        spec = MachineSpec(states=names, triggers=["NEXT"],
                           rules=[Rule.of("NEXT", names[i], names[i + 1]) for i in range(n - 1)],
                           initial="S0", closed=[names[-1]], name="chain")
        eng = make_engine(capacity=1, spec=spec)
        pos = eng.open_position(1.0, 1.0)
        for _ in range(n - 1):
            assert eng.transition(pos, "NEXT") is Outcome.APPLIED
        assert eng.state(pos).name == names[-1]
        assert eng.state_word(eng.slot_of(pos)) & lib.ENG_SW_STATE_MASK == 1 << (n - 1)
        assert eng.transition(pos, "NEXT") is Outcome.INVALID

    def test_handle_carries_custom_spec(self, make_engine):
        """A custom engine's handle pickles with its spec and attaches with it."""
        spec = strategy_spec()
        eng = make_engine(capacity=2, spec=spec)
        pos = eng.open_position(100.0, 1.0)
        h = pickle.loads(pickle.dumps(eng.handle))
        assert h.spec == spec
        with Engine.attach(h) as other:
            assert other.spec == spec
            assert other.transition(pos, "START") is Outcome.APPLIED
        assert eng.state(pos).name == "ANALYZING"

    def test_attach_with_explicit_spec(self, make_engine):
        """attach(name, spec=...) with the creator's spec is accepted."""
        eng = make_engine(capacity=2, spec=strategy_spec())
        with Engine.attach(eng.name, spec=strategy_spec()) as other:
            assert other.spec == eng.spec


class TestSpecMismatch:
    def test_attach_custom_segment_with_default_spec_is_refused(self, make_engine):
        """Default-spec attach to a custom segment: SpecMismatchError, no change."""
        eng = make_engine(capacity=2, spec=strategy_spec())
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, "START")
        word = eng.state_word(eng.slot_of(pos))
        with pytest.raises(SpecMismatchError, match="another machine spec") as info:
            Engine.attach(eng.name)
        assert isinstance(info.value, SegmentError)
        assert eng.state_word(eng.slot_of(pos)) == word
        assert eng.recover().changed is False

    def test_attach_default_segment_with_custom_spec_is_refused(self, engine):
        """Attaching a default segment with another spec is refused."""
        with pytest.raises(SpecMismatchError):
            Engine.attach(engine.name, spec=strategy_spec())

    def test_same_shape_different_guard_is_refused(self, make_engine):
        """Two specs that differ only in their guard are different specs."""
        eng = make_engine(capacity=2, spec=strategy_spec(guard=above_entry))
        other = strategy_spec(guard=recording_guard)
        assert other != eng.spec
        with pytest.raises(SpecMismatchError):
            Engine.attach(eng.name, spec=other)


# ---------------------------------------------------------------------------------
class TestGuards:
    @pytest.fixture
    def strat(self, make_engine):
        """A strategy engine with one position in ANALYZING at entry 100."""
        eng = make_engine(capacity=4, spec=strategy_spec())
        pos = eng.open_position(entry_price=100.0, amount=1.0)
        assert eng.transition(pos, "START") is Outcome.APPLIED
        return eng, pos

    def test_guard_accepts(self, strat):
        """When the guard says yes the guarded rule is APPLIED."""
        eng, pos = strat
        eng.update_price(pos, 101.0)
        gen = generation(eng.state_word(eng.slot_of(pos)))
        assert eng.transition(pos, "EXECUTE") is Outcome.APPLIED
        assert eng.state(pos).name == "EXECUTING"
        assert generation(eng.state_word(eng.slot_of(pos))) == (gen + 1) & GEN_MASK

    def test_guard_rejects_and_changes_nothing(self, strat):
        """A guard's no gives REJECTED; word, context, price, counter unchanged."""
        eng, pos = strat
        eng.update_price(pos, 99.0)
        word, ctx, price = eng.state_word(eng.slot_of(pos)), eng.context(pos), eng.price(pos)
        count = transitions(eng, pos)
        assert eng.transition(pos, "EXECUTE") is Outcome.REJECTED
        assert eng.transition(pos, "EXECUTE", exit_reason=5, stop_loss=1.0) is Outcome.REJECTED
        assert eng.state_word(eng.slot_of(pos)) == word
        assert not eng.state_word(eng.slot_of(pos)) & lib.ENG_SW_LOCK
        assert eng.context(pos) == ctx
        assert eng.price(pos) == price
        assert transitions(eng, pos) == count

    def test_guarded_context_update_applies_with_state(self, strat):
        """A context update on an accepted guarded rule lands with the new state."""
        eng, pos = strat
        eng.update_price(pos, 150.0)
        assert eng.transition(pos, "EXECUTE", exit_reason=8, take_profit=160.0) \
            is Outcome.APPLIED
        ctx = eng.context(pos)
        assert eng.state(pos).name == "EXECUTING"
        assert (ctx.exit_reason, ctx.take_profit) == (8, 160.0)

    def test_unguarded_rules_of_guarded_spec_use_no_guard(self, strat):
        """Rules without a guard apply regardless of the price."""
        eng, pos = strat
        eng.update_price(pos, 1.0)
        assert eng.transition(pos, "ABORT") is Outcome.APPLIED
        assert eng.state(pos).name == "IDLE"

    def test_guard_not_run_for_invalid_trigger(self, make_engine):
        """A trigger with no rule from the state is INVALID without calling the guard."""
        eng = make_engine(capacity=2, spec=strategy_spec(guard=recording_guard))
        pos = eng.open_position(100.0, 1.0)      # IDLE: EXECUTE has no rule
        GUARD_CALLS.clear()
        assert eng.transition(pos, "EXECUTE") is Outcome.INVALID
        assert GUARD_CALLS == []

    def test_guard_sees_context_and_price(self, make_engine):
        """The guard receives the slot's current context and price records."""
        eng = make_engine(capacity=2, spec=strategy_spec(guard=recording_guard))
        pos = eng.open_position(100.0, 2.0, side=-1, token=4)
        eng.transition(pos, "START")
        eng.update_price(pos, 90.0)
        GUARD_CALLS.clear()
        assert eng.transition(pos, "EXECUTE") is Outcome.APPLIED
        [(ctx, price)] = GUARD_CALLS
        assert (ctx.entry_price, ctx.amount, ctx.side, ctx.token) == (100.0, 2.0, -1, 4)
        assert price == eng.price(pos)

    def test_guard_exception_propagates_and_changes_nothing(self, make_engine):
        """A raising guard: the caller gets it; the slot is unlocked, unchanged."""
        eng = make_engine(capacity=2, spec=strategy_spec(guard=always_fails))
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, "START")
        word, ctx = eng.state_word(eng.slot_of(pos)), eng.context(pos)
        with pytest.raises(RuntimeError, match="guard exploded"):
            eng.transition(pos, "EXECUTE")
        assert eng.state_word(eng.slot_of(pos)) == word
        assert eng.context(pos) == ctx
        assert eng.transition(pos, "ABORT") is Outcome.APPLIED   # not left locked

    def test_guarded_transition_halted(self, strat):
        """While halted a guarded rule returns HALTED without running the guard."""
        eng, pos = strat
        eng.update_price(pos, 200.0)
        eng.halt()
        try:
            assert eng.transition(pos, "EXECUTE") is Outcome.HALTED
            assert eng.state(pos).name == "ANALYZING"
        finally:
            eng.halt(False)

    def test_guarded_transition_counts_once(self, strat):
        """A guarded transition is one transition_ctx attempt and no error."""
        eng, pos = strat
        before = eng.metrics()
        eng.update_price(pos, 99.0)
        assert eng.transition(pos, "EXECUTE") is Outcome.REJECTED
        eng.update_price(pos, 101.0)
        assert eng.transition(pos, "EXECUTE") is Outcome.APPLIED
        m = eng.metrics()
        ctx_op = {f: getattr(m["transition_ctx"], f) - getattr(before["transition_ctx"], f)
                  for f in ("attempts", "applied", "rejected", "errors")}
        fast = {f: getattr(m["transition"], f) - getattr(before["transition"], f)
                for f in ("attempts", "errors")}
        assert ctx_op == {"attempts": 2, "applied": 1, "rejected": 1, "errors": 0}
        assert fast == {"attempts": 0, "errors": 0}


# ---------------------------------------------------------------------------------
def spec_kwargs(**over):
    kw = dict(states=["A", "B"], triggers=["GO"], rules=[Rule.of("GO", "A", "B")], initial="A")
    kw.update(over)
    return kw


class TestSpecErrors:
    @pytest.mark.parametrize(("over", "match"), [
        ({"states": [f"S{i}" for i in range(lib.ENG_MAX_STATES + 1)], "initial": "S0",
          "rules": []}, "1 to 16 states"),
        ({"states": [], "rules": []}, "1 to 16 states"),
        ({"triggers": [f"T{i}" for i in range(lib.ENG_MAX_TRIGGERS + 1)], "rules": []},
         "triggers"),
        ({"triggers": [], "rules": []}, "triggers"),
        ({"states": ["A", "B", "A"]}, "duplicate state"),
        ({"triggers": ["GO", "GO"]}, "duplicate trigger"),
        ({"states": ["A", "not an identifier"]}, "identifiers"),
        ({"triggers": ["GO", 3]}, "identifiers"),
        ({"initial": "Z"}, "initial state 'Z'"),
        ({"closed": ["Z"]}, "closed state 'Z'"),
        ({"rules": [Rule.of("STOP", "A", "B")]}, "rule trigger 'STOP'"),
        ({"rules": [Rule.of("GO", "Z", "B")]}, "rule source 'Z'"),
        ({"rules": [Rule.of("GO", "A", "Z")]}, "rule target 'Z'"),
        ({"rules": [Rule.of("GO", "A", "B"), Rule.of("GO", "A", "A")]}, "two rules"),
        ({"rules": [Rule.of("GO", ["A", "A"], "B")]}, "two rules"),
        ({"rules": [Rule.of("GO", "A", "B", guard="not callable")]}, "callable"),
    ], ids=["17-states", "0-states", "257-triggers", "0-triggers", "dup-state", "dup-trigger",
            "bad-state-name", "bad-trigger-name", "unknown-initial", "unknown-closed",
            "unknown-rule-trigger", "unknown-source", "unknown-target", "dup-rule",
            "dup-source-in-rule", "guard-not-callable"])
    def test_bad_spec_raises_spec_error(self, over, match):
        """A malformed spec raises SpecError naming what is wrong."""
        with pytest.raises(SpecError, match=match) as info:
            MachineSpec(**spec_kwargs(**over))
        assert isinstance(info.value, EngineError) and isinstance(info.value, ValueError)

    def test_minimal_spec_is_fine(self):
        """The base of the parametrized cases above is itself valid."""
        spec = MachineSpec(**spec_kwargs())
        assert spec.table_bytes()[0] == 2    # A --GO--> B: target index 1, + 1
