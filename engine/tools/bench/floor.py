"""Where one worker's time goes: the engine's hot calls taken apart, beside
the same operation on the CPU-bound peers, all in this process.

For ``transition`` and ``update_price``, four layers of the engine:

``empty call``
    ``lib.eng_noop()``: calling into C through cffi at all;
``same-shape call``
    the hot C function with an argument it refuses before any work (a
    trigger past the table, a NaN price): cffi's call with the hot call's own
    argument conversion (cffi packs two or more arguments into a tuple);
``raw call``
    ``lib.eng_transition(seg, id, trigger)``: that plus the C work;
``Engine method``
    ``eng.transition(id, trigger)``: the public call, with the wrapper's
    checks (metrics on, default sampling, as users run it);

and each peer's operation (its ``Ops``, on its own shared memory, one
process, so any lock is uncontended, as with one worker).

Each variant runs ``ROUNDS`` rounds of calls, interleaved round by round with
the others, and keeps its fastest round: on a busy host other load only slows
a round down, and interleaving gives every variant the same chances.  The
layers then subtract: C work = raw - same-shape, wrapper = method - raw,
argument passing = same-shape - empty.  The ratios are engine ops/s ÷ peer
ops/s (peer ns ÷ engine ns) for the method, for the raw cffi call (a
negative wrapper: the method, a C callable, is faster than that call) and
for an empty call plus the C work (about what a call with no argument
conversion would give: a lower bound for any binding).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine._native import lib
from engine.tools.bench.peers import (
    CONNECT,
    HOSTS,
    LABELS,
    PAUSE,
    RESUME,
    EngineHost,
    Unavailable,
)

__all__ = ["FLOOR_PEERS", "FLOOR_WORKLOADS", "Breakdown", "layers", "measure"]

#: Peers measured beside the engine (the ones whose operation is all CPU).
FLOOR_PEERS = ("value_lock", "value_lock_tuned", "atomicshm")
FLOOR_WORKLOADS = ("transition", "update_price")
#: Calls written out per loop iteration; a round is ITERATIONS of them.
UNROLL = 10
ITERATIONS = 50
ENGINE_LAYERS = ("empty", "shape", "raw", "method")
LAYER_LABELS = {"empty": "empty cffi call (eng_noop())", "shape": "same-shape call, refused",
                "raw": "raw lib call", "method": "Engine method"}


@dataclass
class Breakdown:
    """ns per call (fastest round) of every variant: ``ns[workload][key]``,
    key an engine layer or a peer's system name; the same for the median round."""

    rounds: int
    calls_per_round: int
    ns: dict[str, dict[str, float]] = field(default_factory=dict)
    median_ns: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # peer -> why it could not run
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "calls_per_round": self.calls_per_round,
                "ns_per_call_min": self.ns, "ns_per_call_median": self.median_ns,
                "layers": {w: layers(self.ns[w]) for w in self.ns}, "skipped": self.skipped,
                "seconds": self.seconds}


def layers(ns: dict[str, float]) -> dict[str, Any]:
    """The engine's layers and the ratios to each peer, from one workload's
    ``ns`` (keys ``ENGINE_LAYERS`` and peer names)."""
    empty, shape, raw, method = (ns.get(k, math.nan) for k in ENGINE_LAYERS)
    c_work = max(0.0, raw - shape)
    out: dict[str, Any] = {
        "engine_method_ns": method, "wrapper_ns": method - raw, "raw_call_ns": raw,
        "empty_call_ns": empty, "argument_passing_ns": shape - empty, "c_work_ns": c_work,
        "peers": {}}
    for p in FLOOR_PEERS:
        if p in ns:
            out["peers"][p] = {"ns": ns[p], "ratio_method": ns[p] / method,
                               "ratio_raw_call": ns[p] / raw,
                               "ratio_empty_call_plus_c_work": ns[p] / (empty + c_work)}
    return out


