"""State machines: the default position lifecycle and custom specs.

A :class:`MachineSpec` compiles to a dense table (state index x trigger ->
target index + 1) that is stored in the segment header, so every attached
process enforces the same rules, and to a record layout (its fields, see
:mod:`engine.records`).  Its fingerprint goes in the header too; an attach
with a different spec is refused.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from engine._native import lib
from engine.errors import SpecError
from engine.records import RecordLayout

if TYPE_CHECKING:
    from engine.records import Context, PriceSnapshot

#: A guard sees the context and price read under the transition lock and
#: says whether the transition may go ahead.  It must be importable (module
#: level) to travel to spawned workers inside a handle.
Guard = Callable[["Context", "PriceSnapshot"], bool]


class NamedIntEnum(enum.IntEnum):
    """An IntEnum whose ``str()`` is its name (Python 3.11 made an IntEnum's
    ``str()`` its number: ``print(State.EXIT_PENDING)`` showed ``4``).
    ``repr()`` and formatting with a spec (``f"{s:#x}"``) are unchanged."""

    def __str__(self) -> str:
        return self.name


class State(NamedIntEnum):
    """States of the default position lifecycle (one-hot codes)."""

    CREATED = 0x01
    MONITORING = 0x02
    EXIT_PENDING = 0x04
    EXITING = 0x08
    CLOSED = 0x10
    ERROR = 0x20
    PAUSED = 0x40


class Trigger(NamedIntEnum):
    """Triggers of the default position lifecycle."""

    POSITION_OPENED = 0
    EXIT_CONDITION_MET = 1
    EXIT_CANCELLED = 2
    EXIT_STARTED = 3
    EXIT_COMPLETED = 4
    EXIT_FAILED = 5
    PAUSE = 6
    RESUME = 7
    ERROR_OCCURRED = 8
    RECOVER = 9


class Outcome(NamedIntEnum):
    """What a transition did (codes from the C header)."""

    APPLIED = lib.ENG_APPLIED
    INVALID = lib.ENG_INVALID
    CONFLICT = lib.ENG_CONFLICT
    REJECTED = lib.ENG_REJECTED
    HALTED = lib.ENG_HALTED


class Side(NamedIntEnum):
    """A position's side: ``open_position(side=Side.SELL)`` (the ints 1 and
    -1 are accepted too)."""

    BUY = 1
    SELL = -1


#: The trigger names of the default position lifecycle, for type checkers:
#: ``eng.transition(pos, "EXIT_STARTED")`` is checked, a misspelled name is
#: an error (ints and ``Trigger`` members are accepted too).
TriggerName = Literal["POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_CANCELLED", "EXIT_STARTED",
                      "EXIT_COMPLETED", "EXIT_FAILED", "PAUSE", "RESUME", "ERROR_OCCURRED",
                      "RECOVER"]


@dataclass(frozen=True)
class Rule:
    """``trigger`` moves a slot from any of ``sources`` to ``target``."""

    trigger: str
    sources: tuple[str, ...]
    target: str
    guard: Guard | None = None

    @classmethod
    def of(cls, trigger: str, sources: str | Sequence[str], target: str,
           guard: Guard | None = None) -> Rule:
        srcs = (sources,) if isinstance(sources, str) else tuple(sources)
        return cls(trigger, srcs, target, guard)


class MachineSpec:
    """A state machine: up to ``ENG_MAX_STATES`` states and its rules.

    >>> spec = MachineSpec(
    ...     states=["IDLE", "ANALYZING", "EXECUTING"],
    ...     triggers=["START", "EXECUTE", "DONE"],
    ...     rules=[Rule.of("START", "IDLE", "ANALYZING"),
    ...            Rule.of("EXECUTE", "ANALYZING", "EXECUTING"),
    ...            Rule.of("DONE", ["ANALYZING", "EXECUTING"], "IDLE")],
    ...     initial="IDLE")
    >>> spec.table_bytes()[:3]
    b'\\x00\\x00\\x00'
    """

    def __init__(self, states: Sequence[str], triggers: Sequence[str],
                 rules: Iterable[Rule], initial: str, closed: Iterable[str] = (),
                 name: str = "custom", fields: Mapping[str, str] | None = None,
                 exits: tuple[str, str] | None = None) -> None:
        """``fields`` maps each record field to its type: ``f8``, ``i8``,
        ``i4``, ``u8`` or fixed bytes ``S1``..``S32``, in record order.
        None: the position fields (entry_price, amount, ...).

        ``exits=(armed_state, trigger)``: every price write fires ``trigger``
        on a position in ``armed_state`` whose price crossed its stop_loss,
        take_profit or trailing_stop (see "Exits fired by the price")."""
        self.name = name
        #: the compiled record: fields, words, roles, row dtype
        self.record: RecordLayout = RecordLayout(POSITION_FIELDS if fields is None else fields)
        self.states: tuple[str, ...] = tuple(states)
        self.triggers: tuple[str, ...] = tuple(triggers)
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.initial = initial
        self.closed: tuple[str, ...] = tuple(closed)
        self.exits: tuple[str, str] | None = None if exits is None else _exits_pair(exits)
        self._check()
        #: the first rule that leaves a closed state (or the closed initial
        #: state), in words; None if a closing happens once
        self.reopens: str | None = self._reopening()
        self._check_exits()
        self.state_index: Mapping[str, int] = {s: i for i, s in enumerate(self.states)}
        self.trigger_index: Mapping[str, int] = {t: i for i, t in enumerate(self.triggers)}
        self.State: type[enum.IntEnum] = (
            State if self.states == tuple(State.__members__) else
            _int_enum(f"{name}State", {s: 1 << i for i, s in enumerate(self.states)}))
        self.Trigger: type[enum.IntEnum] = (
            Trigger if self.triggers == tuple(Trigger.__members__) else
            _int_enum(f"{name}Trigger", {t: i for i, t in enumerate(self.triggers)}))
        #: (source state index, trigger index) -> guard
        self.guards: dict[tuple[int, int], Guard] = {
            (self.state_index[src], self.trigger_index[r.trigger]): r.guard
            for r in self.rules if r.guard is not None for src in r.sources}

    # -- construction -------------------------------------------------------------
    @classmethod
    def position(cls) -> MachineSpec:
        """The default position lifecycle of the design."""
        s, t = State, Trigger
        rule = Rule.of
        rules = [
            rule(t.POSITION_OPENED.name, s.CREATED.name, s.MONITORING.name),
            rule(t.EXIT_CONDITION_MET.name, s.MONITORING.name, s.EXIT_PENDING.name),
            rule(t.EXIT_CANCELLED.name, s.EXIT_PENDING.name, s.MONITORING.name),
            rule(t.EXIT_STARTED.name, s.EXIT_PENDING.name, s.EXITING.name),
            rule(t.EXIT_COMPLETED.name, s.EXITING.name, s.CLOSED.name),
            rule(t.EXIT_FAILED.name, s.EXITING.name, s.EXIT_PENDING.name),
            rule(t.PAUSE.name, s.MONITORING.name, s.PAUSED.name),
            rule(t.RESUME.name, s.PAUSED.name, s.MONITORING.name),
            rule(t.ERROR_OCCURRED.name, [x.name for x in s if x is not s.CLOSED], s.ERROR.name),
            rule(t.RECOVER.name, s.ERROR.name, s.MONITORING.name),
        ]
        return cls(states=list(s.__members__), triggers=list(t.__members__), rules=rules,
                   initial=s.CREATED.name, closed=[s.CLOSED.name], name="position",
                   fields=POSITION_FIELDS, exits=(s.MONITORING.name, t.EXIT_CONDITION_MET.name))

    def _check(self) -> None:
        n_states, n_triggers = len(self.states), len(self.triggers)
        if not 1 <= n_states <= lib.ENG_MAX_STATES:
            raise SpecError(f"a spec has 1 to {lib.ENG_MAX_STATES} states, got {n_states}")
        if not 1 <= n_triggers <= lib.ENG_MAX_TRIGGERS:
            raise SpecError(f"a spec has 1 to {lib.ENG_MAX_TRIGGERS} triggers, got {n_triggers}")
        for kind, names in (("state", self.states), ("trigger", self.triggers)):
            if len(set(names)) != len(names):
                raise SpecError(f"duplicate {kind} names in {names}")
            for n in names:
                if not isinstance(n, str) or not n.isidentifier():
                    raise SpecError(f"{kind} names must be identifiers, got {n!r}")
        known = set(self.states)
        if self.initial not in known:
            raise SpecError(f"initial state {self.initial!r} is not one of {self.states}")
        for c in self.closed:
            if c not in known:
                raise SpecError(f"closed state {c!r} is not one of {self.states}")
        seen: set[tuple[str, str]] = set()
        for r in self.rules:
            if r.trigger not in self.triggers:
                raise SpecError(f"rule trigger {r.trigger!r} is not one of {self.triggers}")
            if r.target not in known:
                raise SpecError(f"rule target {r.target!r} is not one of {self.states}")
            if r.guard is not None and not callable(r.guard):
                raise SpecError(f"guard of rule {r.trigger} must be callable")
            for src in r.sources:
                if src not in known:
                    raise SpecError(f"rule source {src!r} is not one of {self.states}")
                if (src, r.trigger) in seen:
                    raise SpecError(f"two rules for trigger {r.trigger} from {src}")
                seen.add((src, r.trigger))

    def _reopening(self) -> str | None:
        closed = set(self.closed)
        if self.initial in closed:
            return f"initial state {self.initial!r} is closed"
        for r in self.rules:
            if r.target not in closed and closed.intersection(r.sources):
                return (f"rule {r.trigger} leaves closed state(s) "
                        f"{sorted(closed.intersection(r.sources))} for {r.target!r}")
        return None

    def _check_exits(self) -> None:
        """The armed state's rule for the exit trigger, and the fields an exit
        reads and writes (see ``EXIT_FIELDS``)."""
        if self.exits is None:
            return
        armed, trigger = self.exits
        if armed not in self.states:
            raise SpecError(f"exits: armed state {armed!r} is not one of {self.states}")
        if trigger not in self.triggers:
            raise SpecError(f"exits: trigger {trigger!r} is not one of {self.triggers}")
        rule = next((r for r in self.rules if r.trigger == trigger and armed in r.sources), None)
        if rule is None:
            raise SpecError(f"exits: no rule for trigger {trigger} from armed state {armed!r}")
        if rule.guard is not None:
            raise SpecError(f"exits: the rule {trigger} from {armed!r} has a guard; a price "
                            "write fires in C and cannot call it")
        if rule.target == armed or rule.target in self.closed:
            raise SpecError(f"exits: the rule {trigger} from {armed!r} goes to {rule.target!r}; "
                            "it must leave the armed state for a state that is not closed "
                            "(the executor closes at its fill)")
        have = self.record.types
        if not self.record.pnl:
            raise SpecError(f"exits need the PnL fields entry_price (f8), amount (f8) and side "
                            f"(i4 or i8); the record has {list(have)}")
        for name, allowed in EXIT_FIELDS.items():
            if name in EXIT_LEVELS and name not in have:
                continue   # a level the spec does not use: off
            if have.get(name) not in allowed:
                raise SpecError(f"exits need field {name!r} of type {' or '.join(allowed)}; "
                                f"the record has {name}={have.get(name)!r}")
        if not any(n in have for n in EXIT_LEVELS):
            raise SpecError(f"exits need at least one of the fields {sorted(EXIT_LEVELS)} (f8)")

    # -- compiled forms ------------------------------------------------------------
    def table_bytes(self) -> bytes:
        """The dense table for the segment header."""
        table = bytearray(lib.ENG_MAX_STATES * lib.ENG_MAX_TRIGGERS)
        for r in self.rules:
            t = self.trigger_index[r.trigger]
            entry = self.state_index[r.target] + 1
            if r.guard is not None:
                entry |= lib.ENG_RULE_GUARDED
            for src in r.sources:
                table[self.state_index[src] * lib.ENG_MAX_TRIGGERS + t] = entry
        return bytes(table)

    def c_layout(self, keys_per_position: int) -> Any:
        """The record layout for eng_format, with the exits' state and trigger."""
        exits = None if self.exits is None else (self.state_index[self.exits[0]],
                                                 self.trigger_index[self.exits[1]])
        return self.record.c_layout(keys_per_position, exits)

    @property
    def closed_mask(self) -> int:
        return sum(1 << self.state_index[c] for c in self.closed)

    @property
    def fingerprint(self) -> int:
        """64-bit digest of everything that decides behaviour (never 0)."""
        doc: dict[str, Any] = {
            "states": self.states, "triggers": self.triggers, "initial": self.initial,
            "closed": sorted(self.closed), "fields": list(self.record.types.items()),
            "rules": sorted((r.trigger, list(r.sources), r.target,
                             _guard_name(r.guard)) for r in self.rules),
        }
        if self.exits is not None:
            doc["exits"] = list(self.exits)
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:8], "little") or 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MachineSpec) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return self.fingerprint

    def __repr__(self) -> str:
        return (f"MachineSpec({self.name!r}, states={len(self.states)}, "
                f"triggers={len(self.triggers)}, rules={len(self.rules)})")

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "states": self.states, "triggers": self.triggers,
                "rules": self.rules, "initial": self.initial, "closed": self.closed,
                "fields": dict(self.record.types), "exits": self.exits}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__(**st)  # type: ignore[misc]


