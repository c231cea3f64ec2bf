"""The scaling sweep (``bench --scaling``): its table, what it predicts for
hosts with more cores, and its plots.

The sweep runs 1 to N workers on disjoint slots (one each) and all on one
shared slot, for ``transition`` and ``update_price`` through each system's
Python API, and for the engine's C fast paths with Python out of the loop
(``transition_c``, ``update_price_c``: ``C_BATCH`` operations per raw call).

What a host with few cores can show, and what it cannot, is in
``HOST_NOTE``; the predictions for 16 and 64 cores (``predict``) are a
model fed with the measured one- and two-worker numbers, and say so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.tools.bench.peers import C_BATCH, LABELS
from engine.tools.bench.runner import (
    C_WORKLOADS,
    Case,
    Plan,
    Results,
    _fmt_ns,
    _fmt_rate,
    runs,
)

__all__ = ["HOST_NOTE", "line_rate", "predict", "print_scaling", "shared_rate", "table",
           "write_scaling_plots"]

SHARINGS = ("disjoint", "shared")
_SHARING_LABELS = {"disjoint": "disjoint slots", "shared": "one shared slot"}
#: What a system's scaling depends on, beside its name in the table and plots.
DESIGN_NOTES = {"value_lock": "one Lock for all slots",
                "value_lock_tuned": "one Lock for all slots",
                "atomicshm": "a 256-byte record per slot"}


def _name(system: str) -> str:
    note = DESIGN_NOTES.get(system)
    return f"{LABELS[system]} ({note})" if note else LABELS[system]
#: Cores of the hosts the predictions are for.
PREDICT_CORES = (16, 64)
#: Assumed time for a contended cache line to move to another core (ns):
#: (low, high).  Typical of current x86 servers: a few tens of ns inside a
#: core complex, ~40-120 ns across one socket's mesh or chiplets, 100-250 ns
#: when a 64-core host spans chiplets and sockets.  Assumptions, not measured.
LINE_MOVE_NS = {16: (40.0, 120.0), 64: (100.0, 250.0)}
#: All-core clock relative to the clock one or two busy cores get: (low, high).
ALL_CORE_CLOCK = (0.75, 1.0)
#: Contended cache lines each operation needs exclusively on a shared slot:
#: a transition's CAS and counter bump are on the slot's first line; a price
#: update takes the latch and bumps the sequence there and writes the copy on
#: the second line.
LINES_PER_OP = {"transition": 1, "update_price": 2}
#: Below this CPU share a worker did not get its CPU: not a measure of scaling.
FULL_CPU = 0.9

HOST_NOTE = (
    "What a {cpus}-core host can show: whether disjoint slots share anything (two workers on "
    "two cores should each keep the one-worker rate); what one contended slot costs when its "
    "line moves between two cores (2 shared against 2 disjoint, clearest in the C fast-path "
    "rows, which have no Python in the loop); and what happens with more workers than cores "
    "(from {over} workers on, they take turns: the total can only stay near {cpus} cores' "
    "worth, and a lock-based peer whose lock holder is descheduled stalls everyone, where the "
    "engine's lock-free fast path does not). What it cannot show: throughput growing past "
    "{cpus} workers, or the coherence traffic of a line fought over by many cores, across "
    "chiplets or sockets (NUMA), with shared-cache, memory-bandwidth or SMT effects. The "
    "numbers for 16 and 64 cores below are predictions from a model, not measurements.")


# ==== the table ==================================================================================
def _find(cases: Sequence[Case], system: str, workload: str, workers: int,
          sharing: str) -> Case | None:
    for c in cases:
        if (c.system, c.workload, c.workers, c.sharing) == (system, workload, workers, sharing):
            return c
    return None


def _row(c: Case, one: Case | None) -> dict[str, Any]:
    if c.error:
        return {"workers": c.workers, "error": c.error}
    per = c.per_worker_ops_per_s or [c.ops_per_s]
    mean = float(np.mean(per))
    cpu = c.per_worker_cpu_share if len(c.per_worker_cpu_share) == len(per) else []
    per_cpu = [r / x for r, x in zip(per, cpu, strict=True) if x > 0]
    return {"workers": c.workers, "ops_per_s": c.ops_per_s,
            "speedup": c.ops_per_s / one.ops_per_s if one and not one.error else None,
            "per_worker_mean": mean, "per_worker_min": float(min(per)),
            "per_worker_max": float(max(per)), "ns_per_op_per_worker": 1e9 / mean,
            # ops per second of the worker's own CPU time: what a core gives
            # a worker that has it, whether or not the host lent it all the time
            "per_worker_per_cpu_second": float(np.mean(per_cpu)) if per_cpu else None,
            "p50_ns": None if math.isnan(c.p50_ns) else c.p50_ns,
            "p99_ns": None if math.isnan(c.p99_ns) else c.p99_ns,
            "cpu_share": None if math.isnan(c.cpu_share) else c.cpu_share,
            "committed_fraction": c.committed_fraction, "busy_fraction": c.busy_fraction}


def table(plan: Plan, cases: Sequence[Case]) -> dict[str, dict[str, dict[str, list[Any]]]]:
    """``table[workload][system][sharing]``: one row per worker count (the
    one-worker case heads both sharings)."""
    out: dict[str, dict[str, dict[str, list[Any]]]] = {}
    counts = sorted({n for n, _ in plan.layout})
    for w in plan.workloads:
        for s in plan.systems:
            if not runs(s, w):
                continue
            one = _find(cases, s, w, 1, "single")
            for sharing in SHARINGS:
                rows = []
                for n in counts:
                    c = one if n == 1 else _find(cases, s, w, n, sharing)
                    if c is not None:
                        rows.append(_row(c, one))
                out.setdefault(w, {}).setdefault(s, {})[sharing] = rows
    return out


def _at(rows: Sequence[dict[str, Any]], n: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["workers"] == n and "error" not in r), None)


# ==== predictions ================================================================================
def line_rate(move_ns: float, lines: int, c_ns: float) -> float:
    """Operations per second one contended slot can serve: one per move of
    its ``lines`` lines plus the C work done while holding them."""
    return 1e9 / (lines * move_ns + c_ns)


def shared_rate(n: int, move_ns: float, lines: int, op_ns: float, c_ns: float) -> float:
    """``n`` workers on one slot, each needing ``op_ns`` per operation
    uncontended: the line's rate, or the workers' demand if that is lower
    (each of their operations also waits for its lines to arrive)."""
    return min(line_rate(move_ns, lines, c_ns), n * 1e9 / (op_ns + lines * move_ns))


def _per_cpu(row: dict[str, Any] | None) -> float | None:
    """A row's ops per CPU-second per worker (its wall rate if unknown)."""
    if row is None:
        return None
    return row.get("per_worker_per_cpu_second") or row["per_worker_mean"]  # type: ignore[no-any-return]


