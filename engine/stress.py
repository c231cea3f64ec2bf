"""``python -m engine stress``: hammer shared slots from many processes, then prove
nothing was lost, duplicated or torn.

How a run goes:

1. The parent creates a fresh segment with ``positions`` slots, opens every
   slot, sets the metrics sampling period (and, for tests, a fault switch).
2. ``workers`` processes start in the ``spawn`` context, attach through the
   picklable ``engine.handle``, report ready, and block on a POSIX named
   semaphore (the start gate, mode 0600, initial value 0).  Once every worker
   is ready the parent releases the gate once per worker, so they all start
   together.
3. Each worker runs a weighted mix of operations on random shared slots
   (contention is the point: INVALID and CONFLICT outcomes are expected).
   An operation acts on the position open at the slot: the worker keeps the
   id of each slot's opening it last saw (``eng.id_of(slot)``) and looks it
   up again when the engine says that opening is gone (``StaleIdError``,
   a ``NotOpenError``):
   whole lifecycles with context updates, release and reopen, PAUSE/RESUME,
   ERROR_OCCURRED/RECOVER, single, batch and per-token price updates,
   consistent reads checked for tearing, and short ``wait_for_change`` calls.
   After every APPLIED commit (transition, open, release) it logs one
   16-byte link: slot index (``eng.slot_of(id)``), time, and the state words
   around the commit as the C core recorded them (``eng_seg.last_old_word`` /
   ``last_new_word``).
4. The parent prints progress once a second, stops the workers, and
   verifies: per slot, every logged link from every process forms one
   unbroken chain of generations starting at the fresh slot's (state 0,
   generation 0), with no missing and no duplicated generation, each link's
   to-state equal to the next link's from-state, and the last link equal to
   the slot's final state word; the chain length equals the slot's
   ``transitions`` counter (which C bumps on every commit: opens, releases
   and transitions); final words are one-hot (or 0 for a free slot) and
   unlocked; readers saw no torn record and no version going backwards; and
   the totals agree with the engine's own metrics.  Any violation makes the
   exit code non-zero.

Generations are 16 bits and wrap.  To put links from different processes in
one order, each link carries a CLOCK_MONOTONIC time taken right after the
commit returned; links sorted by time are then unwrapped with signed
differences, which is exact while the time error on a slot stays under 32768
commits (a worker would have to stall for a large fraction of a second
between a commit and reading the clock).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import queue
import random
import secrets
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

import numpy as np
import posix_ipc

from engine._native import lib
from engine.core import Engine, Handle
from engine.errors import (
    BusyError,
    CapacityError,
    EngineError,
    NotOpenError,
    WaitTimeout,
)
from engine.metrics import OPS, Metrics, check_alerts
from engine.spec import State, Trigger

__all__ = [
    "KINDS",
    "LINK_DTYPE",
    "PRESETS",
    "ChainReport",
    "StressConfig",
    "StressResult",
    "add_parsers",
    "decode_links",
    "encode_links",
    "links_from_words",
    "parse_mix",
    "run",
    "run_stress",
    "verify_chains",
]

# ---- the workload ---------------------------------------------------------------

#: Operation kinds of the mix, in the order workers publish their counts.
KINDS = ("lifecycle", "pause", "error", "price", "batch", "token", "read", "wait")

#: Named mixes; ``--mix`` also takes ``kind=weight,...``, optionally after a preset.
PRESETS: dict[str, dict[str, int]] = {
    "default": {"lifecycle": 4, "pause": 2, "error": 1, "price": 6, "batch": 1, "token": 1,
                "read": 4, "wait": 1},
    "transitions": {"lifecycle": 8, "pause": 4, "error": 1, "read": 1},
    "prices": {"lifecycle": 1, "price": 8, "batch": 2, "token": 1, "read": 4},
    "reads": {"lifecycle": 2, "price": 2, "read": 10, "wait": 1},
}

#: What one operation of the mix ended with.  The first three equal the C
#: outcome codes APPLIED / INVALID / CONFLICT, so a transition maps directly.
RESULTS = ("ok", "invalid", "conflict", "not_open", "busy", "full", "timeout", "unexpected")
_OK, _INVALID, _CONFLICT, _NOT_OPEN, _BUSY, _FULL, _TIMEOUT, _UNEXPECTED = range(len(RESULTS))
assert (_OK, _INVALID, _CONFLICT) == (lib.ENG_APPLIED, lib.ENG_INVALID, lib.ENG_CONFLICT)

#: Positions are opened with one of these (entry_price, amount, side) sets,
#: picked by token.  A price record's PnL must match the formula for its own
#: price and one of them: a record whose price and PnL come from two writes is
#: torn.  (The context alone cannot decide it: a reopen publishes the new
#: context just before the opening price, so a reader can briefly see the new
#: context next to the previous position's last price.)
N_TOKENS = 4
TOKEN_PARAMS: tuple[tuple[float, float, int], ...] = tuple(
    (100.0 + 10.0 * t, 1.0 + t, 1 if t % 2 == 0 else -1) for t in range(N_TOKENS))

#: Context updates carry stop_loss and take_profit derived from exit_reason,
#: so a context record mixing two updates is detectable too.
STOP_PER_REASON = 0.25
TAKE_PER_REASON = 0.75

FAULTS = {"skip-gen": lib.ENG_FAULT_SKIP_GEN, "blind-store": lib.ENG_FAULT_BLIND_STORE}

_MAX_MESSAGES = 20          # messages kept per violation category
_CHECK_EVERY = 256          # ops between a worker's stop checks and count publishing


def parse_mix(text: str | Mapping[str, int]) -> dict[str, int]:
    """Weights per kind from ``"preset"``, ``"kind=w,..."`` or ``"preset,kind=w,..."``.

    Kinds left out weigh 0 (after a preset: the preset's weight).  Raises
    ``ValueError`` for an unknown preset or kind, a negative weight or an all-zero mix.
    """
    if isinstance(text, Mapping):
        items: list[str] = [f"{k}={v}" for k, v in text.items()]
    else:
        items = [p.strip() for p in text.split(",") if p.strip()]
    weights = dict.fromkeys(KINDS, 0)
    if not items:
        items = ["default"]
    if "=" not in items[0]:
        preset = items.pop(0)
        if preset not in PRESETS:
            raise ValueError(f"unknown mix preset {preset!r}; presets: {', '.join(PRESETS)}")
        weights.update(PRESETS[preset])
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"mix item {item!r}: a preset comes first; then kind=weight")
        if key not in weights:
            raise ValueError(f"unknown mix kind {key!r}; kinds: {', '.join(KINDS)}")
        try:
            w = int(value)
        except ValueError:
            raise ValueError(f"mix weight of {key!r} must be an int, got {value!r}") from None
        if w < 0:
            raise ValueError(f"mix weight of {key!r} must be >= 0, got {w}")
        weights[key] = w
    if not any(weights.values()):
        raise ValueError("the mix has no operation with a weight > 0")
    return weights


# ---- links: the compact log of applied commits ----------------------------------
#
# A worker appends three uint64 per commit on its hot path (cheap Python
# appends) and packs them, a buffer at a time, into two:
#
#   word 0   63        40 39                         0
#           | slot (24)  | time since run start (40) |    time unit: 1024 ns
#   word 1   63     48 47      32 31     16 15      0
#           | new gen  | new state| old gen | old state|
#
# The state and generation fields come from the C state word layout
# (lib.ENG_SW_*); the lock, error and owner bits are not kept.

LINK_DTYPE = np.dtype([("slot", "<u4"), ("t", "<u8"), ("old_state", "<u2"), ("old_gen", "<u2"),
                       ("new_state", "<u2"), ("new_gen", "<u2")])
_T_BITS = 40
_T_SHIFT = 10               # ns -> units of 1024 ns
_SLOT_SHIFT = 40
_GEN_MOD = lib.ENG_SW_GEN_MASK + 1
_FLUSH_WORDS = 3 * 65536    # raw words buffered before a pack-and-write


def encode_links(raw: np.ndarray) -> np.ndarray:
    """Pack raw ``(n, 3)`` rows ``[slot << 40 | t, old_word, new_word]`` into ``(n, 2)``."""
    raw = np.asarray(raw, dtype=np.uint64).reshape(-1, 3)
    sm, gm = np.uint64(lib.ENG_SW_STATE_MASK), np.uint64(lib.ENG_SW_GEN_MASK)
    gs = np.uint64(lib.ENG_SW_GEN_SHIFT)
    old, new = raw[:, 1], raw[:, 2]
    packed = ((old & sm) | (((old >> gs) & gm) << np.uint64(16))
              | ((new & sm) << np.uint64(32)) | (((new >> gs) & gm) << np.uint64(48)))
    return np.stack([raw[:, 0], packed], axis=1)


def decode_links(packed: np.ndarray) -> np.ndarray:
    """Unpack ``(n, 2)`` words (see ``encode_links``) into a ``LINK_DTYPE`` array."""
    packed = np.asarray(packed, dtype=np.uint64).reshape(-1, 2)
    a, b = packed[:, 0], packed[:, 1]
    out = np.empty(len(packed), dtype=LINK_DTYPE)
    out["slot"] = a >> np.uint64(_SLOT_SHIFT)
    out["t"] = a & np.uint64((1 << _T_BITS) - 1)
    for i, name in enumerate(("old_state", "old_gen", "new_state", "new_gen")):
        out[name] = (b >> np.uint64(16 * i)) & np.uint64(0xFFFF)
    return out


def links_from_words(slots: Sequence[int], old_words: Sequence[int], new_words: Sequence[int],
                     times: Sequence[int] | None = None) -> np.ndarray:
    """A ``LINK_DTYPE`` array from raw state words (times default to 0, 1, 2, ...)."""
    n = len(slots)
    t = np.arange(n, dtype=np.uint64) if times is None else np.asarray(times, dtype=np.uint64)
    raw = np.empty((n, 3), dtype=np.uint64)
    raw[:, 0] = (np.asarray(slots, dtype=np.uint64) << np.uint64(_SLOT_SHIFT)) | t
    raw[:, 1] = np.asarray(old_words, dtype=np.uint64)
    raw[:, 2] = np.asarray(new_words, dtype=np.uint64)
    return decode_links(encode_links(raw))


class LinkLog:
    """The applied commits of one Engine, appended to a file 16 bytes each."""

    def __init__(self, eng: Engine, path: str, base_ns: int) -> None:
        self._seg = eng._seg
        self._base_ns = base_ns
        self._file = open(path, "ab")   # noqa: SIM115 (closed by close())
        self._buf = array("Q")
        self.count = 0

    def record(self, slot: int) -> None:
        """Log the commit this Engine just applied on ``slot`` (call right after APPLIED)."""
        t = time.monotonic_ns()
        seg = self._seg
        buf = self._buf
        buf.append((slot << _SLOT_SHIFT) | ((t - self._base_ns) >> _T_SHIFT))
        buf.append(seg.last_old_word)
        buf.append(seg.last_new_word)
        self.count += 1
        if len(buf) >= _FLUSH_WORDS:
            self.flush()

    def flush(self) -> None:
        """Pack the buffered links and append them to the file."""
        if self._buf:
            encode_links(np.frombuffer(self._buf, dtype=np.uint64)).tofile(self._file)
            self._buf = array("Q")
        self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


# ---- the chain checker ----------------------------------------------------------

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


def _state_name(onehot: Any) -> str:
    onehot = int(onehot)
    if onehot == 0:
        return "FREE"
    try:
        return State(onehot).name
    except ValueError:
        return f"{onehot:#x}"


def verify_chains(links: np.ndarray, counters: np.ndarray, final_words: np.ndarray, *,
                  initial_state: int = 0, initial_gen: int = 0) -> ChainReport:
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
    ``bad_slot`` (a link naming a slot past the capacity).
    """
    rep = ChainReport(links=len(links), slots=len(counters))
    counters = np.asarray(counters, dtype=np.uint64)
    final_words = np.asarray(final_words, dtype=np.uint64)
    cap = len(counters)
    name = _state_name

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

    # order by (slot, time), then unwrap the 16-bit generations with signed
    # differences (exact while the clock disorder on a slot is < 32768 commits)
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

    # order by (slot, unwrapped generation): this is the chain
    order = np.lexsort((u, slot))
    lk, u, slot = lk[order], u[order], slot[order]
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


# ---- configuration and results -------------------------------------------------

@dataclass
class StressConfig:
    """Parameters of one stress run."""

    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    positions: int = 16                 # shared slots (the segment's capacity)
    seconds: float = 5.0
    mix: str = "default"                # see parse_mix
    seed: int = 0                       # seeds the workers' choices (not the interleaving)
    sample_every: int = 64              # latency sampled for 1 op in N (power of two)
    batch_size: int = 8                 # slots per update_prices call
    wait_timeout: float = 0.0001        # seconds per wait_for_change
    alert_p99_us: float | None = 1000.0     # alert above this p99 (None: off)
    alert_success: float | None = None      # alert below this success rate (None: off)
    fault: str | None = None            # a key of FAULTS: tests only
    progress: TextIO | None = None      # where progress lines go (None: nowhere)

    def check(self) -> dict[str, int]:
        """Validate; returns the parsed mix.  Raises ``ValueError``."""
        if not 1 <= self.workers < lib.ENG_MAX_PROCS:
            raise ValueError(f"workers must be in [1, {lib.ENG_MAX_PROCS - 1}] (the registry "
                             f"holds {lib.ENG_MAX_PROCS} Engines, the parent's included), "
                             f"got {self.workers}")
        if not 1 <= self.positions <= lib.ENG_MAX_CAPACITY:
            raise ValueError(f"positions must be in [1, {lib.ENG_MAX_CAPACITY}], "
                             f"got {self.positions}")
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"seconds must be > 0, got {self.seconds}")
        if self.sample_every < 1 or self.sample_every & (self.sample_every - 1):
            raise ValueError(f"sample_every must be a power of two >= 1, got {self.sample_every}")
        if not (math.isfinite(self.wait_timeout) and self.wait_timeout >= 0):
            raise ValueError(f"wait_timeout must be >= 0 s, got {self.wait_timeout}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {sorted(FAULTS)}, got {self.fault!r}")
        return parse_mix(self.mix)


