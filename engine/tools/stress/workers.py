"""The worker: one spawned process's share of the workload, logging a link per
applied commit and checking every read for tearing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core import Engine, Handle
from engine.errors import (
    BusyError,
    CapacityError,
    EngineError,
    NotOpenError,
    WaitTimeout,
)
from engine.spec import State, Trigger
from engine.tools.stress.base import (
    BUSY,
    CONFLICT,
    FULL,
    NOT_OPEN,
    OK,
    TIMEOUT,
    UNEXPECTED,
    BaseWorker,
)
from engine.tools.stress.codec import LinkLog
from engine.tools.stress.mix import (
    KINDS,
    N_TOKENS,
    STOP_PER_REASON,
    TAKE_PER_REASON,
    TOKEN_PARAMS,
    TRAIL_BASE,
)
from engine.tools.stress.verify import _MAX_MESSAGES


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
    sample_every: int = 64      # on Redis: this worker's Engine samples 1 call in N


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _pnl_matches(price: float, pnl_pct: float, pnl_usd: float,
                 params: tuple[float, float, int]) -> bool:
    entry, amount, side = params
    diff = price - entry
    return _close(pnl_pct, diff / entry * 100.0 * side) and _close(pnl_usd, diff * amount * side)


class _Worker(BaseWorker):
    """One process's share of the workload.

    Operations pick a slot index; they act on the position open there through
    its id.  ``ids[slot]`` is the id of the slot's opening this worker last
    saw (0: none known, or the slot was free), refreshed with ``eng.id_of``
    when a call says that opening is gone.
    """

    kinds = KINDS

    def __init__(self, eng: Engine, plan: _Plan, log: LinkLog) -> None:
        super().__init__(eng, plan, log)
        self.releases = 0
        self.reopen_full = 0
        self.torn_price = 0
        self.torn_context = 0
        self.regressions = 0
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
        return UNEXPECTED

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
        return NOT_OPEN

    def fire(self, slot: int, pos: int, trigger: int, reason: int | None = None) -> int:
        """Fire one trigger on opening ``pos`` of ``slot``; log the link if it applied."""
        try:
            if reason is None:
                out = int(self.eng.transition(pos, trigger))
            else:
                out = int(self.eng.transition(
                    pos, trigger, exit_reason=reason,
                    trailing_stop=TRAIL_BASE + reason * STOP_PER_REASON,
                    exit_price=reason * TAKE_PER_REASON))
        except NotOpenError:
            return self.gone(slot)
        except BusyError:
            return BUSY
        except EngineError as e:
            return self.note(f"transition(slot {slot}, {Trigger(trigger).name}): {e!r}")
        if out == OK:
            self.record(slot)
        elif out > CONFLICT:
            return self.note(f"transition(slot {slot}, {Trigger(trigger).name}) -> outcome {out}")
        return out

    def open(self) -> int:
        """Open a new position on any free slot, with one of the token parameter sets."""
        token = self.rng.randrange(N_TOKENS)
        entry, amount, side = TOKEN_PARAMS[token]
        try:
            pos = self.eng.open_position(entry, amount, side, token)
        except CapacityError:
            return FULL
        except BusyError:
            return BUSY
        except EngineError as e:
            return self.note(f"open_position: {e!r}")
        slot = self.eng.slot_of(pos)
        self.record(slot)
        self.ids[slot] = pos
        return OK

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
            if out != OK:
                return out
            self.record(slot)
            self.ids[slot] = 0
            self.releases += 1
            if self.open() == FULL:
                self.reopen_full += 1
            return OK
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
            return BUSY
        return OK

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
            return NOT_OPEN
        except BusyError:
            return BUSY
        return OK

    def op_token(self, slot: int, i: int) -> int:
        """One ``update_token_price`` (every open position on a token)."""
        try:
            self.eng.update_token_price(slot % N_TOKENS, self.prices[i % 4099])
        except BusyError:
            return BUSY
        return OK

    def op_read(self, slot: int, i: int) -> int:
        """Read price and context; check both for tearing and their versions for regress."""
        pos = self.pos(slot)
        try:
            p = self.eng.price(pos)
            c = self.eng.context(pos)
        except NotOpenError:
            return self.gone(slot)
        except BusyError:
            return BUSY
        if not (_pnl_matches(p.price, p.pnl_pct, p.pnl_usd,
                             (c.entry_price, c.amount, c.side))
                or any(_pnl_matches(p.price, p.pnl_pct, p.pnl_usd, q) for q in TOKEN_PARAMS)):
            self.torn_price += 1
            self.note(f"torn price read on slot {slot}: {p}")
        ok_params = 0 <= c.token < N_TOKENS and TOKEN_PARAMS[c.token] == (
            c.entry_price, c.amount, c.side)
        trail = TRAIL_BASE + c.exit_reason * STOP_PER_REASON if c.exit_reason else 0.0
        if not (ok_params and c.trailing_stop == trail and c.stop_loss == c.take_profit == 0.0
                and c.exit_price == c.exit_reason * TAKE_PER_REASON):
            self.torn_context += 1
            self.note(f"torn context read on slot {slot}: {c}")
        if p.version < self.last_pv[slot] or c.version < self.last_cv[slot]:
            self.regressions += 1
            self.note(f"slot {slot}: version went back: price {self.last_pv[slot]} -> "
                      f"{p.version}, context {self.last_cv[slot]} -> {c.version}")
        self.last_pv[slot] = p.version
        self.last_cv[slot] = c.version
        return OK

    def op_wait(self, slot: int, i: int) -> int:
        """A short ``wait_for_change``: a commit or a timeout."""
        try:
            self.eng.wait_for_change(self.pos(slot), timeout=self.plan.wait_timeout)
        except WaitTimeout:
            return TIMEOUT
        except NotOpenError:
            return self.gone(slot)
        return OK

    # -- the loop (``BaseWorker.run``) ------------------------------------------
    def stepper(self) -> Callable[[int, int], int]:
        """Scheduled op ``k`` as step ``i`` acts on one of 4093 random slots."""
        ops = self.ops
        slots = [self.rng.randrange(self.plan.positions) for _ in range(4093)]
        return lambda k, i: ops[k](slots[i % 4093], i)

    def extra_summary(self) -> dict[str, Any]:
        return {"releases": self.releases, "reopen_full": self.reopen_full,
                "torn_price": self.torn_price, "torn_context": self.torn_context,
                "regressions": self.regressions}
