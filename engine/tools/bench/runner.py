"""Running cases: spawned workers, started together, each timing one workload
on one system; and the host's own figures (idle CPU, a pipe round trip).

What is measured
----------------
Throughput: each worker runs batches of calls in a tight loop (the same loop
for every system: ``op(slot, PAUSE); op(slot, RESUME)``), and stamps
``time.monotonic_ns()`` (system-wide on Linux) when its timed phase starts
and ends; ops/s is all workers' ops divided by the span from the first start
to the last end.  Latency: after every batch, two ops are timed one by one
with ``time.perf_counter_ns()``, and the timer's own cost (the median of an
empty pair of reads, measured in each worker) is subtracted: p50/p99 are
percentiles of those sampled single ops, not of batch means.  Transitions
that lose a race on a shared slot (the state already moved) count as ops;
the fraction that committed is reported beside them.

The C batch workloads (``transition_c``, ``update_price_c``; the engine
only, for the scaling sweep) do ``C_BATCH`` operations per call in one raw
C call, so Python is out of the loop: their ops count every operation of
the batch, and their latency samples are a batch's time divided by
``C_BATCH`` (a mean per operation, not a single one).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.tools.bench.peers import (
    C_BATCH,
    CONNECT,
    HOSTS,
    LABELS,
    PAUSE,
    RESUME,
    Ops,
    Unavailable,
    shared_redis,
    stop_shared_redis,
)

WORKLOADS = ("transition", "update_price", "read_price")
#: The engine's C fast paths, ``C_BATCH`` operations per call (see ``peers.Ops``).
C_WORKLOADS = ("transition_c", "update_price_c")
#: Systems whose ``Ops`` have the C batch forms.
C_SYSTEMS = frozenset({"engine"})
#: The scaling sweep's workloads.
SCALING_WORKLOADS = ("transition", "update_price", *C_WORKLOADS)
TRANSITIONS = frozenset({"transition", "transition_c"})
#: Aim for batches of about this long (fewer timer reads for fast systems).
BATCH_TARGET_NS = 250_000
MAX_PAIRS = 1024
MAX_SAMPLES = 200_000


# ==== the worker =================================================================================
def runs(system: str, workload: str) -> bool:
    """Whether ``system`` has a form of ``workload`` (the C batches: the engine only)."""
    return workload not in C_WORKLOADS or system in C_SYSTEMS


def ops_per_call(workload: str) -> int:
    return C_BATCH if workload in C_WORKLOADS else 1


def _loops(workload: str, ops: Ops, slot: int) -> tuple[Callable[[int], int],
                                                       Callable[[], tuple[int, int, int]]]:
    """(batch(pairs): 2 * pairs calls in a tight loop, single(): two calls
    timed one by one), each also returning how many calls raised one of
    ``ops.busy`` (a bounded wait that ran out: the call is counted, and the
    loop goes on).  The loops are the same for every system, every name in
    them a fast local; a ``try`` costs nothing until something is raised."""
    if workload in C_WORKLOADS:
        c_op = ops.transition_c if workload == "transition_c" else ops.update_price_c
        if c_op is None:
            raise ValueError(f"{workload} has no form on this system")
        op: Callable[..., Any] = c_op
        a: tuple[Any, ...] = (slot, 0)
        b: tuple[Any, ...] = (slot, 0)
    elif workload == "transition":
        op, a, b = ops.transition, (slot, PAUSE), (slot, RESUME)
    elif workload == "update_price":
        op, a, b = ops.update_price, (slot, 101.5), (slot, 99.5)
    elif workload == "read_price":
        op, a, b = ops.read_price, (slot,), (slot,)
    else:
        raise ValueError(f"unknown workload {workload!r}")
    g: dict[str, Any] = {"rep": itertools.repeat, "pc": time.perf_counter_ns, "op": op,
                         "busy": ops.busy}
    a_src, b_src = ", ".join(map(repr, a)), ", ".join(map(repr, b))
    exec(  # literal arguments: the loop does no variable lookups but the call
        f"def batch(pairs, op=op, rep=rep, busy=busy):\n"
        f"    nb = 0\n"
        f"    for _ in rep(None, pairs):\n"
        f"        try:\n"
        f"            op({a_src})\n"
        f"        except busy:\n"
        f"            nb += 1\n"
        f"        try:\n"
        f"            op({b_src})\n"
        f"        except busy:\n"
        f"            nb += 1\n"
        f"    return nb\n"
        f"def single(op=op, pc=pc, busy=busy):\n"
        f"    nb = 0\n"
        f"    t0 = pc()\n"
        f"    try:\n"
        f"        op({a_src})\n"
        f"    except busy:\n"
        f"        nb += 1\n"
        f"    t1 = pc()\n"
        f"    try:\n"
        f"        op({b_src})\n"
        f"    except busy:\n"
        f"        nb += 1\n"
        f"    return t1 - t0, pc() - t1, nb\n", g)
    return g["batch"], g["single"]


def _timer_overhead_ns() -> int:
    """Median cost of an empty ``perf_counter_ns()`` pair (subtracted from samples)."""
    pc = time.perf_counter_ns
    d = []
    for _ in range(2000):
        t0 = pc()
        d.append(pc() - t0)
    return int(np.median(d))


def _worker(system: str, payload: Any, workload: str, slot: int, budget_ns: int,
            warmup_ns: int, barrier: Any, results: Any) -> None:
    """Attach, warm up and size batches, wait for everyone, run, report."""
    out: dict[str, Any] = {"slot": slot, "pid": os.getpid()}
    ops: Ops | None = None
    mult = ops_per_call(workload)
    try:
        ops = CONNECT[system](payload)
        batch, single = _loops(workload, ops, ops.key(slot))
        out["timer_overhead_ns"] = _timer_overhead_ns()
        pairs, end, warm = 1, time.monotonic_ns() + warmup_ns, 0
        while True:
            t0 = time.perf_counter_ns()
            batch(pairs)
            took = time.perf_counter_ns() - t0
            single()
            warm += (2 * pairs + 2) * mult
            if took < BATCH_TARGET_NS and pairs < MAX_PAIRS:
                pairs *= 2
            elif time.monotonic_ns() >= end:
                break
        barrier.wait(timeout=120)
        samples: list[int] = []
        n = busy = 0
        mono = time.monotonic_ns
        cpu0 = time.process_time_ns()
        start = mono()
        deadline = start + budget_ns
        while True:
            busy += batch(pairs)
            a, b, nb = single()
            busy += nb
            n += 2 * pairs + 2
            if len(samples) < MAX_SAMPLES:
                samples += (a, b)
            if mono() >= deadline:
                break
        stop = mono()
        n *= mult
        busy *= mult
        if mult > 1:   # a batch's time per operation
            samples = [x // mult for x in samples]
        out.update(ops=n, busy_ops=busy, warmup_ops=warm, t_start=start, t_end=stop, pairs=pairs,
                   cpu_share=(time.process_time_ns() - cpu0) / max(1, stop - start),
                   samples=samples)
    except BaseException as e:  # reported to the parent, which carries on
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc(limit=4)
        barrier.abort()
    finally:
        try:
            if ops is not None:
                ops.close()
        finally:
            results.put(out)


# ==== running cases ==============================================================================
@dataclass
class Case:
    """One measured configuration and what it gave."""

    system: str
    workload: str
    workers: int
    sharing: str                      # "single", "disjoint" or "shared"
    ops: int = 0
    seconds: float = 0.0
    ops_per_s: float = 0.0
    per_worker_ops_per_s: list[float] = field(default_factory=list)
    p50_ns: float = math.nan
    p99_ns: float = math.nan
    samples: int = 0
    committed_fraction: float | None = None
    busy_fraction: float = 0.0        # ops that raised a bounded wait's BusyError
    cpu_share: float = math.nan       # worker CPU time / wall time, mean over workers
    per_worker_cpu_share: list[float] = field(default_factory=list)
    runs_ops_per_s: list[float | None] = field(default_factory=list)   # with --repeat
    error: str | None = None
    latencies: np.ndarray | None = None   # kept for the plots, not in the JSON

    @property
    def label(self) -> str:
        return "1 worker" if self.sharing == "single" else f"{self.workers} {self.sharing}"

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "latencies"}
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _run_case(host: Any, system: str, workload: str, slots: list[int], sharing: str,
              budget_s: float, warmup_s: float) -> Case:
    """Spawn one worker per slot entry, run them together, aggregate."""
    case = Case(system, workload, len(slots), sharing)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(slots))
    results = ctx.Queue()
    before = host.committed(sorted(set(slots))) if workload in TRANSITIONS else 0
    procs = [ctx.Process(target=_worker, name=f"bench-{system}-{i}", daemon=True,
                         args=(system, host.payload(), workload, s, int(budget_s * 1e9),
                               int(warmup_s * 1e9), barrier, results))
             for i, s in enumerate(slots)]
    for p in procs:
        p.start()
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + budget_s + warmup_s + 120
    try:
        while len(got) < len(procs):
            try:
                got.append(results.get(timeout=0.5))
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    case.error = f"worker(s) died with exit code(s) {dead}"
                    break
                if time.monotonic() > deadline:
                    case.error = f"{len(procs) - len(got)} worker(s) did not report in time"
                    break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
        results.close()
    errors = [r["error"] for r in got if "error" in r]
    if errors or case.error:
        case.error = case.error or "; ".join(sorted(set(errors)))
        return case
    case.ops = sum(r["ops"] for r in got)
    case.busy_fraction = sum(r["busy_ops"] for r in got) / max(1, case.ops)
    span = max(r["t_end"] for r in got) - min(r["t_start"] for r in got)
    case.seconds = span / 1e9
    case.ops_per_s = case.ops / case.seconds
    case.per_worker_ops_per_s = [r["ops"] / ((r["t_end"] - r["t_start"]) / 1e9) for r in got]
    mult = ops_per_call(workload)
    lat = np.concatenate([np.asarray(r["samples"], dtype=np.int64)
                          - r["timer_overhead_ns"] // mult for r in got]).clip(min=0)
    case.samples = int(lat.size)
    case.latencies = lat
    if lat.size:
        case.p50_ns, case.p99_ns = (float(x) for x in np.percentile(lat, [50, 99]))
    case.per_worker_cpu_share = [r["cpu_share"] for r in got]
    case.cpu_share = float(np.mean(case.per_worker_cpu_share))
    if workload in TRANSITIONS:   # warm-up transitions commit too
        calls = case.ops + sum(r["warmup_ops"] for r in got)
        case.committed_fraction = (host.committed(sorted(set(slots))) - before) / calls
    return case


def _best_of(repeat: int, host: Any, system: str, workload: str, slots: list[int],
             sharing: str, budget_s: float, warmup_s: float) -> Case:
    """Run a case ``repeat`` times and keep the fastest run: on a shared host
    other load only ever slows a run down."""
    best: Case | None = None
    runs: list[float | None] = []
    for _ in range(repeat):
        c = _run_case(host, system, workload, slots, sharing, budget_s, warmup_s)
        runs.append(None if c.error else c.ops_per_s)
        if best is None or (c.error is None and (best.error or c.ops_per_s > best.ops_per_s)):
            best = c
    assert best is not None
    best.runs_ops_per_s = runs
    return best


def _cases(workers: Sequence[int]) -> list[tuple[int, str]]:
    out = [(1, "single")]
    for n in workers:
        out += [(n, "disjoint"), (n, "shared")]
    return out


def _fmt_rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_ns(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}ms"
    if x >= 1e3:
        return f"{x / 1e3:.1f}us"
    return f"{x:.0f}ns"


# ==== the host ===================================================================================
def _host_idle(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs idle over ``seconds`` (from /proc/stat; None elsewhere)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])    # idle + iowait, all but guest time

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(1, total1 - total0)


def _echo(conn: Any) -> None:
    """Pipe echo server for ``_pipe_round_trip_us`` (module level: spawn imports it)."""
    while (msg := conn.recv_bytes()) != b"q":
        conn.send_bytes(msg)


def _pipe_round_trip_us(n: int = 2000) -> float:
    """One byte there and back through a pipe between two processes: the
    host's cost of waking another process, which Manager and Redis pay on
    every call.  On a VM it is much higher when the other vCPU is idle."""
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_echo, args=(b,), daemon=True)
    p.start()
    try:
        for _ in range(200):
            a.send_bytes(b"x")
            a.recv_bytes()
        t0 = time.perf_counter()
        for _ in range(n):
            a.send_bytes(b"x")
            a.recv_bytes()
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        a.send_bytes(b"q")
        p.join(timeout=5)


# ==== the run ====================================================================================
@dataclass(frozen=True)
class Plan:
    """What one ``bench`` run does (checked by the command line)."""

    seconds: float                      # timed seconds per case
    warmup: float                       # warm-up seconds per case (and process start)
    repeat: int                         # runs per case; the fastest is kept
    quick: bool
    workers: list[int]                  # worker counts of the multi-worker cases
    systems: list[str]
    workloads: list[str]
    layout: list[tuple[int, str]]       # (workers, sharing) of each case: see _cases
    title: str = "side by side"         # what the run is, in its first line

    def workloads_of(self, system: str) -> list[str]:
        """The workloads ``system`` runs (the C batches: the engine only)."""
        return [w for w in self.workloads if runs(system, w)]

    @property
    def total(self) -> int:
        """Cases, over every system and workload."""
        return sum(len(self.workloads_of(s)) for s in self.systems) * len(self.layout)


@dataclass(frozen=True)
class Probe:
    """The host just before the run."""

    idle: float | None                  # share of all CPUs idle (None: unknown)
    pipe_round_trip_us: float           # see _pipe_round_trip_us


@dataclass
class Results:
    """What running every case gave."""

    cases: list[Case] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # system -> why it could not run
    meta: dict[str, Any] = field(default_factory=dict)      # about the systems (Redis version)
    redis_costs: dict[str, Any] | None = None   # engine on Redis vs raw EVALSHA (redis_costs)
    elapsed: float = 0.0                                     # seconds, setups included


def probe_host(plan: Plan) -> Probe:
    """Say what the run will do, and measure and print the host's state."""
    seconds, warmup, repeat, total = plan.seconds, plan.warmup, plan.repeat, plan.total
    idle = _host_idle()
    print(f"engine bench, {plan.title}: {len(plan.systems)} systems x "
          f"{len(plan.workloads)} workloads x {len(plan.layout)} cases"
          f"{f' x {repeat} repeats' if repeat > 1 else ''} = "
          f"{total * repeat} runs of {seconds:g} s (+{warmup:g} s warm-up and "
          f"process start each); {os.cpu_count()} CPUs"
          f"{'' if idle is None else f' ({idle:.0%} idle now)'}, "
          f"Python {platform.python_version()}", flush=True)
    rtt = _pipe_round_trip_us()
    print(f"  pipe round trip between two processes: {rtt:.1f} us (Manager and Redis pay "
          "this on every call)", flush=True)
    if idle is not None and idle < 0.9:
        print("  note: other processes are using the CPUs; multi-worker cases may not get a "
              "CPU per worker (see the cpu column)", flush=True)
    return Probe(idle, rtt)


