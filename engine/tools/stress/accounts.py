"""The account workload's rules and checkers (``--mix accounts``): the terms
the shared accounts are opened with, what a position and its booking are
worth, the checks a worker makes on every refusal and read, and the
end-of-run books check.

The parent opens a few shared accounts (``accounts``, 3 by default) with the
same terms (``terms_for``): cash, ``max_exposure`` and ``max_positions`` a
little above what the workers' open positions average on one account, so
that a refusal (``RiskLimitError``) happens sometimes but not mostly;
``max_loss`` is a few per cent of the cash.  Every worker keeps up to
``inflight`` positions of its own, each opened with ``account=`` one of the
shared accounts at random, at a random entry price, amount and side; it moves
them along the lifecycle to CLOSED (the booking transition), marks their
price on the way, and releases them.  It also deposits and withdraws small
amounts, changes the limits with ``update_account`` (moves a limit within
its band, halts an account as an emergency stop, resumes a halted one,
raising ``max_loss`` past the realized loss) and reads the books.

Nothing is taken on trust.  Each worker journals, per account, every money
movement it made (deposits, withdrawals: the units it asked for, when the
call succeeded) and, for every position of its own that closed, the realized
PnL the engine booked: only the owner writes its positions' prices, so the
price record it reads after the close is the one C read under the lock, and
``realized_of`` recomputes the booking exactly as C does
(``engine.accounts.money_of``).  At the end, with every worker stopped,
``verify_books`` checks every account exactly (``Decimal``): reserved == the
sum of the notionals of its open positions in ``snapshot()``, open_positions
== their count, realized == the journaled realized PnL, deposits and
withdrawals == the journaled sums, and cash == opening cash + deposits -
withdrawals + realized.

Pure: no processes, no segment (the parent gathers what ``verify_books`` needs).
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from engine.accounts import SCALE, Account, from_units, money_of
from engine.spec import State
from engine.tools.stress.verify import Violations

#: Latencies the workers sample (client side: the Python call,
#: time.perf_counter_ns).  ``open`` (open_position with account=, refused
#: ones included) and ``close`` (the booking transition into CLOSED) are
#: timed on every call; the rest one op in ``sample_every``: step (the other
#: lifecycle transitions), release, mark (update_price), deposit, withdraw,
#: update (update_account, retries included), books (account()).
CLIENT_OPS = ("open", "close", "step", "release", "mark", "deposit", "withdraw", "update",
              "books")

#: The limits a RiskLimitError names (``e.limit``), in the order C checks them.
LIMITS = ("halted", "exposure", "count", "cash")

#: Counters the workers keep (summed over workers); the violations among
#: them are those in VIOLATIONS.
COUNTERS = (
    "open_attempts", "opened", "open_full", "open_busy", "closed", "releases",
    "steps", "marks", "deposits", "withdrawals", "withdraw_refused", "updates",
    "update_busy", "halts", "resumes", "books_reads", "busy", "leaked",
    "refused_halted", "refused_exposure", "refused_count", "refused_cash",
    "unjustified_refusal", "unknown_limit", "torn_books", "version_regression",
    "price_moved", "foreign_change", "lost_position", "unexpected",
)

#: Violation categories (any count > 0 fails the run) and what each means.
VIOLATIONS: dict[str, str] = {
    "reserved": "an account's reserved differs from the sum of the notionals of its open "
                "positions",
    "open_positions": "an account's open_positions differs from the count of its open positions",
    "cash": "an account's cash differs from opening cash + deposits - withdrawals + realized "
            "(all journaled)",
    "realized": "an account's realized PnL differs from the realized PnL booked by the "
                "positions closed on it (as journaled)",
    "money_moved": "an account's deposits or withdrawals differ from the journaled sums",
    "opening_cash": "an account's opening cash differs from what it was opened with",
    "latched": "an account latch still held after every worker stopped",
    "unknown_account": "a position booked on an account that was never opened for the run",
    "orphan_position": "an open position that no worker holds",
    "lost_position": "a worker's position that is gone though it never released it",
    "wrong_account": "a position carries another account than it was opened on",
    "unjustified_refusal": "a RiskLimitError whose own numbers do not pass the limit it names",
    "unknown_limit": "a RiskLimitError naming no known limit",
    "torn_books": "an account read whose books do not add up (cash != opening + deposits - "
                  "withdrawals + realized, or reserved without open positions)",
    "version_regression": "an account's version went back between two reads of one worker",
    "price_moved": "the price record of a worker's own position is not the last price it wrote",
    "foreign_change": "a worker's own position changed state under it (a transition it made "
                      "was not APPLIED)",
    "unexpected": "an engine call failed in a way the workload does not allow",
    "stall": "a worker published no progress for a long time (a deadlock?)",
}

#: Positions: entry price and amount uniform in these ranges (any double:
#: the notional's rounding is exercised), side +1 or -1; a mark moves the
#: price within +-MARK_MOVE of the entry.
ENTRY_RANGE = (90.0, 110.0)
AMOUNT_RANGE = (0.5, 10.0)
MARK_MOVE = 0.02
MEAN_NOTIONAL = (sum(ENTRY_RANGE) / 2) * (sum(AMOUNT_RANGE) / 2)


@dataclass(frozen=True)
class AccountTerms:
    """What every shared account is opened with, and the bands the workers
    keep it in (money in units of 1 / SCALE)."""

    cash: int
    max_exposure: int
    max_positions: int
    max_loss: int
    exposure_band: tuple[int, int]      # update_account moves max_exposure within
    positions_band: tuple[int, int]     # ... and max_positions within
    exposure_step: int
    loss_step: int                      # a resume sets max_loss to -realized + this
    cash_step: int                      # a deposit or withdrawal is 1 .. this units

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("cash", "max_exposure", "max_loss", "exposure_step", "loss_step", "cash_step"):
            d[k] = str(from_units(d[k]))
        d["exposure_band"] = [str(from_units(x)) for x in self.exposure_band]
        d["positions_band"] = list(self.positions_band)
        return d


def terms_for(workers: int, inflight: int, accounts: int) -> AccountTerms:
    """The terms of the shared accounts for this many workers.

    ``m`` = workers x inflight / accounts is what one account carries when
    every worker holds all its positions (they hold a little less on
    average; the load of one account spreads by about sqrt(m)).  The limits
    sit about one spread above it, so a refusal needs an account that chance
    has loaded more than its share: count at m + sqrt(m) positions
    (rounded up), exposure at that many mean notionals (moved within 0.8x ..
    1.3x by the workers), cash at 1.15x the exposure (deposits and
    withdrawals keep it near), max_loss at 4% of the cash."""
    m = workers * inflight / accounts
    top = m + math.sqrt(m)
    unit = MEAN_NOTIONAL * SCALE
    exposure = int(top * unit)
    cash = int(exposure * 1.15)
    positions = math.ceil(top)
    return AccountTerms(
        cash=cash, max_exposure=exposure, max_positions=positions,
        max_loss=cash // 25,
        exposure_band=(int(exposure * 0.8), int(exposure * 1.3)),
        positions_band=(max(1, positions - 1), positions + 2),
        exposure_step=max(1, exposure // 10), loss_step=cash // 25,
        cash_step=max(1, cash // 200))


def notional_of(entry: float, amount: float) -> int:
    """The units an opening of ``amount`` at ``entry`` reserves (as C computes it)."""
    return money_of(entry, amount)


def realized_of(entry: float, amount: float, side: int, last: float) -> int:
    """The units C books when a position closes with ``last`` as its price:
    side x (money(last x amount) - money(entry x amount))."""
    diff = money_of(last, amount) - money_of(entry, amount)
    return diff if side > 0 else -diff


def refusal_problem(limit: str, books: Account | None, need: int) -> str | None:
    """Is a RiskLimitError naming ``limit`` justified by the books it carries
    (``e.books``, read under the latch) for an opening of notional ``need``
    units (a withdrawal of ``need`` units for ``cash``)?  None if it is."""
    if limit not in LIMITS:
        return f"RiskLimitError names limit {limit!r}, not one of {LIMITS}"
    if books is None:
        return f"RiskLimitError({limit!r}) carries no books"
    n = from_units(need)
    ok = {
        "halted": books.halted,
        "count": books.open_positions >= books.max_positions,
        "exposure": books.reserved + n > books.max_exposure,
        "cash": n > books.cash - books.reserved,
    }[limit]
    if ok:
        return None
    return (f"refused by {limit!r} for {n}, but its books pass it: cash {books.cash}, "
            f"reserved {books.reserved}, max_exposure {books.max_exposure}, open_positions "
            f"{books.open_positions} of {books.max_positions}, halted {books.halted}")


def books_problem(a: Account) -> str | None:
    """What is wrong with one consistent read of an account on its own (None:
    it adds up): cash == opening cash + deposits - withdrawals + realized, and
    reserved > 0 exactly when positions are open (a notional is >= 1 unit)."""
    want = a.opening_cash + a.deposits - a.withdrawals + a.realized_pnl
    if a.cash != want:
        return (f"account {a.id}: cash {a.cash} != opening {a.opening_cash} + deposits "
                f"{a.deposits} - withdrawals {a.withdrawals} + realized {a.realized_pnl} = {want}")
    if a.reserved < 0 or (a.reserved == 0) != (a.open_positions == 0):
        return (f"account {a.id}: reserved {a.reserved} with {a.open_positions} open "
                "positions")
    return None


@dataclass
class Journal:
    """One account's money as a worker (or all of them) made it move, in units."""

    deposits: int = 0
    withdrawals: int = 0
    realized: int = 0           # sum of the bookings of positions closed on it
    closes: int = 0
    opens: int = 0
    n_deposits: int = 0
    n_withdrawals: int = 0

    def add(self, other: Journal) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(asdict(self).values())

    @classmethod
    def of(cls, values: Iterable[int]) -> Journal:
        return cls(*values)


