"""``python -m engine bench --journal``: the journal's figures, side by side
with Eclipse iceoryx2 (its official Python binding) in the same run.

Engine (the journal on, ``journal=True`` passed explicitly):

``commit -> subscriber``
    a writer process commits paced bursts (``BURST`` transitions back to
    back, then ``GAP_S`` idle) and a subscriber in another process follows
    ``events()``: busy (it never sleeps: ``spin_us`` past the gap), spinning
    for ``ENG_JOURNAL_SPIN_US`` then sleeping (the default), and sleeping at
    once (``spin_us=0``: every burst's first record is a futex wake).  The
    latency of a record is the subscriber's ``perf_counter_ns`` when the
    Event reaches it minus the writer's just before the call that committed
    it (CLOCK_MONOTONIC: one clock for both processes).
``events/s``
    what one subscriber reads through ``events()`` and through
    ``read_events()`` (numpy rows), from a ring filled first, and
    ``events()`` keeping up with a live writer.
``trigger -> close``
    the README's exit executor in another process, over ``EXECUTOR_IDS``
    positions, three ways: following ``events()``, looping
    ``wait_for_change(pos, 0.01)`` over the ids, and polling ``states(ids)``
    every millisecond.  The main process moves one random position at a time
    to EXIT_PENDING; the latency is the journal's ``ts_ns`` of the
    executor's EXIT_STARTED minus that of the EXIT_PENDING (one clock, read
    in C at each commit).
``scaling``
    transition commits/s of 1 and 2 worker processes on disjoint slots, with
    ``journal=None`` and ``journal=True``.

iceoryx2 (``pip install 'engine[peer]'``; skipped with a message when it is
missing): publish-subscribe of a 40-byte ctypes record with the same bursts;
a busy subscriber (``receive()`` in a loop), one woken by its Listener (the
publisher notifies after each send), and the samples/s one Python publisher
sends.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

__all__ = ["BURST", "GAP_S", "measure", "report_lines"]

#: records per burst, and the idle time between bursts (the issue's pacing)
BURST = 64
GAP_S = 0.002
#: what a busy subscriber passes as spin_us: longer than any gap
BUSY_SPIN_US = 10_000


def _pause(ns: int) -> None:
    """Idle ``ns``: a sleep, or under a millisecond (shorter than the
    kernel's sleep granularity) a busy wait."""
    if ns >= 1_000_000:
        time.sleep(ns / 1e9)
        return
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass


def _pcts(lat_ns: Any) -> dict[str, float]:
    a = np.asarray(lat_ns, dtype=np.float64)
    if a.size == 0:
        return {"p50_us": math.nan, "p99_us": math.nan, "n": 0}
    return {"p50_us": float(np.percentile(a, 50)) / 1e3,
            "p99_us": float(np.percentile(a, 99)) / 1e3, "n": int(a.size)}


def _monitoring(n: int) -> tuple[Any, list[int]]:
    """An engine (journal on, a ring of 2^16) with ``n`` positions in MONITORING."""
    from engine import Engine, Trigger

    eng = Engine.create(capacity=max(n, 4), journal=True, journal_records=1 << 16)
    ids = [eng.open_position(entry_price=100.0, amount=1.0) for _ in range(n)]
    for p in ids:
        eng.transition(p, Trigger.POSITION_OPENED)
    return eng, ids


# -- the engine: commit -> subscriber ------------------------------------------------------
def _engine_subscriber(handle: Any, since: int, count: int, spin_us: float, ready: Any,
                       conn: Any) -> None:
    from engine import Engine

    clock = time.perf_counter_ns
    seqs = np.zeros(count, np.int64)
    at = np.zeros(count, np.int64)
    n = 0
    with Engine.attach(handle) as eng:
        if spin_us < 0:   # busy on read_events(): numpy rows, never a sleep
            ready.set()
            after, end = since, time.monotonic() + 60
            while n < count and time.monotonic() < end:
                rows = eng.read_events(after, max=4096)
                if not len(rows):
                    continue
                k = min(len(rows), count - n)
                at[n:n + k] = clock()
                seqs[n:n + k] = rows["seq"][:k]
                n += k
                after = int(rows["seq"][-1])
        else:
            it = eng.events(since=since, timeout=5.0, spin_us=spin_us)
            ready.set()
            for ev in it:
                at[n] = clock()
                seqs[n] = ev.seq
                n += 1
                if n == count:
                    break
    conn.send((seqs[:n], at[:n]))
    conn.close()


def engine_latency(spin_us: float, bursts: int, burst: int = BURST,
                   gap_s: float = GAP_S) -> dict[str, float]:
    """p50/p99 commit -> subscriber (another process) over paced bursts: it
    follows ``events(spin_us=spin_us)``, or with ``spin_us < 0`` calls
    ``read_events()`` in a loop (busy, numpy rows)."""
    from engine import Trigger

    eng, ids = _monitoring(burst)
    try:
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        rx, tx = ctx.Pipe(duplex=False)
        since = eng.journal_seq
        count = bursts * burst
        proc = ctx.Process(target=_engine_subscriber,
                           args=(eng.handle, since, count, spin_us, ready, tx), daemon=True)
        proc.start()
        tx.close()
        if not ready.wait(60):
            raise RuntimeError("the subscriber did not start")
        time.sleep(0.05)   # it is in its first wait
        clock = time.perf_counter_ns
        t0 = np.zeros(count, np.int64)
        transition = eng.transition
        trig = (int(Trigger.PAUSE), int(Trigger.RESUME))
        k = 0
        gap_ns = int(gap_s * 1e9)
        for b in range(bursts):
            t = trig[b & 1]
            for p in ids[:burst]:
                t0[k] = clock()
                transition(p, t)
                k += 1
            _pause(gap_ns)
        seqs, at = rx.recv() if rx.poll(60) else (np.zeros(0, np.int64),) * 2
        proc.join(10)
        lat = at - t0[seqs - since - 1]
        out = _pcts(lat)
        out["missing"] = count - len(seqs)
        return out
    finally:
        eng.close()
        eng.unlink()


# -- the engine: trigger -> close (an exit executor following the engine) -----------------
#: the positions an executor watches, and the pause between two triggers
EXECUTOR_IDS = 50
EXECUTOR_GAP_S = 0.02
EXECUTOR_WAYS = ("events", "wait_for_change", "states")


def _executor(handle: Any, ids: list[int], since: int, count: int, way: str,
              ready: Any) -> None:
    """Close (EXIT_STARTED) ``count`` positions that reach EXIT_PENDING, found ``way``."""
    from engine import Engine, State, Trigger
    from engine.errors import WaitTimeout

    started = int(Trigger.EXIT_STARTED)
    with Engine.attach(handle) as eng:
        ready.set()
        end = time.monotonic() + 120
        n = 0
        if way == "events":
            for ev in eng.events(since=since, timeout=10.0):
                if ev.kind == "transition" and ev.state is State.EXIT_PENDING:
                    eng.transition(ev.id, started)
                    n += 1
                    if n == count:
                        return
            return
        pending = int(State.EXIT_PENDING)
        while n < count and time.monotonic() < end:
            if way == "wait_for_change":   # a new user's loop: one id at a time
                for pos in ids:
                    with contextlib.suppress(WaitTimeout):
                        eng.wait_for_change(pos, 0.01)
                    if eng.state(pos) is State.EXIT_PENDING:
                        eng.transition(pos, started)
                        n += 1
            else:                          # poll every id's state each millisecond
                for pos, st in zip(ids, eng.states(ids), strict=True):
                    if int(st) == pending:
                        eng.transition(pos, started)
                        n += 1
                time.sleep(0.001)


def executor_latency(way: str, triggers: int, gap_s: float = EXECUTOR_GAP_S) -> dict[str, float]:
    """p50/p99 from a position's EXIT_PENDING to its EXIT_STARTED by an
    executor in another process that finds it ``way`` (see the module)."""
    from engine import State, Trigger

    if way not in EXECUTOR_WAYS:
        raise ValueError(f"way must be one of {EXECUTOR_WAYS}, got {way!r}")
    eng, ids = _monitoring(EXECUTOR_IDS)
    try:
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        since = eng.journal_seq
        proc = ctx.Process(target=_executor, args=(eng.handle, ids, since, triggers, way, ready),
                           daemon=True)
        proc.start()
        if not ready.wait(60):
            raise RuntimeError("the executor did not start")
        time.sleep(0.05)
        rng = np.random.default_rng(7)
        live = list(ids)
        for _ in range(min(triggers, len(live))):
            pos = live.pop(int(rng.integers(len(live))))
            eng.transition(pos, Trigger.EXIT_CONDITION_MET)
            time.sleep(gap_s)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        at: dict[int, int] = {}
        lat = []
        for ev in eng.events(since=since, timeout=0):
            if ev.kind != "transition":
                continue
            if ev.state is State.EXIT_PENDING:
                at[ev.id] = ev.ts_ns
            elif ev.state is State.EXITING and ev.id in at:
                lat.append(ev.ts_ns - at.pop(ev.id))
        out = _pcts(lat)
        out["missing"] = len(at)
        return out
    finally:
        eng.close()
        eng.unlink()


# -- the engine: events per second ---------------------------------------------------------
def engine_read_rate(records: int = 200_000) -> dict[str, float]:
    """Events/s one reader gets from a filled ring: events(), read_events()."""
    from engine import Engine, Trigger

    eng = Engine.create(capacity=1024, journal=True, journal_records=1 << 18)
    try:
        ids = [eng.open_position(entry_price=100.0, amount=1.0) for _ in range(1000)]
        for p in ids:
            eng.transition(p, Trigger.POSITION_OPENED)
        trig = (int(Trigger.PAUSE), int(Trigger.RESUME))
        while eng.journal_seq < records + 2000:
            for p in ids:
                eng.transition(p, trig[0])
                eng.transition(p, trig[1])
        first = eng.journal_seq - records
        best_ev = best_np = math.inf
        for _ in range(3):
            t = time.perf_counter()
            n = 0
            for _ev in eng.events(since=first, timeout=0):
                n += 1
            best_ev = min(best_ev, (time.perf_counter() - t) / n)
            t = time.perf_counter()
            n, after = 0, first
            while True:
                rows = eng.read_events(after, max=4096)
                if not len(rows):
                    break
                n += len(rows)
                after = int(rows["seq"][-1])
            best_np = min(best_np, (time.perf_counter() - t) / n)
        return {"events_per_s": 1 / best_ev, "read_events_per_s": 1 / best_np,
                "bytes_per_record": 256.0}
    finally:
        eng.close()
        eng.unlink()


def _live_reader(handle: Any, since: int, count: int, ready: Any, conn: Any) -> None:
    from engine import Engine
    from engine.errors import JournalLappedError

    with Engine.attach(handle) as eng:
        ready.set()
        n = skipped = 0
        after = since
        t = time.perf_counter()
        while after < since + count:
            try:
                for ev in eng.events(since=after, timeout=5.0, spin_us=BUSY_SPIN_US):
                    n += 1
                    after = ev.seq
                    if after == since + count:
                        break
                else:
                    break   # nothing for 5 s: the writer is gone
            except JournalLappedError as e:   # a whole ring behind: counted, then resumed
                skipped += e.resume_seq - 1 - after
                after = e.resume_seq - 1
        conn.send((n, time.perf_counter() - t, skipped))


def engine_live_rate(seconds: float = 1.0) -> dict[str, float]:
    """events() keeping up with a live writer (transitions from this process):
    commits/s written, events/s read, whether the reader kept up."""
    from engine import Engine, Trigger

    eng = Engine.create(capacity=64, journal=True, journal_records=1 << 20)
    try:
        ids = [eng.open_position(entry_price=100.0, amount=1.0) for _ in range(64)]
        for p in ids:
            eng.transition(p, Trigger.POSITION_OPENED)
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        rx, tx = ctx.Pipe(duplex=False)
        since = eng.journal_seq
        # how many commits one second holds, measured first (no reader yet)
        t = time.perf_counter()
        for _ in range(200):
            for p in ids:
                eng.transition(p, Trigger.PAUSE)
                eng.transition(p, Trigger.RESUME)
        per_s = 200 * 128 / (time.perf_counter() - t)
        since = eng.journal_seq
        rounds = max(1, int(per_s * seconds / 128))
        count = rounds * 128
        proc = ctx.Process(target=_live_reader, args=(eng.handle, since, count, ready, tx),
                           daemon=True)
        proc.start()
        tx.close()
        if not ready.wait(60):
            raise RuntimeError("the reader did not start")
        t = time.perf_counter()
        for _ in range(rounds):
            for p in ids:
                eng.transition(p, Trigger.PAUSE)
                eng.transition(p, Trigger.RESUME)
        wrote = time.perf_counter() - t
        try:
            n, took, skipped = rx.recv() if rx.poll(60) else (0, math.nan, 0)
        except EOFError:   # the reader died: reported, not a crash of the whole section
            n, took, skipped = 0, math.nan, 0
        proc.join(10)
        return {"commits_per_s": count / wrote, "events_per_s": n / took if took else math.nan,
                "read": n, "written": count, "lapped_records": skipped}
    finally:
        eng.close()
        eng.unlink()


# -- scaling: 1 vs 2 workers on disjoint slots ---------------------------------------------
def _scale_worker(handle: Any, pos: int, seconds: float, barrier: Any, conn: Any) -> None:
    from engine import Engine, Trigger

    with Engine.attach(handle) as eng:
        f = eng.transition
        p, r = int(Trigger.PAUSE), int(Trigger.RESUME)
        barrier.wait()
        n = 0
        end = time.perf_counter() + seconds
        t = time.perf_counter()
        while True:
            for _ in range(500):
                f(pos, p)
                f(pos, r)
            n += 1000
            if time.perf_counter() >= end:
                break
        conn.send(n / (time.perf_counter() - t))


def scaling(seconds: float = 1.0) -> dict[str, dict[int, float]]:
    """Transition commits/s (sum over workers) with 1 and 2 worker processes
    on disjoint slots, journal=None and journal=True (best of 2 runs)."""
    from engine import Engine, Trigger

    out: dict[str, dict[int, float]] = {}
    ctx = mp.get_context("spawn")
    for label, kw in (("journal=None", {"journal": None}), ("journal=True", {"journal": True})):
        out[label] = {}
        for workers in (1, 2):
            best = 0.0
            for _ in range(2):
                eng = Engine.create(capacity=8, **kw)
                try:
                    ids = [eng.open_position(entry_price=100.0, amount=1.0)
                           for _ in range(workers)]
                    for p in ids:
                        eng.transition(p, Trigger.POSITION_OPENED)
                    barrier = ctx.Barrier(workers)
                    pipes = [ctx.Pipe(duplex=False) for _ in range(workers)]
                    procs = [ctx.Process(target=_scale_worker,
                                         args=(eng.handle, ids[i], seconds, barrier, pipes[i][1]),
                                         daemon=True) for i in range(workers)]
                    for pr in procs:
                        pr.start()
                    total = sum(rx.recv() for rx, _ in pipes)
                    for pr in procs:
                        pr.join(10)
                    best = max(best, total)
                finally:
                    eng.close()
                    eng.unlink()
            out[label][workers] = best
    return out


# -- iceoryx2 ------------------------------------------------------------------------------
class Record40(ctypes.Structure):
    """The 40-byte record both sides publish: seq, send time, price, pnl, version."""

    _fields_ = [("seq", ctypes.c_uint64), ("t0", ctypes.c_int64), ("price", ctypes.c_double),
                ("pnl", ctypes.c_double), ("version", ctypes.c_uint64)]


def iceoryx2_missing() -> str | None:
    """Why the iceoryx2 side cannot run (None: it can)."""
    try:
        import iceoryx2  # noqa: F401
    except ImportError:
        return ("iceoryx2 is not installed: pip install 'engine[peer]' "
                "(Eclipse iceoryx2's Python binding) to run it beside the journal")
    return None


def _iox_service(iox: Any, node: Any, name: str) -> tuple[Any, Any]:
    svc = (node.service_builder(iox.ServiceName.new(name)).publish_subscribe(Record40)
           .subscriber_max_buffer_size(4096).history_size(0).open_or_create())
    ev = node.service_builder(iox.ServiceName.new(name + "/ev")).event().open_or_create()
    return svc, ev


def _iox_subscriber(name: str, count: int, woken: bool, ready: Any, conn: Any) -> None:
    import iceoryx2 as iox

    iox.set_log_level(iox.LogLevel.Fatal)
    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
    svc, ev = _iox_service(iox, node, name)
    sub = svc.subscriber_builder().create()
    listener = ev.listener_builder().create() if woken else None
    clock = time.perf_counter_ns
    seqs = np.zeros(count, np.int64)
    lat = np.zeros(count, np.int64)
    n = 0
    ready.set()
    deadline = time.monotonic() + 60
    wait = iox.Duration.from_millis(250)
    while n < count and time.monotonic() < deadline:
        if listener is not None:
            listener.timed_wait(wait)
        while True:
            s = sub.receive()
            if s is None:
                break
            rec = s.payload().contents
            lat[n] = clock() - rec.t0
            seqs[n] = rec.seq
            n += 1
            s.delete()
            if n == count:
                break
    conn.send((seqs[:n], lat[:n]))
    conn.close()


def iceoryx2_latency(woken: bool, bursts: int, burst: int = BURST,
                     gap_s: float = GAP_S) -> dict[str, float]:
    """p50/p99 publish -> subscriber in another process over paced bursts:
    busy (``receive()`` in a loop) or woken by its Listener."""
    import iceoryx2 as iox

    iox.set_log_level(iox.LogLevel.Fatal)
    name = f"engine-bench/{os.getpid()}/{time.monotonic_ns()}"
    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
    svc, ev = _iox_service(iox, node, name)
    pub = svc.publisher_builder().create()
    notifier = ev.notifier_builder().create() if woken else None
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    rx, tx = ctx.Pipe(duplex=False)
    count = bursts * burst
    proc = ctx.Process(target=_iox_subscriber, args=(name, count, woken, ready, tx), daemon=True)
    proc.start()
    tx.close()
    if not ready.wait(60):
        raise RuntimeError("the iceoryx2 subscriber did not start")
    pub.update_connections()
    time.sleep(0.05)
    clock = time.perf_counter_ns
    k = 0
    for _ in range(bursts):
        for _ in range(burst):
            k += 1
            sample = pub.loan_uninit()
            sample = sample.write_payload(Record40(k, clock(), 100.0, 0.0, k))
            sample.send()
            if notifier is not None:
                notifier.notify()
        _pause(int(gap_s * 1e9))
    seqs, lat = rx.recv() if rx.poll(60) else (np.zeros(0, np.int64),) * 2
    proc.join(10)
    out = _pcts(lat)
    out["missing"] = count - len(seqs)
    return out


def iceoryx2_send_rate(samples: int = 100_000) -> float:
    """Samples/s one Python publisher sends (loan, write the record, send),
    with a subscriber connected (best of 3)."""
    import iceoryx2 as iox

    iox.set_log_level(iox.LogLevel.Fatal)
    name = f"engine-bench/{os.getpid()}/{time.monotonic_ns()}/rate"
    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
    svc, _ev = _iox_service(iox, node, name)
    pub = svc.publisher_builder().create()
    sub = svc.subscriber_builder().create()
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for k in range(samples):
            sample = pub.loan_uninit()
            sample = sample.write_payload(Record40(k, 0, 100.0, 0.0, k))
            sample.send()
            if k & 1023 == 1023:   # the subscriber's buffer drained now and then
                while (s := sub.receive()) is not None:
                    s.delete()
        best = min(best, time.perf_counter() - t)
        while (s := sub.receive()) is not None:
            s.delete()
    return samples / best


def engine_commit_rate(commits: int = 100_000) -> float:
    """Transitions/s one Python process commits with the journal on (each a
    record any subscriber can read: the engine's "samples/s")."""
    from engine import Engine, Trigger

    eng = Engine.create(capacity=8, journal=True)
    try:
        pos = eng.open_position(entry_price=100.0, amount=1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        f, p, r = eng.transition, int(Trigger.PAUSE), int(Trigger.RESUME)
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(commits // 2):
                f(pos, p)
                f(pos, r)
            best = min(best, time.perf_counter() - t)
        return commits / best
    finally:
        eng.close()
        eng.unlink()


# -- the section ---------------------------------------------------------------------------
def measure(quick: bool = False) -> dict[str, Any]:
    """Every figure of the section, in one run (about a minute; 20 s quick)."""
    from engine._native import lib

    bursts = 60 if quick else 300
    out: dict[str, Any] = {"burst": BURST, "gap_us": GAP_S * 1e6, "bursts": bursts,
                           "spin_us_default": int(lib.ENG_JOURNAL_SPIN_US)}
    eng: dict[str, Any] = {
        "busy": engine_latency(BUSY_SPIN_US, bursts),
        "busy_rows": engine_latency(-1, bursts),
        "spin": engine_latency(lib.ENG_JOURNAL_SPIN_US, bursts),
        "sleep": engine_latency(0, bursts),
    }
    eng.update(engine_read_rate(50_000 if quick else 200_000))
    eng["live"] = engine_live_rate(0.5 if quick else 1.0)
    eng["commits_per_s"] = engine_commit_rate(50_000 if quick else 200_000)
    eng["executor"] = {way: executor_latency(way, 20 if quick else EXECUTOR_IDS)
                       for way in EXECUTOR_WAYS}
    out["engine"] = eng
    missing = iceoryx2_missing()
    if missing:
        out["iceoryx2"] = {"skipped": missing}
    else:
        out["iceoryx2"] = {"busy": iceoryx2_latency(False, bursts),
                           "woken": iceoryx2_latency(True, bursts),
                           "samples_per_s": iceoryx2_send_rate(50_000 if quick else 200_000)}
    out["scaling"] = scaling(0.5 if quick else 1.0)
    return out


def _us(x: float) -> str:
    return "-" if x != x else f"{x:.1f} us"


def report_lines(res: dict[str, Any]) -> list[str]:
    """The section as printed: the journal beside iceoryx2, then scaling."""
    e, i = res["engine"], res["iceoryx2"]
    lines = [f"\njournal vs iceoryx2 (another process; paced bursts of {res['burst']}, "
             f"{res['gap_us']:.0f} us apart, {res['bursts']} bursts)",
             f"  {'':44} {'p50':>10} {'p99':>10}"]

    def row(label: str, d: dict[str, float]) -> None:
        lines.append(f"  {label:44} {_us(d['p50_us']):>10} {_us(d['p99_us']):>10}"
                     + (f"  ({d['missing']} not received)" if d.get("missing") else ""))

    row("engine: commit -> busy subscriber, events()", e["busy"])
    row("engine: commit -> busy subscriber, read_events()", e["busy_rows"])
    row(f"engine: spin {res['spin_us_default']} us, then sleep (default)", e["spin"])
    row("engine: commit -> sleeping subscriber", e["sleep"])
    if "skipped" in i:
        lines.append(f"  iceoryx2: skipped: {i['skipped']}")
    else:
        row("iceoryx2: publish -> busy subscriber", i["busy"])
        row("iceoryx2: publish -> Listener-woken subscriber", i["woken"])
    lines.append(f"  engine: events() reads {e['events_per_s'] / 1e6:.2f} M events/s, "
                 f"read_events() {e['read_events_per_s'] / 1e6:.2f} M/s (a filled ring); "
                 f"live: writer {e['live']['commits_per_s'] / 1e6:.2f} M commits/s, "
                 f"reader {e['live']['events_per_s'] / 1e6:.2f} M events/s "
                 f"({e['live']['read']} of {e['live']['written']}, "
                 f"{e['live'].get('lapped_records', 0)} lapped)")
    lines.append(f"  one Python publisher: engine {e['commits_per_s'] / 1e3:.0f} k commits/s "
                 "(each one journaled)"
                 + ("" if "skipped" in i else
                    f", iceoryx2 {i['samples_per_s'] / 1e3:.0f} k samples/s"))
    lines.append(f"  {e['bytes_per_record']:.0f} bytes per record")
    lines.append(f"trigger -> close: EXIT_PENDING -> an executor's EXIT_STARTED "
                 f"({EXECUTOR_IDS} positions, another process; journal ts_ns)")
    for way, d in e.get("executor", {}).items():
        row(f"  executor following {way}()", d)
    lines.append("scaling: transition commits/s on disjoint slots (sum over worker processes)")
    for label, by in res["scaling"].items():
        one, two = by.get(1, math.nan), by.get(2, math.nan)
        lines.append(f"  {label:14} 1 worker {one / 1e6:.2f} M/s, 2 workers {two / 1e6:.2f} M/s "
                     f"(x{two / one:.2f})")
    return lines
