"""Figures of the journal on disk (``python -m engine bench --durable``,
bench/test_bench_durable.py): durable records per second from one process
with the background fdatasync, ``flush()`` latency on this disk, journal
bytes per transition, and SQLite in WAL mode (``synchronous=NORMAL``)
writing the same changes, one row per transition, in the same run."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from typing import Any

import numpy as np

from engine.durable import frames

_POSITIONS = 1024
_BATCH = 1024


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def measure(seconds: float = 2.0, flushes: int = 300, where: str | None = None) -> dict[str, Any]:
    """Run every figure once; ``where``: a directory on the disk to measure
    (default: a fresh one under the current directory's filesystem)."""
    from engine import Engine, Trigger

    base = tempfile.mkdtemp(prefix="engine-durable-bench-", dir=where or os.getcwd())
    out: dict[str, Any] = {"dir": base}
    try:
        eng = Engine.create(capacity=_POSITIONS, journal=os.path.join(base, "j"),
                            journal_records=1 << 18, checkpoint_records=0, checkpoint_s=0)
        try:
            ids = np.array([eng.open_position(100.0, 1.0) for _ in range(_POSITIONS)],
                           dtype=np.uint64)
            eng.transition_many(ids, int(Trigger.POSITION_OPENED))
            eng.flush()
            pause, resume = int(Trigger.PAUSE), int(Trigger.RESUME)
            chunks = [ids[i:i + _BATCH] for i in range(0, _POSITIONS, _BATCH)]
            # 1. records/s: transitions committed by one process while its writer
            #    thread writes and fdatasyncs in the background; the clock stops
            #    once flush() says every one of them is on disk
            first = eng.journal_seq
            t0 = time.perf_counter()
            end = t0 + seconds
            trig = pause
            while time.perf_counter() < end:
                for c in chunks:
                    eng.transition_many(c, trig)
                trig = resume if trig == pause else pause
            durable = eng.flush(timeout=60)
            dt = time.perf_counter() - t0
            n = durable - first
            out["records"] = n
            out["durable_records_per_s"] = n / dt
            # 2. flush() latency: one transition, then flush, many times
            lat = []
            pos = int(ids[0])
            for i in range(flushes):
                eng.transition(pos, pause if i % 2 == 0 else resume)
                t = time.perf_counter()
                eng.flush()
                lat.append((time.perf_counter() - t) * 1e6)
            out["flush_p50_us"] = _percentile(lat, 50)
            out["flush_p99_us"] = _percentile(lat, 99)
            # 3. bytes per transition: what the files hold per record
            out["journal_bytes_per_transition"] = frames.FRAME
            start = time.perf_counter()
            eng.checkpoint()
            out["checkpoint_ms"] = (time.perf_counter() - start) * 1e3
        finally:
            eng.close()
            eng.unlink()
        out.update(_sqlite(base, seconds))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def _sqlite(base: str, seconds: float) -> dict[str, Any]:
    """The same changes into SQLite (WAL, synchronous=NORMAL): one row per
    transition, committed one by one (what durability per change costs there)
    and in transactions of _BATCH rows."""
    out: dict[str, Any] = {}
    db = sqlite3.connect(os.path.join(base, "sqlite.db"), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE journal (seq INTEGER PRIMARY KEY, ts_ns INTEGER, kind INTEGER, "
                   "id INTEGER, word INTEGER, trig INTEGER, state INTEGER, version INTEGER, "
                   "record BLOB)")
        rec = bytes(192)
        seq = 0
        sql = "INSERT INTO journal VALUES (?, ?, 1, ?, 0, 6, 2, ?, ?)"
        t0 = time.perf_counter()
        end = t0 + seconds / 2
        n = 0
        while time.perf_counter() < end:
            for _ in range(100):
                seq += 1
                db.execute(sql, (seq, time.time_ns(), seq % _POSITIONS, seq, rec))
            n += 100
        out["sqlite_rows_per_s_autocommit"] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        end = t0 + seconds / 2
        n = 0
        while time.perf_counter() < end:
            rows = [(seq + i + 1, time.time_ns(), (seq + i) % _POSITIONS, seq + i, rec)
                    for i in range(_BATCH)]
            seq += _BATCH
            db.execute("BEGIN")
            db.executemany(sql, rows)
            db.execute("COMMIT")
            n += _BATCH
        out["sqlite_rows_per_s_batched"] = n / (time.perf_counter() - t0)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        out["sqlite_bytes_per_row"] = os.path.getsize(os.path.join(base, "sqlite.db")) / seq
        lat = []
        for _ in range(200):   # a FULL-sync commit of one row: what flush() is to it
            seq += 1
            db.execute("PRAGMA synchronous=FULL")
            t = time.perf_counter()
            db.execute(sql, (seq, time.time_ns(), 0, seq, rec))
            lat.append((time.perf_counter() - t) * 1e6)
        out["sqlite_full_commit_p50_us"] = _percentile(lat, 50)
        out["sqlite_full_commit_p99_us"] = _percentile(lat, 99)
    finally:
        db.close()
    return out


def report_lines(r: dict[str, Any]) -> list[str]:
    return [
        "journal on disk (one process, background fdatasync; SQLite WAL side by side):",
        f"  durable records/s          {r['durable_records_per_s']:>12,.0f}   "
        f"({r['records']:,} transitions, clock stopped at flush())",
        f"  flush() p50 / p99          {r['flush_p50_us']:>9,.0f} us / {r['flush_p99_us']:,.0f} us",
        f"  journal bytes/transition   {r['journal_bytes_per_transition']:>12}",
        f"  checkpoint ({_POSITIONS} positions) {r['checkpoint_ms']:>9.1f} ms",
        f"  SQLite rows/s autocommit   {r['sqlite_rows_per_s_autocommit']:>12,.0f}   "
        "(WAL, synchronous=NORMAL, one row per transition)",
        f"  SQLite rows/s {_BATCH}/txn      {r['sqlite_rows_per_s_batched']:>12,.0f}",
        f"  SQLite bytes/row           {r['sqlite_bytes_per_row']:>12.0f}",
        f"  SQLite FULL commit p50/p99 {r['sqlite_full_commit_p50_us']:>9,.0f} us / "
        f"{r['sqlite_full_commit_p99_us']:,.0f} us",
    ]
