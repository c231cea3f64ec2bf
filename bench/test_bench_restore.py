"""Restore time (issue 22): ``Engine.restore`` of a journal directory with
100k open positions and 900k records (goal <= 5 s), and with 1M open
positions (1M opens and 1M transitions).

The directory is made in the exact on-disk format (engine.durable.format)
from records shaped like the engine's own: one real open and one real
transition of the default position spec are the templates; every slot is
opened once, then transitions (PAUSE / RESUME) land on random slots, each
with its slot's next generation.  Timed: the whole ``Engine.restore`` (read
and check every frame, reduce, place, attach).  Printed, and written to
bench/restore_results.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import Engine, Trigger
from engine._native import lib
from engine.durable import format as fmt

RESULTS = Path(__file__).with_name("restore_results.json")
PER_FILE = 1 << 18   # records per journal file


def _ring(eng: Engine) -> np.ndarray:
    from engine._native import ffi
    buf = ffi.new("eng_jrec[]", 16)
    n, resume = ffi.new("uint32_t *"), ffi.new("uint64_t *")
    assert lib.eng_journal_read(eng.seg, 0, buf, 16, n, resume) == 0
    return np.frombuffer(ffi.buffer(buf, n[0] * fmt.JREC_SIZE), dtype=fmt.JREC_DTYPE).copy()


def make_directory(directory: Path, positions: int, transitions: int, seed: int = 1) -> int:
    """A journal directory of `positions` opens and `transitions` transitions;
    returns the number of records."""
    eng = Engine.create(max(positions, 16), journal=True, journal_records=1 << 16,
                        keys_per_position=0, max_accounts=0)
    try:
        p = eng.open_position(100.0, 2.0, token=5)
        eng.transition(p, Trigger.POSITION_OPENED)
        eng.transition(p, Trigger.PAUSE)
        recs = _ring(eng)
        fmt.write_meta(directory, eng)
    finally:
        eng.close()
        eng.unlink()
    op, tr = recs[1], recs[2]   # the open and the PAUSE (recs[0]: POSITION_OPENED)
    n = positions + transitions
    out = np.zeros(n, dtype=fmt.JREC_DTYPE)
    slots = np.arange(positions, dtype=np.uint64)
    one = np.uint64(1) << np.uint64(lib.ENG_ID_SLOT_BITS)
    out[:positions] = op
    out["id"][:positions] = one | slots
    rng = np.random.default_rng(seed)
    ts = rng.integers(0, positions, transitions).astype(np.uint64)
    out[positions:] = tr
    out["id"][positions:] = one | ts
    # generation: 1 at the open, +1 per transition of the slot; MONITORING /
    # PAUSED alternate (PAUSE from MONITORING, RESUME from PAUSED)
    order = np.argsort(ts, kind="stable")
    sorted_ts = ts[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_ts)) + 1]
    counts = np.diff(np.r_[first, len(sorted_ts)])
    rank = np.arange(len(sorted_ts)) - np.repeat(first, counts)
    k = np.empty(transitions, dtype=np.uint64)
    k[order] = rank.astype(np.uint64) + np.uint64(1)   # the slot's k-th transition
    monitoring = 1 << int(eng.spec.state_index["MONITORING"])
    paused = 1 << int(eng.spec.state_index["PAUSED"])
    gen = (k + np.uint64(1)) & np.uint64(lib.ENG_SW_GEN_MASK)
    state = np.where(k % np.uint64(2) == 1, paused, monitoring).astype(np.uint64)
    ctx = np.where((k + np.uint64(1)) % np.uint64(2) == 1, lib.ENG_SW_CTX, 0).astype(np.uint64)
    out["word"][positions:] = state | (gen << np.uint64(lib.ENG_SW_GEN_SHIFT)) | ctx
    out["trigger"][positions:] = np.where(k % np.uint64(2) == 1, int(Trigger.PAUSE),
                                          int(Trigger.RESUME)).astype(np.uint32)
    out["version"][positions:] = k + np.uint64(1)
    out["seq"] = np.arange(1, n + 1, dtype=np.uint64)
    out["ts_ns"] = int(op["ts_ns"]) + np.arange(n, dtype=np.int64)
    out["latch"] = 0
    for i in range(0, n, PER_FILE):
        chunk = out[i:i + PER_FILE]
        fmt.write_journal_file(directory, int(chunk["seq"][0]), chunk)
    return n


def _run(tmp_path: Path, positions: int, transitions: int, label: str) -> dict[str, Any]:
    d = tmp_path / label
    d.mkdir()
    n = make_directory(d, positions, transitions)
    size = sum(f.stat().st_size for f in d.iterdir())
    name = f"bench_restore_{os.getpid()}_{label}"
    t0 = time.perf_counter()
    eng = Engine.restore(d, name=name)
    took = time.perf_counter() - t0
    try:
        assert len(eng.snapshot()) == positions
        rep = eng.restore_report
        assert rep.last_seq == n and rep.records_replayed == n
    finally:
        eng.unlink()
        eng.close()
    row = {"positions": positions, "records": n, "bytes": size, "seconds": round(took, 3),
           "records_per_s": round(n / took)}
    print(f"\nrestore {label}: {positions} open positions, {n} records ({size / 1e6:.0f} MB): "
          f"{took:.2f} s ({n / took / 1e6:.2f} M records/s)")
    return row


@pytest.mark.benchmark(group="restore")
class TestRestoreTime:
    results: dict[str, Any] = {}

    def test_restore_100k_positions_900k_records(self, tmp_path: Path) -> None:
        """Engine.restore of 100k open positions from 900k records (goal <= 5 s)."""
        self.results["100k"] = _run(tmp_path, 100_000, 800_000, "100k")
        RESULTS.write_text(json.dumps(self.results, indent=2) + "\n")

    def test_restore_1m_positions(self, tmp_path: Path) -> None:
        """Engine.restore of 1M open positions from 2M records."""
        self.results["1m"] = _run(tmp_path, 1_000_000, 1_000_000, "1m")
        RESULTS.write_text(json.dumps(self.results, indent=2) + "\n")
