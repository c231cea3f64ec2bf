"""Merged metrics: the per-Engine shards in the segment, summed.

Each attached Engine writes only its own shard (no contention); a departed
Engine's counts live on in the retired shard.  Latencies are sampled into a
log2 histogram in C: bucket b holds [2^(b-1), 2^b) ns.  Percentiles are read
off the histogram with linear interpolation inside the bucket, so they are
accurate to within one power of two, and capped at the sampled maximum.

For ``wait``, ``applied`` counts waits that saw a change and ``conflicts``
counts the ones that timed out.  ``key`` counts bind_key calls (a key given
to open counts under ``open``); ``lookup``'s ``applied`` counts every lookup,
found or not.
"""

from __future__ import annotations

import mmap
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine._native import lib
from engine.records import OP_METRICS_DTYPE

if TYPE_CHECKING:
    from engine.core import Engine
    from engine.prometheus import EngineCollector

OPS = ("transition", "transition_ctx", "open", "price", "price_batch", "read", "wait", "recover",
       "key", "lookup", "account", "exit")
assert len(OPS) == lib.ENG_OP_COUNT
assert [getattr(lib, "ENG_OP_" + op.upper()) for op in OPS] == list(range(len(OPS)))
#: the public calls each operation of ``metrics()`` counts, as the tools show
#: them (``python -m engine top``): "/" between calls counted together
OP_CALLS = {
    "transition": "transition",
    "transition_ctx": "transition(fields/guard)",   # with record fields, or a guarded rule
    "open": "open_position/open",
    "price": "update_price",
    "price_batch": "update_prices/update_token_price",
    "read": "price/context/prices",
    "wait": "wait_for_change",
    "recover": "recover",
    "key": "bind_key",
    "lookup": "lookup",
    "account": "*_account/deposit/withdraw",
    "exit": "update_price*(fired)",   # exits fired by price writes
}
assert tuple(OP_CALLS) == OPS
#: what the tools' counter columns mean, under their tables
OP_LEGEND = ("INVALID: no rule from the current state; CONFLICTS: retries spent "
             "(wait_for_change: timed out); REFUSED: a guard, a risk limit or a halt said no "
             "(rejected + halted); ERRORS: bad input or a failure\n")


@dataclass(frozen=True)
class OpMetrics:
    """Counts and sampled latency of one operation."""

    attempts: int
    applied: int
    invalid: int
    conflicts: int
    rejected: int
    halted: int
    errors: int
    retries: int
    takeovers: int
    rolled_forward: int
    rolled_back: int
    samples: int
    p50_ns: float
    p99_ns: float
    p999_ns: float
    max_ns: int

    @property
    def success_rate(self) -> float:
        """Applied / attempts (1.0 with no attempts)."""
        return self.applied / self.attempts if self.attempts else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "success_rate": self.success_rate}


Metrics = dict[str, OpMetrics]


def percentile(hist: np.ndarray, q: float) -> float:
    """The q-quantile (0..1) of a log2 histogram, in ns (0.0 if empty)."""
    total = int(hist.sum())
    if total == 0:
        return 0.0
    rank = q * total
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, rank, side="left"))
    below = int(cum[b - 1]) if b else 0
    lo, hi = (0.0, 1.0) if b == 0 else (float(2 ** (b - 1)), float(2**b))
    frac = (rank - below) / int(hist[b]) if hist[b] else 1.0
    return lo + (hi - lo) * min(max(frac, 0.0), 1.0)


def read_shards(mm: mmap.mmap, shards_off: int) -> np.ndarray:
    """A copy of every shard's counters (plain loads: no lock, no wait)."""
    n_shards = lib.ENG_MAX_PROCS + 1
    view = np.frombuffer(mm, dtype=OP_METRICS_DTYPE, count=n_shards * lib.ENG_OP_COUNT,
                         offset=shards_off).reshape(n_shards, lib.ENG_OP_COUNT)
    try:
        return view.copy()
    finally:
        del view   # the mmap cannot close while a view of it lives


def shard_histograms(shards: np.ndarray) -> np.ndarray:
    """The merged latency histograms of a shard copy: ``ENG_OP_COUNT`` x
    ``ENG_HIST_BUCKETS`` sample counts, in the order of ``OPS``."""
    return np.asarray(shards["hist"].sum(axis=0), dtype=np.int64)


def read_metrics(mm: mmap.mmap, shards_off: int) -> Metrics:
    return merge_shards(read_shards(mm, shards_off))


def merge_shards(shards: np.ndarray) -> Metrics:
    """``Metrics`` from a copy of the shards (see ``read_shards``)."""
    out: Metrics = {}
    for i, op in enumerate(OPS):
        col = shards[:, i]
        hist = col["hist"].sum(axis=0)
        counts = {k: int(col[k].sum()) for k in ("attempts", "applied", "invalid", "conflicts",
                                                  "rejected", "halted", "errors", "retries",
                                                  "takeovers", "rolled_forward", "rolled_back",
                                                  "samples")}
        max_ns = int(col["max_ns"].max())
        # interpolation inside the top bucket may overshoot the true maximum
        p50, p99, p999 = (min(percentile(hist, q), float(max_ns)) for q in (0.5, 0.99, 0.999))
        out[op] = OpMetrics(**counts, p50_ns=p50, p99_ns=p99, p999_ns=p999, max_ns=max_ns)
    return out


def check_alerts(metrics: Metrics, p99_ns: float | None = None,
                 success_rate: float | None = None) -> list[str]:
    """Alert messages for every operation that breaches a threshold.

    ``p99_ns``: an operation whose sampled p99 latency exceeds it alerts.
    ``success_rate``: an operation whose applied / attempts falls below it
    alerts.  ``None`` turns a check off; operations never attempted (or with
    no latency samples, for the p99 check) are skipped.  Note what counts as a
    failure: invalid outcomes and conflicts, and for ``wait`` a timeout.
    """
    alerts: list[str] = []
    for op, m in metrics.items():
        if not m.attempts:
            continue
        p99 = min(m.p99_ns, m.max_ns)   # interpolation inside a bucket can pass the max
        if p99_ns is not None and m.samples and p99 > p99_ns:
            alerts.append(f"{op}: p99 latency {p99 / 1e3:.2f} us > "
                          f"{p99_ns / 1e3:.2f} us ({m.samples} samples)")
        if success_rate is not None and m.success_rate < success_rate:
            alerts.append(f"{op}: success rate {m.success_rate:.3f} < {success_rate:.3f} "
                          f"({m.applied} of {m.attempts} applied)")
    return alerts


def collector(eng: Engine, labels: dict[str, str] | None = None) -> EngineCollector:
    """A ``prometheus_client`` collector of ``eng`` (every scrape reads it
    afresh, taking no lock the traders wait on); ``labels``: constant labels
    added to every sample (e.g. ``{"engine": eng.name}`` when one exporter
    serves several engines).  Needs the ``metrics`` extra
    (``pip install 'engine[metrics]'``): ``MissingExtraError`` without it.
    Names and meanings: ``engine.prometheus``."""
    from engine.prometheus import EngineCollector
    return EngineCollector(eng, labels)
