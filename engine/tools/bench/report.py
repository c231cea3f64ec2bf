"""Reporting: the table of every case, the engine's ratios to its peers, the
target verdicts, and the plots.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.tools.bench.floor import Breakdown
from engine.tools.bench.peers import C_BATCH, LABELS, PEERS
from engine.tools.bench.runner import Case, Plan, Probe, Results, _fmt_ns, _fmt_rate

#: engine ops/s / peer ops/s wanted on the single-worker transition workload
TARGET_RATIOS = {"value_lock": 3.0, "value_lock_tuned": 3.0, "atomicshm": 2.0, "manager": 500.0,
                 "manager_lock": 500.0, "redis": 200.0}
#: N workers on disjoint slots / one worker, engine transition
TARGET_SCALING = 1.8
#: Systems whose workers should use a whole CPU (the others wait for a server).
CPU_BOUND = frozenset({"engine", "value_lock", "value_lock_tuned", "atomicshm"})
#: an engine call on Redis / a raw EVALSHA round trip on the same server (issue 10)
TARGET_REDIS_CALL = 1.2


def _find(cases: list[Case], system: str, workload: str, workers: int,
          sharing: str) -> Case | None:
    for c in cases:
        if (c.system, c.workload, c.workers, c.sharing) == (system, workload, workers, sharing) \
                and c.error is None:
            return c
    return None


def _table(cases: list[Case], systems: Sequence[str], workloads: Sequence[str],
           layout: list[tuple[int, str]]) -> list[str]:
    lines = [f"{'workload':13s} {'case':11s} {'system':22s} {'ops/s':>9s} {'p50':>8s} "
             f"{'p99':>8s} {'engine x':>9s}  notes"]
    for w in workloads:
        for n, sharing in layout:
            eng = _find(cases, "engine", w, n, sharing)
            for s in systems:
                c = next((c for c in cases if (c.system, c.workload, c.workers, c.sharing)
                          == (s, w, n, sharing)), None)
                if c is None:
                    continue
                label = "1 worker" if sharing == "single" else f"{n} {sharing}"
                if c.error:
                    lines.append(f"{w:13s} {label:11s} {LABELS[s]:22s} {'failed':>9s}  "
                                 f"{c.error[:60]}")
                    continue
                ratio = f"{eng.ops_per_s / c.ops_per_s:9.2f}" if eng else f"{'-':>9s}"
                note = f"cpu {c.cpu_share:.0%}/worker"
                if c.committed_fraction is not None:
                    note += f", {c.committed_fraction:.0%} committed"
                if c.busy_fraction:
                    note += f", {c.busy_fraction:.2%} BusyError"
                lines.append(f"{w:13s} {label:11s} {LABELS[s]:22s} {_fmt_rate(c.ops_per_s):>9s} "
                             f"{_fmt_ns(c.p50_ns):>8s} {_fmt_ns(c.p99_ns):>8s} {ratio}  {note}")
            lines.append("")
    return lines


def _summary(cases: list[Case], systems: Sequence[str], workers: Sequence[int],
             skipped: dict[str, str]) -> dict[str, Any]:
    """Ratios, scaling and target verdicts."""
    eng1 = _find(cases, "engine", "transition", 1, "single")
    ratios: dict[str, float | None] = {}
    for p in PEERS:
        c = _find(cases, p, "transition", 1, "single")
        ratios[p] = eng1.ops_per_s / c.ops_per_s if (eng1 and c) else None
    per_cpu: dict[str, float | None] = {}   # the same per CPU-second of each side's worker
    for p in PEERS:
        c = _find(cases, p, "transition", 1, "single")
        per_cpu[p] = (_per_cpu_rate(eng1) / _per_cpu_rate(c)
                      if eng1 and c and p in CPU_BOUND else None)
    all_ratios: dict[str, Any] = {}
    for c in cases:
        e = _find(cases, "engine", c.workload, c.workers, c.sharing)
        if c.system != "engine" and e and c.error is None:
            all_ratios.setdefault(c.workload, {}).setdefault(c.label, {})[c.system] = (
                e.ops_per_s / c.ops_per_s)
    scaling: dict[str, Any] = {}
    for c in cases:
        one = _find(cases, c.system, c.workload, 1, "single")
        if c.sharing != "single" and one and c.error is None:
            scaling.setdefault(c.system, {}).setdefault(c.workload, {})[c.label] = (
                c.ops_per_s / one.ops_per_s)
    def starved(*cs: Case | None) -> str:
        low = [c for c in cs if c and c.system in CPU_BOUND and c.cpu_share < 0.9]
        return ("host busy: " + ", ".join(f"{c.system} {c.label} got {c.cpu_share:.0%} "
                                          "CPU/worker" for c in low)) if low else ""

    targets = []
    for p, want in TARGET_RATIOS.items():
        if p not in systems:
            continue
        got = ratios.get(p)
        busy = starved(eng1, _find(cases, p, "transition", 1, "single"))
        note = skipped.get(p, "") or busy
        if busy and per_cpu.get(p) is not None:
            # the host lent the two sides different shares of a core: judge
            # by what each did per second of the CPU it got
            got = per_cpu[p]
            note += "; judged per CPU-second"
        targets.append({"target": f"engine transition >= {want:g}x {LABELS[p]}",
                        "value": got, "met": None if got is None else got >= want,
                        "note": note})
    if 2 in workers and "engine" in systems:
        many = _find(cases, "engine", "transition", 2, "disjoint")
        got = many.ops_per_s / eng1.ops_per_s if (eng1 and many) else None
        note = starved(eng1, many)
        if note:
            note += " (not a measure of scaling)"
        targets.append({"target": f"engine transition, 2 workers disjoint >= "
                                  f"{TARGET_SCALING:g}x one worker", "value": got,
                        "met": None if got is None else got >= TARGET_SCALING,
                        "note": note or f"{os.cpu_count()} CPUs"})
    # engine on Redis against the Redis 7 Lua peer: cost per call (peer ops/s / engine's)
    on_redis: dict[str, Any] = {}
    for c in cases:
        peer = _find(cases, "redis", c.workload, c.workers, c.sharing)
        if c.system == "engine_redis" and c.error is None and peer:
            on_redis.setdefault(c.workload, {})[c.label] = peer.ops_per_s / c.ops_per_s
    return {"ratios": ratios, "ratios_per_cpu_second": per_cpu, "ratios_all": all_ratios,
            "scaling": scaling, "targets": targets, "engine_redis_vs_redis": on_redis}


def _per_cpu_rate(c: Case) -> float:
    """ops per second of the workers' own CPU time (their wall rate if unknown)."""
    return c.ops_per_s / c.cpu_share if c.cpu_share and c.cpu_share > 0 else c.ops_per_s


