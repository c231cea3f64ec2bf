"""Concurrency across processes (spawn context, module-level workers).

Each test states its allowed and forbidden outcomes.  Loops are bounded by
counts (and a generous deadline as a safety net); children are joined with
timeouts and terminated by the `spawner` fixture whatever happens.
"""

from __future__ import annotations

import queue
import time
import traceback
from typing import Any

import pytest
from procs import until

from engine import Engine, Outcome, State, Trigger, WaitTimeout
from engine._native import lib

BACKENDS = ("shm", "redis")
JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)


def blocked_clients(url: str) -> int:
    """Clients the Redis server holds in a blocking command."""
    import redis
    return int(redis.Redis.from_url(url).info("clients")["blocked_clients"])

GEN_SHIFT = lib.ENG_SW_GEN_SHIFT
GEN_MASK = lib.ENG_SW_GEN_MASK
START_TIMEOUT = 120.0     # spawned interpreters may start slowly on a loaded host
RESULT_TIMEOUT = 120.0


def asleep_in_futex(pid: int) -> bool:
    """The process's main thread sleeps in a futex wait (/proc/<pid>/wchan).
    Where the kernel does not tell (wchan unreadable or "0"), only that it sleeps."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state == "S" and ("futex" in wchan or wchan in ("", "0"))


def collect(q: Any, n: int, timeout: float = RESULT_TIMEOUT) -> list[Any]:
    """n results from the children; a child's exception fails the test."""
    out = []
    deadline = time.monotonic() + timeout
    for _ in range(n):
        try:
            item = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"only {len(out)} of {n} children reported within {timeout} s")
        if isinstance(item, tuple) and item and item[0] == "error":
            pytest.fail(f"child failed:\n{item[1]}")
        out.append(item)
    return out


# ---- workers (module level: importable by spawned children) -----------------------
def _pause_resume_worker(handle, pos, max_iterations, seconds, first, start, out) -> None:
    """Alternate PAUSE and RESUME on one slot for `seconds` (at most
    `max_iterations` calls); report the outcomes counted."""
    try:
        with Engine.attach(handle) as eng:
            counts = {"calls": 0, "pause": 0, "resume": 0, "invalid": 0, "conflict": 0,
                      "other": []}
            triggers = (Trigger.PAUSE, Trigger.RESUME) if first == 0 else \
                (Trigger.RESUME, Trigger.PAUSE)
            if not start.wait(START_TIMEOUT):
                raise TimeoutError("start signal never came")
            stop = time.monotonic() + seconds
            for i in range(max_iterations):
                if (i & 1023) == 0 and time.monotonic() > stop:
                    break
                counts["calls"] += 1
                trig = triggers[i & 1]
                outcome = eng.transition(pos, trig)
                if outcome is Outcome.APPLIED:
                    counts["pause" if trig is Trigger.PAUSE else "resume"] += 1
                elif outcome is Outcome.INVALID:
                    counts["invalid"] += 1
                elif outcome is Outcome.CONFLICT:
                    counts["conflict"] += 1
                else:
                    counts["other"].append(outcome.name)
        out.put(("ok", counts))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _price_writer(handle, pos, base, step, max_n, seconds, ready, start, out) -> None:
    """Publish strictly increasing prices base + i*step (exact binary fractions),
    i = 1, 2, ... for `seconds` (at most `max_n`); report how many."""
    try:
        with Engine.attach(handle) as eng:
            ready.set()
            if not start.wait(START_TIMEOUT):
                raise TimeoutError("start signal never came")
            stop = time.monotonic() + seconds
            written = 0
            for i in range(1, max_n + 1):
                if (i & 1023) == 0 and time.monotonic() > stop:
                    break
                eng.update_price(pos, base + i * step)
                written = i
        out.put(("writer", pos, written))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _check_price(p, prev, ctx, base, step, n) -> str | None:
    """The reader's rules; returns a description of the first one broken."""
    diff = p.price - ctx.entry_price
    if p.pnl_pct != diff / ctx.entry_price * 100.0 * float(ctx.side):
        return f"pnl_pct {p.pnl_pct!r} is not the formula on price {p.price!r}"
    if p.pnl_usd != diff * ctx.amount * float(ctx.side):
        return f"pnl_usd {p.pnl_usd!r} is not the formula on price {p.price!r}"
    k = (p.price - base) / step
    if k != int(k) or not 0 <= k <= n:
        return f"price {p.price!r} was never written"
    if prev is not None:
        if p.version < prev.version:
            return f"version went back {prev.version} -> {p.version}"
        if p.version == prev.version and p != prev:
            return f"same version {p.version}, different record {prev} / {p}"
        if p.version > prev.version and p.price <= prev.price:
            return f"price did not increase with version: {prev} -> {p}"
    return None