def _ran_together(row: dict[str, Any] | None) -> bool:
    return row is not None and (row.get("cpu_share") or 0) >= FULL_CPU


def predict(tab: dict[str, dict[str, dict[str, list[Any]]]],
            cores: Sequence[int] = PREDICT_CORES) -> dict[str, Any]:
    """What the engine's measured 1- and 2-worker numbers predict for hosts
    with ``cores`` cores, one worker per core, for disjoint slots and for
    every worker on one slot.  A model, not a measurement.  Rates are per
    second of the worker's own CPU time, so a busy host that lends a worker
    only part of a core does not make the core look slower.

    * disjoint: a slot's lines are written by its one worker only, and the
      metrics go to a per-process shard, so nothing is shared: N x the
      per-core rate measured with two workers on disjoint slots, times the
      all-core clock (``ALL_CORE_CLOCK``);
    * one slot: every operation needs the slot's line(s) exclusively
      (``LINES_PER_OP``), so the line is a queue: the total is at most one
      operation per line move, 1e9 / (lines x t_move + C work) per second
      (``line_rate``), and at most the N workers' demand (``shared_rate``);
      t_move from ``LINE_MOVE_NS``, its low end raised to the move measured
      here (C fast path, 2 shared against 2 disjoint) when the two workers
      ran at the same time.
    """
    eng = {w: tab.get(w, {}).get("engine") for w in ("transition", "update_price",
                                                      *C_WORKLOADS)}
    out: dict[str, Any] = {"label": "PREDICTION (a model fed with measured 1-2 worker numbers)",
                           "assumptions": {"line_move_ns": {str(k): v for k, v in
                                                            LINE_MOVE_NS.items()},
                                           "all_core_clock": ALL_CORE_CLOCK,
                                           "lines_per_op": LINES_PER_OP},
                           "workloads": {}}
    for w in ("transition", "update_price"):
        api, c = eng.get(w), eng.get(w + "_c")
        one = _at(api["disjoint"], 1) if api else None
        if not api or one is None:
            continue
        two_d, two_s = _at(api["disjoint"], 2), _at(api["shared"], 2)
        c_one = _at(c["disjoint"], 1) if c else None
        c_two_d = _at(c["disjoint"], 2) if c else None
        c_two_s = _at(c["shared"], 2) if c else None
        lines = LINES_PER_OP[w]
        one_rate = _per_cpu(one) or one["ops_per_s"]
        per_core = _per_cpu(two_d) or one_rate
        w_ns = 1e9 / one_rate                                # one worker, Python included
        c_rate = _per_cpu(c_one)
        c_ns = 1e9 / c_rate if c_rate else 20.0             # the C work alone
        measured: dict[str, Any] = {
            "one_worker_ops_per_s": one["ops_per_s"], "one_worker_per_cpu_second": one_rate,
            "two_disjoint_per_worker_per_cpu_second": _per_cpu(two_d),
            "two_disjoint_speedup": two_d["speedup"] if two_d else None,
            "two_disjoint_ran_together": _ran_together(two_d),
            "two_shared_ops_per_s": two_s["ops_per_s"] if two_s else None,
            "per_core_rate_used": per_core, "c_ns_per_op": c_ns if c_rate else None,
            "c_line_move_ns_here": None, "c_line_move_measured": False}
        move_here = None
        cd, cs = _per_cpu(c_two_d), _per_cpu(c_two_s)
        if cd and cs:
            move_here = max(0.0, (1e9 / cs - 1e9 / cd) / lines)
            measured["c_line_move_ns_here"] = move_here
            measured["c_line_move_measured"] = _ran_together(c_two_s) and _ran_together(c_two_d)
        pred: dict[str, Any] = {}
        for n in cores:
            lo_move, hi_move = LINE_MOVE_NS.get(n, LINE_MOVE_NS[max(LINE_MOVE_NS)])
            if move_here is not None and measured["c_line_move_measured"]:
                lo_move = min(hi_move, max(lo_move, move_here))
            d_lo, d_hi = (n * per_core * f for f in ALL_CORE_CLOCK)
            s_lo = shared_rate(n, hi_move, lines, w_ns, c_ns)
            s_hi = shared_rate(n, lo_move, lines, w_ns, c_ns)
            pred[str(n)] = {
                "line_move_ns": [lo_move, hi_move],
                "disjoint_ops_per_s": [d_lo, d_hi],
                "disjoint_per_worker": [d_lo / n, d_hi / n],
                "shared_ops_per_s": [s_lo, s_hi],
                "shared_per_worker": [s_lo / n, s_hi / n],
                "disjoint_over_shared": [d_lo / s_hi, d_hi / s_lo],
                "shared_c_fast_path_ops_per_s": [line_rate(hi_move, lines, c_ns),
                                                 line_rate(lo_move, lines, c_ns)],
                "shared_queue_wait_ns": [(n - 1) * lines * lo_move, (n - 1) * lines * hi_move],
            }
        out["workloads"][w] = {"measured": measured, "predicted": pred}
    return out


