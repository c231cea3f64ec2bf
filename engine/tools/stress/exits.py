"""The exits workload (``--mix exits``): price writers fire stop losses, take
profits and trailing stops while others pause and re-arm the positions.

Every position is long or short with entry 100 and levels that prices drawn
around the entry (PRICE_SIGMA, within [PRICE_LO, PRICE_HI]) cross now and
then (``levels_for``).  Workers mix:

* ``tick``: ``update_price`` of one position; ``batch``: ``update_prices``
  of every position; ``token``: ``update_token_price`` of one token;
* ``pause``: PAUSE one position, write it crossing prices, check it is still
  PAUSED, RESUME it (then write it a price: see below);
* ``rearm``: a fired position (EXIT_PENDING): check its fire (reason and
  exit_price against its levels), EXIT_CANCELLED, then write it a price.

The verifier (``verify_exits``) fails the run on:

* ``wrong_reason``: a fire whose exit_reason is not the one its exit_price
  gives (stop loss first, then trailing stop, then take profit), or whose
  exit_price does not cross the level it names;
* ``fired_paused``: a position left PAUSED by something else than its
  pauser's RESUME (only a fire could: RESUME found it in another state);
* ``lost_fire``: at the end, a MONITORING position whose last price crosses
  its stop loss or take profit (a crossing written while armed never fired;
  every op that arms a position writes it a price after, so the last price
  of an armed position was written while armed);
* ``not_once``: the commits on the positions (transitions counters) differ
  from pauses + resumes + cancels + fires, or the fires counted by the engine
  (``metrics()["exit"].applied``) differ from the fires the states show
  (cancels + positions left EXIT_PENDING): a crossing fired twice, or a
  fire not counted.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine import BusyError, Engine, ExitReason, Outcome, State, Trigger
from engine._native import lib
from engine.tools.stress.config import StressConfig, StressResult
from engine.tools.stress.mix import EXIT_KINDS, RESULTS
from engine.tools.stress.witness import (
    JournalFollower,
    add_to_result,
    journal_options,
    verify_journal,
)

PRICE_LO, PRICE_HI = 92.0, 108.0
PRICE_SIGMA = 4.0
#: the run is cut in phases of about this many seconds; at the end of each the
#: workers stop at a barrier and the parent checks every position
PHASE_S = 0.1
BARRIER_TIMEOUT = 60.0
N_EXIT_TOKENS = 4
VIOLATIONS = {
    "wrong_reason": "a fire's exit_reason or exit_price does not match its levels",
    "fired_paused": "a paused position left PAUSED by something else than its RESUME",
    "lost_fire": "an armed position shows a price that crosses its stop or take profit",
    "not_once": "commits or counted fires differ from the fires the states show",
    "unexpected": "an engine error a worker did not expect",
}
_MAX_MESSAGES = 20


@dataclass(frozen=True)
class Levels:
    side: int
    stop: float
    take: float
    trail: float


def levels_for(i: int) -> Levels:
    """Position i: long or short; stop+take, trailing (+ a far stop), or all three."""
    side = 1 if i % 2 == 0 else -1
    kind = (i // 2) % 3
    if kind == 0:
        return Levels(side, 100.0 - 8.0 * side, 100.0 + 8.0 * side, 0.0)
    if kind == 1:
        return Levels(side, 100.0 - 7.5 * side, 0.0, 13.0)
    return Levels(side, 100.0 - 7.0 * side, 100.0 + 7.0 * side, 14.0)


def fire_problem(lv: Levels, reason: int, price: float) -> str | None:
    """Why a fire (reason, exit_price) does not fit the levels, or None."""
    x = price * lv.side
    stop = lv.stop > 0 and x <= lv.stop * lv.side
    take = lv.take > 0 and x >= lv.take * lv.side
    top = (PRICE_HI if lv.side > 0 else -PRICE_LO)   # the highest x any write had
    trail_possible = lv.trail > 0 and x <= top - lv.trail
    if stop and reason != ExitReason.STOP_LOSS:
        return f"price {price} crosses the stop {lv.stop} but the reason is {reason}"
    if reason == ExitReason.STOP_LOSS and not stop:
        return f"STOP_LOSS at {price} does not cross the stop {lv.stop}"
    if reason == ExitReason.TAKE_PROFIT and not take:
        return f"TAKE_PROFIT at {price} does not cross the take profit {lv.take}"
    if reason == ExitReason.TRAILING_STOP and not trail_possible:
        return f"TRAILING_STOP at {price}: no peak of the run is {lv.trail} past it"
    if reason not in (ExitReason.STOP_LOSS, ExitReason.TAKE_PROFIT, ExitReason.TRAILING_STOP):
        return f"exit_reason {reason} is not an exit the engine fires"
    return None


def crosses_fixed(lv: Levels, price: float) -> bool:
    x = price * lv.side
    return (lv.stop > 0 and x <= lv.stop * lv.side) or (lv.take > 0 and x >= lv.take * lv.side)


def exits_worker(handle: Any, index: int, seed: int, weights: tuple[int, ...],
                 seconds: float, ids: list[int], q: Any, barrier: Any, phases: int,
                 unchecked: Any) -> None:
    """One worker of the exits workload: ``phases`` phases of the mix, each
    ended at the barrier (twice: the parent checks in between); puts its
    counts on q."""
    try:
        q.put(("ok", index, _work(handle, seed, weights, seconds, ids, barrier, phases,
                                  unchecked)))
    except BaseException:
        q.put(("error", index, traceback.format_exc()))


def _work(handle: Any, seed: int, weights: tuple[int, ...], seconds: float,
          ids: list[int], barrier: Any, phases: int, unchecked_flags: Any) -> dict[str, Any]:
    eng = Engine.attach(handle)
    rng = random.Random(seed)
    arr = np.array(ids, dtype=np.uint64)
    counts = {k: dict.fromkeys(RESULTS, 0) for k in EXIT_KINDS}
    c = {"pauses": 0, "resumes": 0, "cancels": 0, "fires_checked": 0}
    unchecked: list[int] = []
    viol: dict[str, int] = dict.fromkeys(VIOLATIONS, 0)
    messages: list[str] = []

    def bad(kind: str, msg: str) -> None:
        viol[kind] += 1
        if len(messages) < _MAX_MESSAGES:
            messages.append(msg)

    def walk() -> float:   # around the entry: most writes inside the levels, some past
        return min(PRICE_HI, max(PRICE_LO, rng.gauss(100.0, PRICE_SIGMA)))

    def write_after_arming(i: int) -> None:
        for _ in range(50):
            try:
                eng.update_price(ids[i], walk())
                return
            except BusyError:
                time.sleep(0.0005)
        unchecked.append(i)
        unchecked_flags[i] = 1

    for _ in range(phases):
        _phase(eng, rng, weights, seconds / phases, ids, arr, counts, c, bad, walk,
               write_after_arming)
        barrier.wait(BARRIER_TIMEOUT)   # quiescent: the parent checks the positions
        barrier.wait(BARRIER_TIMEOUT)
    eng.close()
    return {"counts": counts, **c, "unchecked": unchecked, "violations": viol,
            "messages": messages}


def _phase(eng: Engine, rng: random.Random, weights: tuple[int, ...], seconds: float,
           ids: list[int], arr: np.ndarray, counts: dict[str, dict[str, int]],
           c: dict[str, int], bad: Any, walk: Any, write_after_arming: Any) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind = rng.choices(EXIT_KINDS, weights)[0]
        i = rng.randrange(len(ids))
        pos = ids[i]
        res = "ok"
        try:
            if kind == "tick":
                eng.update_price(pos, walk())
            elif kind == "batch":
                eng.update_prices(arr, np.full(len(ids), walk()))
            elif kind == "token":
                eng.update_token_price(rng.randrange(N_EXIT_TOKENS), walk())
            elif kind == "pause":
                if eng.transition(pos, Trigger.PAUSE) is not Outcome.APPLIED:
                    res = "invalid"
                else:
                    c["pauses"] += 1
                    lv = levels_for(i)
                    for p in (lv.stop - lv.side, lv.take + lv.side if lv.take else 100.0):
                        with contextlib.suppress(BusyError):
                            eng.update_price(pos, p)
                    out = eng.transition(pos, Trigger.RESUME)
                    if out is Outcome.APPLIED:
                        c["resumes"] += 1
                        write_after_arming(i)
                    else:
                        bad("fired_paused", f"position {i}: paused, then RESUME -> {out.name} "
                                            f"in state {eng.state(pos).name}")
            elif kind == "rearm":
                if eng.state(pos) is not State.EXIT_PENDING:
                    res = "invalid"
                else:
                    ctx = eng.context(pos)
                    why = fire_problem(levels_for(i), int(ctx.exit_reason), ctx.exit_price)
                    c["fires_checked"] += 1
                    if why:
                        bad("wrong_reason", f"position {i}: {why}")
                    if eng.transition(pos, Trigger.EXIT_CANCELLED) is Outcome.APPLIED:
                        c["cancels"] += 1
                        write_after_arming(i)
                    else:
                        res = "invalid"
        except BusyError:
            res = "busy"
        except Exception as e:
            res = "unexpected"
            bad("unexpected", f"{kind} on position {i}: {e!r}")
        counts[kind][res] += 1


def run_exits(config: StressConfig, weights: dict[str, int]) -> StressResult:
    """Run the exits workload and verify it (see the module docstring)."""
    ctx = multiprocessing.get_context("spawn")
    url = config.url
    server = None
    if url == "auto":
        from engine.tools.redis_server import PrivateRedis
        server = PrivateRedis(prefix="engine-stress-redis-").__enter__()
        url = server.url
    try:
        eng = Engine.create(capacity=config.positions, url=url,
                            **(journal_options(url) if config.journal else {}))
        try:
            with tempfile.TemporaryDirectory(prefix="eng_stress_") as tmp:
                follower = JournalFollower(ctx, eng, tmp) if config.journal else None
                try:
                    if follower is not None:
                        follower.start()
                    res = _run(eng, config, weights, ctx)
                    if follower is not None:
                        _cross_check(res, eng, follower)
                    return res
                finally:
                    if follower is not None:
                        follower.kill()
        finally:
            eng.close()
            eng.unlink()
    finally:
        if server is not None:
            server.__exit__(None, None, None)


def _run(eng: Engine, config: StressConfig, weights: dict[str, int], ctx: Any) -> StressResult:
    ids = []
    for i in range(config.positions):
        lv = levels_for(i)
        pos = eng.open_position(100.0, 1.0, lv.side, i % N_EXIT_TOKENS, stop_loss=lv.stop,
                                take_profit=lv.take, trailing_stop=lv.trail)
        eng.transition(pos, Trigger.POSITION_OPENED)
        ids.append(pos)
    before = {int(r["id"]): int(r["transitions"]) for r in eng.snapshot()}
    fires_before = eng.metrics()["exit"].applied
    q = ctx.Queue()
    wt = tuple(weights[k] for k in EXIT_KINDS)
    phases = max(1, round(config.seconds / PHASE_S))
    barrier = ctx.Barrier(config.workers + 1)
    unchecked = ctx.RawArray("b", len(ids))
    procs = [ctx.Process(target=exits_worker, args=(eng.handle, w, config.seed * 1000 + w, wt,
                                                     config.seconds, ids, q, barrier, phases,
                                                     unchecked), daemon=True)
             for w in range(config.workers)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    got: list[dict[str, Any]] = []
    problems: list[str] = []
    phase_viol: dict[str, int] = dict.fromkeys(VIOLATIONS, 0)
    phase_messages: list[str] = []
    checked = parent_cancels = 0
    try:
        for _ in range(phases):
            barrier.wait(BARRIER_TIMEOUT + config.seconds + 60)
            checked += _check_quiescent(eng, ids, unchecked, phase_viol, phase_messages)
            parent_cancels += _rearm_all(eng, ids, phase_viol, phase_messages)
            barrier.wait(BARRIER_TIMEOUT)
    except threading.BrokenBarrierError:
        barrier.abort()
        problems.append("a worker did not reach a phase's barrier")
    deadline = time.monotonic() + config.seconds + 120
    while len(got) + len(problems) < len(procs) and time.monotonic() < deadline:
        try:
            item = q.get(timeout=1.0)
        except Exception:
            continue
        (got if item[0] == "ok" else problems).append(item[2])
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    seconds = time.monotonic() - t0
    got.append({"counts": {k: dict.fromkeys(RESULTS, 0) for k in EXIT_KINDS}, "pauses": 0,
                "resumes": 0, "cancels": parent_cancels, "fires_checked": parent_cancels,
                "unchecked": [], "violations": {}, "messages": []})   # the parent's re-arms
    res = verify_exits(eng, config, weights, ids, before, fires_before, got, problems, seconds)
    res.violations += sum(phase_viol.values())
    res.violation_messages += phase_messages[:_MAX_MESSAGES]
    assert res.exits is not None
    res.exits["quiescent_checks"] = checked
    for k, n in phase_viol.items():
        res.exits["violations"][k] += n
        if n:
            res.verification["by_category"][k] = res.verification["by_category"].get(k, 0) + n
    return res


def _cross_check(res: StressResult, eng: Engine, follower: JournalFollower) -> None:
    """The journal, the second witness of the exits run: every slot's records
    against its counter and final word, the transition records per trigger
    against what the workers and the parent did (pauses, resumes, re-arms,
    fires), and every fire's record (its exit_reason and exit_price) against
    the position's levels: fires inside price writes are journaled too."""
    jr = follower.finish()
    rows = eng.snapshot()
    counters = np.zeros(eng.capacity, dtype=np.uint64)
    counters[rows["slot"]] = rows["transitions"]
    words = np.array([eng.state_word(s) for s in range(eng.capacity)], dtype=np.uint64)
    rep = verify_journal(jr, eng.spec, final_words=words, counters=counters,
                         final_ids={int(r["slot"]): int(r["id"]) for r in rows})
    e = res.exits
    assert e is not None
    want = {"POSITION_OPENED": eng.capacity, "PAUSE": e["pauses"], "RESUME": e["resumes"],
            "EXIT_CANCELLED": e["cancels"], "EXIT_CONDITION_MET": e["fires"]}
    wrong = [t for t, n in want.items() if rep.triggers.get(t, 0) != n]
    rep.add("journal_count", len(wrong), lambda i: f"{wrong[i]}: {rep.triggers.get(wrong[i], 0)} "
            f"records, the run made {want[wrong[i]]}", range(len(wrong)))
    # the positions were opened in slot order, position i at slot i (run_exits)
    index = {int(r["id"]): int(r["slot"]) for r in rows}
    levels = {p: levels_for(i) for p, i in index.items()}
    fire = int(Trigger.EXIT_CONDITION_MET)
    kinds = jr.rows["kind"]
    bad: list[str] = []
    for i in np.flatnonzero((kinds == lib.ENG_JK_TRANSITION) & (jr.rows["trigger"] == fire)):
        ev = jr.event(int(i))
        lv = levels.get(ev.id)
        why = None if lv is None else fire_problem(lv, int(ev.record.exit_reason),
                                                   ev.record.exit_price)
        if why:
            bad.append(f"record seq {ev.seq} (position {index.get(ev.id)}): {why}")
    rep.add("journal_chain", len(bad), lambda i: f"a fire's record: {bad[i]}", range(len(bad)))
    add_to_result(res, rep, jr)