@dataclass
class StressResult:
    """Figures and verdict of one stress run (``as_dict`` is the JSON)."""

    ops: int
    seconds: float
    violations: int
    violation_messages: list[str]
    workload: dict[str, dict[str, int]]
    table: list[dict[str, Any]]
    alerts: list[str]
    verification: dict[str, Any]
    config: dict[str, Any]
    segment: str = ""               # the run's segment and start gate (both removed at the end)
    gate: str = ""

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def as_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "violations": self.violations, "seconds": self.seconds,
                "ops_per_s": self.ops_per_s, "violation_messages": self.violation_messages,
                "table": self.table, "workload": self.workload, "alerts": self.alerts,
                "verification": self.verification, "config": self.config}


# ---- the worker -----------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """Everything a spawned worker needs (picklable)."""

    index: int
    handle: Handle
    gate: str
    log_path: str
    base_ns: int
    positions: int
    weights: tuple[int, ...]
    seed: int
    batch_size: int
    wait_timeout: float
    max_seconds: float


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _pnl_matches(price: float, pnl_pct: float, pnl_usd: float,
                 params: tuple[float, float, int]) -> bool:
    entry, amount, side = params
    diff = price - entry
    return _close(pnl_pct, diff / entry * 100.0 * side) and _close(pnl_usd, diff * amount * side)