def _compile(calls: tuple[str, str], env: dict[str, Any]) -> Callable[[int], None]:
    """run(iterations): the two calls, ``UNROLL // 2`` times each per
    iteration, every name a fast local (as ``timeit`` does)."""
    params = "".join(f", {n}={n}" for n in sorted(env))
    body = "".join(f"        {calls[0]}; {calls[1]}\n" for _ in range(UNROLL // 2))
    g: dict[str, Any] = dict(env, _rep=itertools.repeat)
    exec(f"def run(iterations{params}, _rep=_rep):\n"
         f"    for _ in _rep(None, iterations):\n{body}", g)
    return g["run"]  # type: ignore[no-any-return]


def _engine_variants(host: EngineHost) -> dict[tuple[str, str], Callable[[int], None]]:
    eng = host.eng
    seg, t_id, p_id = eng.seg, eng.id_of(0), eng.id_of(1)
    bad_trigger, nan = len(eng.spec.triggers), math.nan
    # the same-shape calls must be refused before any work, or they are not floors
    assert lib.eng_transition(seg, t_id, bad_trigger) == lib.ENG_EBADTRIGGER
    assert lib.eng_update_price(seg, p_id, nan) == lib.ENG_EBADPRICE
    tr, up = lib.eng_transition, lib.eng_update_price
    env = {"seg": seg, "i": t_id, "j": p_id, "P": PAUSE, "R": RESUME, "bad": bad_trigger,
           "nan": nan}
    empty = _compile(("f()", "f()"), {"f": lib.eng_noop})
    return {
        ("transition", "empty"): empty,
        ("transition", "shape"): _compile(("f(seg, i, bad)",) * 2, dict(env, f=tr)),
        ("transition", "raw"): _compile(("f(seg, i, P)", "f(seg, i, R)"), dict(env, f=tr)),
        ("transition", "method"): _compile(("m(i, P)", "m(i, R)"), dict(env, m=eng.transition)),
        ("update_price", "empty"): empty,
        ("update_price", "shape"): _compile(("f(seg, j, nan)",) * 2, dict(env, f=up)),
        ("update_price", "raw"): _compile(("f(seg, j, 101.5)", "f(seg, j, 99.5)"),
                                          dict(env, f=up)),
        ("update_price", "method"): _compile(("m(j, 101.5)", "m(j, 99.5)"),
                                             dict(env, m=eng.update_price)),
    }


def measure(workloads: tuple[str, ...] | list[str] = FLOOR_WORKLOADS,
            peers: tuple[str, ...] | list[str] = FLOOR_PEERS, rounds: int = 200,
            iterations: int = ITERATIONS) -> Breakdown:
    """Time every variant, interleaved; see the module's docstring."""
    t_begin = time.monotonic()
    workloads = [w for w in FLOOR_WORKLOADS if w in workloads]
    out = Breakdown(rounds=rounds, calls_per_round=iterations * UNROLL)
    hosts: list[Any] = []
    opses: list[Any] = []
    try:
        eng_host = EngineHost()
        eng_host.setup()
        hosts.append(eng_host)
        variants = {k: v for k, v in _engine_variants(eng_host).items() if k[0] in workloads}
        for p in peers:
            host = HOSTS[p]()
            try:
                host.setup()
            except Unavailable as e:
                out.skipped[p] = str(e)
                continue
            hosts.append(host)
            ops = CONNECT[p](host.payload())
            opses.append(ops)
            if "transition" in workloads:
                variants["transition", p] = _compile(
                    ("op(0, P)", "op(0, R)"), {"op": ops.transition, "P": PAUSE, "R": RESUME})
            if "update_price" in workloads:
                variants["update_price", p] = _compile(
                    ("op(1, 101.5)", "op(1, 99.5)"), {"op": ops.update_price})
        for run in variants.values():   # warm up (and fail early)
            run(iterations)
        times: dict[tuple[str, str], list[int]] = {k: [] for k in variants}
        pc = time.perf_counter_ns
        for _ in range(rounds):
            for k, run in variants.items():
                t0 = pc()
                run(iterations)
                times[k].append(pc() - t0)
        calls = iterations * UNROLL
        for (w, key), ts in times.items():
            out.ns.setdefault(w, {})[key] = min(ts) / calls
            out.median_ns.setdefault(w, {})[key] = float(np.median(ts)) / calls
    finally:
        for ops in opses:
            ops.close()
        for host in reversed(hosts):
            host.teardown()
    out.seconds = time.monotonic() - t_begin
    return out


def report_lines(b: Breakdown, targets: dict[str, float]) -> list[str]:
    """The breakdown as text: per workload the engine's layers, then each peer
    with the ratios (``targets``: wanted engine ÷ peer ratio by peer)."""
    lines = [f"where one worker's time goes (one process, ns per call: fastest of {b.rounds} "
             f"interleaved rounds of {b.calls_per_round} calls; median round in brackets):"]
    for w, ns in b.ns.items():
        lay, med = layers(ns), b.median_ns[w]
        wrapper = lay["wrapper_ns"]   # < 0: the method is a C callable (native/fastpath.c)
        lines.append(
            f"  {w:13s} Engine method {lay['engine_method_ns']:5.0f} ({med['method']:.0f}):"
            f" {abs(wrapper):.0f} ns {'over' if wrapper >= 0 else 'under'} a raw cffi call"
            f" {lay['raw_call_ns']:.0f} [empty cffi call {lay['empty_call_ns']:.0f} + argument"
            f" passing {lay['argument_passing_ns']:.0f} + C work {lay['c_work_ns']:.0f}]")
        for p, r in lay["peers"].items():
            want = targets.get(p) if w == "transition" else None
            need = f"; {want:g}x needs an engine call <= {r['ns'] / want:.0f} ns" if want else ""
            lines.append(
                f"  {'':13s} {LABELS[p]:22s} {r['ns']:5.0f} ({med[p]:.0f}): engine "
                f"{r['ratio_method']:.2f}x; through a raw cffi call {r['ratio_raw_call']:.2f}x; "
                f"empty call + C work {r['ratio_empty_call_plus_c_work']:.2f}x{need}")
    for p, why in b.skipped.items():
        lines.append(f"  {LABELS[p]}: skipped: {why}")
    return lines