def _rearm_all(eng: Engine, ids: list[int], viol: dict[str, int], messages: list[str]) -> int:
    """Between two phases: check every fired position's fire, arm it again
    and write it the entry price, so that the next phase starts with every
    position armed.  Returns the cancels."""
    n = 0
    for i, pos in enumerate(ids):
        if eng.state(pos) is not State.EXIT_PENDING:
            continue
        ctx = eng.context(pos)
        why = fire_problem(levels_for(i), int(ctx.exit_reason), ctx.exit_price)
        if why:
            viol["wrong_reason"] += 1
            messages.append(f"position {i}: {why}")
        if eng.transition(pos, Trigger.EXIT_CANCELLED) is Outcome.APPLIED:
            n += 1
            eng.update_price(pos, 100.0)
    return n


def _check_quiescent(eng: Engine, ids: list[int], unchecked: Any, viol: dict[str, int],
                     messages: list[str]) -> int:
    """Between two phases (no worker calls): no position PAUSED, and no armed
    one at a price that crosses its stop or take profit.  Returns the armed
    positions checked."""
    rows = {int(r["id"]): r for r in eng.snapshot()}
    n = 0
    for i, pos in enumerate(ids):
        r = rows[pos]
        st = State(int(r["state"]))
        if st is State.PAUSED:
            viol["fired_paused"] += 1
            messages.append(f"position {i}: PAUSED between phases")
        elif st is State.MONITORING and not unchecked[i]:
            n += 1
            if crosses_fixed(levels_for(i), float(r["price"])):
                viol["lost_fire"] += 1
                messages.append(f"position {i}: MONITORING between phases at "
                                f"{float(r['price'])}, which crosses {levels_for(i)}")
    return n


