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
The order workload (``--mix orders``) replaces step 3: the segment runs
``ORDER_SPEC`` with two keys per order on a table small enough that slots are
reused constantly (64 by default), and each worker opens orders under unique
client keys, runs them through SUBMIT, ACCEPT, binding an exchange key, fills
applied *by lookup* of that key, cancels and release, while also applying
fills to other workers' recent orders found by key, as a WebSocket handler
would.  Every lookup and every fill is checked against the record it
reached (the order's identity is in its record), and at the end every open
order and key is scanned; see ``engine.tools.stress.orders``.  Links are
logged as above, so the chain check of step 4 applies unchanged.
The account workload (``--mix accounts``) replaces step 3 too: the parent
opens a few shared accounts (``--accounts``, 3 by default) with limits a
little above what the workers' open positions average on one of them, and
each worker opens positions of its own with ``account=`` one of them at
random, marks their prices, moves them through the lifecycle to CLOSED (the
transition that releases the reservation and books realized PnL) and
releases them, while it deposits and withdraws small amounts, moves limits
with ``update_account`` (and halts and resumes accounts) and reads the
books.  A ``RiskLimitError`` is a normal outcome (counted by limit, and
checked against the books it carries).  Every worker journals each money
movement it made and the realized PnL of each of its closes (recomputed
from the position's price record with C's rounding); at the end every
account's books are checked exactly against the open positions and the
journals, and the run is measured against seed 003's bar (1000 ops/s at
p99 < 10 ms); see ``engine.tools.stress.accounts``.  Links are logged as
above.

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
5. The journal, a second and independent witness (``witness``; off with
   ``--no-journal``): the engine is created with its journal, and a
   dedicated process follows it from seq 0 while the workers run (a ring of
   ``witness.STRESS_RING_RECORDS``; a lap, or a follower that does not end,
   is a ``journal_lapped`` violation, never a silent pass).  At the end every
   record is checked: seq 1, 2, 3, ... once each; per slot, the records form
   one chain of moves the spec allows (one generation each, one id per
   opening), as many as the slot's counter and the workers' links, with the
   same states and generations in the same order, ending at the final state
   word and id; per account, the books walked through its records (account
   records, booked opens and closes) equal the account read at the end.  The
   exits workload has no links: its records per trigger must equal the run's
   pauses, resumes, re-arms and fires, and every fire's record must match its
   position's levels.  On Redis each shard's stream is read after the run
   (states in commit order per id; no generations).  The count of records
   checked and any ``journal_*`` violation are in the report and the JSON
   (``verification.journal``).

On Redis (``--url redis://...``, or ``--url auto`` for a private
redis-server started for the run, persistence off, stopped after it) every
step is the same: the workers attach through the handle, which carries the
url, and the server's functions report each commit's generation and states
the way C leaves them in ``eng_seg``, so the chains, counters, torn-read and
totals checks run unchanged.  What has no meaning there is said at the start
and in the result (``notes``): there are no locks to take over and no C
fault switches (``--fault skip-gen`` / ``blind-store`` / ``tear-price`` are refused), and
since no segment gathers per-process metrics, each worker sends its
Engine's sampled round trips with its summary and the latency columns are
those (every call is timed by default there: ``--sample-every 1``).