def _get(rec: Any, name: str) -> Any:
    if isinstance(rec, (Mapping, np.void)):
        return rec[name]
    return getattr(rec, name)


def _signed(diff: Decimal) -> str:
    """A difference of money, plain and in units: ``+0.00000094 = +94 units``."""
    return f"{'+' if diff >= 0 else '-'}{abs(diff):f} = {int(diff * SCALE):+,} units"


@dataclass
class AccountCheck:
    """One account at the end: what the engine says and what it should say
    (``Decimal`` strings in ``as_dict``)."""

    id: int
    cash: Decimal
    want_cash: Decimal
    reserved: Decimal
    want_reserved: Decimal
    realized: Decimal
    want_realized: Decimal
    open_positions: int
    want_open_positions: int
    deposits: Decimal
    withdrawals: Decimal
    halted: bool
    version: int

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in asdict(self).items()}


@dataclass
class BooksReport(Violations):
    """What ``verify_books`` found at the end of a run."""

    accounts: int = 0                           # accounts checked
    positions: int = 0                          # position rows scanned
    open_positions: int = 0                     # ... of them open (holding a reservation)
    checks: list[AccountCheck] = field(default_factory=list)
    by_category: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def verify_books(books: Mapping[int, Account], rows: Iterable[Any],
                 opening_cash: Mapping[int, int], journals: Mapping[int, Journal],
                 held: Mapping[int, int] | None = None, *, complete: bool = True,
                 latched: Mapping[int, int] | None = None,
                 closed_mask: int = int(State.CLOSED)) -> BooksReport:
    """The end-of-run books check, after every worker stopped.

    ``books``: account id -> ``eng.account(id)`` for every account of the run.
    ``rows``: the open positions (``eng.snapshot()`` rows, or mappings with
    ``id``, ``state``, ``account``, ``entry_price``, ``amount``).
    ``opening_cash``: account id -> the cash it was opened with (units).
    ``journals``: account id -> the workers' journals summed (units).
    ``held``: position id -> account id of every position a worker still
    holds (None: not checked); ``complete``: every worker reported (else an
    open position nobody holds is not an orphan).  ``latched``: account id
    -> its latch (``accounts()["latched"]``); non-zero is a violation.
    ``closed_mask``: the one-hot states that hold no reservation.

    Exact: money compares as ``Decimal`` (``from_units``) and notionals are
    recomputed from each row's entry price and amount as C computes them.
    """
    rep = BooksReport()
    want_reserved: dict[int, int] = dict.fromkeys(books, 0)
    want_count: dict[int, int] = dict.fromkeys(books, 0)
    seen: dict[int, int] = {}
    for row in rows:
        rep.positions += 1
        pos, acct = int(_get(row, "id")), int(_get(row, "account"))
        seen[pos] = acct
        if acct == 0:
            if held is not None and pos in held:
                pass        # reported below (wrong_account)
            elif complete:
                rep.add("orphan_position", f"id {pos:#x} is open without an account; no "
                        "worker opened it")
            continue
        if acct not in books:
            rep.add("unknown_account", f"id {pos:#x} is booked on account {acct}, not one of "
                    f"the run's {sorted(books)}")
            continue
        if held is not None and complete and pos not in held:
            rep.add("orphan_position", f"id {pos:#x} (account {acct}) is open, no worker "
                    "holds it")
        if int(_get(row, "state")) & closed_mask:
            continue        # closed: its reservation was released, its PnL booked
        rep.open_positions += 1
        want_reserved[acct] += notional_of(float(_get(row, "entry_price")),
                                           float(_get(row, "amount")))
        want_count[acct] += 1
    if held is not None:
        for pos, acct in held.items():
            if pos not in seen:
                rep.add("lost_position", f"id {pos:#x} (account {acct}) is held by a worker "
                        "but not open")
            elif seen[pos] != acct:
                rep.add("wrong_account", f"id {pos:#x} was opened on account {acct}, its "
                        f"record says {seen[pos]}")

    with decimal.localcontext() as ctx:
        ctx.prec = 60           # exact: int64 units have at most 19 digits
        for acct, a in sorted(books.items()):
            rep.accounts += 1
            j = journals.get(acct, Journal())
            opening = from_units(opening_cash.get(acct, 0))
            dep, wd = from_units(j.deposits), from_units(j.withdrawals)
            real = from_units(j.realized)
            cash = opening + dep - wd + real
            reserved = from_units(want_reserved[acct])
            rep.checks.append(AccountCheck(
                acct, a.cash, cash, a.reserved, reserved, a.realized_pnl, real,
                a.open_positions, want_count[acct], a.deposits, a.withdrawals, a.halted,
                a.version))
            who = f"account {acct}"
            if a.reserved != reserved:
                rep.add("reserved", f"{who}: reserved {a.reserved}, its {want_count[acct]} open "
                        f"positions' notionals sum to {reserved} "
                        f"({_signed(a.reserved - reserved)})")
            if a.open_positions != want_count[acct]:
                rep.add("open_positions", f"{who}: open_positions {a.open_positions}, "
                        f"{want_count[acct]} open positions carry it")
            if a.opening_cash != opening:
                rep.add("opening_cash", f"{who}: opening cash {a.opening_cash}, opened with "
                        f"{opening}")
            if a.realized_pnl != real:
                rep.add("realized", f"{who}: realized {a.realized_pnl}, its {j.closes} closed "
                        f"positions booked {real} ({_signed(a.realized_pnl - real)})")
            for name, got, want, n in (("deposits", a.deposits, dep, j.n_deposits),
                                       ("withdrawals", a.withdrawals, wd, j.n_withdrawals)):
                if got != want:
                    rep.add("money_moved", f"{who}: {name} {got}, the workers' {n} journaled "
                            f"{name} sum to {want} ({_signed(got - want)})")
            if a.cash != cash:
                rep.add("cash", f"{who}: cash {a.cash} != opening {opening} + deposits {dep} - "
                        f"withdrawals {wd} + realized {real} = {cash} "
                        f"({_signed(a.cash - cash)})")
            if latched and latched.get(acct):
                rep.add("latched", f"{who}: latch {latched[acct]:#x} still held")
    return rep


#: Seed 003's bar: 1000 ops/s with p99 below 10 ms.
BAR_OPS_PER_S = 1000.0
BAR_P99_US = 10_000.0


def bar_factor(ops_per_s: float, booked_ops_per_s: float,
               latency: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The run against seed 003's bar: ``factor`` = ops/s / 1000 when the p99
    of both open and close (client side) is below 10 ms, else 0;
    ``booked_factor`` the same over opens + closes alone."""
    p99 = max(latency["open"]["p99_us"], latency["close"]["p99_us"])
    met = (latency["open"]["samples"] > 0 and latency["close"]["samples"] > 0
           and p99 < BAR_P99_US)
    return {"bar_ops_per_s": BAR_OPS_PER_S, "bar_p99_us": BAR_P99_US,
            "p99_open_us": latency["open"]["p99_us"], "p99_close_us": latency["close"]["p99_us"],
            "p99_met": met, "ops_per_s": ops_per_s, "booked_ops_per_s": booked_ops_per_s,
            "factor": ops_per_s / BAR_OPS_PER_S if met else 0.0,
            "booked_factor": booked_ops_per_s / BAR_OPS_PER_S if met else 0.0}