def _price_reader(handle, slots, bases, step, n, ready, start, done, out) -> None:
    """Read prices while writers run; count records that break a rule."""
    try:
        with Engine.attach(handle) as eng:
            ctxs = {s: eng.context(s) for s in slots}
            last = {s: eng.price(s) for s in slots}
            versions = {s: {last[s].version} for s in slots}
            reads = violations = 0
            examples: list[str] = []

            def check(s: int) -> None:
                nonlocal reads, violations
                p = eng.price(s)
                reads += 1
                why = _check_price(p, last[s], ctxs[s], bases[s], step, n)
                if why:
                    violations += 1
                    if len(examples) < 5:
                        examples.append(f"slot {s}: {why}")
                last[s] = p
                versions[s].add(p.version)

            ready.set()
            if not start.wait(START_TIMEOUT):
                raise TimeoutError("start signal never came")
            deadline = time.monotonic() + 60.0   # safety net; `done` ends the loop
            i = 0
            while True:
                if (i & 255) == 0 and (done.is_set() or time.monotonic() > deadline):
                    break
                check(slots[i % len(slots)])
                i += 1
            for s in slots:                      # after the writers: the last record
                check(s)
        out.put(("reader", reads, violations, examples,
                 {s: len(v) for s, v in versions.items()}))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _waiter(handle, pos, timeout, ready, out) -> None:
    """Block in wait_for_change; report the state it woke with (or the timeout)."""
    try:
        with Engine.attach(handle) as eng:
            ready.set()
            t0 = time.monotonic()
            try:
                state = eng.wait_for_change(pos, timeout=timeout)
                out.put(("woke", state.name, time.monotonic() - t0))
            except WaitTimeout:
                out.put(("timeout", None, time.monotonic() - t0))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _guarded_worker(handle, pos, out) -> None:
    """Attach with a handle that carries a custom spec; fire its guarded rule."""
    try:
        with Engine.attach(handle) as eng:
            rejected = eng.transition(pos, "EXECUTE")       # price at entry: guard says no
            eng.update_price(pos, eng.context(pos).entry_price * 2)
            applied = eng.transition(pos, "EXECUTE")
            out.put(("guarded", rejected.name, applied.name, eng.state(pos).name))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def above_entry(ctx, price) -> bool:
    return price.price > ctx.entry_price


# ---- tests ------------------------------------------------------------------------
class TestPauseResumeRace:
    WORKERS = 4
    MAX_ITERATIONS = 2_000_000
    SECONDS = 2.0

    def test_racing_pause_resume_is_linearizable(self, make_engine, spawner):
        """4 processes racing PAUSE/RESUME on one slot for 2 s keep it consistent.

        Allowed: APPLIED, INVALID or CONFLICT per call.  Forbidden: applied
        pauses minus applied resumes outside {0, 1}; a final state other than
        PAUSED when that difference is 1 (MONITORING when 0); a transition
        counter or generation that differs from the 2 commits before the race
        (open, POSITION_OPENED) plus the applied transitions."""
        eng = make_engine(capacity=4)
        pos = eng.open_position(100.0, 1.0)
        assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
        assert int(eng.snapshot()["transitions"][0]) == 2
        ctx = spawner.ctx
        start, out = ctx.Event(), ctx.Queue()
        for k in range(self.WORKERS):
            spawner.start(_pause_resume_worker, eng.handle, pos, self.MAX_ITERATIONS,
                          self.SECONDS, k % 2, start, out)
        start.set()
        results = [r[1] for r in collect(out, self.WORKERS)]
        spawner.join_all(60)

        pauses = sum(r["pause"] for r in results)
        resumes = sum(r["resume"] for r in results)
        others = [o for r in results for o in r["other"]]
        assert others == [], f"outcomes other than APPLIED/INVALID/CONFLICT: {others}"
        assert sum(r["pause"] + r["resume"] + r["invalid"] + r["conflict"]
                   for r in results) == sum(r["calls"] for r in results)
        diff = pauses - resumes
        assert diff in (0, 1), f"applied pauses {pauses} - resumes {resumes} = {diff}"
        assert eng.state(pos) is (State.PAUSED if diff else State.MONITORING)
        applied = pauses + resumes
        row = eng.snapshot()[0]
        assert int(row["transitions"]) == 2 + applied
        word = eng.state_word(eng.slot_of(pos))
        assert (word >> GEN_SHIFT) & GEN_MASK == (2 + applied) & GEN_MASK
        assert not word & lib.ENG_SW_LOCK
        m = eng.metrics()["transition"]      # the workers' shards were retired on close
        assert m.applied == 1 + applied
        assert m.conflicts == sum(r["conflict"] for r in results)
        assert applied > 0


