"""A process whose CLOCK_REALTIME is stepped and slewed while it writes prices.

An LD_PRELOAD shim around clock_gettime (SHIM_C, compiled by build_shim)
adds an offset to CLOCK_REALTIME that clockshim_step() (a step) and
clockshim_slew() (a rate, as adjtime slews) change at run time: one process
sees an NTP step or a VM resume, the host clock is untouched, and
CLOCK_MONOTONIC stays as it was (so it times the steps).  Run as a script
under the shim (run_child), this module hammers the price clock from many
threads while its main thread (and, for a step inside a thread's first rate
measurement, the thread itself) steps the clock both ways, checks every
timestamp, and prints what it found as one JSON line.

What it checks (the promise of "price timestamps" in native/engine.h):
- a call that starts later than an anchor life and a quarter after a step
  returns a timestamp within ERR_NS of the (stepped) CLOCK_REALTIME read
  around it; a slew is no step: that holds all through it;
- a thread's timestamps never go back, except across steps back of the real
  clock, and then by no more than those steps plus ERR_NS.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <time.h>

/* CLOCK_REALTIME here = the real one + base + (real - since) * ppm / 1e6,
 * the three words under a seqlock (one writer: the test's main thread) */
typedef int (*gettime_fn)(clockid_t, struct timespec *);
static gettime_fn real_gettime;
static unsigned seq;
static int64_t base, since, ppm;

static int real_clock(clockid_t clk, struct timespec *ts)
{
    gettime_fn f = __atomic_load_n(&real_gettime, __ATOMIC_ACQUIRE);
    if (!f) {
        f = (gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
        __atomic_store_n(&real_gettime, f, __ATOMIC_RELEASE);
    }
    return f(clk, ts);
}

static int64_t real_ns(void)
{
    struct timespec ts;
    real_clock(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t offset_at(int64_t now, int64_t b, int64_t t0, int64_t p)
{
    return b + (int64_t)((__int128)(now - t0) * p / 1000000);
}

static void set_offset(int64_t step, int64_t new_ppm)
{
    int64_t now = real_ns();
    int64_t b = offset_at(now, base, since, ppm) + step;
    __atomic_store_n(&seq, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&base, b, __ATOMIC_RELAXED);
    __atomic_store_n(&since, now, __ATOMIC_RELAXED);
    __atomic_store_n(&ppm, new_ppm, __ATOMIC_RELAXED);
    __atomic_store_n(&seq, seq + 1, __ATOMIC_RELEASE);
}

/* a step of CLOCK_REALTIME by delta_ns (the slew goes on) */
void clockshim_step(int64_t delta_ns) { set_offset(delta_ns, ppm); }

/* from now on CLOCK_REALTIME runs new_ppm parts per million fast (slow if < 0) */
void clockshim_slew(int64_t new_ppm) { set_offset(0, new_ppm); }

int clock_gettime(clockid_t clk, struct timespec *ts)
{
    int rc = real_clock(clk, ts);
    if (rc == 0 && clk == CLOCK_REALTIME) {
        int64_t ns = (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
        unsigned s0, s1;
        int64_t b, t0, p;
        do {
            s0 = __atomic_load_n(&seq, __ATOMIC_ACQUIRE);
            b = __atomic_load_n(&base, __ATOMIC_RELAXED);
            t0 = __atomic_load_n(&since, __ATOMIC_RELAXED);
            p = __atomic_load_n(&ppm, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            s1 = __atomic_load_n(&seq, __ATOMIC_RELAXED);
        } while ((s0 & 1) || s0 != s1);
        ns += offset_at(ns, b, t0, p);
        ts->tv_sec = ns / 1000000000;
        ts->tv_nsec = ns % 1000000000;
    }
    return rc;
}
"""

ERR_NS = 5_000                      # the bound of tests/test_price_clock.py
STEP_BURSTS_NS = [[1_000_000], [5_000_000], [-1_000_000], [-5_000_000], [1_000_000_000],
                  [-1_000_000_000], [3_000], [-3_000], [1_000], [-1_000], [-1_000_000], [1_000_000],
                  [2_000_000, -2_000_000, 1_000_000, -3_000_000]]   # the last, back to back
LATE_STEPS_NS = [200_000, 500_000, -300_000, 200_000]
SLEWS_PPM = [-500, 500, -500, 0, 500, 0]   # adjtime slews at 500 ppm
FAST_SLEW_STEPS = [(100_000, -1_000_000), (-100_000, 1_000_000), (100_000, -3_000),
                   (-100_000, 3_000)]          # (slew ppm, step ns): a step inside a fast slew
CLOCK_THREADS = 4                   # eng_price_clock_ns in a loop, each call timed
TIGHT_THREADS = 2                   # eng_price_clock_ns back to back, TIGHT_BATCH at a time
TIGHT_BATCH = 200
PRICE_THREADS = 2                   # update_price on an Engine of their own, read back
SETTLE_ANCHORS = 4                  # rate baselines every thread runs through after each step
DEADLINE_S = 120.0                  # the whole run, however loaded the host