class _Worker:
    """One process's share of the workload.

    Operations pick a slot index; they act on the position open there through
    its id.  ``ids[slot]`` is the id of the slot's opening this worker last
    saw (0: none known, or the slot was free), refreshed with ``eng.id_of``
    when a call says that opening is gone.
    """

    def __init__(self, eng: Engine, plan: _Plan, log: LinkLog) -> None:
        self.eng = eng
        self.plan = plan
        self.rng = random.Random(plan.seed * 1_000_003 + plan.index)
        self.record = log.record
        self.log = log
        self.counts = [0] * (len(KINDS) * len(RESULTS))
        self.kind_ops = [0] * len(KINDS)
        self.releases = 0
        self.reopen_full = 0
        self.torn_price = 0
        self.torn_context = 0
        self.regressions = 0
        self.messages: list[str] = []
        n = plan.positions
        self.ids = [0] * n
        self.last_pv = [0] * n
        self.last_cv = [0] * n
        self.prices = [round(self.rng.uniform(50.0, 200.0), 4) for _ in range(4099)]
        nb = min(plan.batch_size, n)
        self.batches = [(self.rng.sample(range(n), nb),
                         np.array([self.rng.uniform(50.0, 200.0) for _ in range(nb)]))
                        for _ in range(61)]
        self.ops: list[Callable[[int, int], int]] = [
            self.op_lifecycle, self.op_pause, self.op_error, self.op_price, self.op_batch,
            self.op_token, self.op_read, self.op_wait]
        assert len(self.ops) == len(KINDS)

    # -- helpers ---------------------------------------------------------------
    def note(self, message: str) -> int:
        """Record an unexpected outcome (a violation) and say so."""
        if len(self.messages) < _MAX_MESSAGES:
            self.messages.append(f"worker {self.plan.index}: {message}")
        return _UNEXPECTED

    def refresh(self, slot: int) -> int:
        """The id of the slot's current opening, 0 if the slot is free."""
        try:
            pos = self.eng.id_of(slot)
        except NotOpenError:
            pos = 0
        self.ids[slot] = pos
        return pos

    def pos(self, slot: int) -> int:
        """The id last seen at ``slot`` (looked up if none is known; 0 if free:
        a call with it raises NotOpenError, as a free slot did)."""
        return self.ids[slot] or self.refresh(slot)

    def gone(self, slot: int) -> int:
        """A call said the opening is gone: look it up next time."""
        self.ids[slot] = 0
        return _NOT_OPEN

    def fire(self, slot: int, pos: int, trigger: int, reason: int | None = None) -> int:
        """Fire one trigger on opening ``pos`` of ``slot``; log the link if it applied."""
        try:
            if reason is None:
                out = int(self.eng.transition(pos, trigger))
            else:
                out = int(self.eng.transition(pos, trigger, exit_reason=reason,
                                              stop_loss=reason * STOP_PER_REASON,
                                              take_profit=reason * TAKE_PER_REASON))
        except NotOpenError:
            return self.gone(slot)
        except BusyError:
            return _BUSY
        except EngineError as e:
            return self.note(f"transition(slot {slot}, {Trigger(trigger).name}): {e!r}")
        if out == _OK:
            self.record(slot)
        elif out > _CONFLICT:
            return self.note(f"transition(slot {slot}, {Trigger(trigger).name}) -> outcome {out}")
        return out

    def open(self) -> int:
        """Open a new position on any free slot, with one of the token parameter sets."""
        token = self.rng.randrange(N_TOKENS)
        entry, amount, side = TOKEN_PARAMS[token]
        try:
            pos = self.eng.open_position(entry, amount, side, token)
        except CapacityError:
            return _FULL
        except BusyError:
            return _BUSY
        except EngineError as e:
            return self.note(f"open_position: {e!r}")
        slot = self.eng.slot_of(pos)
        self.record(slot)
        self.ids[slot] = pos
        return _OK

    def current(self, slot: int) -> tuple[int, int]:
        """(id, one-hot state) of the position open at ``slot``; (0, 0) if free."""
        pos = self.ids[slot]
        if pos:
            try:
                return pos, int(self.eng.state(pos))
            except NotOpenError:
                pass   # released (and maybe reopened) since: look again
        pos = self.refresh(slot)
        if pos:
            try:
                return pos, int(self.eng.state(pos))
            except NotOpenError:
                self.ids[slot] = 0
        return 0, 0

    # -- the operations: each returns a RESULTS index -----------------------------
    def op_lifecycle(self, slot: int, i: int) -> int:
        """Move a position one step along its lifecycle; release and reopen when closed."""
        pos, st = self.current(slot)
        r = self.rng.random()
        if st == 0:
            return self.open()
        if st == State.CREATED:
            return self.fire(slot, pos, Trigger.POSITION_OPENED)
        if st == State.MONITORING:
            return self.fire(slot, pos, Trigger.EXIT_CONDITION_MET, 1 + i % 7)
        if st == State.EXIT_PENDING:
            return self.fire(slot, pos,
                             Trigger.EXIT_STARTED if r < 0.8 else Trigger.EXIT_CANCELLED)
        if st == State.EXITING:
            if r < 0.75:
                return self.fire(slot, pos, Trigger.EXIT_COMPLETED)
            return self.fire(slot, pos, Trigger.EXIT_FAILED, 100 + i % 5)
        if st == State.CLOSED:
            try:
                out = int(self.eng.release_position(pos))
            except NotOpenError:
                return self.gone(slot)
            if out != _OK:
                return out
            self.record(slot)
            self.ids[slot] = 0
            self.releases += 1
            if self.open() == _FULL:
                self.reopen_full += 1
            return _OK
        if st == State.PAUSED:
            return self.fire(slot, pos, Trigger.RESUME)
        if st == State.ERROR:
            return self.fire(slot, pos, Trigger.RECOVER)
        return self.note(f"slot {slot} in unknown state {st:#x}")

    def op_pause(self, slot: int, i: int) -> int:
        """PAUSE a monitored position, RESUME a paused one."""
        pos, st = self.current(slot)
        return self.fire(slot, pos, Trigger.RESUME if st == State.PAUSED else Trigger.PAUSE)

    def op_error(self, slot: int, i: int) -> int:
        """Raise ERROR_OCCURRED on a position, or RECOVER one in ERROR."""
        pos, st = self.current(slot)
        return self.fire(slot, pos,
                         Trigger.RECOVER if st == State.ERROR else Trigger.ERROR_OCCURRED)

    def op_price(self, slot: int, i: int) -> int:
        """One ``update_price``."""
        try:
            self.eng.update_price(self.pos(slot), self.prices[i % 4099])
        except NotOpenError:
            return self.gone(slot)
        except BusyError:
            return _BUSY
        return _OK

    def op_batch(self, slot: int, i: int) -> int:
        """One ``update_prices`` over a batch of slots' positions (refused whole
        if one of them is gone)."""
        slots, prices = self.batches[i % 61]
        ids = self.ids
        batch = [ids[s] or self.refresh(s) for s in slots]
        try:
            self.eng.update_prices(batch, prices)
        except NotOpenError:
            for s in slots:
                ids[s] = 0
            return _NOT_OPEN
        except BusyError:
            return _BUSY
        return _OK

    def op_token(self, slot: int, i: int) -> int:
        """One ``update_token_price`` (every open position on a token)."""
        try:
            self.eng.update_token_price(slot % N_TOKENS, self.prices[i % 4099])
        except BusyError:
            return _BUSY
        return _OK

    def op_read(self, slot: int, i: int) -> int:
        """Read price and context; check both for tearing and their versions for regress."""
        pos = self.pos(slot)
        try:
            p = self.eng.price(pos)
            c = self.eng.context(pos)
        except NotOpenError:
            return self.gone(slot)
        except BusyError:
            return _BUSY
        if not (_pnl_matches(p.price, p.pnl_pct, p.pnl_usd,
                             (c.entry_price, c.amount, c.side))
                or any(_pnl_matches(p.price, p.pnl_pct, p.pnl_usd, q) for q in TOKEN_PARAMS)):
            self.torn_price += 1
            self.note(f"torn price read on slot {slot}: {p}")
        ok_params = 0 <= c.token < N_TOKENS and TOKEN_PARAMS[c.token] == (
            c.entry_price, c.amount, c.side)
        if not (ok_params and c.stop_loss == c.exit_reason * STOP_PER_REASON
                and c.take_profit == c.exit_reason * TAKE_PER_REASON):
            self.torn_context += 1
            self.note(f"torn context read on slot {slot}: {c}")
        if p.version < self.last_pv[slot] or c.version < self.last_cv[slot]:
            self.regressions += 1
            self.note(f"slot {slot}: version went back: price {self.last_pv[slot]} -> "
                      f"{p.version}, context {self.last_cv[slot]} -> {c.version}")
        self.last_pv[slot] = p.version
        self.last_cv[slot] = c.version
        return _OK

    def op_wait(self, slot: int, i: int) -> int:
        """A short ``wait_for_change``: a commit or a timeout."""
        try:
            self.eng.wait_for_change(self.pos(slot), timeout=self.plan.wait_timeout)
        except WaitTimeout:
            return _TIMEOUT
        except NotOpenError:
            return self.gone(slot)
        return _OK

    # -- the loop --------------------------------------------------------------
    def run(self, shared: Any, stop: Any) -> tuple[int, int]:
        """Run until the stop flag; publish counts every ``_CHECK_EVERY`` ops.
        Returns (start, end) CLOCK_MONOTONIC ns."""
        plan = self.plan
        rng = self.rng
        schedule = rng.choices(range(len(KINDS)), weights=plan.weights, k=4096)
        slots = [rng.randrange(plan.positions) for _ in range(4093)]
        ops, counts, kind_ops = self.ops, self.counts, self.kind_ops
        nres = len(RESULTS)
        row = plan.index * len(KINDS)
        t0 = time.monotonic_ns()
        deadline = time.monotonic() + plan.max_seconds
        i = 0
        while not stop.value and time.monotonic() < deadline:
            for _ in range(_CHECK_EVERY):
                k = schedule[i & 4095]
                counts[k * nres + ops[k](slots[i % 4093], i)] += 1
                kind_ops[k] += 1
                i += 1
            shared[row:row + len(KINDS)] = kind_ops
        return t0, time.monotonic_ns()

    def summary(self, t0: int, t1: int) -> dict[str, Any]:
        nres = len(RESULTS)
        return {
            "index": self.plan.index, "pid": os.getpid(), "start_ns": t0, "end_ns": t1,
            "counts": {k: dict(zip(RESULTS, self.counts[j * nres:(j + 1) * nres], strict=True))
                       for j, k in enumerate(KINDS)},
            "applied": self.log.count, "releases": self.releases,
            "reopen_full": self.reopen_full, "torn_price": self.torn_price,
            "torn_context": self.torn_context, "regressions": self.regressions,
            "messages": self.messages,
        }


