"""Configuration and results of one stress run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, TextIO

from engine._native import lib
from engine.tools.stress.mix import FAULTS, parse_mix


@dataclass
class StressConfig:
    """Parameters of one stress run."""

    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    positions: int = 16                 # shared slots (the segment's capacity)
    seconds: float = 5.0
    mix: str = "default"                # see parse_mix
    seed: int = 0                       # seeds the workers' choices (not the interleaving)
    sample_every: int = 64              # latency sampled for 1 op in N (power of two)
    batch_size: int = 8                 # slots per update_prices call
    wait_timeout: float = 0.0001        # seconds per wait_for_change
    alert_p99_us: float | None = 1000.0     # alert above this p99 (None: off)
    alert_success: float | None = None      # alert below this success rate (None: off)
    fault: str | None = None            # a key of FAULTS: tests only
    progress: TextIO | None = None      # where progress lines go (None: nowhere)

    def check(self) -> dict[str, int]:
        """Validate; returns the parsed mix.  Raises ``ValueError``."""
        if not 1 <= self.workers < lib.ENG_MAX_PROCS:
            raise ValueError(f"workers must be in [1, {lib.ENG_MAX_PROCS - 1}] (the registry "
                             f"holds {lib.ENG_MAX_PROCS} Engines, the parent's included), "
                             f"got {self.workers}")
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
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {sorted(FAULTS)}, got {self.fault!r}")
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

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def as_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "violations": self.violations, "seconds": self.seconds,
                "ops_per_s": self.ops_per_s, "violation_messages": self.violation_messages,
                "table": self.table, "workload": self.workload, "alerts": self.alerts,
                "verification": self.verification, "config": self.config}