def _exits_pair(exits: Any) -> tuple[str, str]:
    if (not isinstance(exits, (tuple, list)) or len(exits) != 2
            or not all(isinstance(x, str) for x in exits)):
        raise SpecError(f"exits must be a pair (armed state, trigger) of names, "
                        f"got {exits!r:.80}")
    return (exits[0], exits[1])


def _int_enum(name: str, members: dict[str, int]) -> type[enum.IntEnum]:
    """An IntEnum class made at run time (the functional API)."""
    made: type[enum.IntEnum] = NamedIntEnum(name, members)  # type: ignore[call-arg,assignment,arg-type]
    return made


def _guard_name(g: Guard | None) -> str | None:
    if g is None:
        return None
    return f"{getattr(g, '__module__', '?')}.{getattr(g, '__qualname__', repr(g))}"


class ExitReason(NamedIntEnum):
    """Why an exit fired (the record's ``exit_reason``); other codes are the user's."""

    NONE = lib.ENG_EXIT_NONE
    STOP_LOSS = lib.ENG_EXIT_STOP_LOSS
    TAKE_PROFIT = lib.ENG_EXIT_TAKE_PROFIT
    TRAILING_STOP = lib.ENG_EXIT_TRAILING_STOP


#: The fields an exit reads (the levels: 0 is off; a spec may leave out the
#: levels it does not use) and writes (exit_reason, exit_price), with the
#: types each may have.
EXIT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "stop_loss": ("f8",), "take_profit": ("f8",), "trailing_stop": ("f8",),
    "exit_reason": ("i4", "i8"), "exit_price": ("f8",),
}
EXIT_LEVELS = frozenset({"stop_loss", "take_profit", "trailing_stop"})

