"""The parent: create the segment, start the workers together, watch them,
stop them, and verify every process's links against the segment's final
state (see ``engine.tools.stress``).

With ``url`` the engine lives on a Redis server (``"auto"``: a private
redis-server started for the run and stopped after it) and the workers
attach through the handle, which carries the url.  The workloads and the
checks are the same; what differs is said in ``REDIS_NOTES``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import random
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from typing import Any, TextIO

import numpy as np
import posix_ipc

from engine._native import lib
from engine.accounts import from_units
from engine.core import Engine
from engine.errors import redact
from engine.metrics import OPS, Metrics, check_alerts, percentile
from engine.spec import ORDER_SPEC, State
from engine.store.redis import RedisStore
from engine.tools.redis_server import PrivateRedis
from engine.tools.stress import accounts as acc
from engine.tools.stress.account_workers import _AccountPlan, _AccountWorker
from engine.tools.stress.base import worker_main
from engine.tools.stress.codec import DROP_LINK_ENV, LinkLog, decode_links
from engine.tools.stress.config import (
    AUTO_URL,
    ORDER_KEYS_PER_POSITION,
    StressConfig,
    StressResult,
)
from engine.tools.stress.mix import (
    DROP_LINK_AT,
    FAULTS,
    KINDS,
    N_TOKENS,
    RESULTS,
    TOKEN_PARAMS,
    WORKLOADS,
)
from engine.tools.stress.order_workers import _OrderPlan, _OrderWorker
from engine.tools.stress.orders import (
    CLIENT_OPS,
    COUNTERS,
    VIOLATIONS,
    client_key,
    exchange_key,
    verify_orders,
)
from engine.tools.stress.verify import ChainReport, verify_chains
from engine.tools.stress.witness import (
    JournalFollower,
    add_to_result,
    journal_options,
    verify_journal,
)
from engine.tools.stress.workers import _Plan, _Worker

#: A worker whose published op count stays put this long (during the run)
#: counts as stalled: a violation of the order and account workloads (a
#: deadlock shows up so before the end-of-run collection times out).
STALL_SECONDS = 5.0

#: What a run on Redis does differently, said at its start and kept in the result.
REDIS_NOTES = (
    "Redis: latency is each worker's sampled round trips (one server call each), collected "
    "from the workers: no segment gathers per-process metrics shards",
    "Redis: no locks to take over, no C fault switches (--fault skip-gen / blind-store / "
    "tear-price are refused); the chains are checked from the generations the server "
    "functions report",
    "Redis: the server does not count wait_for_change calls, so the engine's wait row stays "
    "empty (the workload table counts them)",
)


def _say(out: TextIO | None, text: str) -> None:
    if out is not None:
        print(text, file=out, flush=True)


def _slot_transitions(eng: Engine, slot: int) -> int:
    """The transitions counter of a slot (a free one: no snapshot row has it)."""
    if eng.url is None:
        return int(eng._slot(slot).transitions)
    store = eng.store          # on Redis: the slot's hash, field ctr
    assert isinstance(store, RedisStore)
    key = store.prefixes[slot % store.shards] + f"p:{slot}"
    return int(store.conn.command("HGET", key, "ctr", key=key) or 0)


def _final_state(eng: Engine) -> tuple[np.ndarray, np.ndarray, int]:
    """Per slot: transitions counter and state word; and how many came from the
    snapshot.  The snapshot omits free slots, so theirs are read from the slot."""
    counters = np.zeros(eng.capacity, dtype=np.uint64)
    words = np.array([eng.state_word(s) for s in range(eng.capacity)], dtype=np.uint64)
    rows = eng.snapshot()
    counters[rows["slot"]] = rows["transitions"]
    seen = np.zeros(eng.capacity, dtype=bool)
    seen[rows["slot"]] = True
    for s in np.flatnonzero(~seen):
        counters[s] = _slot_transitions(eng, int(s))
    return counters, words, len(rows)


def _with_worker_latency(eng: Engine, metrics: Metrics,
                         summaries: list[dict[str, Any]]) -> Metrics:
    """On Redis: the metrics with latency from every process's samples (the
    parent's and each worker's ``engine_latency``), as the segment's shards
    give them on shared memory.  The counts are the server's already."""
    if eng.url is None:
        return metrics
    assert isinstance(eng.store, RedisStore)
    hist, max_ns = eng.store.latency()
    for s in summaries:
        if "engine_latency" in s:
            h, m = s["engine_latency"]
            hist += np.frombuffer(h, dtype=np.int64).reshape(hist.shape)
            max_ns = [max(a, b) for a, b in zip(max_ns, m, strict=True)]
    out: Metrics = {}
    for i, op in enumerate(OPS):
        p50, p99, p999 = (min(percentile(hist[i], q), float(max_ns[i]))
                          for q in (0.5, 0.99, 0.999))
        out[op] = replace(metrics[op], samples=int(hist[i].sum()), p50_ns=p50, p99_ns=p99,
                          p999_ns=p999, max_ns=max_ns[i])
    return out