def announce(plan: Plan) -> None:
    """The first line of a run after the first (the host was probed already)."""
    print(f"engine bench, {plan.title}: {plan.total * plan.repeat} runs of {plan.seconds:g} s "
          f"(+{plan.warmup:g} s warm-up and process start each): workers "
          f"{', '.join(str(n) for n in sorted({n for n, _ in plan.layout}))} on disjoint "
          f"slots and all on one shared slot; {' '.join(plan.systems)}", flush=True)


def _assignments(plan: Plan, system: str) -> list[tuple[str, str, list[int]]]:
    """(workload, sharing, slots) of each case of one system: every case on fresh slots."""
    out = []
    next_slot = 0
    for w in plan.workloads_of(system):
        for n, sharing in plan.layout:
            if sharing == "shared":
                slots = [next_slot] * n
                next_slot += 1
            else:
                slots = list(range(next_slot, next_slot + n))
                next_slot += n
            out.append((w, sharing, slots))
    return out


def run_cases(plan: Plan) -> Results:
    """Every case of every system, a line printed as each ends; systems that
    cannot run here are skipped, and say why.  With both Redis systems, then
    the engine on Redis's cost per call against a raw EVALSHA round trip
    (``redis_costs``).  The Redis systems' shared server is stopped at the end."""
    res = Results()
    done = 0
    t_begin = time.monotonic()
    try:
        for system in plan.systems:
            host = HOSTS[system]()
            try:
                host.setup()
            except Unavailable as e:
                res.skipped[system] = str(e)
                done += len(plan.workloads_of(system)) * len(plan.layout)
                print(f"  {LABELS[system]}: SKIPPED: {e}", flush=True)
                continue
            if system == "redis":
                res.meta["redis_version"] = host.version
            try:
                for w, sharing, slots in _assignments(plan, system):
                    case = _best_of(plan.repeat, host, system, w, slots, sharing, plan.seconds,
                                    plan.warmup)
                    res.cases.append(case)
                    done += 1
                    status = (f"FAILED: {case.error}" if case.error else
                              f"{_fmt_rate(case.ops_per_s):>8s} ops/s  p50 "
                              f"{_fmt_ns(case.p50_ns):>7s}  p99 {_fmt_ns(case.p99_ns):>7s}")
                    print(f"  [{done:2d}/{plan.total}] {w:14s} {LABELS[system]:22s} "
                          f"{case.label:11s} {status}", flush=True)
            finally:
                host.teardown()
        both = {"redis", "engine_redis"}
        if both <= set(plan.systems) and not both & res.skipped.keys():
            from engine.tools.bench import redis_costs

            seconds = max(1.0, 2 * plan.seconds)
            print(f"  engine on Redis: cost per call against a raw EVALSHA round trip "
                  f"({seconds:g} s of interleaved rounds) ...", flush=True)
            try:
                res.redis_costs = redis_costs.measure(shared_redis().port, seconds)
            except Exception as e:   # reported with the rest; the cases stand
                res.redis_costs = {"error": f"{type(e).__name__}: {e}"}
    finally:
        stop_shared_redis()
    res.elapsed = time.monotonic() - t_begin
    return res