def build_shim(tmp: Path) -> Path:
    """Compile the shim into tmp; return the .so path."""
    src, so = tmp / "clockshim.c", tmp / "clockshim.so"
    src.write_text(SHIM_C)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(so),
                    str(src), "-ldl"], check=True, capture_output=True)
    return so


def run_child(shim: Path, mode: int, timeout: float = DEADLINE_S + 60,
              slews_ppm: list[int] | None = None) -> dict[str, Any]:
    """Run this module under the shim with price clock `mode`; its JSON verdict.
    With `slews_ppm`: those slews instead of SLEWS_PPM, and no step bursts."""
    # after what is preloaded already (the sanitizers' runtimes must come first)
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), str(shim)]))
    env = {**os.environ, "LD_PRELOAD": preload, "CLOCKSHIM_SO": str(shim)}
    if slews_ppm is not None:
        env["CLOCKSHIM_SLEWS_PPM"] = ",".join(map(str, slews_ppm))
    env.pop("ENGINE_PRICE_CLOCK", None)
    out = subprocess.run([sys.executable, __file__, str(mode)], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    verdict: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return verdict


class Steps:
    """The steps made so far: [mono before, mono after (None while stepping), delta]."""

    def __init__(self, grace_ns: int) -> None:
        self.grace = grace_ns
        self.log: list[list[Any]] = []

    def near(self, m0: int, m1: int) -> list[int]:
        """Deltas of the steps whose [start, end + grace] meets [m0, m1]."""
        far = 1 << 62
        return [d for s0, s1, d in list(self.log)
                if s0 <= m1 and (far if s1 is None else s1 + self.grace) >= m0]


class Watch:
    """One thread's checks of its own timestamps."""

    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.prev: tuple[int, int] | None = None   # (timestamp, mono start) of the last call
        self.last_start = 0
        self.calls = self.checked = 0
        self.stepped_at = 0                          # late threads: mono after their step
        self.ahead = self.behind = self.back = 0     # worst seen outside any grace
        self.bad: list[str] = []

    def see(self, m0: int, a: int, xs: list[int], b: int, m1: int) -> None:
        """Calls that started at mono m0 / real a, returned xs in their order,
        and ended at real b / mono m1."""
        self.calls += len(xs)
        self.last_start = m0
        lo, hi = min(a, b), max(a, b)
        if not self.steps.near(m0, m1):
            self.checked += len(xs)
            self.ahead = max(self.ahead, max(xs) - hi)
            self.behind = max(self.behind, lo - min(xs))
            for x in xs:
                if not lo - ERR_NS <= x <= hi + ERR_NS:
                    self.fail(f"ts {x} outside [{lo - ERR_NS}, {hi + ERR_NS}] "
                              f"({x - hi:+} ns after the calls, {lo - x:+} before)")
        prev = self.prev
        for x in xs:
            if prev is not None and x < prev[0]:
                back = prev[0] - x
                allowed = sum(-d for d in self.steps.near(prev[1], m1) if d < 0)
                self.back = self.back if allowed else max(self.back, back)
                if back > (allowed + ERR_NS if allowed else 0):
                    self.fail(f"went back {back} ns in one thread (steps back of "
                              f"{allowed} ns in all near it)")
            prev = (x, m0)
        self.prev = prev

    def fail(self, what: str) -> None:
        if len(self.bad) < 20:
            self.bad.append(what)


def child(mode: int) -> dict[str, Any]:
    """Hammer the price clock in many threads while stepping CLOCK_REALTIME."""
    from engine import Engine
    from engine._native import lib

    shim = ctypes.CDLL(os.environ["CLOCKSHIM_SO"])
    shim.clockshim_step.argtypes = [ctypes.c_int64]
    shim.clockshim_step.restype = None
    shim.clockshim_slew.argtypes = [ctypes.c_int64]
    shim.clockshim_slew.restype = None
    if lib.eng_price_clock(mode) != mode:
        return {"skip": "the kernel does not keep time with the TSC here"}
    # the shim is in effect: a step moves CLOCK_REALTIME here, and nothing else
    m0, r0 = time.monotonic_ns(), time.time_ns()
    shim.clockshim_step(3_600_000_000_000)
    r1, m1 = time.time_ns(), time.monotonic_ns()
    shim.clockshim_step(-3_600_000_000_000)
    assert 0 <= (r1 - r0) - 3_600_000_000_000 <= (m1 - m0) + 1_000_000, (r0, r1)

    anchor = int(lib.ENG_CLOCK_ANCHOR_NS)
    baseline = int(lib.ENG_CLOCK_RATE_NS)
    sys.setswitchinterval(1e-4)   # threads take turns within an anchor life
    steps = Steps(grace_ns=anchor + anchor // 4)
    stop = threading.Event()
    eng = Engine.create(64)
    watches = [Watch(steps) for _ in range(CLOCK_THREADS + TIGHT_THREADS + PRICE_THREADS)]
    errors: list[str] = []

    def clock_loop(w: Watch) -> None:
        f, mono, real = lib.eng_price_clock_ns, time.monotonic_ns, time.time_ns
        while not stop.is_set():
            m0, a = mono(), real()
            x = f()
            b, m1 = real(), mono()
            w.see(m0, a, [x], b, m1)

    def tight_loop(w: Watch) -> None:
        f, mono, real = lib.eng_price_clock_ns, time.monotonic_ns, time.time_ns
        while not stop.is_set():
            m0, a = mono(), real()
            xs = [f() for _ in range(TIGHT_BATCH)]
            b, m1 = real(), mono()
            w.see(m0, a, xs, b, m1)

    def price_loop(w: Watch) -> None:
        mono, real = time.monotonic_ns, time.time_ns
        with Engine.attach(eng.handle) as mine:
            pos = mine.open_position(100.0, 1.0)
            while not stop.is_set():
                m0, a = mono(), real()
                mine.update_price(pos, 101.0)
                b, m1 = real(), mono()
                w.see(m0, a, [mine.price(pos).timestamp_ns], b, m1)

    def guarded(loop: Any, w: Watch) -> None:
        try:
            loop(w)
        except BaseException as e:
            errors.append(repr(e))
            stop.set()

    loops = ([clock_loop] * CLOCK_THREADS + [tight_loop] * TIGHT_THREADS +
             [price_loop] * PRICE_THREADS)
    threads = [threading.Thread(target=guarded, args=(f, w))
               for f, w in zip(loops, watches, strict=False)]
    deadline = time.monotonic() + DEADLINE_S

    def settle(since: int) -> None:
        """Wait until every thread has started calls SETTLE_ANCHORS rate baselines past `since`
        (each an anchor life or more)."""
        target = since + steps.grace + SETTLE_ANCHORS * max(anchor, baseline)
        while not stop.is_set() and min(w.last_start for w in watches) < target:
            if time.monotonic() > deadline:
                errors.append("threads starved: not every thread ran after a step")
                stop.set()
            time.sleep(0.0005)

    def step(d: int) -> int:
        """Step CLOCK_REALTIME by d, logged; the mono time after it."""
        entry: list[Any] = [time.monotonic_ns(), None, d]
        steps.log.append(entry)
        shim.clockshim_step(d)
        entry[1] = time.monotonic_ns()
        return int(entry[1])

    def late_loop(w: Watch, d: int) -> None:
        f, mono, real = lib.eng_price_clock_ns, time.monotonic_ns, time.time_ns
        born = mono()
        while not stop.is_set():
            m0, a = mono(), real()
            x = f()
            b, m1 = real(), mono()
            w.see(m0, a, [x], b, m1)
            if not w.stepped_at and m1 >= born + baseline // 2:
                w.stepped_at = step(d)

    for t in threads:
        t.start()
    try:
        settle(time.monotonic_ns())
        for burst in STEP_BURSTS_NS:
            for d in burst:
                after = step(d)
            settle(after)
        # slews are no steps: the bound and the order hold all through them
        for ppm in SLEWS_PPM:
            shim.clockshim_slew(ppm)
            settle(time.monotonic_ns())
        shim.clockshim_slew(-500)   # a step in the middle of a slew
        settle(step(1_000_000))
        for ppm, d in FAST_SLEW_STEPS:   # ... and of the fastest slews, both ways
            shim.clockshim_slew(ppm)
            settle(step(d))
        shim.clockshim_slew(0)
        settle(time.monotonic_ns())
        # threads that step the clock themselves half a rate baseline after their
        # first call: the step lands inside their first measurement of the rate
        for d in LATE_STEPS_NS:
            late = Watch(steps)
            watches.append(late)
            born = threading.Thread(target=guarded, args=(lambda w, d=d: late_loop(w, d), late))
            born.start()
            threads.append(born)
            while not late.stepped_at and not stop.is_set():
                if time.monotonic() > deadline:
                    errors.append("a late thread never stepped")
                    stop.set()
                time.sleep(0.0005)
            settle(late.stepped_at)
    finally:
        stop.set()
        for t in threads:
            t.join()
        eng.close()
        eng.unlink()
    return {
        "errors": errors,
        "bad": [b for w in watches for b in w.bad],
        "calls": [w.calls for w in watches],
        "checked": [w.checked for w in watches],
        "worst_ahead_ns": max(w.ahead for w in watches),
        "worst_behind_ns": max(w.behind for w in watches),
        "worst_back_ns": max(w.back for w in watches),
    }


if __name__ == "__main__":
    if os.environ.get("CLOCKSHIM_SLEWS_PPM"):   # run_child(slews_ppm=...)
        SLEWS_PPM = [int(x) for x in os.environ["CLOCKSHIM_SLEWS_PPM"].split(",")]
        STEP_BURSTS_NS, LATE_STEPS_NS = [], []
    print(json.dumps(child(int(sys.argv[1]))))
