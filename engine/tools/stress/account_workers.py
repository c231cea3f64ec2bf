"""The account worker (``--mix accounts``): one spawned process that opens
positions of its own on the shared accounts, moves them to CLOSED (the
booking) and releases them, moves money and limits, and journals every
money movement and every booking (``engine.tools.stress.accounts``); it logs
a link per applied commit for the chain verifier, like the position workers.

Only the owner touches its positions (transitions, prices, release), so
each of them is in the state the owner last moved it to: a transition of
its own that is not APPLIED is a violation (``foreign_change``), and the
price record read after the close is the price C booked from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.accounts import Account, from_units
from engine.core import Engine, Handle
from engine.errors import (
    BusyError,
    CapacityError,
    EngineError,
    NotOpenError,
    RiskLimitError,
)
from engine.spec import State, Trigger
from engine.tools.stress.accounts import (
    AMOUNT_RANGE,
    CLIENT_OPS,
    COUNTERS,
    ENTRY_RANGE,
    LIMITS,
    MARK_MOVE,
    AccountTerms,
    Journal,
    books_problem,
    notional_of,
    realized_of,
    refusal_problem,
)
from engine.tools.stress.base import (
    BUSY,
    CONFLICT,
    FULL,
    INVALID,
    NOT_OPEN,
    OK,
    UNEXPECTED,
    SampledWorker,
)
from engine.tools.stress.codec import LinkLog
from engine.tools.stress.mix import ACCOUNT_KINDS

_CREATED, _MONITORING, _EXIT_PENDING = int(State.CREATED), int(State.MONITORING), \
    int(State.EXIT_PENDING)
_EXITING, _CLOSED, _ERROR, _PAUSED = int(State.EXITING), int(State.CLOSED), int(State.ERROR), \
    int(State.PAUSED)
_T = Trigger
#: where each trigger of the lifecycle leads (from the states the worker fires it in)
_TARGET = {_T.POSITION_OPENED: _MONITORING, _T.EXIT_CONDITION_MET: _EXIT_PENDING,
           _T.EXIT_CANCELLED: _MONITORING, _T.EXIT_STARTED: _EXITING,
           _T.EXIT_COMPLETED: _CLOSED, _T.EXIT_FAILED: _EXIT_PENDING, _T.PAUSE: _PAUSED,
           _T.RESUME: _MONITORING, _T.ERROR_OCCURRED: _ERROR, _T.RECOVER: _MONITORING}


@dataclass(frozen=True)
class _AccountPlan:
    """Everything a spawned account worker needs (picklable)."""

    index: int
    handle: Handle
    gate: str
    log_path: str
    base_ns: int
    weights: tuple[int, ...]
    seed: int
    sample_every: int
    inflight: int               # own positions kept open
    accounts: tuple[int, ...]   # the shared account ids
    terms: AccountTerms
    leak: bool                  # the test fault: some withdrawals take an unjournaled unit
    max_seconds: float


@dataclass
class _Held:
    """One of the worker's own positions, as the worker left it."""

    id: int
    slot: int
    account: int
    entry: float
    amount: float
    side: int
    notional: int
    price: float                # the last price the worker wrote (the entry at open)
    state: int = _CREATED
    booked: bool = False        # its closing booking is journaled