def _plot(cases: list[Case], systems: Sequence[str], workloads: Sequence[str],
          layout: list[tuple[int, str]], outdir: Path) -> list[Path]:
    """throughput.png (per system and case) and latency.png (single worker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.8), squeeze=False)
    width = 0.8 / max(1, len(layout))
    for ax, w in zip(axes[0], workloads, strict=True):
        for k, (n, sharing) in enumerate(layout):
            xs, ys = [], []
            for i, s in enumerate(systems):
                c = _find(cases, s, w, n, sharing)
                if c:
                    xs.append(i + (k - (len(layout) - 1) / 2) * width)
                    ys.append(c.ops_per_s)
            ax.bar(xs, ys, width, label="1 worker" if sharing == "single" else f"{n} {sharing}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(systems)))
        ax.set_xticklabels([LABELS[s] for s in systems], rotation=30, ha="right", fontsize=8)
        ax.set_title(w)
        ax.set_ylabel("ops/s (all workers)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("throughput per system and worker count")
    fig.tight_layout()
    written.append(outdir / "throughput.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        for s in systems:
            c = _find(cases, s, w, 1, "single")
            if c is None or c.latencies is None or not c.latencies.size:
                continue
            lat = np.sort(np.maximum(c.latencies, 1))
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=LABELS[s])
        ax.set_xscale("log")
        ax.set_xlabel("latency per op, ns (sampled single ops, timer cost subtracted)")
        ax.set_ylabel("fraction of ops")
        ax.set_title(f"{w}, 1 worker")
        ax.grid(which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    written.append(outdir / "latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def print_report(plan: Plan, res: Results) -> dict[str, Any]:
    """Print the table of every case, the ratios and the target verdicts;
    return the summary (see ``_summary``)."""
    print()
    print("\n".join(_table(res.cases, plan.systems, plan.workloads, plan.layout)))
    print("cpu = worker CPU time / wall time: below ~90% a worker was waiting (on a lock, a "
          "server, or for a CPU\ntaken by other processes), so its case under-states what "
          "the system can do with free cores.\n")
    summary = _summary(res.cases, plan.systems, plan.workers, res.skipped)
    print("engine ops/s / peer ops/s, transition, 1 worker (and per CPU-second of each side's "
          "worker, which takes out\nhow much of a core a busy host lent each; CPU-bound "
          "peers only):")
    for p, r in summary["ratios"].items():
        if p in plan.systems:
            rc = summary["ratios_per_cpu_second"].get(p)
            print(f"  {LABELS[p]:22s} {'-' if r is None else f'{r:.2f}x':>9s}"
                  f"{'' if rc is None else f'   per CPU-second {rc:.2f}x'}"
                  f"{'  (' + res.skipped[p] + ')' if p in res.skipped else ''}")
    costs = res.redis_costs
    if costs is not None and "ratios" in costs:
        v = costs["ratios"]["transition_vs_evalsha"]
        summary["targets"].append({
            "target": f"engine on Redis transition <= {TARGET_REDIS_CALL:g}x a raw EVALSHA "
                      "round trip", "value": v, "met": v <= TARGET_REDIS_CALL,
            "note": "Redis.evalsha of 'return 0' on the same server, interleaved rounds"})
    if summary["engine_redis_vs_redis"]:
        print("engine on Redis, cost per call / Redis 7 Lua's (same server, same workload):")
        for w, by_case in summary["engine_redis_vs_redis"].items():
            print(f"  {w:13s} " + ", ".join(f"{label} {r:.2f}x" for label, r in by_case.items()))
    if costs is not None:
        from engine.tools.bench.redis_costs import report_lines

        print("\n".join(report_lines(costs, TARGET_REDIS_CALL)))
    print("targets (reported, not asserted):")
    for t in summary["targets"]:
        v = t["value"]
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {t['target']:58s} {'-' if v is None else f'{v:8.2f}x'}  {verdict}"
              f"{'  ' + t['note'] if t['note'] else ''}")
    print(f"total {res.elapsed:.0f} s")
    return summary


def write_json(path: Path, plan: Plan, probe: Probe, res: Results,
               summary: dict[str, Any] | None, *, breakdown: Breakdown | None = None,
               sweep: Plan | None = None, swept: Results | None = None,
               scaling: dict[str, Any] | None = None) -> None:
    """The results, ratios and target verdicts, with how and where they were
    measured; the one-worker breakdown (``floor``) and the scaling sweep when
    they ran (``scaling_sweep``: its table, host note, predictions and cases)."""
    summary = summary or {"ratios": {}, "ratios_all": {}, "scaling": {}, "targets": [],
                          "engine_redis_vs_redis": {}}
    doc: dict[str, Any] = {
        "meta": {"python": platform.python_version(), "platform": platform.platform(),
                 "cpus": os.cpu_count(), "seconds_per_case": plan.seconds,
                 "warmup_seconds": plan.warmup, "workers": plan.workers, "quick": plan.quick,
                 "repeat": plan.repeat,
                 "engine_metrics": "on, latency sampled 1 in 64 (the default)",
                 "latency": "sampled single ops (2 per batch), perf_counter_ns, timer "
                            "overhead subtracted per worker",
                 "elapsed_seconds": res.elapsed, "host_idle_before": probe.idle,
                 "pipe_round_trip_us": probe.pipe_round_trip_us,
                 "load_average_after": os.getloadavg()[0], **res.meta},
        "ratios": summary["ratios"],
        "ratios_per_cpu_second": summary.get("ratios_per_cpu_second", {}),
        "ratios_all": summary["ratios_all"],
        "scaling": summary["scaling"],
        "targets": summary["targets"],
        "skipped": res.skipped,
        "engine_redis_vs_redis": summary["engine_redis_vs_redis"],
        "redis_costs": res.redis_costs,
        "results": [c.as_dict() for c in res.cases],
    }
    if breakdown is not None:
        doc["breakdown"] = breakdown.as_dict()
    if sweep is not None and swept is not None:
        doc["scaling_sweep"] = {
            "systems": sweep.systems, "workloads": sweep.workloads,
            "workers": sorted({n for n, _ in sweep.layout}), "seconds_per_case": sweep.seconds,
            "c_batch": C_BATCH, "elapsed_seconds": swept.elapsed, "skipped": swept.skipped,
            **(scaling or {}), "results": [c.as_dict() for c in swept.cases]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"JSON written to {path}")


def write_plots(outdir: Path, plan: Plan, cases: list[Case]) -> None:
    """throughput.png and latency.png (see ``_plot``), or why there are none."""
    try:
        for path in _plot(cases, plan.systems, plan.workloads, plan.layout, outdir):
            print(f"plot written to {path}")
    except ImportError:
        print("matplotlib is not installed (pip install 'engine[bench]'): no plots written")