def _metrics_table(metrics: Metrics, seconds: float) -> list[dict[str, Any]]:
    table = []
    for op in OPS:
        m = metrics[op]
        if op == "recover":
            continue
        table.append({"op": op, "attempts": m.attempts,
                      "ops_per_s": m.attempts / seconds if seconds > 0 else 0.0,
                      "applied": m.applied, "success_rate": m.success_rate,
                      "invalid": m.invalid, "conflicts": m.conflicts, "retries": m.retries,
                      "takeovers": m.takeovers, "errors": m.errors, "samples": m.samples,
                      # the histogram interpolates inside a power-of-two bucket and
                      # can land above the true maximum: cap at the recorded max
                      "p50_us": min(m.p50_ns, m.max_ns) / 1e3,
                      "p99_us": min(m.p99_ns, m.max_ns) / 1e3,
                      "p999_us": min(m.p999_ns, m.max_ns) / 1e3, "max_us": m.max_ns / 1e3})
    return table


def _open_all(eng: Engine, log: LinkLog, seed: int) -> None:
    """Open every slot of the fresh segment (logging each open's commit)."""
    rng = random.Random(seed)
    for _ in range(eng.capacity):
        token = rng.randrange(N_TOKENS)
        entry, amount, side = TOKEN_PARAMS[token]
        log.record(eng.slot_of(eng.open_position(entry, amount, side, token)))


def _wait_ready(procs: list[Any], ready: Any, timeout: float) -> None:
    """Block until every worker said it is attached and at the gate."""
    n, deadline = 0, time.monotonic() + timeout
    while n < len(procs):
        try:
            ready.get(timeout=0.2)
            n += 1
        except queue.Empty:
            dead = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode is not None]
            if dead:
                raise RuntimeError(
                    f"stress workers died before the start: {', '.join(dead)}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n} of {len(procs)} stress workers got ready "
                                   f"within {timeout:.0f} s") from None


def _show_progress(procs: list[Any], shared: Any, seconds: float,
                   out: TextIO | None) -> list[float]:
    """Sleep through the run, printing the operation rate once a second.
    Returns per worker the longest time (s) its published op count stood still."""
    t_start = time.monotonic()
    last_ops, last_t = 0, t_start
    width = len(shared) // max(len(procs), 1)
    rows = [0] * len(procs)
    moved = [t_start] * len(procs)
    stalls = [0.0] * len(procs)
    while True:
        elapsed = time.monotonic() - t_start
        if elapsed >= seconds or any(p.exitcode not in (None, 0) for p in procs):
            return stalls
        time.sleep(min(1.0 - elapsed % 1.0, seconds - elapsed))
        total, now = sum(shared), time.monotonic()
        for w in range(len(procs)):
            n = sum(shared[w * width:(w + 1) * width])
            if n != rows[w]:
                rows[w], moved[w] = n, now
            stalls[w] = max(stalls[w], now - moved[w])
        if now - last_t >= 0.5:
            _say(out, f"  {now - t_start:5.1f} s  {(total - last_ops) / (now - last_t):>12,.0f}"
                      f" ops/s  {total:>14,} ops")
            last_ops, last_t = total, now


