"""What every stress worker shares: the RESULTS indices, the schedule loop,
the common summary fields and the spawned process's main (attach, report
ready, wait at the gate, run, report, close).  The workers themselves are in
``workers`` (positions), ``order_workers`` and ``account_workers``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from array import array
from collections.abc import Callable, Iterable
from typing import Any

import posix_ipc

from engine._native import lib
from engine.core import Engine
from engine.store.redis import RedisStore
from engine.tools.stress.codec import LinkLog
from engine.tools.stress.mix import RESULTS

CHECK_EVERY = 256           # ops between a worker's stop checks and count publishing
MESSAGES_PER_CATEGORY = 5   # messages a categorizing worker keeps per violation category

#: Indices into RESULTS: what an operation returns.
OK, INVALID, CONFLICT, NOT_OPEN, BUSY, FULL, TIMEOUT, UNEXPECTED = range(len(RESULTS))
assert (OK, INVALID, CONFLICT) == (lib.ENG_APPLIED, lib.ENG_INVALID, lib.ENG_CONFLICT)


class BaseWorker:
    """One process's share of a workload: ``kinds`` names its operations.

    A subclass sets ``kinds`` (and ``rng_salt``), fills ``self.ops`` and
    implements ``stepper`` (how one scheduled op is run) and ``extra_summary``.
    ``plan`` must have ``index``, ``weights`` and ``max_seconds``.
    """

    kinds: tuple[str, ...] = ()
    rng_salt = 0

    def __init__(self, eng: Engine, plan: Any, log: LinkLog) -> None:
        self.eng = eng
        self.plan = plan
        self.log = log
        self.record = log.record
        self.rng = random.Random(plan.seed * 1_000_003 + plan.index + self.rng_salt)
        self.counts = [0] * (len(self.kinds) * len(RESULTS))
        self.kind_ops = [0] * len(self.kinds)
        self.messages: list[str] = []

    def stepper(self) -> Callable[[int, int], int]:
        """A function running scheduled op ``k`` as step ``i`` and returning its
        RESULTS index (called once, after the schedule is drawn)."""
        raise NotImplementedError

    def extra_summary(self) -> dict[str, Any]:
        """The workload's own summary fields ("releases" first)."""
        raise NotImplementedError

    def run(self, shared: Any, stop: Any) -> tuple[int, int]:
        """Run until the stop flag; publish counts every ``CHECK_EVERY`` ops.
        Returns (start, end) CLOCK_MONOTONIC ns."""
        plan = self.plan
        schedule = self.rng.choices(range(len(self.kinds)), weights=plan.weights, k=4096)
        step = self.stepper()
        counts, kind_ops = self.counts, self.kind_ops
        nres = len(RESULTS)
        row = plan.index * len(self.kinds)
        t0 = time.monotonic_ns()
        deadline = time.monotonic() + plan.max_seconds
        i = 0
        while not stop.value and time.monotonic() < deadline:
            for _ in range(CHECK_EVERY):
                k = schedule[i & 4095]
                counts[k * nres + step(k, i)] += 1
                kind_ops[k] += 1
                i += 1
            shared[row:row + len(self.kinds)] = kind_ops
        return t0, time.monotonic_ns()

    def summary(self, t0: int, t1: int) -> dict[str, Any]:
        nres = len(RESULTS)
        return {
            "index": self.plan.index, "pid": os.getpid(), "start_ns": t0, "end_ns": t1,
            "counts": {k: dict(zip(RESULTS, self.counts[j * nres:(j + 1) * nres], strict=True))
                       for j, k in enumerate(self.kinds)},
            "applied": self.log.count, **self.extra_summary(),
            "messages": self.messages,
        }


class SampledWorker(BaseWorker):
    """A worker that counts into named counters, keeps a few messages per
    violation category, and times one op in ``plan.sample_every`` (a power of
    two) into per-client-op latency samples."""

    counters: Iterable[str] = ()
    client_ops: Iterable[str] = ()
    always_timed: frozenset[str] = frozenset()
    releases_counter = "releases"

    def __init__(self, eng: Engine, plan: Any, log: LinkLog) -> None:
        super().__init__(eng, plan, log)
        self.c = dict.fromkeys(self.counters, 0)
        self.lat = {op: array("q") for op in self.client_ops}
        self.timing = False
        self.noted: dict[str, int] = {}
        self.ops: list[Callable[[], int]] = []

    def note(self, category: str, message: str) -> int:
        """Count a violation of ``category`` and keep the first few messages."""
        self.c[category] += 1
        n = self.noted.get(category, 0)
        if n < MESSAGES_PER_CATEGORY:
            self.noted[category] = n + 1
            self.messages.append(f"{category}: worker {self.plan.index}: {message}")
        return UNEXPECTED

    def call(self, op: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)``, timed into ``op``'s samples when this op is
        sampled (or ``op`` is always timed)."""
        if not (self.timing or op in self.always_timed):
            return fn(*args, **kw)
        t0 = time.perf_counter_ns()
        try:
            return fn(*args, **kw)
        finally:
            self.lat[op].append(time.perf_counter_ns() - t0)

    def stepper(self) -> Callable[[int, int], int]:
        ops, mask = self.ops, self.plan.sample_every - 1

        def step(k: int, i: int) -> int:
            self.timing = (i & mask) == 0
            return ops[k]()
        return step

    def extra_summary(self) -> dict[str, Any]:
        return {"releases": self.c[self.releases_counter], "counters": dict(self.c),
                "latency": {op: a.tobytes() for op, a in self.lat.items()}}


def worker_main(cls: type[BaseWorker], plan: Any, shared: Any, stop: Any, ready: Any,
                results: Any, *extra: Any) -> None:
    """Spawned worker ``cls(eng, plan, log, *extra)``: attach, report ready,
    wait at the gate, run, report.

    On Redis (the handle has a url) each Engine samples its own round trips
    and no segment gathers them: the worker sets its sampling period and
    sends its samples with its summary (``engine_latency``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent decides when to stop
    eng = Engine.attach(plan.handle)
    try:
        if eng.url is not None:
            eng.set_metrics(True, plan.sample_every)
        log = LinkLog(eng, plan.log_path, plan.base_ns)
        worker = cls(eng, plan, log, *extra)
        gate = posix_ipc.Semaphore(plan.gate)
        try:
            ready.put(("ready", plan.index))
            gate.acquire(plan.max_seconds)
        finally:
            gate.close()
        t0, t1 = worker.run(shared, stop)
        log.close()
        summary = worker.summary(t0, t1)
        if isinstance(eng.store, RedisStore):   # (shared memory: in the segment's shards)
            hist, max_ns = eng.store.latency()
            summary["engine_latency"] = (hist.tobytes(), max_ns)
        results.put(("done", summary))
    except BaseException as e:
        results.put(("error", {"index": plan.index, "error": repr(e)}))
        raise
    finally:
        eng.close()