#: The record of the default position lifecycle.  entry_price, amount and
#: side give PnL in C; token drives update_token_price; opened_ns is stamped
#: by open.  These are set at open only.  stop_loss, take_profit and
#: trailing_stop arm its exits (0: off); a fired exit sets exit_reason and
#: exit_price, and the close books at exit_price when it is set.
POSITION_FIELDS: Mapping[str, str] = {
    "entry_price": "f8", "amount": "f8", "stop_loss": "f8", "take_profit": "f8",
    "trailing_stop": "f8",   # beside the other levels: a price write reads one line
    "token": "i8", "opened_ns": "i8", "side": "i4", "exit_reason": "i4",
    "account": "i8",   # the account the opening reserved on (0: none); set at open only
    "exit_price": "f8",
}

POSITION_SPEC = MachineSpec.position()
assert get_args(TriggerName) == POSITION_SPEC.triggers, "TriggerName: the trigger names"


def _order_spec() -> MachineSpec:
    """The usual exchange order lifecycle (FIX-like order states)."""
    live = ["SUBMITTED", "ACCEPTED", "PARTIALLY_FILLED", "PENDING_UPDATE", "PENDING_CANCEL",
            "TRIGGERED"]
    late = ["CANCELED", "EXPIRED"]
    rule = Rule.of
    rules = [
        rule("SUBMIT", "INITIALIZED", "SUBMITTED"),
        rule("DENY", "INITIALIZED", "DENIED"),                 # refused before it left us
        rule("ACCEPT", "SUBMITTED", "ACCEPTED"),
        rule("REJECT", ["SUBMITTED", "PENDING_UPDATE", "PENDING_CANCEL"], "REJECTED"),
        rule("TRIGGER", "ACCEPTED", "TRIGGERED"),              # a stop order became live
        # a fill in flight when a cancel or an expiry was acknowledged still
        # arrives ("real world possibility" in Nautilus Trader's table)
        rule("PARTIAL_FILL", ["SUBMITTED", "ACCEPTED", "TRIGGERED", "PARTIALLY_FILLED",
                              "PENDING_UPDATE", "PENDING_CANCEL", *late], "PARTIALLY_FILLED"),
        rule("FILL", [*live, *late], "FILLED"),
        rule("REQUEST_UPDATE", ["ACCEPTED", "TRIGGERED", "PARTIALLY_FILLED"], "PENDING_UPDATE"),
        rule("UPDATED", "PENDING_UPDATE", "ACCEPTED"),
        rule("UPDATE_REJECTED", "PENDING_UPDATE", "ACCEPTED"),
        rule("REQUEST_CANCEL", ["SUBMITTED", "ACCEPTED", "TRIGGERED", "PARTIALLY_FILLED",
                                "PENDING_UPDATE"], "PENDING_CANCEL"),
        rule("CANCEL", ["SUBMITTED", "ACCEPTED", "TRIGGERED", "PARTIALLY_FILLED",
                        "PENDING_UPDATE", "PENDING_CANCEL"], "CANCELED"),
        rule("CANCEL_REJECTED", "PENDING_CANCEL", "ACCEPTED"),
        rule("EXPIRE", ["ACCEPTED", "TRIGGERED", "PARTIALLY_FILLED"], "EXPIRED"),
    ]
    return MachineSpec(
        states=["INITIALIZED", "SUBMITTED", "ACCEPTED", "TRIGGERED", "PARTIALLY_FILLED",
                "PENDING_UPDATE", "PENDING_CANCEL", "FILLED", "CANCELED", "REJECTED",
                "EXPIRED", "DENIED"],
        triggers=["SUBMIT", "DENY", "ACCEPT", "REJECT", "TRIGGER", "PARTIAL_FILL", "FILL",
                  "REQUEST_UPDATE", "UPDATED", "UPDATE_REJECTED", "REQUEST_CANCEL", "CANCEL",
                  "CANCEL_REJECTED", "EXPIRE"],
        rules=rules, initial="INITIALIZED",
        closed=["FILLED", "CANCELED", "REJECTED", "EXPIRED", "DENIED"], name="order",
        fields=ORDER_FIELDS)


#: The record of an order.  qty, filled_qty, leaves_qty, prices in the
#: instrument's units; side +1 buy / -1 sell; token the instrument; position
#: the id of the position it opens or closes (0: none); venue and symbol as
#: fixed bytes; last_fill_ns / updated_ns: exchange times.
ORDER_FIELDS: Mapping[str, str] = {
    "qty": "f8", "filled_qty": "f8", "leaves_qty": "f8", "avg_px": "f8", "limit_px": "f8",
    "stop_px": "f8", "last_px": "f8", "last_qty": "f8", "side": "i4", "order_type": "i4",
    "time_in_force": "i4", "reject_reason": "i4", "token": "i8", "position": "i8",
    "account": "i8", "last_fill_ns": "i8", "updated_ns": "i8", "venue": "S8", "symbol": "S16",
}

ORDER_SPEC = _order_spec()
"""The exchange order lifecycle: ``Engine.create(spec=ORDER_SPEC)``."""