def _collect(procs: list[Any], results: Any, timeout: float) -> tuple[list[dict[str, Any]],
                                                                      list[str]]:
    """The workers' summaries, and what went wrong with any that sent none."""
    summaries: list[dict[str, Any]] = []
    problems: list[str] = []
    pending, deadline = len(procs), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        try:
            kind, payload = results.get(timeout=0.2)
        except queue.Empty:
            if all(p.exitcode is not None for p in procs) and results.empty():
                break
            continue
        pending -= 1
        if kind == "done":
            summaries.append(payload)
        else:
            problems.append(f"worker {payload['index']} failed: {payload['error']}")
    return summaries, problems


def run_stress(config: StressConfig) -> StressResult:
    """Run one stress test and verify it; see ``engine.tools.stress``.

    Raises ``ValueError`` for a bad configuration and ``RuntimeError`` if the
    workers cannot be started.  The segment, the start gate and the log files
    are removed whatever happens; workers still running are stopped.  With
    ``config.url`` the engine is on that Redis server (``"auto"``: one started
    for the run, and stopped after it).
    """
    weights = config.check()
    if config.workload == "exits":
        from engine.tools.stress.exits import run_exits
        return run_exits(config, weights)
    orders, booked = config.orders, config.booked
    kinds = WORKLOADS[config.workload][0]
    out = config.progress
    if config.fault in FAULTS:
        # a C fault is a test hook: this process and the workers it spawns
        # (they inherit the environment) switch them on explicitly
        os.environ["ENGINE_TEST_FAULTS"] = "1"
        lib.eng_test_faults(1)
    ctx = multiprocessing.get_context("spawn")
    base_ns = time.monotonic_ns()
    gate_name = "/eng_stress_" + secrets.token_hex(8)
    procs: list[Any] = []
    stop = ctx.RawValue("B", 0)
    shared = ctx.RawArray("Q", config.workers * len(kinds))
    # order workload: the number of each worker's last opened order (-1: none yet)
    published = ctx.RawArray("q", [-1] * config.workers)

    def stop_workers() -> None:
        stop.value = 1
        for p in procs:
            p.join(10)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)

    with contextlib.ExitStack() as cleanup:    # unwinds in reverse order
        tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="eng_stress_"))
        ready_q, result_q = ctx.Queue(), ctx.Queue()
        cleanup.callback(result_q.close)
        cleanup.callback(ready_q.close)
        url = config.url
        if url == AUTO_URL:
            server = cleanup.enter_context(PrivateRedis(prefix="engine-stress-redis-"))
            url = server.url
            _say(out, f"stress: started a private redis-server at {url} (persistence off; "
                      "stopped at the end)")
        jopts = journal_options(url) if config.journal else {}
        eng = (Engine.create(capacity=config.positions, spec=ORDER_SPEC,
                             keys_per_position=ORDER_KEYS_PER_POSITION, url=url, **jopts)
               if orders
               else Engine.create(capacity=config.positions, max_accounts=config.accounts,
                                  url=url, **jopts)
               if booked else Engine.create(capacity=config.positions, url=url, **jopts))
        cleanup.callback(eng.unlink)
        cleanup.callback(eng.close)
        follower = JournalFollower(ctx, eng, tmp) if config.journal else None
        if follower is not None:    # from seq 0, before the first commit
            follower.start()
            cleanup.callback(follower.kill)
        if config.fault == "drop-link":   # the workers (and this log) inherit it
            os.environ[DROP_LINK_ENV] = str(DROP_LINK_AT)
            cleanup.callback(os.environ.pop, DROP_LINK_ENV, None)
        gate = posix_ipc.Semaphore(gate_name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
        cleanup.callback(posix_ipc.unlink_semaphore, gate_name)
        cleanup.callback(gate.close)
        cleanup.callback(stop_workers)

        eng.set_metrics(True, config.sample_every)
        parent_log = LinkLog(eng, os.path.join(tmp, "parent.bin"), base_ns)
        if not (orders or booked):      # order and account workers open their own
            _open_all(eng, parent_log, config.seed)
        parent_log.close()
        terms = acc.terms_for(config.workers, config.inflight, config.accounts)
        account_ids = tuple(
            eng.open_account(from_units(terms.cash), from_units(terms.max_exposure),
                             terms.max_positions, from_units(terms.max_loss))
            for _ in range(config.accounts if booked else 0))

        wtuple = tuple(weights[k] for k in kinds)
        for i in range(config.workers):
            log_path = os.path.join(tmp, f"worker{i}.bin")
            if orders:
                oplan = _OrderPlan(i, eng.handle, gate_name, log_path, base_ns, config.workers,
                                   config.positions, wtuple, config.seed, config.sample_every,
                                   config.inflight, config.fault == "misroute",
                                   config.seconds + 60.0)
                args: tuple[Any, ...] = (_OrderWorker, oplan, shared, stop, ready_q, result_q,
                                         published)
            elif booked:
                aplan = _AccountPlan(i, eng.handle, gate_name, log_path, base_ns, wtuple,
                                     config.seed, config.sample_every, config.inflight,
                                     account_ids, terms, config.fault == "leak",
                                     config.seconds + 60.0)
                args = (_AccountWorker, aplan, shared, stop, ready_q, result_q)
            else:
                plan = _Plan(i, eng.handle, gate_name, log_path, base_ns, config.positions,
                             wtuple, config.seed, config.batch_size, config.wait_timeout,
                             config.seconds + 60.0, config.sample_every)
                args = (_Worker, plan, shared, stop, ready_q, result_q)
            p = ctx.Process(target=worker_main, args=args, name=f"stress-worker-{i}", daemon=True)
            p.start()
            procs.append(p)
        _wait_ready(procs, ready_q, 60.0 + 2.0 * config.workers)

        # everyone is at the gate: switch the fault on, then let them all go at once
        if config.fault in FAULTS:
            eng._set_fault(FAULTS[config.fault])
        for _ in procs:
            gate.release()
        for note in REDIS_NOTES if url else ():
            _say(out, f"  note: {note}")
        _say(out, f"stress: {config.workers} workers on {config.positions} shared slots"
                  + (f" of an engine on Redis at {redact(url)}" if url else "") + ", "
                  f"{config.seconds:g} s, "
                  + ("ORDER workload (ORDER_SPEC, keys_per_position="
                     f"{ORDER_KEYS_PER_POSITION}, {config.inflight} orders in flight per "
                     "worker), " if orders else "")
                  + (f"ACCOUNT workload ({config.accounts} shared accounts, cash "
                     f"{from_units(terms.cash)}, max_exposure {from_units(terms.max_exposure)}, "
                     f"max_positions {terms.max_positions}, max_loss "
                     f"{from_units(terms.max_loss)}; {config.inflight} positions in flight "
                     "per worker), " if booked else "") + "mix "
                  + ",".join(f"{k}={w}" for k, w in weights.items() if w)
                  + (f", FAULT {config.fault}" if config.fault else ""))
        stalls = _show_progress(procs, shared, config.seconds, out)
        stop.value = 1
        summaries, problems = _collect(procs, result_q, 60.0)
        stop_workers()
        if config.fault in FAULTS:
            eng._set_fault(0)
        problems += [f"{p.name} exited with code {p.exitcode}" for p in procs if p.exitcode]
        if len(summaries) < config.workers:
            problems.append(f"only {len(summaries)} of {config.workers} workers reported")

        # every process's links against the segment's final state
        counters, words, n_rows = _final_state(eng)
        packed = [np.fromfile(os.path.join(tmp, f), dtype=np.uint64)
                  for f in sorted(os.listdir(tmp)) if f.endswith(".bin")]
        links = decode_links(np.concatenate(packed) if packed else np.empty(0, np.uint64))
        chains = verify_chains(links, counters, words,
                               state_enum=ORDER_SPEC.State if orders else State)
        metrics = _with_worker_latency(eng, eng.metrics(), summaries)
        res = _result(config, weights, summaries, problems, chains, counters, metrics,
                      n_rows, parent_log.count, kinds)
        if follower is not None:
            _cross_check(res, eng, follower, counters, words, links, account_ids)
        if orders:
            _add_orders(res, eng, config, summaries, stalls)
        if booked:
            _add_accounts(res, eng, config, summaries, stalls, account_ids, terms)
        res.segment, res.gate = eng.name, gate_name
        res.url = redact(url) if url else url
        res.notes = list(REDIS_NOTES) if url else []
    return res


def _cross_check(res: StressResult, eng: Engine, follower: JournalFollower,
                 counters: np.ndarray, words: np.ndarray, links: np.ndarray,
                 account_ids: tuple[int, ...]) -> None:
    """The journal, the second witness: every record it holds against the
    workers' links, the slots' counters and final words, the open ids, and
    the books of every account (``engine.tools.stress.witness``)."""
    jr = follower.finish()
    rows = eng.snapshot()
    final_ids = {int(r["slot"]): int(r["id"]) for r in rows}
    books = {a: eng.account(a) for a in account_ids} if account_ids else None
    rep = verify_journal(jr, eng.spec, final_words=words, counters=counters, links=links,
                         final_ids=final_ids, books=books)
    add_to_result(res, rep, jr)


def _result(config: StressConfig, weights: dict[str, int], summaries: list[dict[str, Any]],
            problems: list[str], chains: ChainReport, counters: np.ndarray, metrics: Metrics,
            snapshot_rows: int, parent_opens: int,
            kinds: tuple[str, ...] = KINDS) -> StressResult:
    """Put the figures together and count every violation."""
    seconds = ((max(s["end_ns"] for s in summaries) - min(s["start_ns"] for s in summaries))
               / 1e9 if summaries else 0.0)
    workload = {k: dict.fromkeys(RESULTS, 0) for k in kinds}
    for s in summaries:
        for k in kinds:
            for r in RESULTS:
                workload[k][r] += s["counts"][k][r]
    ops = sum(sum(w.values()) for w in workload.values())
    torn_price = sum(s.get("torn_price", 0) for s in summaries)
    torn_context = sum(s.get("torn_context", 0) for s in summaries)
    regressions = sum(s.get("regressions", 0) for s in summaries)
    unexpected = sum(w["unexpected"] for w in workload.values())
    releases = sum(s["releases"] for s in summaries)
    applied = parent_opens + sum(s["applied"] for s in summaries)
    engine_applied = (metrics["transition"].applied + metrics["transition_ctx"].applied
                      + metrics["open"].applied + releases)
    counters_total = int(counters.sum())

    by_category = dict(chains.by_category)
    messages = list(chains.messages)
    for name, n in (("torn_price_read", torn_price), ("torn_context_read", torn_context),
                    ("version_regression", regressions), ("unexpected_outcome", unexpected)):
        if n:
            by_category[name] = n
    for s in summaries:
        messages.extend(s["messages"])
    if problems:
        by_category["worker_failure"] = len(problems)
        messages.extend(problems)
    for name, got in (("links logged", chains.links), ("transitions counters", counters_total),
                      ("engine metrics applied + releases", engine_applied)):
        if got != applied:
            by_category["totals"] = by_category.get("totals", 0) + 1
            messages.append(f"totals: workers applied {applied} commits, {name} say {got}")
    if metrics["transition"].takeovers or metrics["transition_ctx"].takeovers:
        messages.append("note: lock takeovers happened; a takeover's commit is not logged")

    alerts = check_alerts(metrics,
                          p99_ns=None if config.alert_p99_us is None else config.alert_p99_us * 1e3,
                          success_rate=config.alert_success)
    verification = {
        "links": chains.links, "slots": chains.slots, "snapshot_rows": snapshot_rows,
        "applied": applied, "releases": releases, "counters_total": counters_total,
        "engine_applied": engine_applied, "torn_price_reads": torn_price,
        "torn_context_reads": torn_context, "version_regressions": regressions,
        "reads_checked": workload["read"]["ok"] if "read" in workload else 0,
        "by_category": by_category,
    }
    cfg = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "progress"}
    cfg["mix"] = weights
    if cfg.get("url"):
        cfg["url"] = redact(cfg["url"])   # the report and its JSON never show a password
    return StressResult(ops=ops, seconds=seconds, violations=sum(by_category.values()),
                        violation_messages=messages, workload=workload,
                        table=_metrics_table(metrics, seconds), alerts=alerts,
                        verification=verification, config=cfg)


