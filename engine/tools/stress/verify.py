"""The chain checker: per slot, do the logged links of every process form one
unbroken chain of commits that ends at the slot's final state word?

Pure: numpy and the C constants, no processes, no segment.

Generations are 16 bits and wrap.  To put links from different processes in
one order, each link carries a CLOCK_MONOTONIC time taken right after the
commit returned; links sorted by time are then unwrapped with signed
differences, which is exact while the time error on a slot stays under 32768
commits (a worker would have to stall for a large fraction of a second
between a commit and reading the clock).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine._native import lib
from engine.spec import State
from engine.tools.stress.codec import _GEN_MOD

_MAX_MESSAGES = 20          # messages kept per violation category


class Violations:
    """A report's violation counts per category and the first
    ``_MAX_MESSAGES`` messages of each; the report (a dataclass) declares
    both fields."""

    by_category: dict[str, int]
    messages: list[str]

    @property
    def violations(self) -> int:
        return sum(self.by_category.values())

    def add(self, category: str, message: str) -> None:
        n = self.by_category.get(category, 0)
        self.by_category[category] = n + 1
        if n < _MAX_MESSAGES:
            self.messages.append(f"{category}: {message}")


@dataclass
class ChainReport:
    """What ``verify_chains`` found: violation counts per category and the
    first few messages of each."""

    links: int                                  # links checked
    slots: int                                  # slots checked
    by_category: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return sum(self.by_category.values())

    def add(self, category: str, count: int, describe: Callable[[int], str],
            where: Sequence[int] | np.ndarray) -> None:
        """Count ``count`` violations of ``category``; describe the first
        ``_MAX_MESSAGES`` positions of ``where``."""
        if count <= 0:
            return
        self.by_category[category] = self.by_category.get(category, 0) + count
        self.messages += [f"{category}: {describe(int(i))}" for i in where[:_MAX_MESSAGES]]


def _state_name(onehot: Any, states: type[enum.IntEnum] = State) -> str:
    onehot = int(onehot)
    if onehot == 0:
        return "FREE"
    try:
        return states(onehot).name
    except ValueError:
        return f"{onehot:#x}"


def chain_order(links: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The links in chain order, by (slot, unwrapped old generation), and
    those unwrapped generations.

    Ordered by (slot, time) first, then the 16-bit generations are unwrapped
    with signed differences (exact while the clock disorder on a slot is
    < 32768 commits)."""
    if not len(links):
        return links, np.empty(0, dtype=np.int64)
    order = np.lexsort((np.arange(len(links)), links["t"], links["slot"]))
    lk = links[order]
    slot = lk["slot"].astype(np.int64)
    g = lk["old_gen"].astype(np.int64)
    first = np.r_[True, slot[1:] != slot[:-1]]
    group = np.cumsum(first) - 1
    step = np.zeros(len(lk), dtype=np.int64)
    step[1:] = ((np.diff(g) + _GEN_MOD // 2) % _GEN_MOD) - _GEN_MOD // 2
    step[first] = 0
    cum = np.cumsum(step)
    u = cum - cum[first][group] + g[first][group]
    order = np.lexsort((u, slot))
    return lk[order], u[order]


def verify_chains(links: np.ndarray, counters: np.ndarray, final_words: np.ndarray, *,
                  initial_state: int = 0, initial_gen: int = 0,
                  state_enum: type[enum.IntEnum] = State) -> ChainReport:
    """Check that per slot the links form one unbroken chain of commits.

    ``links``: ``LINK_DTYPE`` records from every process, in any order (each
    process's own records in program order).  ``counters[s]``: slot ``s``'s
    ``transitions`` counter at the end; ``final_words[s]``: its state word.
    Every slot is expected to start at (``initial_state``, ``initial_gen``),
    a fresh segment's zero word.

    Violation categories: ``gen_step`` (a link whose generation did not advance
    by exactly one), ``missing`` (generations no link covers, counted one per
    generation), ``duplicate`` (two links from the same generation),
    ``state_mismatch`` (a link's to-state differs from the next link's
    from-state, or the first from-state is not the initial state),
    ``counter_mismatch`` (chain length differs from the slot's counter),
    ``final_word`` (the last link disagrees with the final state word),
    ``bad_state`` (a final word that is not one-hot or 0), ``locked`` and
    ``bad_slot`` (a link naming a slot past the capacity).  ``state_enum``:
    the spec's state enum, for the messages (``ORDER_SPEC.State`` for orders).
    """
    rep = ChainReport(links=len(links), slots=len(counters))
    counters = np.asarray(counters, dtype=np.uint64)
    final_words = np.asarray(final_words, dtype=np.uint64)
    cap = len(counters)

    def name(onehot: Any) -> str:
        return _state_name(onehot, state_enum)

    # final words: one-hot or free, unlocked
    states = (final_words & np.uint64(lib.ENG_SW_STATE_MASK)).astype(np.int64)
    gens = ((final_words >> np.uint64(lib.ENG_SW_GEN_SHIFT))
            & np.uint64(lib.ENG_SW_GEN_MASK)).astype(np.int64)
    bad = np.flatnonzero(states & (states - 1))
    rep.add("bad_state", len(bad), lambda s: f"slot {s}: final state {states[s]:#x} is not "
            "one-hot", bad)
    bad = np.flatnonzero(final_words & np.uint64(lib.ENG_SW_LOCK))
    rep.add("locked", len(bad), lambda s: f"slot {s}: final word {int(final_words[s]):#x} is "
            "locked", bad)
    bad = np.flatnonzero(links["slot"] >= cap)
    rep.add("bad_slot", len(bad), lambda i: f"a link names slot {links['slot'][i]}, capacity "
            f"is {cap}", bad)
    links = links[links["slot"] < cap]

    # every link advances the generation by exactly one
    bad = np.flatnonzero(links["new_gen"].astype(np.int64)
                         != (links["old_gen"].astype(np.int64) + 1) % _GEN_MOD)
    rep.add("gen_step", len(bad), lambda i: f"slot {links['slot'][i]}: link "
            f"{name(links['old_state'][i])} -> {name(links['new_state'][i])} went from "
            f"generation {links['old_gen'][i]} to {links['new_gen'][i]}", bad)

    # chain length equals the slot's transitions counter; no links: still fresh
    lengths = np.bincount(links["slot"].astype(np.int64), minlength=cap).astype(np.uint64)
    bad = np.flatnonzero(lengths != counters)
    rep.add("counter_mismatch", len(bad), lambda s: f"slot {s}: {lengths[s]} links logged, "
            f"transitions counter says {counters[s]}", bad)
    fresh = np.uint64(initial_state | (initial_gen << lib.ENG_SW_GEN_SHIFT))
    bad = np.flatnonzero((lengths == 0) & (final_words != fresh))
    rep.add("final_word", len(bad), lambda s: f"slot {s}: no links, but final word "
            f"{int(final_words[s]):#x}", bad)
    if not len(links):
        return rep

    lk, u = chain_order(links)
    slot = lk["slot"].astype(np.int64)
    old_s, new_s = lk["old_state"].astype(np.int64), lk["new_state"].astype(np.int64)
    first = np.r_[True, slot[1:] != slot[:-1]]
    last = np.r_[slot[1:] != slot[:-1], True]
    same = ~first[1:]
    du = np.diff(u)

    def at(i: int) -> str:
        return f"slot {slot[i]}: generation {u[i] % _GEN_MOD}"

    bad = np.flatnonzero(same & (du == 0))
    rep.add("duplicate", len(bad), lambda i: f"{at(i)} has two links "
            f"({name(old_s[i])} -> {name(new_s[i])} and {name(old_s[i + 1])} -> "
            f"{name(new_s[i + 1])})", bad)
    bad = np.flatnonzero(same & (du > 1))
    rep.add("missing", int((du[bad] - 1).sum()), lambda i: f"slot {slot[i]}: no link from "
            f"generation {(u[i] + 1) % _GEN_MOD} to {(u[i + 1] - 1) % _GEN_MOD} "
            f"({du[i] - 1} lost)", bad)
    bad = np.flatnonzero(same & (du == 1) & (new_s[:-1] != old_s[1:]))
    rep.add("state_mismatch", len(bad), lambda i: f"{at(i)} ends in {name(new_s[i])}, the "
            f"next link starts from {name(old_s[i + 1])}", bad)

    # the chain starts at the fresh word and ends at the final word
    heads = np.flatnonzero(first)
    bad = heads[u[heads] != initial_gen]
    rep.add("missing", int(np.maximum(u[bad] - initial_gen, 1).sum()), lambda i: f"slot "
            f"{slot[i]}: chain starts at generation {u[i] % _GEN_MOD}, expected {initial_gen}",
            bad)
    bad = heads[old_s[heads] != initial_state]
    rep.add("state_mismatch", len(bad), lambda i: f"slot {slot[i]}: first link starts from "
            f"{name(old_s[i])}, expected {name(initial_state)}", bad)
    tails = np.flatnonzero(last)
    bad = tails[(new_s[tails] != states[slot[tails]])
                | (lk["new_gen"][tails].astype(np.int64) != gens[slot[tails]])]
    rep.add("final_word", len(bad), lambda i: f"slot {slot[i]}: last link ends in "
            f"({name(new_s[i])}, gen {lk['new_gen'][i]}), final word is "
            f"({name(states[slot[i]])}, gen {gens[slot[i]]})", bad)
    return rep
