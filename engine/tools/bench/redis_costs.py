"""What one call of the engine on Redis costs against a raw EVALSHA round
trip, and where its time goes.

One spawned process calls, in interleaved rounds (so that a change of the
host's load during the run moves every kind alike), a block of each of:

``evalsha_raw``
    ``EVALSHA`` of a script that returns 0, sent and read on one connection
    of redis-py (``send_command`` / ``read_response``): the floor of a round
    trip from Python;
``evalsha``
    the same script through ``Redis.evalsha``, the client call people use
    (it adds redis-py's connection pool and reply callbacks);
``peer_transition``
    the "Redis 7 Lua" peer's transition (``Redis.evalsha`` of its script);
``engine_fcall``
    the engine's ``tx`` function sent as the store's own round trip does it
    (``_Conn.fcall``: the engine's command with its declared keys and request
    number, without ``Engine`` and ``RedisStore`` around it);
``engine_transition`` / ``engine_update_price``
    ``Engine.transition`` (PAUSE, RESUME) and ``Engine.update_price`` on an
    engine on the same server.

Per kind: the median over rounds of the wall time per call, and the
process's CPU time per call (user + system: the Python of the engine, of
redis-py's packing and parsing, and the socket calls).  Then, per kind
alone, the server's own time per call: ``INFO commandstats``
``usec_per_call`` of its command (FCALL or EVALSHA) after a ``CONFIG
RESETSTAT``.  What is neither is the wait for the other process (the
kernel's wake-ups, scheduling, the server's event loop).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

from engine._native import lib
from engine.core import Engine, Handle
from engine.spec import Trigger
from engine.tools.bench.peers import (
    _REDIS_TRANSITION,
    APPLIED,
    INVALID,
    MONITORING,
    NT,
    PAUSE,
    RESUME,
    TABLE,
)

KINDS = ("evalsha_raw", "evalsha", "peer_transition", "engine_fcall", "engine_transition",
         "engine_update_price")
LABELS = {
    "evalsha_raw": "EVALSHA 'return 0', one connection",
    "evalsha": "EVALSHA 'return 0', Redis.evalsha",
    "peer_transition": "Redis 7 Lua transition (evalsha)",
    "engine_fcall": "engine 'tx' FCALL, _Conn.fcall",
    "engine_transition": "engine on Redis: transition",
    "engine_update_price": "engine on Redis: update_price",
}
#: the command whose commandstats time the server spends on each kind
COMMAND = {"evalsha_raw": "evalsha", "evalsha": "evalsha", "peer_transition": "evalsha",
           "engine_fcall": "fcall", "engine_transition": "fcall",
           "engine_update_price": "fcall"}
BLOCK = 50          # calls per kind per round


def _calls(port: int, handle: Handle) -> tuple[dict[str, Callable[[int], None]], Any, Any]:
    """The kinds, each as ``run(n)``: n calls; and the client and engine to close."""
    import redis

    r: Any = redis.Redis(host="127.0.0.1", port=port)
    sha0 = r.script_load("return 0")
    table = "".join(f"\\{b}" for b in TABLE)
    sha_t = r.script_load(_REDIS_TRANSITION.format(table=table, nt=NT, invalid=INVALID,
                                                   applied=APPLIED))
    r.hset("probe:s", mapping={"st": MONITORING, "gen": 0})
    conn: Any = r.connection_pool.get_connection("_")
    eng = Engine.attach(handle)
    pos = eng.id_of(0)
    from engine.store.redis import RedisStore
    from engine.store.redis.connection import _packed_keys
    store = eng.store
    assert isinstance(store, RedisStore)
    slot, op = eng.slot_of(pos), pos >> lib.ENG_ID_SLOT_BITS
    route = store._fixed[0][0]
    keys = _packed_keys([*store._fixed[0],
                         *(f"{store.prefixes[0]}{x}:{slot}" for x in ("p", "g", "wf", "w"))])
    inc = store.inc
    send, read, evalsha = conn.send_command, conn.read_response, r.evalsha
    call, transition, update_price = store.conn.fcall, eng.transition, eng.update_price

    def evalsha_raw(n: int) -> None:
        for _ in range(n):
            send("EVALSHA", sha0, 1, "probe:x")
            read()

    def evalsha_(n: int) -> None:
        for _ in range(n):
            evalsha(sha0, 1, "probe:x")

    def peer_transition(n: int) -> None:
        for i in range(n):
            evalsha(sha_t, 1, "probe:s", RESUME if i & 1 else PAUSE)

    def engine_fcall(n: int) -> None:
        for i in range(n):
            store._seq += 1   # each a new request (the store's own calls go on from it)
            call(route, keys, 7, "tx",
                 (inc, store._seq, slot, op, RESUME if i & 1 else PAUSE, 0, b""))

    def engine_transition(n: int) -> None:
        for i in range(n):
            transition(pos, RESUME if i & 1 else PAUSE)

    def engine_update_price(n: int) -> None:
        for i in range(n):
            update_price(pos, 99.5 if i & 1 else 101.5)

    runs: dict[str, Callable[[int], None]] = {
        "evalsha_raw": evalsha_raw, "evalsha": evalsha_, "peer_transition": peer_transition,
        "engine_fcall": engine_fcall, "engine_transition": engine_transition,
        "engine_update_price": engine_update_price}
    return runs, r, (eng, conn)


def _commandstats(r: Any, command: str) -> tuple[int, float]:
    """(calls, usec_per_call) of ``command`` since the last CONFIG RESETSTAT."""
    s = r.info("commandstats").get(f"cmdstat_{command}", {})
    return int(s.get("calls", 0)), float(s.get("usec_per_call", 0.0))


def _probe(port: int, handle: Handle, seconds: float, results: Any) -> None:
    """The worker: interleaved rounds, then each kind alone for commandstats."""
    out: dict[str, Any] = {}
    try:
        runs, r, (eng, conn) = _calls(port, handle)
        for run in runs.values():      # warm up: connections, caches, the scripts
            run(BLOCK)
        wall: dict[str, list[float]] = {k: [] for k in KINDS}
        cpu: dict[str, float] = dict.fromkeys(KINDS, 0.0)
        calls = 0
        deadline = time.monotonic() + seconds
        while calls < 20 or time.monotonic() < deadline:
            for k in KINDS:
                c0, t0 = time.process_time_ns(), time.perf_counter_ns()
                runs[k](BLOCK)
                t1, c1 = time.perf_counter_ns(), time.process_time_ns()
                wall[k].append((t1 - t0) / BLOCK / 1e3)
                cpu[k] += (c1 - c0) / 1e3
            calls += 1
        server: dict[str, float] = {}
        for k in KINDS:
            r.config_resetstat()
            runs[k](20 * BLOCK)
            n, usec = _commandstats(r, COMMAND[k])
            server[k] = usec if n >= 20 * BLOCK else float("nan")
        out = {"rounds": calls, "block": BLOCK,
               "kinds": {k: {"label": LABELS[k], "wall_us": statistics.median(wall[k]),
                             "wall_us_p10": statistics.quantiles(wall[k], n=10)[0],
                             "client_cpu_us": cpu[k] / (calls * BLOCK),
                             "server_us": server[k]} for k in KINDS}}
        eng.close()
        conn.disconnect()
        r.delete("probe:s")
        r.close()
    except Exception as e:   # reported, not raised: the bench carries on
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
    results.put(out)


def measure(port: int, seconds: float) -> dict[str, Any]:
    """Create an engine with one MONITORING position on the server at
    ``port``, run the probe against both in a spawned process, remove the
    engine; the figures (or {"error": ...})."""
    eng = Engine.create(capacity=1, url=f"redis://127.0.0.1:{port}/0")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_probe, args=(port, eng.handle, seconds, results), daemon=True,
                    name="bench-redis-costs")
    try:
        eng.transition(eng.open_position(100.0, 2.0, token=1), Trigger.POSITION_OPENED)
        p.start()
        deadline = time.monotonic() + seconds + 120
        while True:
            try:
                out: dict[str, Any] = results.get(timeout=0.5)
                break
            except queue.Empty:
                if p.exitcode is not None:
                    out = {"error": f"the probe died (exit code {p.exitcode})"}
                    break
                if time.monotonic() > deadline:
                    out = {"error": "the probe did not report in time"}
                    break
    finally:
        if p.pid is not None:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join()
        results.close()
        eng.close()
        eng.unlink()
    if "kinds" in out:
        k = out["kinds"]
        eng_t = k["engine_transition"]["wall_us"]
        raw = k["evalsha"]["wall_us"]
        out["ratios"] = {
            "transition_vs_evalsha": eng_t / raw,
            "transition_vs_evalsha_raw": eng_t / k["evalsha_raw"]["wall_us"],
            "transition_vs_peer": eng_t / k["peer_transition"]["wall_us"],
            "update_price_vs_evalsha": k["engine_update_price"]["wall_us"] / raw,
        }
    return out


def report_lines(costs: dict[str, Any], target: float) -> list[str]:
    """The probe's table and ratios, for the bench's report."""
    if "error" in costs:
        return [f"engine on Redis, cost per call: probe FAILED: {costs['error']}"]
    lines = [f"engine on Redis, cost per call (same server; median of {costs['rounds']} "
             f"interleaved rounds of {costs['block']} calls):",
             f"  {'call':36s} {'wall us':>8s} {'client cpu us':>14s} {'server us':>10s} "
             f"{'rest us':>8s}"]
    for k in KINDS:
        m = costs["kinds"][k]
        rest = m["wall_us"] - m["client_cpu_us"] - m["server_us"]
        lines.append(f"  {m['label']:36s} {m['wall_us']:8.1f} {m['client_cpu_us']:14.1f} "
                     f"{m['server_us']:10.1f} {rest:8.1f}")
    r = costs["ratios"]
    verdict = "met" if r["transition_vs_evalsha"] <= target else "MISSED"
    lines += [
        "  client cpu: Python (engine, redis-py packing and parsing) and the socket calls; "
        "server: commandstats usec_per_call;",
        "  rest: waiting for the other process (wake-ups, scheduling, the event loop)",
        f"  engine transition / raw EVALSHA round trip (Redis.evalsha): "
        f"{r['transition_vs_evalsha']:.2f}x (target <= {target:g}x: {verdict}); "
        f"/ one-connection EVALSHA: {r['transition_vs_evalsha_raw']:.2f}x; "
        f"/ Redis 7 Lua transition: {r['transition_vs_peer']:.2f}x",
        f"  engine update_price / raw EVALSHA round trip (Redis.evalsha): "
        f"{r['update_price_vs_evalsha']:.2f}x",
    ]
    return lines
