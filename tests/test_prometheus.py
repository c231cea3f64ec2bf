"""Monitoring: the Prometheus collector, ``python -m engine serve`` scraped
over real HTTP, and what the engine logs for an operator (issue 23)."""

from __future__ import annotations

import contextlib
import logging
import selectors
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from procs import JOIN_TIMEOUT, READY_TIMEOUT
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import (
    ORDER_SPEC,
    Engine,
    MissingExtraError,
    Outcome,
    RiskLimitError,
    Trigger,
)
from engine._native import lib
from engine.metrics import OPS, collector
from engine.prometheus import OUTCOMES, bucket_bounds

BACKENDS = ("shm", "redis")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, sorted labels)."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape_in_process(eng: Engine) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(eng))
    return parse(generate_latest(registry).decode())


def workload(eng: Engine) -> dict[str, int]:
    """A known mix: applied, invalid and paused transitions, prices, two
    accounts, one of which halts itself at max_loss on a losing close."""
    eng.set_metrics(True, 1)   # every call sampled: the histogram is the calls
    losing = eng.open_account(cash=10_000, max_exposure=10_000, max_positions=8, max_loss=5)
    other = eng.open_account(cash=500, max_exposure=500, max_positions=2, max_loss=1000)
    ps = [eng.open_position(entry_price=100.0, amount=1.0, side=1, token=i, account=losing)
          for i in (1, 2, 3)]
    eng.open_position(entry_price=50.0, amount=2.0, side=1, token=9, account=other)
    eng.open_position(entry_price=10.0, amount=1.0, token=10)
    for p in ps:
        assert eng.transition(p, Trigger.POSITION_OPENED) is Outcome.APPLIED
    eng.update_price(ps[0], 90.0)   # no exits armed: only the price moves
    for t in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
        assert eng.transition(ps[0], t) is Outcome.APPLIED   # closed at -10: halts
    assert eng.transition(ps[1], Trigger.EXIT_COMPLETED) is Outcome.INVALID
    assert eng.transition(ps[2], Trigger.PAUSE) is Outcome.APPLIED
    assert eng.account(losing).halted
    return {"losing": losing, "other": other}


@contextlib.contextmanager
def serving(eng: Engine, env: dict[str, str]) -> Iterator[str]:
    """``python -m engine serve`` on a free loopback port (``--port 0``);
    yields its URL; stopped with SIGTERM, which must end it with 0."""
    cmd = [sys.executable, "-m", "engine", "serve", eng.name, "--port", "0",
           "--addr", "127.0.0.1", *(["--url", eng.url] if eng.url else []),
           *(["--spec", "order"] if eng.spec == ORDER_SPEC else [])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)   # type: ignore[arg-type]
        assert sel.select(READY_TIMEOUT), "serve printed nothing"
        line = proc.stdout.readline()   # type: ignore[union-attr]
        assert line.startswith("serving "), (line, proc.poll())
        yield line.split(" on ", 1)[1].strip()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(JOIN_TIMEOUT) == 0, proc.stderr.read()   # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(JOIN_TIMEOUT)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def http_get(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# -- serve, scraped over HTTP ----------------------------------------------------------------
