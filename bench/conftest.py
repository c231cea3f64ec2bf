"""pytest-benchmark harness: hot calls measured against the empty-call floor.

Run with ``python -m pytest bench --benchmark-only`` (the test suite never
collects this folder: ``testpaths = ["tests"]``).

How a number is made
--------------------
Every benchmark times *rounds* of ``OPS_PER_ROUND`` (1000) calls, unrolled ten
to a loop iteration, in a function compiled for the purpose with every name a
fast local (as ``timeit`` does).  So pytest-benchmark's table, in microseconds
per round, reads directly as **nanoseconds per call**, and the loop costs the
same ~1 ns per call in the floor and in the hot call, which keeps the ratios
honest.  The batch benchmark times one ``update_prices`` call of
``BATCH_SLOTS`` slots per round instead.

Floors, all measured in the same run:

* ``floor_noop``: ``lib.eng_noop()``, the cheapest cffi call (METH_NOARGS).
* ``floor_1arg``: ``lib.eng_check(seg)`` (METH_O).
* ``floor_2arg``: ``lib.eng_state(seg, id)``: one acquire load of C work;
  cffi packs two or more arguments into a tuple (METH_VARARGS).
* same-shape floors: the hot call itself with an argument that C refuses
  before doing any work (a trigger past the table, a NaN price, a slot past
  the capacity).  The cffi signature is identical, so the argument
  conversion is identical, and the C side is a null check and one or two
  compares.

At the end of the session a summary of ns per call and the ratios to the
floors is printed and written to ``bench/results.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine import Engine, Trigger

#: Calls per timed round: us per round == ns per call.
OPS_PER_ROUND = 1000
#: Calls written out per loop iteration (amortises the loop to ~1 ns a call).
UNROLL = 10
#: Capacity of the benchmark engine, and the size of the batch benchmark.
CAPACITY = 10_000
BATCH_SLOTS = 10_000
RESULTS_PATH = Path(__file__).with_name("results.json")


# -- recording ---------------------------------------------------------------------------
@dataclass
class Measurement:
    """One benchmark, reduced to cost per unit (ns per call, or per slot)."""

    key: str
    unit: str                 # "call" or "slot"
    units_per_round: int
    rounds: int
    min_ns: float
    median_ns: float
    mean_ns: float
    stddev_ns: float


@dataclass
class Recorder:
    """Collects measurements during the session for the summary."""

    results: dict[str, Measurement] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)

    def record(self, benchmark: Any, key: str, units_per_round: int,
               unit: str = "call") -> None:
        """Reduce ``benchmark``'s stats (seconds per round) to ns per unit."""
        meta = getattr(benchmark, "stats", None)
        stats = getattr(meta, "stats", None)
        if stats is None or not getattr(stats, "data", None):   # --benchmark-disable
            return
        scale = 1e9 / units_per_round
        benchmark.extra_info.update({"unit": unit, "units_per_round": units_per_round})
        self.results[key] = Measurement(
            key=key, unit=unit, units_per_round=units_per_round, rounds=len(stats.data),
            min_ns=stats.min * scale, median_ns=stats.median * scale,
            mean_ns=stats.mean * scale,
            stddev_ns=(stats.stddev if len(stats.data) > 1 else 0.0) * scale)

    def note(self, key: str, value: float) -> None:
        """Record a value that is not a time (bytes per position, ...)."""
        self.values[key] = value


_RECORDER = pytest.StashKey[Recorder]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDER] = Recorder()


@pytest.fixture(scope="session")
def recorder(pytestconfig: pytest.Config) -> Recorder:
    """The session's recorder (read by the terminal summary)."""
    return pytestconfig.stash[_RECORDER]


# -- the engine under test -------------------------------------------------------------------
@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """A 10 000-slot engine, every slot open and MONITORING; unlinked at the end."""
    eng = Engine.create(capacity=CAPACITY)
    try:
        ids = []
        for i in range(CAPACITY):
            pos = eng.open_position(entry_price=100.0, amount=2.0,
                                    side=1 if i % 2 else -1, token=i % 64)
            eng.transition(pos, Trigger.POSITION_OPENED)
            ids.append(pos)
        eng.update_prices(ids, [100.0] * CAPACITY)
        yield eng
    finally:
        eng.close()
        eng.unlink()