def _worker_main(plan: _Plan, shared: Any, stop: Any, ready: Any, results: Any) -> None:
    """Spawned worker: attach, report ready, wait at the gate, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent decides when to stop
    eng = Engine.attach(plan.handle)
    try:
        log = LinkLog(eng, plan.log_path, plan.base_ns)
        worker = _Worker(eng, plan, log)
        gate = posix_ipc.Semaphore(plan.gate)
        try:
            ready.put(("ready", plan.index))
            gate.acquire(plan.max_seconds)
        finally:
            gate.close()
        t0, t1 = worker.run(shared, stop)
        log.close()
        results.put(("done", worker.summary(t0, t1)))
    except BaseException as e:
        results.put(("error", {"index": plan.index, "error": repr(e)}))
        raise
    finally:
        eng.close()


# ---- the parent -----------------------------------------------------------------

def _say(out: TextIO | None, text: str) -> None:
    if out is not None:
        print(text, file=out, flush=True)


def _final_state(eng: Engine) -> tuple[np.ndarray, np.ndarray, int]:
    """Per slot: transitions counter and state word; and how many came from the
    snapshot.  The snapshot omits free slots, so theirs are read from the slot."""
    counters = np.zeros(eng.capacity, dtype=np.uint64)
    words = np.array([eng.state_word(s) for s in range(eng.capacity)], dtype=np.uint64)
    rows = eng.snapshot()
    counters[rows["slot"]] = rows["transitions"]
    seen = np.zeros(eng.capacity, dtype=bool)
    seen[rows["slot"]] = True
    for s in np.flatnonzero(~seen):
        counters[s] = eng._slot(int(s)).transitions
    return counters, words, len(rows)


def _metrics_table(metrics: Metrics, seconds: float) -> list[dict[str, Any]]:
    table = []
    for op in OPS:
        m = metrics[op]
        if op == "recover":
            continue
        table.append({"op": op, "attempts": m.attempts,
                      "ops_per_s": m.attempts / seconds if seconds > 0 else 0.0,
                      "applied": m.applied, "success_rate": m.success_rate,
                      "invalid": m.invalid, "conflicts": m.conflicts, "retries": m.retries,
                      "takeovers": m.takeovers, "errors": m.errors, "samples": m.samples,
                      # the histogram interpolates inside a power-of-two bucket and
                      # can land above the true maximum: cap at the recorded max
                      "p50_us": min(m.p50_ns, m.max_ns) / 1e3,
                      "p99_us": min(m.p99_ns, m.max_ns) / 1e3,
                      "p999_us": min(m.p999_ns, m.max_ns) / 1e3, "max_us": m.max_ns / 1e3})
    return table


def _open_all(eng: Engine, log: LinkLog, seed: int) -> None:
    """Open every slot of the fresh segment (logging each open's commit)."""
    rng = random.Random(seed)
    for _ in range(eng.capacity):
        token = rng.randrange(N_TOKENS)
        entry, amount, side = TOKEN_PARAMS[token]
        log.record(eng.slot_of(eng.open_position(entry, amount, side, token)))


def _wait_ready(procs: list[Any], ready: Any, timeout: float) -> None:
    """Block until every worker said it is attached and at the gate."""
    n, deadline = 0, time.monotonic() + timeout
    while n < len(procs):
        try:
            ready.get(timeout=0.2)
            n += 1
        except queue.Empty:
            dead = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode is not None]
            if dead:
                raise RuntimeError(
                    f"stress workers died before the start: {', '.join(dead)}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n} of {len(procs)} stress workers got ready "
                                   f"within {timeout:.0f} s") from None