def prediction_lines(pr: dict[str, Any]) -> list[str]:
    """The predictions as text, each number labelled as one."""
    def rng(v: list[float]) -> str:
        return f"{_fmt_rate(v[0])}-{_fmt_rate(v[1])}"

    lines = [f"{pr['label']}; one worker per core, Python API calls; rates per CPU-second:"]
    for w, d in pr["workloads"].items():
        m = d["measured"]
        move = m["c_line_move_ns_here"]
        here = ("" if move is None else
                f"; a contended line's move measured here {move:.0f} ns" +
                ("" if m["c_line_move_measured"] else
                 " (unreliable: the two C workers did not both get a CPU)"))
        two = m["two_disjoint_per_worker_per_cpu_second"]
        lines.append(
            f"  {w}: measured 1 worker {_fmt_rate(m['one_worker_per_cpu_second'])} ops/s, "
            f"2 on disjoint slots {'-' if two is None else _fmt_rate(two)} each"
            f"{'' if m['two_disjoint_ran_together'] else ' (not both on a CPU the whole time)'}"
            f"{here}")
        for n, p in d["predicted"].items():
            lines.append(
                f"    {n:>2s} cores, predicted: disjoint {rng(p['disjoint_ops_per_s'])} ops/s "
                f"({rng(p['disjoint_per_worker'])} per worker); one shared slot "
                f"{rng(p['shared_ops_per_s'])} ops/s ({rng(p['shared_per_worker'])} per "
                f"worker; line move {p['line_move_ns'][0]:.0f}-{p['line_move_ns'][1]:.0f} ns); "
                f"disjoint/shared {p['disjoint_over_shared'][0]:.0f}-"
                f"{p['disjoint_over_shared'][1]:.0f}x; an op on the shared slot may queue "
                f"behind {_fmt_ns(p['shared_queue_wait_ns'][0])}-"
                f"{_fmt_ns(p['shared_queue_wait_ns'][1])} of line moves")
    lines.append(
        "  on one shared slot the p99 grows with the queue, and further once a CAS or latch "
        "loses several times in a row and backs off (spins, then sched_yield; price latch "
        "waits then sleep 50 us steps); a transition that loses ENG_CAS_RETRIES (64) CASes in "
        "a row returns CONFLICT, a price update that waits out its latch bound raises "
        "BusyError: expect some of each with tens of cores on one slot.")
    return lines