def _sum_counters(summaries: list[dict[str, Any]], names: Iterable[str]) -> dict[str, int]:
    """The workers' named counters, summed."""
    counters = dict.fromkeys(names, 0)
    for s in summaries:
        for k, n in s["counters"].items():
            counters[k] += n
    return counters


def _latency(summaries: list[dict[str, Any]],
             ops: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per client op, over every worker's samples: samples, p50 / p99 / p99.9 /
    max in microseconds."""
    out: dict[str, dict[str, float]] = {}
    for op in ops:
        a = np.concatenate([np.frombuffer(s["latency"][op], dtype=np.int64)
                            for s in summaries] or [np.empty(0, np.int64)]).astype(np.float64)
        if not len(a):
            out[op] = {"samples": 0, "p50_us": 0.0, "p99_us": 0.0, "p999_us": 0.0,
                       "max_us": 0.0}
            continue
        p50, p99, p999 = np.percentile(a, [50.0, 99.0, 99.9]) / 1e3
        out[op] = {"samples": len(a), "p50_us": float(p50), "p99_us": float(p99),
                   "p999_us": float(p999), "max_us": float(a.max()) / 1e3}
    return out


def _add_violations(res: StressResult, counters: Mapping[str, int], violations: Iterable[str],
                    final_by_category: Mapping[str, int], final_messages: list[str],
                    stalls: list[float]) -> dict[str, int]:
    """Add to ``res`` the workers' violation counters, the end-of-run check's
    findings and the stalled workers; return them by category."""
    found: dict[str, int] = {k: counters[k] for k in violations if counters.get(k)}
    for k, n in final_by_category.items():
        found[k] = found.get(k, 0) + n
    stalled = [(w, t) for w, t in enumerate(stalls) if t >= STALL_SECONDS]
    if stalled:
        found["stall"] = len(stalled)
    # (the workers' own messages are in already: _result took every summary's)
    messages = final_messages + [
        f"stall: worker {w} published no progress for {t:.1f} s" for w, t in stalled]
    by_category = res.verification["by_category"]
    for k, n in found.items():
        by_category[k] = by_category.get(k, 0) + n
    res.violations += sum(found.values())
    res.violation_messages.extend(messages)
    return found


def _add_orders(res: StressResult, eng: Engine, config: StressConfig,
                summaries: list[dict[str, Any]], stalls: list[float]) -> None:
    """The order workload's figures and checks: the workers' counts and
    latency samples, then the end-of-run scan of every open order and key
    (``verify_orders``); every violation is added to ``res``."""
    counters = _sum_counters(summaries, COUNTERS)

    # every open order, its keys, and the keys of held and recently released orders
    held = {tag: (pos, bound) for s in summaries for tag, pos, bound in s["held"]}
    released = [tag for s in summaries for tag in s["released_recent"]]
    rows = eng.snapshot()
    keys_of = {int(pos): eng.keys(int(pos)) for pos in rows["id"]}
    lookups: dict[str, int | None] = {}
    for tag, (_, bound) in held.items():
        for key in (client_key(tag), exchange_key(tag)) if bound else (client_key(tag),):
            lookups[key] = eng.lookup(key)
    for tag in released:
        for key in (client_key(tag), exchange_key(tag)):
            lookups[key] = eng.lookup(key)
    final = verify_orders(rows, held, keys_of, lookups, released,
                          complete=len(summaries) == config.workers)
    found = _add_violations(res, counters, VIOLATIONS, final.by_category,
                            [f"end-of-run scan: {m}" for m in final.messages], stalls)
    res.verification["reads_checked"] = (counters["lookup_found"] + counters["fills_applied"]
                                         + counters["released"])
    lookups_done = sum(counters[k] for k in ("lookup_found", "lookup_none", "lookup_stale",
                                             "lookup_busy"))
    res.orders = {
        "lookups": {"total": lookups_done,
                    "per_s": lookups_done / res.seconds if res.seconds else 0.0,
                    "found": counters["lookup_found"], "none": counters["lookup_none"],
                    "stale": counters["lookup_stale"], "busy": counters["lookup_busy"]},
        "fills": {"applied": counters["fills_applied"], "own": counters["own_fills"],
                  "ws": counters["ws_fills"], "invalid": counters["fills_invalid"],
                  "stale": counters["fills_stale"], "busy": counters["fills_busy"]},
        "orders": {"opened": counters["opened"], "released": counters["released"],
                   "binds": counters["binds"], "cancels": counters["cancels"],
                   "open_full": counters["open_full"], "key_full": counters["key_full"],
                   "keys_out_of_order": counters["keys_out_of_order"] + final.keys_out_of_order,
                   "held_at_end": len(held), "open_at_end": final.open_orders},
        "wrong_order": {"wrong_lookup": found.get("wrong_lookup", 0),
                        "wrong_fill": found.get("wrong_fill", 0),
                        "bad_record": found.get("bad_record", 0)},
        "key_exists": found.get("key_exists", 0),
        "violations": {k: found.get(k, 0) for k in VIOLATIONS},
        "latency": _latency(summaries, CLIENT_OPS),
        "final_scan": {"open_orders": final.open_orders, "keys_checked": final.keys_checked,
                       "by_category": final.by_category},
        "max_stall_s": max(stalls, default=0.0),
        "counters": counters,
    }


def _add_accounts(res: StressResult, eng: Engine, config: StressConfig,
                  summaries: list[dict[str, Any]], stalls: list[float],
                  account_ids: tuple[int, ...], terms: acc.AccountTerms) -> None:
    """The account workload's figures and checks: the workers' counts,
    journals and latency samples, then the books of every account against
    the open positions and the journals (``verify_books``); every violation
    is added to ``res``."""
    counters = _sum_counters(summaries, acc.COUNTERS)
    journals = {a: acc.Journal() for a in account_ids}
    for s in summaries:
        for a, values in s["journal"].items():
            journals.setdefault(a, acc.Journal()).add(acc.Journal.of(values))
    held = {pos: a for s in summaries for pos, a, _, _ in s["held"]}

    # quiescent: every worker stopped.  The books, the latches, the open positions.
    books = {a: eng.account(a) for a in account_ids}
    latched = {int(r["id"]): int(r["latched"]) for r in eng.accounts()}
    rows = eng.snapshot()
    final = acc.verify_books(books, rows, dict.fromkeys(account_ids, terms.cash), journals,
                             held, complete=len(summaries) == config.workers, latched=latched)
    found = _add_violations(res, counters, acc.VIOLATIONS, final.by_category,
                            [f"books: {m}" for m in final.messages], stalls)
    res.verification["reads_checked"] = counters["books_reads"] + counters["updates"]

    secs = res.seconds
    refused = {limit: counters["refused_" + limit] for limit in acc.LIMITS}
    attempts = counters["open_attempts"]
    latency = _latency(summaries, acc.CLIENT_OPS)
    booked_ops = attempts + counters["closed"]
    total = {k: sum(getattr(j, k) for j in journals.values())
             for k in ("deposits", "withdrawals", "realized", "closes", "opens",
                       "n_deposits", "n_withdrawals")}
    account_metrics = eng.metrics()["account"]
    res.accounts = {
        "accounts": len(account_ids), "terms": terms.as_dict(),
        "opens": {"attempts": attempts, "opened": counters["opened"],
                  "refused": sum(refused.values()),
                  "refused_rate": sum(refused.values()) / attempts if attempts else 0.0,
                  "full": counters["open_full"], "busy": counters["open_busy"],
                  "per_s": attempts / secs if secs else 0.0},
        "closes": {"closed": counters["closed"], "released": counters["releases"],
                   "per_s": counters["closed"] / secs if secs else 0.0},
        "refused": {"open": refused, "withdraw": {"cash": counters["withdraw_refused"]}},
        "money": {"deposits": str(from_units(total["deposits"])),
                  "withdrawals": str(from_units(total["withdrawals"])),
                  "realized": str(from_units(total["realized"])),
                  "n_deposits": total["n_deposits"], "n_withdrawals": total["n_withdrawals"],
                  "leaked": counters["leaked"]},
        "updates": {"applied": counters["updates"], "busy": counters["update_busy"],
                    "halts": counters["halts"], "resumes": counters["resumes"],
                    "conflicts": account_metrics.conflicts, "retries": account_metrics.retries},
        "latency": latency,
        "bar": acc.bar_factor(res.ops_per_s, booked_ops / secs if secs else 0.0, latency),
        "books": [c.as_dict() for c in final.checks],
        "final_scan": {"accounts": final.accounts, "positions": final.positions,
                       "open_positions": final.open_positions, "held_at_end": len(held),
                       "by_category": final.by_category},
        "violations": {k: found.get(k, 0) for k in acc.VIOLATIONS},
        "max_stall_s": max(stalls, default=0.0),
        "counters": counters,
    }