def _show_progress(procs: list[Any], shared: Any, seconds: float, out: TextIO | None) -> None:
    """Sleep through the run, printing the operation rate once a second."""
    t_start = time.monotonic()
    last_ops, last_t = 0, t_start
    while True:
        elapsed = time.monotonic() - t_start
        if elapsed >= seconds or any(p.exitcode not in (None, 0) for p in procs):
            return
        time.sleep(min(1.0 - elapsed % 1.0, seconds - elapsed))
        total, now = sum(shared), time.monotonic()
        if now - last_t >= 0.5:
            _say(out, f"  {now - t_start:5.1f} s  {(total - last_ops) / (now - last_t):>12,.0f}"
                      f" ops/s  {total:>14,} ops")
            last_ops, last_t = total, now


def _collect(procs: list[Any], results: Any, timeout: float) -> tuple[list[dict[str, Any]],
                                                                      list[str]]:
    """The workers' summaries, and what went wrong with any that sent none."""
    summaries: list[dict[str, Any]] = []
    problems: list[str] = []
    pending, deadline = len(procs), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        try:
            kind, payload = results.get(timeout=0.2)
        except queue.Empty:
            if all(p.exitcode is not None for p in procs) and results.empty():
                break
            continue
        pending -= 1
        if kind == "done":
            summaries.append(payload)
        else:
            problems.append(f"worker {payload['index']} failed: {payload['error']}")
    return summaries, problems


