"""Configuration and results of one stress run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, TextIO

from engine._native import lib
from engine.errors import ArgumentError
from engine.store.redis import check_url
from engine.tools.stress.mix import (
    ACCOUNT_FAULTS,
    FAULTS,
    LINK_FAULTS,
    ORDER_FAULTS,
    parse_mix,
    workload_of,
)

#: Shared slots when ``positions`` is not given: few for the position workload
#: (contention), more for the order workload (each worker keeps ``inflight``
#: orders open; the rest are reused constantly), and for the account workload
#: 64 or twice what the workers can hold open at once, whichever is more (a
#: refused opening should be the accounts' doing, not the table's).
DEFAULT_POSITIONS = 16
DEFAULT_ORDER_POSITIONS = 64
DEFAULT_ACCOUNT_POSITIONS = 64
#: Shared accounts of the account workload when ``accounts`` is not given.
DEFAULT_ACCOUNTS = 3
#: Keys per order: the client key given at open and the exchange key bound later.
ORDER_KEYS_PER_POSITION = 2
#: ``url`` that starts a private redis-server for the run (``--url auto``).
AUTO_URL = "auto"


@dataclass
class StressConfig:
    """Parameters of one stress run."""

    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    positions: int = 0                  # shared slots (the segment's capacity); 0: the
                                        # default (16; 64 for the order workload)
    seconds: float = 5.0
    mix: str = "default"                # see parse_mix
    seed: int = 0                       # seeds the workers' choices (not the interleaving)
    sample_every: int = lib.ENG_DEFAULT_SAMPLE_MASK + 1   # latency sampled for 1 op in N
    batch_size: int = 8                 # slots per update_prices call
    wait_timeout: float = 0.0001        # seconds per wait_for_change
    alert_p99_us: float | None = 1000.0     # alert above this p99 (None: off)
    alert_success: float | None = None      # alert below this success rate (None: off)
    fault: str | None = None            # a key of FAULTS (or ORDER_FAULTS): tests only
    progress: TextIO | None = None      # where progress lines go (None: nowhere)
    inflight: int = 4                   # order / account workload: own orders (positions)
                                        # a worker keeps open
    accounts: int = DEFAULT_ACCOUNTS    # account workload: shared accounts
    journal: bool = True                # the engine journals; every commit is cross-checked
                                        # against the journal (engine.tools.stress.witness)
    url: str | None = None              # None: shared memory; a Redis url; "auto": a private
                                        # redis-server started for the run (AUTO_URL)

    def __post_init__(self) -> None:
        self._default_positions()

    def _default_positions(self) -> None:
        if self.positions == 0:
            workload = self.workload
            self.positions = (
                DEFAULT_ORDER_POSITIONS if workload == "orders"
                else max(DEFAULT_ACCOUNT_POSITIONS, 2 * self.workers * self.inflight)
                if workload == "accounts" else DEFAULT_POSITIONS)

    @property
    def workload(self) -> str:
        """``"positions"``, ``"orders"`` (``--mix orders``) or ``"accounts"``
        (``--mix accounts``)."""
        return workload_of(self.mix)

    @property
    def orders(self) -> bool:
        """Does the mix select the order workload (``--mix orders``)?"""
        return self.workload == "orders"

    @property
    def booked(self) -> bool:
        """Does the mix select the account workload (``--mix accounts``)?"""
        return self.workload == "accounts"

    def check(self) -> dict[str, int]:
        """Validate; returns the parsed mix.  Raises ``ValueError``."""
        self._default_positions()
        most = lib.ENG_MAX_PROCS - 1 - (1 if self.journal else 0)
        if not 1 <= self.workers <= most:
            raise ValueError(f"workers must be in [1, {most}] (the registry "
                             f"holds {lib.ENG_MAX_PROCS} Engines, the parent's included"
                             + (", and the journal follower's" if self.journal else "")
                             + f"), got {self.workers}")
        if not 1 <= self.positions <= lib.ENG_MAX_CAPACITY:
            raise ValueError(f"positions must be in [1, {lib.ENG_MAX_CAPACITY}], "
                             f"got {self.positions}")
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"seconds must be > 0, got {self.seconds}")
        if self.sample_every < 1 or self.sample_every & (self.sample_every - 1):
            raise ValueError(f"sample_every must be a power of two >= 1, got {self.sample_every}")
        if not (math.isfinite(self.wait_timeout) and self.wait_timeout >= 0):
            raise ValueError(f"wait_timeout must be >= 0 s, got {self.wait_timeout}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        faults = [*FAULTS, *{"orders": ORDER_FAULTS, "accounts": ACCOUNT_FAULTS}.get(
            self.workload, ()), *(LINK_FAULTS if self.workload != "exits" else ())]
        if self.fault is not None and self.fault not in faults:
            raise ValueError(f"fault must be one of {sorted(faults)}, got {self.fault!r}")
        if self.url is not None:
            if self.url != AUTO_URL:
                try:
                    check_url(self.url)
                except ArgumentError as e:
                    raise ValueError(f"{e} (or {AUTO_URL!r})") from None
            if self.fault in FAULTS:
                raise ValueError(f"fault {self.fault!r} is a switch of the shared-memory C core "
                                 "(ENG_FAULT_*); an engine on Redis has none")
        if (self.orders or self.booked) and self.inflight < 1:
            raise ValueError(f"inflight must be >= 1, got {self.inflight}")
        if self.booked and not 1 <= self.accounts <= lib.ENG_MAX_ACCOUNTS:
            raise ValueError(f"accounts must be in [1, {lib.ENG_MAX_ACCOUNTS}], "
                             f"got {self.accounts}")
        return parse_mix(self.mix)


@dataclass
class StressResult:
    """Figures and verdict of one stress run (``as_dict`` is the JSON)."""

    ops: int
    seconds: float
    violations: int
    violation_messages: list[str]
    workload: dict[str, dict[str, int]]
    table: list[dict[str, Any]]
    alerts: list[str]
    verification: dict[str, Any]
    config: dict[str, Any]
    segment: str = ""               # the run's segment and start gate (both removed at the end)
    gate: str = ""
    orders: dict[str, Any] | None = None    # the order workload's figures (--mix orders)
    accounts: dict[str, Any] | None = None  # the account workload's figures (--mix accounts)
    exits: dict[str, Any] | None = None     # the exits workload's figures (--mix exits)
    url: str | None = None          # the Redis server the engine was on (None: shared memory)
    notes: list[str] = field(default_factory=list)   # what this backend checks differently

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def as_dict(self) -> dict[str, Any]:
        d = {"ops": self.ops, "violations": self.violations, "seconds": self.seconds,
             "ops_per_s": self.ops_per_s, "violation_messages": self.violation_messages,
             "table": self.table, "workload": self.workload, "alerts": self.alerts,
             "verification": self.verification, "config": self.config, "url": self.url,
             "notes": self.notes}
        if self.orders is not None:
            d["orders"] = self.orders
        if self.accounts is not None:
            d["accounts"] = self.accounts
        if self.exits is not None:
            d["exits"] = self.exits
        return d