# ==== printing ===================================================================================
def print_scaling(plan: Plan, res: Results) -> dict[str, Any]:
    """Print the sweep's table, the host note and the predictions; return
    them for the JSON (``table``, ``host_note``, ``predictions``)."""
    tab = table(plan, res.cases)
    cpus = os.cpu_count() or 1
    print()
    print("scaling sweep: ops/s of all workers; x1 = against one worker; /worker = mean of "
          "the workers' own rates;\n/cpu-s = the same per second of the worker's own CPU time "
          "(what a core gives a worker that has it); p99 of sampled single ops (C fast path: "
          f"a batch's mean per op, {C_BATCH} ops per call);\ncpu = worker CPU time / wall "
          "time; commit = transitions that committed (the rest lost the race: INVALID), "
          "or bN% = price updates that raised BusyError (a latch holder kept it past the "
          "bound)")
    cols = (f"{'ops/s':>8s} {'x1':>5s} {'/worker':>8s} {'/cpu-s':>8s} {'p99':>7s} "
            f"{'cpu':>4s}")
    head = f"{'workers':>7s} | {cols} | {cols} {'commit':>6s}"
    for w, by_system in tab.items():
        for s, by_sharing in by_system.items():
            print(f"\n{w} on {_name(s)}:")
            print(f"{'':7s} | {'disjoint slots':^46s} | {'all on one slot':^53s}")
            print(head)
            for d, sh in zip(by_sharing["disjoint"], by_sharing["shared"], strict=False):
                print(f"{d['workers']:7d} | {_cells(d)} | {_cells(sh, commit=True)}")
    for (w, s), errs in _errors(res.cases).items():
        print(f"  {w} {LABELS[s]}: failed: {errs}")
    note = HOST_NOTE.format(cpus=cpus, over=cpus + 1)
    print()
    print(note)
    pr = predict(tab)
    print("\n".join(prediction_lines(pr)))
    print(f"sweep total {res.elapsed:.0f} s")
    return {"table": tab, "host_note": note, "predictions": pr}


def _cells(r: dict[str, Any], commit: bool = False) -> str:
    if "error" in r:
        return f"{'failed':>46s}"
    per_cpu = r.get("per_worker_per_cpu_second")
    cells = (f"{_fmt_rate(r['ops_per_s']):>8s} {r['speedup'] or 0:5.2f} "
             f"{_fmt_rate(r['per_worker_mean']):>8s} "
             f"{'-' if per_cpu is None else _fmt_rate(per_cpu):>8s} {_fmt_ns(r['p99_ns']):>7s} "
             f"{(r['cpu_share'] or 0):4.0%}")
    if commit:
        cf, busy = r["committed_fraction"], r.get("busy_fraction") or 0.0
        outcome = (f"{cf:.0%}" if cf is not None else "-" if not busy
                   else f"b{busy:.1%}" if busy >= 0.001 else "b<0.1%")
        cells += f" {outcome:>6s}"
    return cells