The package, one module per part: ``mix`` (the workload), ``codec`` (the
links), ``workers`` (a worker process), ``orders`` (the order workload's
rules and checkers) and ``order_workers`` (its worker), ``accounts`` and
``account_workers`` (the same for the account workload), ``runner`` (the parent:
``run_stress``), ``verify`` (the chain checker), ``witness`` (the journal
cross-check, and the chaos runs' ``JournalWitness``), ``config`` (configuration
and results), ``report`` (the tables); the command line is here.  Only
``runner`` and ``workers`` start or are processes: ``verify`` and the
modules it needs import without ``multiprocessing``, so this package loads
``runner`` on first use of ``run_stress`` (see ``__getattr__``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from engine.errors import EngineError
from engine.tools.stress.accounts import BooksReport, verify_books
from engine.tools.stress.codec import LINK_DTYPE, decode_links, encode_links, links_from_words
from engine.tools.stress.config import (
    DEFAULT_ACCOUNT_POSITIONS,
    DEFAULT_ACCOUNTS,
    DEFAULT_ORDER_POSITIONS,
    StressConfig,
    StressResult,
)
from engine.tools.stress.mix import (
    ACCOUNT_FAULTS,
    ACCOUNT_KINDS,
    ACCOUNT_PRESETS,
    FAULTS,
    KINDS,
    LINK_FAULTS,
    ORDER_FAULTS,
    ORDER_KINDS,
    ORDER_PRESETS,
    PRESETS,
    is_account_mix,
    is_order_mix,
    parse_mix,
)
from engine.tools.stress.orders import OrderReport, verify_orders
from engine.tools.stress.report import format_report
from engine.tools.stress.verify import ChainReport, verify_chains

__all__ = [
    "ACCOUNT_KINDS",
    "ACCOUNT_PRESETS",
    "KINDS",
    "LINK_DTYPE",
    "ORDER_KINDS",
    "ORDER_PRESETS",
    "PRESETS",
    "BooksReport",
    "ChainReport",
    "OrderReport",
    "StressConfig",
    "StressResult",
    "add_parsers",
    "decode_links",
    "encode_links",
    "is_account_mix",
    "is_order_mix",
    "links_from_words",
    "parse_mix",
    "run",
    "run_stress",
    "verify_books",
    "verify_chains",
    "verify_orders",
]


def __getattr__(name: str) -> Any:
    """``run_stress``, imported on first use (with it ``multiprocessing`` and the workers)."""
    if name == "run_stress":
        from engine.tools.stress.runner import run_stress

        return run_stress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


#: With --url, unless given: time every call (a round trip dwarfs the timer), and
#: alert above 10 ms (seed 003's bar), not 1 ms
REDIS_SAMPLE_EVERY = 1
REDIS_ALERT_P99_US = 10_000.0


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
    p.add_argument("--positions", type=_positive_int, default=None, metavar="N",
                   help=f"shared slots; fewer means more contention (default: {d.positions}; "
                        f"{DEFAULT_ORDER_POSITIONS} with --mix orders; with --mix accounts "
                        f"{DEFAULT_ACCOUNT_POSITIONS} or twice what the workers hold open, "
                        "whichever is more)")
    p.add_argument("--seconds", type=_positive_float, default=d.seconds, metavar="S",
                   help="run time (default: %(default)s)")
    p.add_argument("--mix", type=_mix, default=d.mix,
                   help="workload: a preset (" + ", ".join(PRESETS) + ") and/or weights like "
                   "'lifecycle=4,pause=2,price=6,batch=1,token=1,read=4,wait=1' (kinds: "
                   + ", ".join(KINDS) + "; default: %(default)s); or 'orders' for the order "
                   "workload (ORDER_SPEC, unique keys, fills applied by lookup, every lookup "
                   "and fill checked against the record it reached), optionally with weights "
                   "of " + ", ".join(ORDER_KINDS) + " (e.g. 'orders,ws=5'); or 'accounts' for "
                   "the account workload (positions opened on a few shared accounts, closed "
                   "with booked PnL, deposits, withdrawals and limit updates; the books "
                   "checked exactly at the end), optionally with weights of "
                   + ", ".join(ACCOUNT_KINDS) + " (e.g. 'accounts,cash=4'); or 'exits' for "
                   "the exits workload (prices that cross stop losses, take profits and "
                   "trailing stops, written every way while positions are paused and "
                   "re-armed; each fire checked for its reason and counted once), optionally "
                   "with weights of tick, batch, token, pause, rearm")
    p.add_argument("--accounts", type=_positive_int, default=DEFAULT_ACCOUNTS, metavar="N",
                   help="shared accounts of --mix accounts (default: %(default)s)")
    p.add_argument("--wait-us", type=float, default=d.wait_timeout * 1e6, metavar="US",
                   help="timeout of each wait_for_change; a wait that sees no commit costs "
                        "this long (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the workers' random choices (default: %(default)s)")
    p.add_argument("--sample-every", type=_power_of_two, default=None, metavar="N",
                   help=f"time one operation in N, a power of two (default: {d.sample_every}; "
                        f"{REDIS_SAMPLE_EVERY} with --url, where timing a call costs little "
                        "beside its round trip)")
    p.add_argument("--alert-p99-us", type=float, default=None, metavar="US",
                   help="alert when an operation's p99 latency exceeds this "
                        f"(default: {d.alert_p99_us:g}; {REDIS_ALERT_P99_US:g} with --url; "
                        "0 turns it off)")
    p.add_argument("--alert-success", type=float, default=d.alert_success, metavar="FRACTION",
                   help="alert when an operation's success rate (applied / attempts) is below "
                        "this (default: off)")
    p.add_argument("--url", metavar="URL",
                   help="run the engine on Redis instead of shared memory: redis://host:port/db "
                        "(also rediss://, unix://, redis+cluster://), or 'auto' to start a "
                        "private redis-server (on a free 127.0.0.1 port, persistence off) for "
                        "the run and stop it after; same workloads and checks, and the "
                        "workers attach through the handle, which carries the url. On Redis "
                        "the latency columns are the workers' sampled server round trips, and "
                        "there are no locks to take over")
    p.add_argument("--json", metavar="PATH", help="also write the figures and verdict as JSON")
    p.add_argument("--quiet", action="store_true",
                   help="print one summary line: no progress, no tables")
    p.add_argument("--no-journal", dest="journal", action="store_false",
                   help="run the engine without its journal, and so without the journal "
                        "cross-check (by default the engine journals and every record is "
                        "checked against the workers' commits, the slots and the books)")
    p.add_argument("--fault", choices=sorted([*FAULTS, *ORDER_FAULTS, *ACCOUNT_FAULTS,
                                              *LINK_FAULTS]),
                   help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``stress`` command: 0 when verified clean, 1 on any violation."""
    from engine.tools.stress.runner import run_stress

    d = StressConfig(workers=1)     # the defaults
    on_redis = args.url is not None
    sample_every = args.sample_every or (REDIS_SAMPLE_EVERY if on_redis else d.sample_every)
    alert = args.alert_p99_us
    if alert is None:
        alert = REDIS_ALERT_P99_US if on_redis else d.alert_p99_us
    config = StressConfig(
        workers=args.workers, positions=args.positions or 0, seconds=args.seconds, mix=args.mix,
        seed=args.seed, sample_every=sample_every, wait_timeout=args.wait_us / 1e6,
        alert_p99_us=alert if alert and alert > 0 else None,
        alert_success=args.alert_success, fault=args.fault, accounts=args.accounts,
        url=args.url, journal=args.journal, progress=None if args.quiet else sys.stderr)
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
        orders = ""
        if res.orders is not None:
            lk, f = res.orders["lookups"], res.orders["fills"]
            orders = (f", {lk['total']:,} lookups (found {lk['found']:,}, none {lk['none']:,}, "
                      f"stale {lk['stale']:,}), {f['applied']:,} fills")
        if res.accounts is not None:
            a, bar = res.accounts, res.accounts["bar"]
            orders = (f", {a['opens']['attempts']:,} opens ({a['opens']['refused']:,} refused: "
                      + ", ".join(f"{k} {n:,}" for k, n in a["refused"]["open"].items())
                      + f"), {a['closes']['closed']:,} closes, p99 open "
                      f"{bar['p99_open_us']:,.0f} us / close {bar['p99_close_us']:,.0f} us, "
                      + (f"{bar['factor']:,.0f}x seed 003's bar" if bar["p99_met"]
                         else "seed 003's p99 bar NOT met")
                      + ", books of "
                      f"{a['final_scan']['accounts']} accounts checked")
        where = f" (engine on Redis at {res.url})" if res.url else ""
        tx = next((r for r in res.table if r["op"] == "transition" and r["samples"]), None)
        p99 = f", transition p99 {tx['p99_us']:,.1f} us" if tx else ""
        j = res.verification.get("journal")
        journal = f", {j['checked']:,} journal records cross-checked" if j else ""
        print(f"stress {status}{where}: {res.ops:,} ops, {res.ops_per_s:,.0f} ops/s{p99}, "
              f"{res.verification['links']:,} links verified{journal}{orders}, "
              f"{res.violations} violations")
        for m in res.violation_messages[:10]:
            print(f"  {m}")
    else:
        print(format_report(res))
    return 0 if res.ok else 1
