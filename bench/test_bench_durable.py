"""The journal on disk: durable records/s from one process with the background
fdatasync, ``flush()`` p50/p99 on this disk, journal bytes per transition, and
SQLite in WAL mode (``synchronous=NORMAL``) writing the same changes, one row
per transition, in the same run (engine/durable/bench.py; also
``python -m engine bench --durable``).  Figures only: nothing here asserts a time."""

from __future__ import annotations

import json
import pathlib

import pytest

from engine.durable import bench as durable_bench

RESULTS = pathlib.Path(__file__).with_name("results_durable.json")


@pytest.mark.benchmark(group="durable")
def test_durable_figures() -> None:
    """Every figure is measured once and printed (and kept in results_durable.json)."""
    r = durable_bench.measure(seconds=2.0, where=str(pathlib.Path(__file__).parent))
    print("\n" + "\n".join(durable_bench.report_lines(r)))
    RESULTS.write_text(json.dumps(r, indent=1, sort_keys=True))
    assert r["records"] > 0 and r["journal_bytes_per_transition"] == 264