def run_stress(config: StressConfig) -> StressResult:
    """Run one stress test and verify it; see the module docstring.

    Raises ``ValueError`` for a bad configuration and ``RuntimeError`` if the
    workers cannot be started.  The segment, the start gate and the log files
    are removed whatever happens; workers still running are stopped.
    """
    weights = config.check()
    out = config.progress
    ctx = multiprocessing.get_context("spawn")
    base_ns = time.monotonic_ns()
    gate_name = "/eng_stress_" + secrets.token_hex(8)
    procs: list[Any] = []
    stop = ctx.RawValue("B", 0)
    shared = ctx.RawArray("Q", config.workers * len(KINDS))

    def stop_workers() -> None:
        stop.value = 1
        for p in procs:
            p.join(10)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)

    with contextlib.ExitStack() as cleanup:    # unwinds in reverse order
        tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="eng_stress_"))
        ready_q, result_q = ctx.Queue(), ctx.Queue()
        cleanup.callback(result_q.close)
        cleanup.callback(ready_q.close)
        eng = Engine.create(capacity=config.positions)
        cleanup.callback(eng.unlink)
        cleanup.callback(eng.close)
        gate = posix_ipc.Semaphore(gate_name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
        cleanup.callback(posix_ipc.unlink_semaphore, gate_name)
        cleanup.callback(gate.close)
        cleanup.callback(stop_workers)

        eng.set_metrics(True, config.sample_every)
        parent_log = LinkLog(eng, os.path.join(tmp, "parent.bin"), base_ns)
        _open_all(eng, parent_log, config.seed)
        parent_log.close()

        wtuple = tuple(weights[k] for k in KINDS)
        for i in range(config.workers):
            plan = _Plan(i, eng.handle, gate_name, os.path.join(tmp, f"worker{i}.bin"), base_ns,
                         config.positions, wtuple, config.seed, config.batch_size,
                         config.wait_timeout, config.seconds + 60.0)
            p = ctx.Process(target=_worker_main, args=(plan, shared, stop, ready_q, result_q),
                            name=f"stress-worker-{i}", daemon=True)
            p.start()
            procs.append(p)
        _wait_ready(procs, ready_q, 60.0 + 2.0 * config.workers)

        # everyone is at the gate: switch the fault on, then let them all go at once
        if config.fault:
            eng._set_fault(FAULTS[config.fault])
        for _ in procs:
            gate.release()
        _say(out, f"stress: {config.workers} workers on {config.positions} shared slots, "
                  f"{config.seconds:g} s, mix "
                  + ",".join(f"{k}={w}" for k, w in weights.items() if w)
                  + (f", FAULT {config.fault}" if config.fault else ""))
        _show_progress(procs, shared, config.seconds, out)
        stop.value = 1
        summaries, problems = _collect(procs, result_q, 60.0)
        stop_workers()
        eng._set_fault(0)
        problems += [f"{p.name} exited with code {p.exitcode}" for p in procs if p.exitcode]
        if len(summaries) < config.workers:
            problems.append(f"only {len(summaries)} of {config.workers} workers reported")

        # every process's links against the segment's final state
        counters, words, n_rows = _final_state(eng)
        packed = [np.fromfile(os.path.join(tmp, f), dtype=np.uint64)
                  for f in sorted(os.listdir(tmp)) if f.endswith(".bin")]
        links = decode_links(np.concatenate(packed) if packed else np.empty(0, np.uint64))
        chains = verify_chains(links, counters, words)
        res = _result(config, weights, summaries, problems, chains, counters, eng.metrics(),
                      n_rows, parent_log.count)
        res.segment, res.gate = eng.name, gate_name
    return res


def _result(config: StressConfig, weights: dict[str, int], summaries: list[dict[str, Any]],
            problems: list[str], chains: ChainReport, counters: np.ndarray, metrics: Metrics,
            snapshot_rows: int, parent_opens: int) -> StressResult:
    """Put the figures together and count every violation."""
    seconds = ((max(s["end_ns"] for s in summaries) - min(s["start_ns"] for s in summaries))
               / 1e9 if summaries else 0.0)
    workload = {k: dict.fromkeys(RESULTS, 0) for k in KINDS}
    for s in summaries:
        for k in KINDS:
            for r in RESULTS:
                workload[k][r] += s["counts"][k][r]
    ops = sum(sum(w.values()) for w in workload.values())
    torn_price = sum(s["torn_price"] for s in summaries)
    torn_context = sum(s["torn_context"] for s in summaries)
    regressions = sum(s["regressions"] for s in summaries)
    unexpected = sum(w["unexpected"] for w in workload.values())
    releases = sum(s["releases"] for s in summaries)
    applied = parent_opens + sum(s["applied"] for s in summaries)
    engine_applied = (metrics["transition"].applied + metrics["transition_ctx"].applied
                      + metrics["open"].applied + releases)
    counters_total = int(counters.sum())

    by_category = dict(chains.by_category)
    messages = list(chains.messages)
    for name, n in (("torn_price_read", torn_price), ("torn_context_read", torn_context),
                    ("version_regression", regressions), ("unexpected_outcome", unexpected)):
        if n:
            by_category[name] = n
    for s in summaries:
        messages.extend(s["messages"])
    if problems:
        by_category["worker_failure"] = len(problems)
        messages.extend(problems)
    for name, got in (("links logged", chains.links), ("transitions counters", counters_total),
                      ("engine metrics applied + releases", engine_applied)):
        if got != applied:
            by_category["totals"] = by_category.get("totals", 0) + 1
            messages.append(f"totals: workers applied {applied} commits, {name} say {got}")
    if metrics["transition"].takeovers or metrics["transition_ctx"].takeovers:
        messages.append("note: lock takeovers happened; a takeover's commit is not logged")

    alerts = check_alerts(metrics,
                          p99_ns=None if config.alert_p99_us is None else config.alert_p99_us * 1e3,
                          success_rate=config.alert_success)
    verification = {
        "links": chains.links, "slots": chains.slots, "snapshot_rows": snapshot_rows,
        "applied": applied, "releases": releases, "counters_total": counters_total,
        "engine_applied": engine_applied, "torn_price_reads": torn_price,
        "torn_context_reads": torn_context, "version_regressions": regressions,
        "reads_checked": workload["read"]["ok"], "by_category": by_category,
    }
    cfg = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "progress"}
    cfg["mix"] = weights
    return StressResult(ops=ops, seconds=seconds, violations=sum(by_category.values()),
                        violation_messages=messages, workload=workload,
                        table=_metrics_table(metrics, seconds), alerts=alerts,
                        verification=verification, config=cfg)