def verify_exits(eng: Engine, config: StressConfig, weights: dict[str, int], ids: list[int],
                 before: dict[int, int], fires_before: int, reports: list[dict[str, Any]],
                 problems: list[str], seconds: float) -> StressResult:
    viol = dict.fromkeys(VIOLATIONS, 0)
    messages = list(problems)
    counts = {k: dict.fromkeys(RESULTS, 0) for k in EXIT_KINDS}
    tot = {"pauses": 0, "resumes": 0, "cancels": 0, "fires_checked": 0}
    unchecked: set[int] = set()
    for r in reports:
        for k in EXIT_KINDS:
            for res, n in r["counts"][k].items():
                counts[k][res] += n
        for k in tot:
            tot[k] += r[k]
        unchecked.update(r["unchecked"])
        for k, n in r["violations"].items():
            viol[k] += n
        messages += r["messages"]
    rows = {int(r["id"]): r for r in eng.snapshot()}
    pending = armed = 0
    for i, pos in enumerate(ids):
        r, lv = rows[pos], levels_for(i)
        st = State(int(r["state"]))
        if st is State.EXIT_PENDING:
            pending += 1
            why = fire_problem(lv, int(r["exit_reason"]), float(r["exit_price"]))
            if why:
                viol["wrong_reason"] += 1
                messages.append(f"position {i}: {why}")
        elif st is State.MONITORING:
            armed += 1
            if i not in unchecked and crosses_fixed(lv, float(r["price"])):
                viol["lost_fire"] += 1
                messages.append(f"position {i}: MONITORING at {float(r['price'])}, which "
                                f"crosses stop {lv.stop} / take profit {lv.take}")
        else:
            viol["fired_paused" if st is State.PAUSED else "unexpected"] += 1
            messages.append(f"position {i}: left in {st.name}")
    fires = tot["cancels"] + pending
    commits = sum(int(rows[p]["transitions"]) - before[p] for p in ids)
    counted = eng.metrics()["exit"].applied - fires_before
    want = tot["pauses"] + tot["resumes"] + tot["cancels"] + fires
    if problems or len(reports) < config.workers:
        viol["unexpected"] += max(1, len(problems))
    if commits != want or counted != fires:
        viol["not_once"] += 1
        messages.append(f"commits {commits} (want pauses {tot['pauses']} + resumes "
                        f"{tot['resumes']} + cancels {tot['cancels']} + fires {fires} = {want}); "
                        f"fires counted by the engine {counted}, by the states {fires}")
    ops = sum(sum(c.values()) for c in counts.values())
    n_viol = sum(viol.values())
    exits = {"fires": fires, "fires_counted": counted, "fires_checked": tot["fires_checked"]
             + pending, "pauses": tot["pauses"], "resumes": tot["resumes"],
             "cancels": tot["cancels"],
             "armed_at_end": armed, "pending_at_end": pending, "unchecked": len(unchecked),
             "violations": viol}
    verification = {"links": 0, "slots": len(ids), "applied": commits,
                    "counters_total": commits, "engine_applied": counted,
                    "reads_checked": exits["fires_checked"], "torn_price_reads": 0,
                    "torn_context_reads": 0, "version_regressions": 0,
                    "by_category": {k: n for k, n in viol.items() if n}, "exits": exits}
    return StressResult(ops=ops, seconds=seconds, violations=n_viol,
                        violation_messages=messages[:_MAX_MESSAGES * 2], workload=counts,
                        table=[], alerts=[], verification=verification,
                        config={"workers": config.workers, "positions": config.positions,
                                "seconds": config.seconds, "mix": config.mix,
                                "weights": weights, "seed": config.seed},
                        exits=exits, url=url_of(eng))


def url_of(eng: Engine) -> str | None:
    from engine.errors import redact
    return redact(eng.url) if eng.url else None