def _errors(cases: Sequence[Case]) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for c in cases:
        if c.error:
            out[c.workload, c.system] = f"{c.label}: {c.error[:80]}"
    return out


# ==== plots ======================================================================================
def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["workers"], r[key]) for r in rows if "error" not in r and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(tab: dict[str, Any], outdir: Path, cpus: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    colors = {s: f"C{i}" for i, s in enumerate(LABELS)}
    style = {"disjoint": ("-", "o"), "shared": ("--", "x")}

    top = max((r["workers"] for by_s in tab.values() for by_sh in by_s.values()
               for rows in by_sh.values() for r in rows), default=1)

    def decorate(ax: Any) -> None:
        ax.axvline(cpus, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"{cpus} cores", (cpus, 0), xycoords=("data", "axes fraction"),
                    xytext=(3, 4), textcoords="offset points", fontsize=7, color="grey")
        ax.set_xticks(range(1, top + 1))
        ax.set_xlabel("workers (processes)")
        ax.set_yscale("log")
        ax.grid(which="both", alpha=0.3)

    def legend(fig: Any, ax: Any, ncol: int) -> None:
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8,
                   frameon=False)

    for w in ("transition", "update_price"):
        if w not in tab:
            continue
        fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
        panels = (("ops_per_s", "ops/s, all workers"), ("per_worker_mean", "ops/s per worker"),
                  ("per_worker_per_cpu_second", "ops per CPU-second, per worker (per core it has)"),
                  ("p99_ns", "p99 latency of one op, ns"))
        for ax, (key, ylabel) in zip(axes, panels, strict=True):
            for s, by_sharing in tab[w].items():
                for sharing, (ls, mk) in style.items():
                    xs, ys = _series(by_sharing[sharing], key)
                    if not xs:
                        continue
                    label = f"{_name(s)}, {_SHARING_LABELS[sharing]}"
                    ax.plot(xs, ys, linestyle=ls, marker=mk, color=colors[s], label=label)
                    if key == "per_worker_mean":
                        lo = [r["per_worker_min"] for r in by_sharing[sharing] if "error" not in r]
                        hi = [r["per_worker_max"] for r in by_sharing[sharing] if "error" not in r]
                        ax.fill_between(xs, lo, hi, color=colors[s], alpha=0.08)
            ax.set_ylabel(ylabel)
            decorate(ax)
        fig.suptitle(f"{w}: 1..N workers on disjoint slots and on one shared slot "
                     f"(measured on {cpus} cores; past {cpus} workers they take turns)")
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        legend(fig, axes[0], 3)
        written.append(outdir / f"scaling_{w}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    c_tab = {w: tab[w]["engine"] for w in C_WORKLOADS if w in tab and "engine" in tab[w]}
    if c_tab:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for k, (w, by_sharing) in enumerate(c_tab.items()):
            for sharing, (ls, mk) in style.items():
                for ax, key in zip(axes, ("ops_per_s", "ns_per_op_per_worker"), strict=True):
                    xs, ys = _series(by_sharing[sharing], key)
                    ax.plot(xs, ys, linestyle=ls, marker=mk, color=f"C{k}",
                            label=f"{w}, {_SHARING_LABELS[sharing]}")
        axes[0].set_ylabel("ops/s, all workers")
        axes[1].set_ylabel("ns per op, per worker (wall time)")
        for ax in axes:
            decorate(ax)
        fig.suptitle(f"engine C fast paths, no Python in the loop ({C_BATCH} ops per raw call): "
                     "the cost of a contended line")
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        legend(fig, axes[0], 2)
        written.append(outdir / "scaling_c_fast_path.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_scaling_plots(outdir: Path, plan: Plan, cases: list[Case]) -> None:
    """scaling_transition.png, scaling_update_price.png and
    scaling_c_fast_path.png, or why there are none."""
    try:
        for path in _plot(table(plan, cases), outdir, os.cpu_count() or 1):
            print(f"plot written to {path}")
    except ImportError:
        print("matplotlib is not installed (pip install 'engine[bench]'): no plots written")