# ---- report -----------------------------------------------------------------------

def _us(x: float) -> str:
    return f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


def format_report(res: StressResult) -> str:
    """The human-readable tables."""
    lines = [f"{res.ops:,} ops in {res.seconds:.2f} s = {res.ops_per_s:,.0f} ops/s "
             f"({res.config['workers']} workers, {res.config['positions']} slots)", ""]
    hdr = (f"{'engine op':<15}{'ops/s':>11}{'success':>9}{'p50 us':>9}{'p99 us':>9}"
           f"{'p99.9 us':>10}{'max us':>9}{'retries':>10}{'conflicts':>10}")
    lines += [hdr, "-" * len(hdr)]
    for row in res.table:
        if not row["attempts"]:
            lines.append(f"{row['op']:<15}{'-':>11}  (no calls metered)")
            continue
        lat = (f"{_us(row['p50_us']):>9}{_us(row['p99_us']):>9}{_us(row['p999_us']):>10}"
               f"{_us(row['max_us']):>9}") if row["samples"] else f"{'-':>9}" * 3 + f"{'-':>10}"
        lines.append(f"{row['op']:<15}{row['ops_per_s']:>11,.0f}{row['success_rate']:>9.3f}{lat}"
                     f"{row['retries']:>10,}{row['conflicts']:>10,}")
    lines.append("")
    hdr = f"{'workload':<11}{'ops/s':>11}" + "".join(f"{r:>11}" for r in RESULTS)
    lines += [hdr, "-" * len(hdr)]
    for kind, c in res.workload.items():
        n = sum(c.values())
        if n:
            rate = n / res.seconds if res.seconds else 0.0
            lines.append(f"{kind:<11}{rate:>11,.0f}" + "".join(f"{c[r]:>11,}" for r in RESULTS))
    v = res.verification
    lines += ["", f"verified: {v['links']:,} chain links on {v['slots']} slots "
              f"({v['applied']:,} applied commits, transitions counters {v['counters_total']:,}, "
              f"engine metrics {v['engine_applied']:,}); {v['reads_checked']:,} reads checked, "
              f"torn {v['torn_price_reads'] + v['torn_context_reads']}, "
              f"version regressions {v['version_regressions']}"]
    for a in res.alerts:
        lines.append(f"ALERT {a}")
    if res.violations:
        cats = ", ".join(f"{k} {n:,}" for k, n in sorted(v["by_category"].items()))
        lines.append(f"VIOLATIONS: {res.violations:,} ({cats})")
        lines += [f"  {m}" for m in res.violation_messages[:40]]
    else:
        lines.append("violations: 0")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------

