"""The engine's metrics as a ``prometheus_client`` collector.

``engine.metrics.collector(eng)`` builds one (it needs the ``metrics``
extra: ``pip install 'engine[metrics]'``).  Each scrape reads, off the
traders' path:

* ``eng.metrics()`` and the latency histograms: a copy of the per-process
  counter shards (plain loads, no lock); on Redis, 2 round trips per shard;
* ``eng.snapshot()``: every position, each row read seqlock-style (a reader
  never waits for a writer, never takes a lock); on Redis, paged;
* ``eng.accounts()``: every account's published books, seqlock-style;
* the process registry (shared memory only): entries and whether their
  owners hold their liveness locks (``F_OFD_GETLK``: asks, takes nothing).

Names (``engine_`` prefix, units in the name, ``_total`` counters):

==========================================  =====================================
``engine_calls_total{op, outcome}``         calls that ended, by outcome
``engine_cas_retries_total{op}``            failed CAS attempts and latch waits
``engine_lock_takeovers_total{op}``         locks and latches taken from the dead
``engine_takeover_rolled_forward_total``    of those, transitions completed
``engine_takeover_rolled_back_total``       of those, transitions undone
``engine_call_duration_seconds{op}``        sampled latency, C's log2 buckets
``engine_call_duration_max_seconds{op}``    the largest sampled latency
``engine_positions{state}``                 open positions by state name
``engine_positions_capacity``               slots in the segment
``engine_account_cash{account}``            and ``_reserved``, ``_realized_pnl``,
                                            ``_open_positions``, ``_halted``; the label
                                            is the account's key, or its id
``engine_journal_seq``                      the last committed record's seq
``engine_journal_durable_seq``              every change <= it is on disk (it ends a commit)
``engine_registry_entries{status}``         ``alive`` / ``dead`` (shared memory)
==========================================  =====================================

The histogram: C's bucket b counts latencies in [2^(b-1), 2^b) ns (bucket 0:
0 ns; the last bucket also holds everything longer).  Latencies are whole
nanoseconds, so bucket b is exactly "<= (2^b - 1) ns": that is its ``le``
bound, in seconds; the last bucket is ``+Inf``.  C keeps no sum of
latencies, so the histogram has no ``_sum`` (and, as prometheus_client
writes such histograms, no ``_count``: the ``+Inf`` bucket is the count).
Only sampled calls are in it (``set_metrics(sample_every=...)``).  On Redis
it holds only the scraping Engine's own round trips (nothing on the server
records latency), which for ``serve`` is none.

Not yet exported: exits fired by reason (C counts them as calls of op
``exit``, not by reason).

Logged through ``logging.getLogger("engine")`` at scrape time: an account
seen halted for the first time, and takeovers of dead owners' locks counted
since the previous scrape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from engine._native import lib
from engine.accounts import SCALE, key_value
from engine.errors import BusyError, EngineError, MissingExtraError
from engine.metrics import OPS
from engine.store.shm import registry_liveness

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from engine.core import Engine

__all__ = ["OUTCOMES", "EngineCollector", "bucket_bounds"]

_log = logging.getLogger("engine")

#: label ``outcome`` -> the ``OpMetrics`` field counting it
OUTCOMES: Mapping[str, str] = {"applied": "applied", "invalid": "invalid",
                               "conflict": "conflicts", "rejected": "rejected",
                               "halted": "halted", "error": "errors"}


def prometheus_core() -> Any:
    """``prometheus_client.core``, or MissingExtraError naming the extra."""
    try:
        import prometheus_client.core
    except ImportError:
        raise MissingExtraError("the Prometheus collector needs prometheus_client: "
                                "pip install 'engine[metrics]' (or pip install "
                                "prometheus-client)") from None
    return prometheus_client.core


def bucket_bounds() -> list[float]:
    """The ``le`` bound, in seconds, of each C latency bucket but the last
    (which is ``+Inf``): bucket b holds whole-ns latencies <= 2^b - 1."""
    return [(2**b - 1) / 1e9 for b in range(lib.ENG_HIST_BUCKETS - 1)]


def _cumulative(hist: np.ndarray, bounds: list[float]) -> list[tuple[str, float]]:
    cum = np.cumsum(hist)
    out = [(repr(le), float(cum[b])) for b, le in enumerate(bounds)]
    out.append(("+Inf", float(cum[-1])))
    return out


class EngineCollector:
    """A ``prometheus_client`` collector of one Engine: register it with a
    registry (``REGISTRY.register(collector(eng))``); every scrape reads the
    engine afresh.  Scrapes are serialized (one Engine object is read by one
    thread at a time); nothing the traders wait on is taken."""

    def __init__(self, eng: Engine, labels: Mapping[str, str] | None = None) -> None:
        self._core = prometheus_core()
        self.eng = eng
        self._const = dict(labels or {})
        self._lock = threading.Lock()   # this process's scrapes only
        self._bounds = bucket_bounds()
        self._takeovers: dict[str, int] | None = None
        self._halted_seen: set[int] = set()

    def describe(self) -> list[Metric]:
        """Nothing: a registry does not scrape the engine to learn names."""
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect()

    # -- the families ------------------------------------------------------------------
    def _family(self, kind: str, name: str, doc: str, labels: tuple[str, ...] = (),
                unit: str = "") -> Any:
        cls = {"counter": self._core.CounterMetricFamily,
               "gauge": self._core.GaugeMetricFamily,
               "histogram": self._core.HistogramMetricFamily}[kind]
        return cls(name, doc, labels=[*self._const, *labels], unit=unit)

    def _values(self, *values: str) -> list[str]:
        return [*self._const.values(), *values]

    def _collect(self) -> Iterator[Metric]:
        eng = self.eng
        metrics, hist = eng._metrics_with_latency()
        calls = self._family("counter", "engine_calls", "Calls that ended, by operation and "
                             "outcome (wait: applied = saw a change, conflict = timed out)",
                             ("op", "outcome"))
        retries = self._family("counter", "engine_cas_retries",
                               "Failed CAS attempts and latch waits", ("op",))
        takeovers = self._family("counter", "engine_lock_takeovers",
                                 "Locks and latches taken over from dead owners", ("op",))
        forward = self._family("counter", "engine_takeover_rolled_forward",
                               "Transitions a takeover completed", ("op",))
        back = self._family("counter", "engine_takeover_rolled_back",
                            "Transitions a takeover undid", ("op",))
        duration = self._family("histogram", "engine_call_duration_seconds",
                                "Sampled call latency (C's log2 buckets; no _sum kept)",
                                ("op",))
        longest = self._family("gauge", "engine_call_duration_max_seconds",
                               "Largest sampled call latency", ("op",))
        for i, op in enumerate(OPS):
            m = metrics[op]
            for outcome, field in OUTCOMES.items():
                calls.add_metric(self._values(op, outcome), getattr(m, field))
            retries.add_metric(self._values(op), m.retries)
            takeovers.add_metric(self._values(op), m.takeovers)
            forward.add_metric(self._values(op), m.rolled_forward)
            back.add_metric(self._values(op), m.rolled_back)
            duration.add_metric(self._values(op), _cumulative(hist[i], self._bounds), None)
            longest.add_metric(self._values(op), m.max_ns / 1e9)
        yield from (calls, retries, takeovers, forward, back, duration, longest)
        self._log_takeovers({op: m.takeovers for op, m in metrics.items()})

        yield from self._positions()
        yield from self._accounts()
        yield from self._journal()
        if eng.url is None:
            yield from self._registry()

    def _positions(self) -> Iterator[Metric]:
        eng = self.eng
        try:
            codes = eng.snapshot()["state"]
        except BusyError as e:   # a row kept moving for READ_RETRIES reads: skip this scrape
            _log.warning("engine %s: positions not exported this scrape: %s", eng.name, e)
            return
        states = self._family("gauge", "engine_positions", "Open positions by state",
                              ("state",))
        found, counts = np.unique(np.asarray(codes, dtype=np.uint64), return_counts=True)
        by_code = dict(zip(found.tolist(), counts.tolist(), strict=True))
        for index, name in enumerate(eng.spec.states):
            states.add_metric(self._values(name), by_code.get(1 << index, 0))
        capacity = self._family("gauge", "engine_positions_capacity",
                                "Position slots in the segment")
        capacity.add_metric(self._values(), eng.capacity)
        yield from (states, capacity)

    def _accounts(self) -> Iterator[Metric]:
        eng = self.eng
        if not eng.max_accounts:
            return
        try:
            rows = eng.accounts()
        except BusyError as e:
            _log.warning("engine %s: accounts not exported this scrape: %s", eng.name, e)
            return
        fams = [(self._family("gauge", f"engine_account_{name}", doc, ("account",)), col, money)
                for name, doc, col, money in (
                    ("cash", "Account cash (currency units)", "cash", True),
                    ("reserved", "Notional reserved by open positions", "reserved", True),
                    ("realized_pnl", "Realized PnL of closed positions", "realized", True),
                    ("open_positions", "Open positions booked on the account",
                     "open_positions", False),
                    ("halted", "1: the account refuses openings", "halted", False))]
        for row in rows:
            account = _account_label(row)
            for fam, col, money in fams:
                v = int(row[col])
                fam.add_metric(self._values(account), v / SCALE if money else v)
            self._log_halted(row)
        yield from (fam for fam, _, _ in fams)

    def _journal(self) -> Iterator[Metric]:
        eng = self.eng
        try:
            seq = eng.journal_seq
        except EngineError:   # no journal
            return
        fam = self._family("gauge", "engine_journal_seq", "Seq of the last committed record")
        fam.add_metric(self._values(), seq)
        yield fam
        if eng._durable is not None:
            fam = self._family("gauge", "engine_journal_durable_seq",
                               "Every change with journal seq <= it is on disk "
                               "(fdatasynced, whole commits)")
            fam.add_metric(self._values(), eng.durable_seq)
            yield fam

    def _registry(self) -> Iterator[Metric]:
        eng = self.eng
        if eng._mm is None:
            return
        # probed through a descriptor of its own: the Engine's own open file
        # description holds its entry's lock, and asking through it says "free"
        alive, dead = registry_liveness(eng.name, eng.seg, eng._mm)
        fam = self._family("gauge", "engine_registry_entries",
                           "Process registry entries by owner status (dead: recover() "
                           "frees them)", ("status",))
        fam.add_metric(self._values("alive"), alive)
        fam.add_metric(self._values("dead"), dead)
        yield fam

    # -- what an operator must know ----------------------------------------------------
    def _log_takeovers(self, now: dict[str, int]) -> None:
        before, self._takeovers = self._takeovers, now
        for op, n in now.items():
            new = n - (before or {}).get(op, 0)
            if new > 0:
                _log.warning("engine %s: %d %s lock(s) taken over from dead owners%s",
                             self.eng.name, new, op,
                             " (so far)" if before is None else " since the last scrape")

    def _log_halted(self, row: Any) -> None:
        account = int(row["id"])
        if not int(row["halted"]):
            self._halted_seen.discard(account)
            return
        if account in self._halted_seen:
            return
        self._halted_seen.add(account)
        realized, max_loss = int(row["realized"]), int(row["max_loss"])
        why = ("it halted itself: realized losses reached max_loss"
               if realized < 0 and realized <= -max_loss else "halted by an operator")
        _log.warning("engine %s: account %d is halted (%s; realized %s, max_loss %s)",
                     self.eng.name, account, why, realized / SCALE, max_loss / SCALE)


def _account_label(row: Any) -> str:
    """An account's ``account`` label: its key where it has one (as the API
    returns it), else its id."""
    n = int(row["key_len"])
    if not n:
        return str(int(row["id"]))
    key = key_value(bytes(row["key"][:n]))
    return key if isinstance(key, str) else key.hex()
