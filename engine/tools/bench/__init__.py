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
under two kinds of lock; atomicshm; Redis) are in ``peers``; how a case
runs and what is measured, in ``runner``; the tables, ratios, target
verdicts and plots, in ``report``.  The command line is here.

Cases: one worker; then for each N in ``--workers``, N workers on disjoint
slots and N workers all on one shared slot.

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
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from engine.tools.bench.peers import HOSTS, LABELS, N_SLOTS, SYSTEMS, Unavailable
from engine.tools.bench.report import _plot, _summary, _table
from engine.tools.bench.runner import (
    WORKLOADS,
    Case,
    _best_of,
    _cases,
    _fmt_ns,
    _fmt_rate,
    _host_idle,
    _pipe_round_trip_us,
)

__all__ = ["add_parsers", "run"]


def _default_workers() -> list[int]:
    cpus = os.cpu_count() or 2
    return sorted({2, min(cpus, 8)}) if cpus > 2 else [2]


def add_parsers(subparsers: Any) -> None:
    """Add the ``bench`` subcommand."""
    p = subparsers.add_parser(
        "bench", help="compare the engine with RawArray+Lock, Manager, atomicshm and Redis",
        description="Run the transition, update_price and read_price workloads on the engine "
                    "and on its peers, with one worker and with N spawned workers on disjoint "
                    "and on shared slots; print ops/s, p50/p99 latency and the engine's ratio "
                    "to each peer.",
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
                   help="write throughput.png and latency.png (needs matplotlib)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the comparison; 0 when the engine's cases ran, 1 otherwise."""
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 2.0)
    if not seconds > 0:
        print("--seconds must be > 0", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("--repeat must be >= 1", file=sys.stderr)
        return 2
    workers = sorted(set(args.workers or _default_workers()))
    if any(n < 2 for n in workers):
        print("--workers takes counts >= 2 (one worker always runs)", file=sys.stderr)
        return 2
    warmup = 0.1 if args.quick else 0.3
    systems = [s for s in SYSTEMS if s in args.systems]
    workloads = [w for w in WORKLOADS if w in args.workloads]
    layout = _cases(workers)
    total = len(systems) * len(workloads) * len(layout)
    slots_needed = len(workloads) * sum(n for n, _ in layout)
    if slots_needed > N_SLOTS:
        print(f"too many workers: the cases need {slots_needed} slots of {N_SLOTS}",
              file=sys.stderr)
        return 2
    idle = _host_idle()
    print(f"engine bench: {len(systems)} systems x {len(workloads)} workloads x "
          f"{len(layout)} cases{f' x {args.repeat} repeats' if args.repeat > 1 else ''} = "
          f"{total * args.repeat} runs of {seconds:g} s (+{warmup:g} s warm-up and "
          f"process start each); {os.cpu_count()} CPUs"
          f"{'' if idle is None else f' ({idle:.0%} idle now)'}, "
          f"Python {platform.python_version()}", flush=True)
    rtt = _pipe_round_trip_us()
    print(f"  pipe round trip between two processes: {rtt:.1f} us (Manager and Redis pay "
          "this on every call)", flush=True)
    if idle is not None and idle < 0.9:
        print("  note: other processes are using the CPUs; multi-worker cases may not get a "
              "CPU per worker (see the cpu column)", flush=True)
    cases: list[Case] = []
    skipped: dict[str, str] = {}
    meta: dict[str, Any] = {}
    done = 0
    t_begin = time.monotonic()
    for system in systems:
        host = HOSTS[system]()
        try:
            host.setup()
        except Unavailable as e:
            skipped[system] = str(e)
            done += len(workloads) * len(layout)
            print(f"  {LABELS[system]}: SKIPPED: {e}", flush=True)
            continue
        if system == "redis":
            meta["redis_version"] = host.version
        try:
            next_slot = 0
            for w in workloads:
                for n, sharing in layout:
                    if sharing == "shared":
                        slots = [next_slot] * n
                        next_slot += 1
                    else:
                        slots = list(range(next_slot, next_slot + n))
                        next_slot += n
                    case = _best_of(args.repeat, host, system, w, slots, sharing, seconds,
                                    warmup)
                    cases.append(case)
                    done += 1
                    status = (f"FAILED: {case.error}" if case.error else
                              f"{_fmt_rate(case.ops_per_s):>8s} ops/s  p50 "
                              f"{_fmt_ns(case.p50_ns):>7s}  p99 {_fmt_ns(case.p99_ns):>7s}")
                    print(f"  [{done:2d}/{total}] {w:12s} {LABELS[system]:22s} "
                          f"{case.label:11s} {status}", flush=True)
        finally:
            host.teardown()
    elapsed = time.monotonic() - t_begin
    print()
    print("\n".join(_table(cases, systems, workloads, layout)))
    print("cpu = worker CPU time / wall time: below ~90% a worker was waiting (on a lock, a "
          "server, or for a CPU\ntaken by other processes), so its case under-states what "
          "the system can do with free cores.\n")
    summary = _summary(cases, systems, workers, skipped)
    print("engine ops/s / peer ops/s, transition, 1 worker:")
    for p, r in summary["ratios"].items():
        if p in systems:
            print(f"  {LABELS[p]:22s} {'-' if r is None else f'{r:.2f}x'}"
                  f"{'  (' + skipped[p] + ')' if p in skipped else ''}")
    print("targets (reported, not asserted):")
    for t in summary["targets"]:
        v = t["value"]
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {t['target']:58s} {'-' if v is None else f'{v:8.2f}x'}  {verdict}"
              f"{'  ' + t['note'] if t['note'] else ''}")
    print(f"total {elapsed:.0f} s")
    if args.json:
        doc = {
            "meta": {"python": platform.python_version(), "platform": platform.platform(),
                     "cpus": os.cpu_count(), "seconds_per_case": seconds,
                     "warmup_seconds": warmup, "workers": workers, "quick": bool(args.quick),
                     "repeat": args.repeat,
                     "engine_metrics": "on, latency sampled 1 in 64 (the default)",
                     "latency": "sampled single ops (2 per batch), perf_counter_ns, timer "
                                "overhead subtracted per worker",
                     "elapsed_seconds": elapsed, "host_idle_before": idle,
                     "pipe_round_trip_us": rtt,
                     "load_average_after": os.getloadavg()[0], **meta},
            "ratios": summary["ratios"],
            "ratios_all": summary["ratios_all"],
            "scaling": summary["scaling"],
            "targets": summary["targets"],
            "skipped": skipped,
            "results": [c.as_dict() for c in cases],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    if args.plots:
        try:
            for path in _plot(cases, systems, workloads, layout, args.plots):
                print(f"plot written to {path}")
        except ImportError:
            print("matplotlib is not installed (pip install 'engine[bench]'): no plots written")
    ok = any(c.system == "engine" and c.error is None for c in cases)
    return 0 if ok or "engine" not in systems else 1
