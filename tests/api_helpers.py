"""Helpers for the public API unit tests: positions opened on an engine,
state words, the waiting flag."""

from __future__ import annotations

from engine import Engine, Outcome, Trigger
from engine._native import lib

GEN_SHIFT = lib.ENG_SW_GEN_SHIFT
GEN_MASK = lib.ENG_SW_GEN_MASK


def generation(word: int) -> int:
    return (word >> GEN_SHIFT) & GEN_MASK


def opened(eng: Engine, entry: float = 100.0, amount: float = 2.0, side: int = 1,
           token: int = 7) -> int:
    """A position moved to MONITORING; returns its id."""
    pos = eng.open_position(entry_price=entry, amount=amount, side=side, token=token)
    assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
    return pos


def word_of(eng: Engine, pos: int) -> int:
    """The state word of position ``pos``'s slot (state_word takes a slot index)."""
    return eng.state_word(eng.slot_of(pos))