def _power_of_two(text: str) -> int:
    n = int(text)
    if n < 1 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two >= 1, got {n}")
    return n


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _positive_float(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return x


def _mix(text: str) -> str:
    try:
        parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_parsers(subparsers: Any) -> None:
    """Add the ``stress`` subcommand (``func`` returns the exit code)."""
    d = StressConfig()
    p = subparsers.add_parser(
        "stress", help="hammer shared slots from many processes, then verify every commit",
        description="Spawn workers that hammer a few shared slots with a realistic mix "
                    "(lifecycles with context updates, pause/resume, errors, single/batch/token "
                    "price updates, consistent reads, waits), then prove that per slot every "
                    "logged commit forms one unbroken chain of generations matching the "
                    "slot's counter, that no read was torn, and that the totals add up. "
                    "Exits 1 on any violation.",
        epilog="Progress goes to stderr once a second, the tables to stdout. "
               "Exit codes: 0 verified clean, 1 violations found, 2 could not run.")
    p.add_argument("--workers", type=_positive_int, default=d.workers, metavar="N",
                   help="worker processes (default: the number of CPUs, here %(default)s)")
    p.add_argument("--positions", type=_positive_int, default=d.positions, metavar="N",
                   help="shared slots; fewer means more contention (default: %(default)s)")
    p.add_argument("--seconds", type=_positive_float, default=d.seconds, metavar="S",
                   help="run time (default: %(default)s)")
    p.add_argument("--mix", type=_mix, default=d.mix,
                   help="workload: a preset (" + ", ".join(PRESETS) + ") and/or weights like "
                   "'lifecycle=4,pause=2,price=6,batch=1,token=1,read=4,wait=1' (kinds: "
                   + ", ".join(KINDS) + "; default: %(default)s)")
    p.add_argument("--wait-us", type=float, default=d.wait_timeout * 1e6, metavar="US",
                   help="timeout of each wait_for_change; a wait that sees no commit costs "
                        "this long (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the workers' random choices (default: %(default)s)")
    p.add_argument("--sample-every", type=_power_of_two, default=d.sample_every, metavar="N",
                   help="time one operation in N, a power of two (default: %(default)s)")
    p.add_argument("--alert-p99-us", type=float, default=d.alert_p99_us, metavar="US",
                   help="alert when an operation's p99 latency exceeds this "
                        "(default: %(default)s; 0 turns it off)")
    p.add_argument("--alert-success", type=float, default=d.alert_success, metavar="FRACTION",
                   help="alert when an operation's success rate (applied / attempts) is below "
                        "this (default: off)")
    p.add_argument("--json", metavar="PATH", help="also write the figures and verdict as JSON")
    p.add_argument("--quiet", action="store_true",
                   help="print one summary line: no progress, no tables")
    p.add_argument("--fault", choices=sorted(FAULTS), help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``stress`` command: 0 when verified clean, 1 on any violation."""
    config = StressConfig(
        workers=args.workers, positions=args.positions, seconds=args.seconds, mix=args.mix,
        seed=args.seed, sample_every=args.sample_every, wait_timeout=args.wait_us / 1e6,
        alert_p99_us=args.alert_p99_us if args.alert_p99_us and args.alert_p99_us > 0 else None,
        alert_success=args.alert_success, fault=args.fault,
        progress=None if args.quiet else sys.stderr)
    try:
        res = run_stress(config)
    except (ValueError, RuntimeError, EngineError) as e:
        print(f"stress: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.as_dict(), f, indent=2)
            f.write("\n")
    if args.quiet:
        status = "ok" if res.ok else "FAILED"
        print(f"stress {status}: {res.ops:,} ops, {res.ops_per_s:,.0f} ops/s, "
              f"{res.verification['links']:,} links verified, {res.violations} violations")
        for m in res.violation_messages[:10]:
            print(f"  {m}")
    else:
        print(format_report(res))
    return 0 if res.ok else 1


if __name__ == "__main__":  # pragma: no cover
    _p = argparse.ArgumentParser(prog="python -m engine.stress")
    add_parsers(_p.add_subparsers(dest="command", required=True))
    _a = _p.parse_args()
    raise SystemExit(_a.func(_a))