class _AccountWorker(SampledWorker):
    """One process's positions on the shared accounts, and its money movements."""

    kinds = ACCOUNT_KINDS
    rng_salt = 0xACC7
    counters = COUNTERS
    client_ops = CLIENT_OPS
    always_timed = frozenset(("open", "close"))

    def __init__(self, eng: Engine, plan: _AccountPlan, log: LinkLog) -> None:
        super().__init__(eng, plan, log)
        self.held: list[_Held] = []
        self.cursor = 0
        self.journal = {a: Journal() for a in plan.accounts}
        self.versions = dict.fromkeys(plan.accounts, 0)
        self.ops = [self.op_trade, self.op_mark, self.op_cash, self.op_limits, self.op_books]
        assert len(self.ops) == len(ACCOUNT_KINDS)

    # -- helpers (``note`` and ``call``: ``SampledWorker``) -------------------------
    def lost(self, h: _Held, what: str, e: BaseException) -> int:
        """The worker's own position is gone though it never released it."""
        if h in self.held:
            self.held.remove(h)
        return self.note("lost_position", f"id {h.id:#x} (account {h.account}): {what}: {e!r}")

    def check_read(self, a: Account) -> None:
        """One account read: it must add up, and its version must not go back."""
        problem = books_problem(a)
        if problem:
            self.note("torn_books", problem)
        if a.version < self.versions[a.id]:
            self.note("version_regression", f"account {a.id}: version {self.versions[a.id]} "
                      f"-> {a.version}")
        self.versions[a.id] = a.version

    # -- positions ------------------------------------------------------------------
    def open(self) -> int:
        """Open a position of our own on a random shared account."""
        rng = self.rng
        acct = rng.choice(self.plan.accounts)
        entry = rng.uniform(*ENTRY_RANGE)
        amount = rng.uniform(*AMOUNT_RANGE)
        side = 1 if rng.random() < 0.5 else -1
        need = notional_of(entry, amount)
        self.c["open_attempts"] += 1
        try:
            pos = self.call("open", self.eng.open_position, entry, amount, side,
                            self.plan.index, account=acct)
        except RiskLimitError as e:
            limit = getattr(e, "limit", "")
            if limit in LIMITS:
                self.c["refused_" + limit] += 1
            problem = refusal_problem(limit, getattr(e, "books", None), need)
            if problem:
                self.note("unknown_limit" if limit not in LIMITS else "unjustified_refusal",
                          f"open_position on account {acct}: {problem} ({e})")
            return INVALID
        except CapacityError:
            self.c["open_full"] += 1
            return FULL
        except BusyError:
            self.c["open_busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"open_position(account={acct}): {e!r}")
        slot = self.eng.slot_of(pos)
        self.record(slot)
        self.c["opened"] += 1
        self.journal[acct].opens += 1
        self.held.append(_Held(pos, slot, acct, entry, amount, side, need, entry))
        return OK

    def book(self, h: _Held) -> None:
        """Journal the realized PnL the engine booked when ``h`` closed: from
        the price record (only we write it, so it is the price C read under
        the lock) with C's rounding."""
        try:
            p = self.eng.price(h.id)
        except EngineError as e:
            self.note("unexpected", f"price({h.id:#x}) after its close: {e!r}")
            return
        if p.price != h.price:
            self.note("price_moved", f"id {h.id:#x}: price record {p.price!r}, last written "
                      f"{h.price!r}")
        j = self.journal[h.account]
        j.realized += realized_of(h.entry, h.amount, h.side, p.price)
        j.closes += 1
        h.booked = True
        self.c["closed"] += 1

    def fire(self, h: _Held, trigger: Trigger, op: str = "step", **fields: Any) -> int:
        """Fire ``trigger`` on our own position ``h``; log the link if it applied."""
        try:
            out = int(self.call(op, self.eng.transition, h.id, trigger, **fields))
        except NotOpenError as e:
            return self.lost(h, f"transition {trigger.name}", e)
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"transition({h.id:#x}, {trigger.name}): {e!r}")
        if out == OK:
            self.record(h.slot)
            h.state = _TARGET[trigger]
            if h.state == _CLOSED:
                self.book(h)
            else:
                self.c["steps"] += 1
            return OK
        # only we move it: anything but APPLIED means someone else did
        try:
            now = int(self.eng.state(h.id))
        except EngineError:
            now = 0
        self.note("foreign_change", f"transition({h.id:#x}, {trigger.name}) from "
                  f"{State(h.state).name} -> outcome {out}; its state is now {now:#x}")
        if now:
            h.state = now
        return out if out in (INVALID, CONFLICT) else UNEXPECTED

    def release(self, h: _Held) -> int:
        """Release our closed position (its booking journaled first)."""
        if not h.booked:
            self.book(h)
        try:
            out = int(self.call("release", self.eng.release_position, h.id))
        except NotOpenError as e:
            return self.lost(h, "release_position", e)
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"release_position({h.id:#x}): {e!r}")
        if out != OK:
            return self.note("foreign_change", f"release_position({h.id:#x}) -> outcome {out}")
        self.record(h.slot)
        self.held.remove(h)
        self.c["releases"] += 1
        return OK

    def step(self, h: _Held) -> int:
        """Move one of our positions a step along the lifecycle, by its state."""
        st, r = h.state, self.rng.random()
        if st == _CREATED:
            return self.fire(h, _T.POSITION_OPENED)
        if st == _MONITORING:
            if r < 0.02:
                return self.fire(h, _T.ERROR_OCCURRED)
            if r < 0.06:
                return self.fire(h, _T.PAUSE)
            return self.fire(h, _T.EXIT_CONDITION_MET, exit_reason=1 + int(r * 7))
        if st == _EXIT_PENDING:
            return self.fire(h, _T.EXIT_CANCELLED if r < 0.1 else _T.EXIT_STARTED)
        if st == _EXITING:
            if r < 0.1:
                return self.fire(h, _T.EXIT_FAILED, exit_reason=100 + int(r * 50))
            if r < 0.55:        # the booking with a context update, or without
                return self.fire(h, _T.EXIT_COMPLETED, "close", exit_reason=9)
            return self.fire(h, _T.EXIT_COMPLETED, "close")
        if st == _CLOSED:
            return self.release(h)
        if st == _PAUSED:
            return self.fire(h, _T.RESUME)
        if st == _ERROR:
            return self.fire(h, _T.RECOVER)
        return self.note("unexpected", f"id {h.id:#x} in unknown state {st:#x}")

    # -- the operations: each returns a RESULTS index -----------------------------
    def op_trade(self) -> int:
        """Open a position (below ``inflight``, half the time when we hold
        some), or move one of ours a step.  A refusal is ``invalid``."""
        held = self.held
        if len(held) < self.plan.inflight and (not held or self.rng.random() < 0.5):
            out = self.open()
            if out != FULL or not held:
                return out
        self.cursor = (self.cursor + 1) % len(held)
        return self.step(held[self.cursor])

    def op_mark(self) -> int:
        """A new price for one of our positions that is not closed."""
        live = [h for h in self.held if h.state != _CLOSED]
        if not live:
            return NOT_OPEN
        h = self.rng.choice(live)
        price = h.entry * (1.0 + self.rng.uniform(-MARK_MOVE, MARK_MOVE))
        try:
            self.call("mark", self.eng.update_price, h.id, price)
        except NotOpenError as e:
            return self.lost(h, "update_price", e)
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"update_price({h.id:#x}, {price!r}): {e!r}")
        h.price = price
        self.c["marks"] += 1
        return OK

    def op_cash(self) -> int:
        """Deposit or withdraw a small amount (towards the opening cash);
        journal what succeeded.  A refused withdrawal is ``invalid``."""
        rng, eng, terms = self.rng, self.eng, self.plan.terms
        acct = rng.choice(self.plan.accounts)
        try:
            a = self.call("books", eng.account, acct)
        except EngineError as e:
            return self.note("unexpected", f"account({acct}): {e!r}")
        self.check_read(a)
        units = rng.randrange(1, terms.cash_step + 1)
        amount = from_units(units)
        withdraw = (a.cash > from_units(terms.cash)) != (rng.random() < 0.2)
        j = self.journal[acct]
        try:
            if withdraw:
                self.call("withdraw", eng.withdraw, acct, amount)
            else:
                self.call("deposit", eng.deposit, acct, amount)
        except RiskLimitError as e:
            limit = getattr(e, "limit", "")
            problem = refusal_problem(limit, getattr(e, "books", None), units)
            if not withdraw or limit != "cash" or problem:
                return self.note("unjustified_refusal" if limit in LIMITS else "unknown_limit",
                                 f"{'withdraw' if withdraw else 'deposit'}({acct}, {amount}): "
                                 f"{problem or e}")
            self.c["withdraw_refused"] += 1
            return INVALID
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"{'withdraw' if withdraw else 'deposit'}({acct}, "
                             f"{amount}): {e!r}")
        if withdraw:
            j.withdrawals += units
            j.n_withdrawals += 1
            self.c["withdrawals"] += 1
            if self.plan.leak and rng.random() < 0.125:
                try:        # the planted bug: a unit leaves the account unjournaled
                    eng.withdraw(acct, from_units(1))
                    self.c["leaked"] += 1
                except (RiskLimitError, BusyError):
                    pass
        else:
            j.deposits += units
            j.n_deposits += 1
            self.c["deposits"] += 1
        return OK

    def op_limits(self) -> int:
        """An optimistic ``update_account``: resume a halted account (raising
        max_loss past its realized loss), now and then halt one (an
        emergency stop), else move max_exposure or max_positions a step
        within its band.  ``fn`` decides from the books it is given, so a
        retry after a version conflict decides again."""
        rng, terms = self.rng, self.plan.terms
        acct = rng.choice(self.plan.accounts)
        r, up = rng.random(), rng.random() < 0.5
        did: list[str] = []

        def fn(a: Account) -> dict[str, Any]:
            did[:] = []
            if a.halted:
                did.append("resume")
                floor = -a.realized_pnl + from_units(terms.loss_step)
                return {"halted": False, "max_loss": max(a.max_loss, floor)}
            if r < 0.04:
                did.append("halt")
                return {"halted": True}
            if r < 0.52:
                lo, hi = (from_units(x) for x in terms.exposure_band)
                step = from_units(terms.exposure_step)
                return {"max_exposure": min(hi, max(lo, a.max_exposure + (step if up else -step)))}
            lo_n, hi_n = terms.positions_band
            return {"max_positions": min(hi_n, max(lo_n, a.max_positions + (1 if up else -1)))}

        try:
            a = self.call("update", self.eng.update_account, acct, fn)
        except BusyError:
            self.c["update_busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"update_account({acct}): {e!r}")
        self.check_read(a)
        self.c["updates"] += 1
        if did == ["resume"]:
            self.c["resumes"] += 1
        elif did == ["halt"]:
            self.c["halts"] += 1
        return OK

    def op_books(self) -> int:
        """Read an account and check the read."""
        acct = self.rng.choice(self.plan.accounts)
        try:
            a = self.call("books", self.eng.account, acct)
        except EngineError as e:
            return self.note("unexpected", f"account({acct}): {e!r}")
        self.check_read(a)
        self.c["books_reads"] += 1
        return OK

    # -- the loop: ``SampledWorker`` --------------------------------------------
    def extra_summary(self) -> dict[str, Any]:
        return {**super().extra_summary(),
                "journal": {a: j.as_tuple() for a, j in self.journal.items()},
                "held": [(h.id, h.account, h.state, h.booked) for h in self.held]}