@pytest.fixture
def metrics_default(engine: Engine) -> Iterator[Engine]:
    """Metrics on with the default sampling, restored afterwards."""
    engine.set_metrics(True, 64)
    yield engine
    engine.set_metrics(True, 64)


# -- timing helpers ----------------------------------------------------------------------------
def compile_loop(body: list[str], names: dict[str, Any],
                 ops: int = OPS_PER_ROUND) -> Callable[[], None]:
    """A function running ``ops`` calls: the statements of ``body`` (each one
    call) written out to ``UNROLL`` calls per iteration of a loop over
    ``itertools.repeat``; every name in ``names`` is a fast local."""
    if UNROLL % len(body) or ops % UNROLL:
        raise ValueError(f"{len(body)} statements do not divide {UNROLL}, or {ops} % {UNROLL}")
    stmts = "; ".join(body * (UNROLL // len(body)))
    params = ", ".join(f"{k}=__names[{k!r}]" for k in names)
    src = (f"def __loop({params}, __repeat=__rep):\n"
           f"    for _ in __repeat(None, {ops // UNROLL}):\n"
           f"        {stmts}\n")
    ns: dict[str, Any] = {"__names": names, "__rep": itertools.repeat}
    exec(compile(src, f"<bench loop: {body}>", "exec"), ns)
    return ns["__loop"]  # type: ignore[no-any-return]


def rounds_for(config: pytest.Config, fn: Callable[[], object], floor: int = 50,
               cap: int = 20_000) -> int:
    """Rounds that fill ``--benchmark-max-time`` (default 1 s) for ``fn``."""
    max_time = float(config.getoption("benchmark_max_time", 1.0) or 1.0)
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return int(min(cap, max(floor, math.ceil(max_time / one))))


@dataclass
class CallTimer:
    """What a benchmark test needs: time a loop of calls or a function per
    round, and record the result for the summary."""

    benchmark: Any
    config: pytest.Config
    recorder: Recorder

    def calls(self, key: str, body: list[str], **names: Any) -> None:
        """Time ``body`` (statements of one call each, over ``names``) as
        ``OPS_PER_ROUND`` calls per round; record ns per call as ``key``."""
        self.rounds(key, compile_loop(body, names), OPS_PER_ROUND)

    def rounds(self, key: str, fn: Callable[[], object], units_per_round: int,
               unit: str = "call") -> None:
        """Time ``fn`` per round (warm-up first, rounds filling the time
        budget); record ns per unit as ``key``."""
        n = rounds_for(self.config, fn)
        self.benchmark.pedantic(fn, rounds=n, warmup_rounds=max(5, n // 20), iterations=1)
        self.recorder.record(self.benchmark, key, units_per_round, unit)

    def interleaved(self, body: list[str], names: dict[str, Any],
                    settings: dict[str, Callable[[], object]], rounds: int = 300) -> None:
        """Time ``body`` under each of ``settings`` (name -> function that
        applies it), alternating round by round; note the best ns per call of
        each as ``<name>_ns``.  Drift in the host's speed hits all alike."""
        loop = compile_loop(body, names)
        best = dict.fromkeys(settings, math.inf)
        for _ in range(rounds):
            for key, apply in settings.items():
                apply()
                t0 = time.perf_counter_ns()
                loop()
                best[key] = min(best[key], (time.perf_counter_ns() - t0) / OPS_PER_ROUND)
        for key, ns in best.items():
            self.recorder.note(f"{key}_ns", ns)


@pytest.fixture
def timer(benchmark: Any, request: pytest.FixtureRequest, recorder: Recorder) -> CallTimer:
    """A ``CallTimer`` over this test's ``benchmark`` fixture."""
    return CallTimer(benchmark, request.config, recorder)


# -- the summary -------------------------------------------------------------------------------
#: hot call -> (same-shape floor, target ratio)
#: hot call -> (same-shape cffi floor, target ratio to the empty Python method
#: of the same arguments, that method's floor)
HOT_CALLS: dict[str, tuple[str, float | None, str]] = {
    "transition": ("floor_transition_shape", 2.0, "floor_method_transition"),
    "update_price": ("floor_update_price_shape", 2.0, "floor_method_update_price"),
    "price_read": ("floor_price_read_shape", 3.0, "floor_method_price"),
    "transition_raw": ("floor_transition_shape", None, "floor_method_transition"),
    "update_price_raw": ("floor_update_price_shape", None, "floor_method_update_price"),
    "price_read_raw": ("floor_price_read_shape", None, "floor_method_price"),
    # the journal's cost (test_bench_journal): the same calls without it, and prices journaled
    "transition_no_journal": ("floor_transition_shape", None, "floor_method_transition"),
    "update_price_no_journal": ("floor_update_price_shape", None, "floor_method_update_price"),
    "update_price_journaled": ("floor_update_price_shape", None, "floor_method_update_price"),
    "update_price_armed": ("floor_update_price_shape", 2.0, "floor_method_update_price"),
    "update_price_armed_raw": ("floor_update_price_shape", None, "floor_method_update_price"),
}
#: exits (bench/test_bench_exits.py): armed call -> (the unarmed call, target ratio)
EXITS: dict[str, tuple[str, float]] = {
    "update_price_armed": ("update_price", 1.1),
    "update_price_armed_raw": ("update_price_raw", 1.1),
    "exit_ab_armed": ("exit_ab_unarmed", 1.1),
}
FLOORS = ("floor_noop", "floor_1arg", "floor_2arg", "floor_transition_shape",
          "floor_update_price_shape", "floor_price_read_shape", "floor_method_transition",
          "floor_method_update_price", "floor_method_price")
TARGET_BATCH_NS = 10.0
TARGET_BYTES = 576   # 11 words since trailing_stop and exit_price (512 with 9)
TARGET_METRICS_PCT = 10.0
#: measured key -> (floor key measured in the same run, target: ns per unit, or None)
SPEED: dict[str, tuple[str, float | None]] = {
    "update_token_price_raw": ("floor_token_price_shape", 5000.0),
    "update_token_price": ("floor_token_price_shape", 5000.0),
    "ten_update_price_raw": ("floor_token_price_shape", None),
    "states_10k": ("floor_vec_call_empty", 20.0),
    "prices_10k": ("floor_vec_call_empty", 20.0),
    "transition_many_10k": ("floor_vec_call_empty", 20.0),
    "update_prices_1M_raw": ("numpy_copy_128B_1M", None),   # target: <= 2x the floor
    "update_prices_10k": ("numpy_copy_128B_10k", TARGET_BATCH_NS),
    "update_prices_10k_raw": ("numpy_copy_128B_10k", TARGET_BATCH_NS),
}


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "MISSED")


def summarize(rec: Recorder) -> dict[str, Any]:
    """Ratios and target verdicts from the recorded measurements (min-based:
    interference on a shared host only ever adds time)."""
    r = rec.results
    out: dict[str, Any] = {"floors": {}, "calls": {}, "batch": {}, "memory": {}, "metrics": {},
                           "speed": {}}
    for k, (floor_key, target) in SPEED.items():
        if k in r:
            f = r.get(floor_key)
            ratio = r[k].min_ns / f.min_ns if f else math.nan
            met = (r[k].min_ns <= target if target is not None
                   else ratio <= 2.0 if k == "update_prices_1M_raw" else None)
            out["speed"][k] = {"unit": r[k].unit, "min_ns": r[k].min_ns,
                               "median_ns": r[k].median_ns, "floor": floor_key,
                               "floor_min_ns": f.min_ns if f else None,
                               "ratio_to_floor": ratio, "target_ns": target, "target_met": met}
    for k in FLOORS:
        if k in r:
            out["floors"][k] = {"min_ns": r[k].min_ns, "median_ns": r[k].median_ns}
    noop = r.get("floor_noop")
    for k, (shape_key, target, method_key) in HOT_CALLS.items():
        if k not in r:
            continue
        shape, method = r.get(shape_key), r.get(method_key)
        row: dict[str, Any] = {"min_ns": r[k].min_ns, "median_ns": r[k].median_ns,
                               "same_shape_floor": shape_key, "method_floor": method_key,
                               "target_ratio": target}
        if method:   # the measure: an empty Python method of the same arguments
            row["ratio_to_method"] = r[k].min_ns / method.min_ns
            row["ratio_to_method_median"] = r[k].median_ns / method.median_ns
            row["target_met"] = None if target is None else row["ratio_to_method"] <= target
        if noop:
            row["ratio_to_noop"] = r[k].min_ns / noop.min_ns
            row["ratio_to_noop_median"] = r[k].median_ns / noop.median_ns
            row["target_met_vs_noop"] = None if target is None else row["ratio_to_noop"] <= target
        if shape:
            row["ratio_to_same_shape"] = r[k].min_ns / shape.min_ns
            row["ratio_to_same_shape_median"] = r[k].median_ns / shape.median_ns
            row["target_met_vs_same_shape"] = (None if target is None
                                               else row["ratio_to_same_shape"] <= target)
        out["calls"][k] = row
    out["exits"] = {}
    for k, (base, target) in EXITS.items():
        a = r[k].min_ns if k in r else rec.values.get(f"{k}_ns")
        b = r[base].min_ns if base in r else rec.values.get(f"{base}_ns")
        if a and b:
            out["exits"][k] = {"armed_ns": a, "unarmed": base, "unarmed_ns": b,
                               "ratio": a / b, "target_ratio": target,
                               "target_met": a / b <= target}
    for q in ("p50", "p99"):
        if f"exit_wake_{q}_ns" in rec.values:
            out["exits"][f"wake_{q}_us"] = rec.values[f"exit_wake_{q}_ns"] / 1e3
    for k in ("update_prices_batch", "update_prices_batch_raw", "update_prices_armed_batch",
              "update_prices_armed_batch_raw", "update_prices_no_exits_batch_raw"):
        if k in r:
            out["batch"][k] = {"ns_per_slot_min": r[k].min_ns, "ns_per_slot_median": r[k].median_ns,
                               "slots": r[k].units_per_round, "target_ns_per_slot": TARGET_BATCH_NS,
                               "target_met": r[k].min_ns <= TARGET_BATCH_NS}
    if "bytes_per_position" in rec.values:
        marginal = rec.values["marginal_bytes_per_position"]   # what one more position costs
        out["memory"] = {"capacity": CAPACITY, "segment_bytes": rec.values["segment_bytes"],
                         "bytes_per_position": rec.values["bytes_per_position"],
                         "marginal_bytes_per_position": marginal,
                         "target_bytes": TARGET_BYTES, "target_met": marginal <= TARGET_BYTES}
    on, off = r.get("transition_metrics_on"), r.get("transition_metrics_off")
    if on and off:
        pct = (on.min_ns / off.min_ns - 1) * 100
        out["metrics"] = {"on_ns": on.min_ns, "off_ns": off.min_ns, "overhead_pct": pct,
                          "overhead_pct_median": (on.median_ns / off.median_ns - 1) * 100,
                          "target_pct": TARGET_METRICS_PCT}
        ab_on, ab_off = rec.values.get("metrics_ab_on_ns"), rec.values.get("metrics_ab_off_ns")
        if ab_on and ab_off:
            out["metrics"].update(ab_on_ns=ab_on, ab_off_ns=ab_off,
                                  ab_overhead_pct=(ab_on / ab_off - 1) * 100)
        worst = max(pct, out["metrics"].get("ab_overhead_pct", pct))
        out["metrics"]["target_met"] = worst <= TARGET_METRICS_PCT
    return out


def format_summary(s: dict[str, Any]) -> list[str]:
    """The summary as terminal lines."""
    lines = ["ns per call = min over rounds of (round time / calls per round); "
             "ratios are min / min"]
    lines.append(f"{'floor':28s} {'min ns':>8s} {'median ns':>10s}")
    for k, v in s["floors"].items():
        lines.append(f"{k:28s} {v['min_ns']:8.1f} {v['median_ns']:10.1f}")
    if s["calls"]:
        lines.append("")
        lines.append(f"{'hot call':18s} {'min ns':>7s} {'med ns':>7s} {'x method':>8s} "
                     f"{'x noop':>7s} {'x shape':>8s} {'target':>7s}  verdict (x empty method)")
        for k, v in s["calls"].items():
            tgt = v["target_ratio"]
            lines.append(
                f"{k:18s} {v['min_ns']:7.1f} {v['median_ns']:7.1f} "
                f"{v.get('ratio_to_method', math.nan):8.2f} "
                f"{v.get('ratio_to_noop', math.nan):7.2f} "
                f"{v.get('ratio_to_same_shape', math.nan):8.2f} "
                f"{'' if tgt is None else f'<={tgt:.1f}x':>7s}  "
                + ("(no target)" if tgt is None else _verdict(v.get("target_met"))))
    for k, v in s["batch"].items():
        lines.append(f"{k:28s} {v['ns_per_slot_min']:6.2f} ns/slot (median "
                     f"{v['ns_per_slot_median']:.2f}) over {v['slots']} slots, target "
                     f"<= {v['target_ns_per_slot']:.0f}: {_verdict(v['target_met'])}")
    for k, v in s["speed"].items():
        fl = v["floor_min_ns"]
        lines.append(f"{k:24s} {v['min_ns']:9.2f} ns/{v['unit']} (median {v['median_ns']:.2f}); "
                     f"floor {v['floor']} {fl if fl is None else round(fl, 2)} "
                     f"(x{v['ratio_to_floor']:.2f}) "
                     + ("" if v["target_met"] is None else _verdict(v["target_met"])))
    for k, v in s.get("exits", {}).items():
        if isinstance(v, dict):
            lines.append(f"{k:24s} {v['armed_ns']:7.1f} ns vs {v['unarmed']} "
                         f"{v['unarmed_ns']:.1f} ns: x{v['ratio']:.3f}, target "
                         f"<= {v['target_ratio']}: {_verdict(v['target_met'])}")
        else:
            lines.append(f"exit wake (tick -> executor in another process) {k}: {v:.1f}")
    if s["memory"]:
        m = s["memory"]
        lines.append(f"memory per position: {m['bytes_per_position']:.1f} B at capacity "
                     f"{m['capacity']} ({m['segment_bytes']} B segment, "
                     f"fixed part included), {m['marginal_bytes_per_position']:.0f} B "
                     f"marginal: target <= {m['target_bytes']} (marginal): "
                     f"{_verdict(m['target_met'])}")
    if s["metrics"]:
        m = s["metrics"]
        lines.append(f"metrics overhead on transition: {m['overhead_pct']:+.1f}% "
                     f"({m['on_ns']:.1f} ns on vs {m['off_ns']:.1f} ns off; median-based "
                     f"{m['overhead_pct_median']:+.1f}%)")
        if "ab_overhead_pct" in m:
            lines.append(f"  interleaved A/B, best of 300 rounds each: "
                         f"{m['ab_overhead_pct']:+.1f}% ({m['ab_on_ns']:.1f} ns on vs "
                         f"{m['ab_off_ns']:.1f} ns off)")
        lines.append(f"  target <= {m['target_pct']:.0f}% (worse of the two): "
                     f"{_verdict(m['target_met'])}")
    return lines


@pytest.hookimpl(trylast=True)   # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    rec = config.stash.get(_RECORDER, None)
    if rec is None or not (rec.results or rec.values):
        return
    summary = summarize(rec)
    terminalreporter.section("engine: ratios to the empty-call floor")
    for line in format_summary(summary):
        terminalreporter.write_line(line)
    doc = {
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "method": {"ops_per_round": OPS_PER_ROUND, "unroll": UNROLL,
                   "statistic": "min over rounds (median also given)"},
        "summary": summary,
        "measurements": {k: asdict(m) for k, m in rec.results.items()},
    }
    RESULTS_PATH.write_text(json.dumps(doc, indent=2) + "\n")
    terminalreporter.write_line(f"written to {RESULTS_PATH}")