class TestServe:
    """``python -m engine serve`` answers a real HTTP GET with what the engine holds."""

    def test_counters_match_metrics(self, engine, child_env):
        """The call, retry and takeover counters equal eng.metrics() after a known workload."""
        workload(engine)
        with serving(engine, child_env) as url:
            got = http_get(url)
        m = engine.metrics()
        # on Redis, read and lookup are counted per process (see RedisStore.metrics)
        ops = [op for op in OPS if engine.url is None or op not in ("read", "lookup")]
        for op in ops:
            for outcome, field in OUTCOMES.items():
                assert value(got, "engine_calls_total", op=op, outcome=outcome) == \
                    getattr(m[op], field), (op, outcome)
            assert value(got, "engine_cas_retries_total", op=op) == m[op].retries
            assert value(got, "engine_lock_takeovers_total", op=op) == m[op].takeovers
        assert value(got, "engine_calls_total", op="transition", outcome="applied") == 7
        assert value(got, "engine_calls_total", op="transition", outcome="invalid") == 1

    def test_positions_by_state_match_snapshot(self, engine, child_env):
        """engine_positions{state} counts the snapshot's rows by state, every state listed."""
        workload(engine)
        with serving(engine, child_env) as url:
            got = http_get(url)
        states = engine.snapshot()["state"]
        for index, name in enumerate(engine.spec.states):
            assert value(got, "engine_positions", state=name) == \
                int(np.count_nonzero(states == 1 << index)), name
        assert value(got, "engine_positions", state="MONITORING") == 1
        assert value(got, "engine_positions", state="PAUSED") == 1
        assert value(got, "engine_positions", state="CLOSED") == 1
        assert value(got, "engine_positions_capacity") == engine.capacity

    def test_accounts_match_their_books(self, engine, child_env):
        """Each account's gauges equal its books.

        Per account (label: its id): cash, reserved, realized PnL, open
        positions and halted equal the account's books.
        """
        ids = workload(engine)
        with serving(engine, child_env) as url:
            got = http_get(url)
        for aid in ids.values():
            a = engine.account(aid)
            label = str(aid)
            assert value(got, "engine_account_cash", account=label) == float(a.cash)
            assert value(got, "engine_account_reserved", account=label) == float(a.reserved)
            assert value(got, "engine_account_realized_pnl", account=label) == \
                float(a.realized_pnl)
            assert value(got, "engine_account_open_positions", account=label) == \
                a.open_positions
            assert value(got, "engine_account_halted", account=label) == int(a.halted)
        assert value(got, "engine_account_realized_pnl", account=str(ids["losing"])) == -10.0
        assert value(got, "engine_account_halted", account=str(ids["losing"])) == 1

    def test_histogram_is_the_c_buckets(self, engine, child_env):
        """engine_call_duration_seconds has the C histogram's buckets and counts.

        engine_call_duration_seconds: one bucket per C bucket, le = (2^b - 1)
        ns, +Inf last, cumulative counts equal to the merged C histogram.
        """
        workload(engine)
        with serving(engine, child_env) as url:
            got = http_get(url)
        metrics, hist = engine._metrics_with_latency()
        bounds = [*bucket_bounds(), float("inf")]
        for i, op in enumerate(OPS):
            les = sorted(float(dict(k[1])["le"]) for k in got
                         if k[0] == "engine_call_duration_seconds_bucket"
                         and dict(k[1])["op"] == op)
            assert les == bounds
            if engine.url is not None:
                continue   # the server's histogram is serve's own round trips (none)
            cum = np.cumsum(hist[i])
            for b, le in enumerate(bounds):
                assert value(got, "engine_call_duration_seconds_bucket", op=op,
                             le=repr(le) if b < len(bounds) - 1 else "+Inf") == cum[b]
            assert cum[-1] == metrics[op].samples
        if engine.url is None:
            assert value(got, "engine_call_duration_seconds_bucket", op="transition",
                         le="+Inf") == 8   # every transition sampled

    def test_order_spec_states(self, make_engine, child_env):
        """serve --spec order: engine_positions names ORDER_SPEC's states."""
        eng = make_engine(spec=ORDER_SPEC)
        o = eng.open(key="o1", qty=2.0, limit_px=10.0, side=1)
        assert eng.transition(o, "SUBMIT") is Outcome.APPLIED
        eng.open(key="o2", qty=1.0, limit_px=11.0, side=1)
        with serving(eng, child_env) as url:
            got = http_get(url)
        assert value(got, "engine_positions", state="SUBMITTED") == 1
        assert value(got, "engine_positions", state="INITIALIZED") == 1
        assert value(got, "engine_positions", state="FILLED") == 0

    @pytest.mark.shm_only
    def test_registry_alive_and_dead(self, engine, child_env):
        """engine_registry_entries counts a killed process dead until recover()."""
        pos = engine.open_position(entry_price=100.0, amount=1.0, token=1)
        die_holding_latch(engine, pos, child_env)
        with serving(engine, child_env) as url:
            got = http_get(url)
        assert value(got, "engine_registry_entries", status="alive") == 2
        assert value(got, "engine_registry_entries", status="dead") == 1

    @pytest.mark.shm_only
    def test_a_scrape_beside_a_held_latch_answers(self, engine, child_env):
        """A scrape beside a dead process's held latch answers and leaves the latch alone."""
        pos = engine.open_position(entry_price=100.0, amount=1.0, token=1)
        die_holding_latch(engine, pos, child_env)
        slot = engine.slot_of(pos)
        latched = engine._slot(slot).pword & ((1 << 24) - 1)
        assert latched
        with serving(engine, child_env) as url:
            got = http_get(url)
            got = http_get(url)
        assert value(got, "engine_positions", state="CREATED") == 1
        assert engine._slot(slot).pword & ((1 << 24) - 1) == latched

    def test_help(self, child_env):
        """serve --help names its options and exits 0."""
        r = subprocess.run([sys.executable, "-m", "engine", "serve", "--help"], env=child_env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0
        for opt in ("--port", "--addr", "--url", "9464", "NAME"):
            assert opt in r.stdout

    def test_unknown_engine_fails_cleanly(self, child_env):
        """A name that does not exist: exit 1 and a message, no server."""
        r = subprocess.run([sys.executable, "-m", "engine", "serve", "no_such_seg_x1",
                            "--port", "0"], env=child_env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1
        assert "cannot attach" in r.stderr


def die_holding_latch(eng: Engine, pos: int, env: dict[str, str]) -> int:
    """A process attaches, takes pos's price latch (C test helper) and is
    SIGKILLed holding it; its pid."""
    code = ("import os, signal, sys; from engine import Engine; from engine._native import lib;"
            f"e = Engine.attach({eng.name!r}); assert lib.eng_test_hold(e._seg, 1, {pos}) == 0;"
            "print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    return int(r.stdout.split()[0])


# -- the bucket mapping -------------------------------------------------------------------------
class TestBuckets:
    """C's log2 buckets map to Prometheus le bounds exactly."""

    def test_every_whole_ns_latency_lands_under_its_bucket_bound(self):
        """Every whole-ns latency lands in the first bucket whose le bound holds it.

        For latencies at and around every power of two, C's bucket
        (bit_length, clamped) is the first whose le bound holds it.
        """
        bounds = [*bucket_bounds(), float("inf")]
        assert len(bounds) == lib.ENG_HIST_BUCKETS
        for k in range(lib.ENG_HIST_BUCKETS + 2):
            for ns in {max(0, 2**k - 1), 2**k, 2**k + 1}:
                b = min(ns.bit_length(), lib.ENG_HIST_BUCKETS - 1)   # as op_end in C
                s = ns / 1e9
                assert s <= bounds[b], (ns, b)
                assert b == 0 or s > bounds[b - 1], (ns, b)

    def test_in_process_histogram_counts(self, engine):
        """The collector's buckets are the cumulative merged C histogram."""
        workload(engine)
        got = scrape_in_process(engine)
        _, hist = engine._metrics_with_latency()
        i = OPS.index("transition")
        assert value(got, "engine_call_duration_seconds_bucket", op="transition",
                     le="+Inf") == int(hist[i].sum())
        assert ("engine_call_duration_seconds_sum",
                (("op", "transition"),)) not in got   # C keeps no sum: none invented


# -- the extra ---------------------------------------------------------------------------------
class TestExtra:
    """prometheus_client is optional: without it, a typed error names the extra."""

    def test_missing_prometheus_client(self, engine, monkeypatch):
        """collector() without prometheus_client raises MissingExtraError naming engine[metrics]."""
        for mod in [m for m in sys.modules if m.startswith("prometheus_client")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, "prometheus_client", None)
        with pytest.raises(MissingExtraError, match=r"engine\[metrics\]") as e:
            collector(engine)
        assert isinstance(e.value, ImportError)
        assert engine.metrics()["open"].attempts == 0


# -- logging -----------------------------------------------------------------------------------
class TestLogging:
    """What an operator must know is logged on logging.getLogger("engine")."""

    def test_account_that_halted_itself(self, engine, caplog):
        """An opening refused by a self-halted account logs a warning naming it, once."""
        ids = workload(engine)
        caplog.set_level(logging.INFO, logger="engine")
        for _ in range(2):
            with pytest.raises(RiskLimitError):
                engine.open_position(entry_price=1.0, amount=1.0, account=ids["losing"])
        recs = [r for r in caplog.records if r.name == "engine"
                and str(ids["losing"]) in r.getMessage()]
        assert len(recs) == 1, [r.getMessage() for r in caplog.records]
        assert recs[0].levelno == logging.WARNING
        assert "halted itself" in recs[0].getMessage()

    def test_operator_halt_is_not_logged_by_the_refusal(self, engine, caplog):
        """An account an operator halted refuses openings without a log line.

        An account an operator halted refuses openings without a log line
        from the refusal (the operator knows; the collector still reports it).
        """
        a = engine.open_account(cash=100, max_exposure=100, max_positions=2, max_loss=5)
        engine.halt_account(a)
        caplog.set_level(logging.INFO, logger="engine")
        with pytest.raises(RiskLimitError):
            engine.open_position(entry_price=1.0, amount=1.0, account=a)
        assert not [r for r in caplog.records if r.name == "engine"]

    def test_concurrent_scrapes_agree(self, engine, child_env):
        """Eight concurrent scrapes all answer 200 with the same counters."""
        workload(engine)
        with serving(engine, child_env) as url, ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _: http_get(url), range(8)))
        want = value(got[0], "engine_calls_total", op="transition", outcome="applied")
        assert want == 7
        assert all(value(g, "engine_calls_total", op="transition", outcome="applied") == want
                   for g in got)

    def test_scrape_logs_a_halted_account_once(self, engine, caplog):
        """The collector logs an account it first sees halted, once."""
        ids = workload(engine)
        caplog.set_level(logging.INFO, logger="engine")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector(engine))
        generate_latest(registry)
        generate_latest(registry)
        recs = [r for r in caplog.records if str(ids["losing"]) in r.getMessage()]
        assert len(recs) == 1 and "halted itself" in recs[0].getMessage()
        assert not [r for r in caplog.records if str(ids["other"]) in r.getMessage()]

    @pytest.mark.shm_only
    def test_takeover_and_recover(self, engine, child_env, caplog):
        """A latch takeover and what recover() released are logged at the next scrape."""
        caplog.set_level(logging.INFO, logger="engine")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector(engine))
        generate_latest(registry)
        assert not caplog.records
        pos = engine.open_position(entry_price=100.0, amount=1.0, token=1)
        pid = die_holding_latch(engine, pos, child_env)
        engine.update_price(pos, 101.0)   # takes the dead writer's latch over
        generate_latest(registry)
        msgs = [r.getMessage() for r in caplog.records]
        assert any("1 price lock(s) taken over" in m for m in msgs), msgs
        caplog.clear()
        report = engine.recover()
        assert report.removed_pids == (pid,)
        msgs = [r.getMessage() for r in caplog.records]
        assert any("recover()" in m and str(pid) in m for m in msgs), msgs
        caplog.clear()
        assert not engine.recover().changed
        assert not caplog.records   # nothing done: nothing said

    def test_redis_resend(self, backend, engine, caplog):
        """Calls resent after lost connections are logged, one line a second at most.

        Calls sent again after lost connections are logged, one line a
        second at most (a burst of five resends: one line).
        """
        if backend != "redis":
            pytest.skip("a Redis connection's resend")
        import redis
        pos = engine.open_position(entry_price=100.0, amount=1.0, token=1)
        conn = engine._seg.conn
        send = conn._send
        failed: list[int] = []

        def lose_five(*args: Any, **kw: Any) -> Any:
            if len(failed) < 5:
                failed.append(1)
                raise redis.ConnectionError("connection lost (test)")
            return send(*args, **kw)

        caplog.set_level(logging.INFO, logger="engine")
        resent0 = conn.resent
        conn._send = lose_five
        try:
            assert engine.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
        finally:
            conn._send = send
        assert conn.resent == resent0 + 5
        msgs = [r.getMessage() for r in caplog.records if r.name == "engine"]
        assert len(msgs) == 1 and "sent again after ConnectionError" in msgs[0], msgs
