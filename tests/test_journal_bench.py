"""``python -m engine bench --journal``: the journal's section runs its
parts, reports iceoryx2 as skipped (with how to install it) when the
binding is missing, writes its figures under "journal" in the JSON, and its
latency run pairs every record read with the commit that made it.  Plans,
counts and outputs only, never timings."""

from __future__ import annotations

import argparse
import builtins
import json
import math
from pathlib import Path
from typing import Any

import pytest

from engine.tools import bench
from engine.tools.bench import journal


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def _stub_latency(*_a: Any, **_k: Any) -> dict[str, float]:
    return {"p50_us": 1.0, "p99_us": 2.0, "n": 64, "missing": 0}


@pytest.fixture
def no_iceoryx2(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import iceoryx2`` fails, as where the extra 'peer' is not installed."""
    real = builtins.__import__

    def fake(name: str, *a: Any, **k: Any) -> Any:
        if name == "iceoryx2" or name.startswith("iceoryx2."):
            raise ImportError("No module named 'iceoryx2'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)


@pytest.fixture
def quick_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The section's measuring parts replaced by stubs (the plumbing is what is tested)."""
    monkeypatch.setattr(journal, "engine_latency", _stub_latency)
    monkeypatch.setattr(journal, "engine_read_rate", lambda *_a: {
        "events_per_s": 1e6, "read_events_per_s": 1e7, "bytes_per_record": 256.0})
    monkeypatch.setattr(journal, "engine_live_rate", lambda *_a: {
        "commits_per_s": 1e6, "events_per_s": 1e6, "read": 10, "written": 10,
        "lapped_records": 0})
    monkeypatch.setattr(journal, "engine_commit_rate", lambda *_a: 1e6)
    monkeypatch.setattr(journal, "executor_latency", _stub_latency)
    monkeypatch.setattr(journal, "scaling", lambda *_a: {
        "journal=None": {1: 2e6, 2: 4e6}, "journal=True": {1: 1e6, 2: 1.2e6}})


class TestJournalSection:
    def test_without_iceoryx2_the_peer_is_skipped_with_how_to_install_it(
            self, no_iceoryx2: None, quick_parts: None, tmp_path: Path,
            capsys: pytest.CaptureFixture[str]) -> None:
        """No iceoryx2: the section still runs, says it skipped the peer and names the extra."""
        assert "engine[peer]" in (journal.iceoryx2_missing() or "")
        rc = bench.run(_args("--journal-only", "--quick", "--json", str(tmp_path / "b.json")))
        out = capsys.readouterr().out
        assert rc == 0
        assert "iceoryx2: skipped" in out and "engine[peer]" in out
        doc = json.loads((tmp_path / "b.json").read_text())
        assert "skipped" in doc["journal"]["iceoryx2"]
        assert set(doc["journal"]["engine"]) >= {"busy", "busy_rows", "spin", "sleep",
                                                 "events_per_s", "read_events_per_s"}
        assert doc["journal"]["scaling"]["journal=True"]["2"] == 1.2e6

    def test_the_report_has_every_row_side_by_side(self, quick_parts: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """With iceoryx2 there: the engine's and iceoryx2's rows, the scaling ratio, printed."""
        monkeypatch.setattr(journal, "iceoryx2_missing", lambda: None)
        monkeypatch.setattr(journal, "iceoryx2_latency", _stub_latency)
        monkeypatch.setattr(journal, "iceoryx2_send_rate", lambda *_a: 3e5)
        lines = "\n".join(journal.report_lines(journal.measure(quick=True)))
        for want in ("busy subscriber, events()", "busy subscriber, read_events()",
                     "sleeping subscriber", "iceoryx2: publish -> busy subscriber",
                     "Listener-woken", "iceoryx2 300 k samples/s", "x1.20",
                     "executor following events()", "executor following states()"):
            assert want in lines


class TestEngineLatency:
    def test_every_record_committed_is_read_once_and_paired(self) -> None:
        """A real run of 3 bursts of 4: every record received, latencies finite and >= 0."""
        for spin in (-1, 0, 20):
            got = journal.engine_latency(spin, bursts=3, burst=4, gap_s=0.001)
            assert got["missing"] == 0 and got["n"] == 12
            assert got["p50_us"] >= 0 and math.isfinite(got["p99_us"])


class TestExecutorLatency:
    @pytest.mark.parametrize("way", journal.EXECUTOR_WAYS)
    def test_every_triggered_position_is_closed_and_paired(self, way: str) -> None:
        """A real run of 3 triggers: each EXIT_PENDING met by the executor's EXIT_STARTED."""
        got = journal.executor_latency(way, 3, gap_s=0.001)
        assert got["missing"] == 0 and got["n"] == 3
        assert got["p50_us"] > 0 and math.isfinite(got["p99_us"])

    def test_an_unknown_way_is_refused(self) -> None:
        """A way that is not one of EXECUTOR_WAYS: ValueError naming the allowed ones."""
        with pytest.raises(ValueError, match="events"):
            journal.executor_latency("poll", 1)


class TestIceoryx2Peer:
    @pytest.mark.parametrize("woken", [False, True])
    def test_every_sample_published_is_received_once(self, woken: bool) -> None:
        """The iceoryx2 run (busy, Listener-woken): 2 bursts of 4, every sample received."""
        pytest.importorskip("iceoryx2", reason="the extra 'peer' is not installed")
        got = journal.iceoryx2_latency(woken, bursts=2, burst=4, gap_s=0.001)
        assert got["missing"] == 0 and got["n"] == 8
