"""``python -m engine bench``: the engine side by side with what people use today.

The same three workloads run on every system, in spawned worker processes
that start together (a ``multiprocessing.Barrier``) and run for a fixed time
budget each:

``transition``
    fire PAUSE then RESUME on a slot, over and over (each call one op);
``update_price``
    publish a price, with PnL computed from the position's entry price,
    amount and side, and the record's version bumped;
``read_price``
    read the 5-field price record (price, timestamp, pnl %, pnl $, version)
    consistently.

The systems (the engine; RawArray+Lock, plain and tuned; Manager dicts
under two kinds of lock; atomicshm; Redis; the engine on Redis) are in
``peers``; how a case runs and what is measured, in ``runner``; the tables,
ratios, target verdicts and plots, in ``report``.  With both Redis systems
the run ends by measuring what one call of the engine on Redis costs
against a raw EVALSHA round trip on the same server, and where the time
goes (``redis_costs``).  The command line is here.

Cases: one worker; then for each N in ``--workers``, N workers on disjoint
slots and N workers all on one shared slot.

Before the cases, ``floor`` takes one worker's time apart in one process
(the empty cffi call, argument passing, the C work, the Python wrapper)
beside the peers' same operation: a second, noise-resistant view of the
one-worker ratios, and where the engine's time goes.

``--scaling`` adds a sweep (``scaling``): 1 to ``--scaling-workers``
workers on disjoint slots and all on one shared slot, ``transition`` and
``update_price`` on the engine and the shared-memory peers, and the
engine's C fast paths with Python out of the loop (``transition_c``,
``update_price_c``: what a contended cache line costs by itself), with a
table, plots, and predictions for hosts with more cores.

Reading the numbers: each case reports its workers' CPU share (CPU time /
wall time).  A CPU-bound system below ~90% did not get its CPUs (other load
on the host, or more workers than cores), and the target verdicts say so.
``--repeat K`` keeps the fastest of K runs of every case.  Manager and Redis
pay a cross-process wake-up on every call; the bench measures a pipe round
trip between two processes first and prints it.  On a VM it moves several-
fold with the host's state (11 to 69 us on the same 2-vCPU guest, depending
on whether the other vCPU was halted), and those peers' numbers move with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from engine.tools.bench import floor
from engine.tools.bench.peers import N_SLOTS, SYSTEMS
from engine.tools.bench.report import TARGET_RATIOS, print_report, write_json, write_plots
from engine.tools.bench.runner import (
    SCALING_WORKLOADS,
    WORKLOADS,
    Plan,
    Results,
    _cases,
    announce,
    probe_host,
    run_cases,
)
from engine.tools.bench.scaling import print_scaling, write_scaling_plots

#: The scaling sweep's systems unless --scaling-systems says otherwise.
SCALING_SYSTEMS = ("engine", "value_lock_tuned", "atomicshm")
MAX_SCALING_WORKERS = 16

__all__ = ["add_parsers", "run"]


def _default_workers() -> list[int]:
    cpus = os.cpu_count() or 2
    return sorted({2, min(cpus, 8)}) if cpus > 2 else [2]


def add_parsers(subparsers: Any) -> None:
    """Add the ``bench`` subcommand."""
    p = subparsers.add_parser(
        "bench", help="compare the engine with RawArray+Lock, Manager, atomicshm and Redis, "
                      "and with itself on Redis",
        description="Run the transition, update_price and read_price workloads on the engine "
                    "and on its peers, with one worker and with N spawned workers on disjoint "
                    "and on shared slots; print ops/s, p50/p99 latency and the engine's ratio "
                    "to each peer, and where one worker's time goes (in one process). "
                    "'engine_redis' is the engine on the same private redis-server as the "
                    "'redis' peer; with both, the run ends with the cost of one engine call on "
                    "Redis against a raw EVALSHA round trip (client CPU, server time per call "
                    "from INFO commandstats, and the rest).  --scaling adds a sweep of 1..8 "
                    "workers with plots and predictions for bigger hosts.",
        epilog="Peers that cannot run (redis-server or a package missing) are reported and "
               "skipped. The bench extras: pip install 'engine[bench]'.")
    p.add_argument("--quick", action="store_true",
                   help="short run: 0.5 s per case (well under 3 minutes on 2 cores)")
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="timed seconds per case (default 2, or 0.5 with --quick)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="run every case K times and keep the fastest run (default 1); "
                        "helps on a shared, busy host")
    p.add_argument("--workers", type=int, nargs="+", default=None, metavar="N",
                   help="worker counts for the multi-worker cases "
                        f"(default {' '.join(map(str, _default_workers()))})")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   metavar="SYSTEM", help=f"systems to run (default all: {' '.join(SYSTEMS)})")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                   metavar="WORKLOAD", help=f"workloads (default all: {' '.join(WORKLOADS)})")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the results, ratios and target verdicts as JSON")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="write throughput.png and latency.png, and with --scaling "
                        "scaling_transition.png, scaling_update_price.png and "
                        "scaling_c_fast_path.png (needs matplotlib)")
    p.add_argument("--scaling", action="store_true",
                   help="also run the scaling sweep: 1 to --scaling-workers workers on disjoint "
                        "slots and all on one shared slot, transition and update_price (and "
                        "the engine's C fast paths); 120 cases: about 6 minutes with --quick "
                        "on a busy 2-core host, 15 without")
    p.add_argument("--scaling-only", action="store_true",
                   help="run the scaling sweep and nothing else (implies --scaling)")
    p.add_argument("--scaling-workers", type=int, default=8, metavar="N",
                   help="largest worker count of the sweep (default 8)")
    p.add_argument("--scaling-systems", nargs="+", choices=SYSTEMS, default=None,
                   metavar="SYSTEM",
                   help=f"systems of the sweep (default {' '.join(SCALING_SYSTEMS)})")
    p.add_argument("--durable", action="store_true",
                   help="also measure the journal on disk: durable records/s, flush() "
                        "p50/p99, bytes per transition, and SQLite (WAL) side by side")
    p.add_argument("--durable-only", action="store_true",
                   help="measure the journal on disk and nothing else")
    p.set_defaults(func=run)


def _plan(args: argparse.Namespace) -> Plan:
    """The run the arguments ask for; ``ValueError`` says what is wrong with them."""
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 2.0)
    if not seconds > 0:
        raise ValueError("--seconds must be > 0")
    if args.repeat < 1:
        raise ValueError("--repeat must be >= 1")
    workers = sorted(set(args.workers or _default_workers()))
    if any(n < 2 for n in workers):
        raise ValueError("--workers takes counts >= 2 (one worker always runs)")
    workloads = [w for w in WORKLOADS if w in args.workloads]
    layout = _cases(workers)
    slots_needed = len(workloads) * sum(n for n, _ in layout)
    if slots_needed > N_SLOTS:
        raise ValueError(f"too many workers: the cases need {slots_needed} slots of {N_SLOTS}")
    return Plan(seconds=seconds, warmup=0.1 if args.quick else 0.3, repeat=args.repeat,
                quick=bool(args.quick), workers=workers,
                systems=[s for s in SYSTEMS if s in args.systems], workloads=workloads,
                layout=layout)


def _scaling_plan(args: argparse.Namespace, base: Plan) -> Plan | None:
    """The sweep the arguments ask for, or None; ``ValueError`` says what is wrong."""
    if not (args.scaling or args.scaling_only):
        return None
    top = args.scaling_workers
    if not 2 <= top <= MAX_SCALING_WORKERS:
        raise ValueError(f"--scaling-workers takes 2 .. {MAX_SCALING_WORKERS}")
    chosen = args.scaling_systems or SCALING_SYSTEMS
    layout = _cases(range(2, top + 1))
    slots_needed = len(SCALING_WORKLOADS) * sum(n for n, _ in layout)
    if slots_needed > N_SLOTS:
        raise ValueError(f"too many workers: the sweep needs {slots_needed} slots of {N_SLOTS}")
    return Plan(seconds=base.seconds, warmup=base.warmup, repeat=base.repeat, quick=base.quick,
                workers=list(range(2, top + 1)), systems=[s for s in SYSTEMS if s in chosen],
                workloads=list(SCALING_WORKLOADS), layout=layout, title="scaling sweep")


def run(args: argparse.Namespace) -> int:
    """Run the comparison; 0 when the engine's cases ran, 1 otherwise."""
    try:
        plan = _plan(args)
        sweep = _scaling_plan(args, plan)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if args.durable or args.durable_only:   # the journal on disk (engine/durable/bench.py)
        from engine.durable import bench as durable_bench
        print("\n".join(durable_bench.report_lines(durable_bench.measure(plan.seconds))),
              flush=True)
        if args.durable_only:
            return 0
    compare = not args.scaling_only
    probe = probe_host(plan if compare or sweep is None else sweep)
    res, summary, breakdown = Results(), None, None
    if compare:
        if "engine" in plan.systems and set(floor.FLOOR_WORKLOADS) & set(plan.workloads):
            breakdown = floor.measure(plan.workloads, [p for p in floor.FLOOR_PEERS
                                                       if p in plan.systems],
                                      rounds=60 if plan.quick else 200)
            print("\n".join(floor.report_lines(breakdown, TARGET_RATIOS)), flush=True)
        res = run_cases(plan)
        summary = print_report(plan, res)
    swept, scaling = None, None
    if sweep is not None:
        if compare:
            announce(sweep)
        swept = run_cases(sweep)
        scaling = print_scaling(sweep, swept)
    if args.json:
        write_json(args.json, plan, probe, res, summary, breakdown=breakdown,
                   sweep=sweep, swept=swept, scaling=scaling)
    if args.plots:
        if compare:
            write_plots(args.plots, plan, res.cases)
        if sweep is not None and swept is not None:
            write_scaling_plots(args.plots, sweep, swept.cases)
    ran = res.cases + (swept.cases if swept else [])
    ok = any(c.system == "engine" and c.error is None for c in ran)
    wanted = "engine" in plan.systems or (sweep is not None and "engine" in sweep.systems)
    return 0 if ok or not wanted else 1