class TestPriceReadersWriters:
    MAX_WRITES = 4_000_000
    SECONDS = 2.0
    STEP = 0.25

    def test_readers_never_see_torn_or_old_prices(self, make_engine, spawner):
        """Readers racing writers never see a torn, unwritten or older price record.

        For 2 s, 2 writers publish increasing prices on their own slot (one
        long, one short) while 2 readers read both.  Forbidden: a record whose PnL is not
        the formula on its own price, a price never written, a version that goes
        back, a same-version record that differs, a newer version without a
        higher price.  Allowed: any interleaving; readers may skip versions."""
        eng = make_engine(capacity=4)
        long_ = eng.open_position(entry_price=100.0, amount=2.0, side=1)
        short = eng.open_position(entry_price=50.0, amount=3.0, side=-1)
        slots = [long_, short]
        bases = {long_: 100.0, short: 50.0}
        ctx = spawner.ctx
        start, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
        readies = []
        for s in slots:
            readies.append(ctx.Event())
            spawner.start(_price_writer, eng.handle, s, bases[s], self.STEP, self.MAX_WRITES,
                          self.SECONDS, readies[-1], start, out)
        for _ in range(2):
            readies.append(ctx.Event())
            spawner.start(_price_reader, eng.handle, slots, bases, self.STEP,
                          self.MAX_WRITES, readies[-1], start, done, out)
        for r in readies:
            assert r.wait(START_TIMEOUT), "a child never got ready"
        start.set()
        writers = collect(out, 2)
        assert sorted(w[1] for w in writers if w[0] == "writer") == sorted(slots), writers
        written = {w[1]: w[2] for w in writers}
        done.set()
        readers = collect(out, 2)
        spawner.join_all(60)

        for _, reads, violations, examples, distinct in readers:
            assert violations == 0, f"{violations} of {reads} reads broke a rule: {examples}"
            assert all(n >= 2 for n in distinct.values()), distinct   # saw before and after
        for s in slots:
            p = eng.price(s)
            assert p.price == bases[s] + written[s] * self.STEP
            assert p.version == 1 + written[s]


class TestFutexWake:
    def test_waiters_in_other_processes_wake_on_commit(self, make_engine, spawner):
        """One commit wakes every process blocked in wait_for_change on the slot.

        Two children blocked in wait_for_change(timeout=10) on one slot both
        wake with the state committed by the parent; the waiting flag they leave
        is cleared by the next commit.  Forbidden: a timeout (a lost wake-up) or
        a state other than the committed one."""
        eng = make_engine(capacity=2)
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        ctx = spawner.ctx
        out = ctx.Queue()
        readies = [ctx.Event() for _ in range(2)]
        for ready in readies:
            spawner.start(_waiter, eng.handle, pos, 10.0, ready, out)
        for ready in readies:
            assert ready.wait(START_TIMEOUT), "a waiter never started"
        if eng.url is not None:
            # on Redis both block on the server (XREAD BLOCK): no polling
            until(lambda: blocked_clients(eng.url) == 2, "both waiters blocked on the server")
        else:
            # The slot's waiting flag (0/1) says some process may sleep on its
            # futex word; it cannot count them, so each child is also seen
            # asleep in a futex wait by the kernel.
            slot = eng._slot(eng.slot_of(pos))
            pids = [p.pid for p in spawner.procs]
            deadline = time.monotonic() + 30
            while not (slot.waiting and all(asleep_in_futex(p) for p in pids)) \
                    and time.monotonic() < deadline:
                time.sleep(0.005)
            assert slot.waiting == 1 and all(asleep_in_futex(p) for p in pids), \
                "waiters never blocked"
        assert eng.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        results = collect(out, 2, timeout=30)
        spawner.join_all(30)
        for kind, state, _elapsed in results:
            assert kind == "woke", results
            assert state == "PAUSED"
        assert eng.transition(pos, Trigger.RESUME) is Outcome.APPLIED
        if eng.url is None:
            assert slot.waiting == 0


class TestCustomSpecAcrossProcesses:
    def test_handle_with_guarded_spec_works_in_a_spawned_child(self, make_engine, spawner):
        """A handle with a guarded custom spec works in a spawned child (reject, accept)."""
        from engine import MachineSpec, Rule

        spec = MachineSpec(
            states=["IDLE", "ANALYZING", "EXECUTING"], triggers=["START", "EXECUTE"],
            rules=[Rule.of("START", "IDLE", "ANALYZING"),
                   Rule.of("EXECUTE", "ANALYZING", "EXECUTING", guard=above_entry)],
            initial="IDLE", name="strategy")
        eng = make_engine(capacity=2, spec=spec)
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, "START")
        out = spawner.ctx.Queue()
        spawner.start(_guarded_worker, eng.handle, pos, out)
        [result] = collect(out, 1)
        spawner.join_all(30)
        assert result == ("guarded", "REJECTED", "APPLIED", "EXECUTING")
        assert eng.state(pos).name == "EXECUTING"
