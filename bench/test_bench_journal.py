"""The journal's cost on the hot calls: the same calls on an engine without a
journal (``journal=None``) and with price records (``journal_prices=True``),
timed in the same run as ``test_bench_core``'s (journal on, the default), so
the summary shows with / without side by side against the same floors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from engine import Engine, Trigger

if TYPE_CHECKING:
    from conftest import CallTimer

PAUSE, RESUME = int(Trigger.PAUSE), int(Trigger.RESUME)


def _engine(**kw: object) -> Iterator[Engine]:
    eng = Engine.create(capacity=16, **kw)  # type: ignore[arg-type]
    try:
        pos = eng.open_position(entry_price=100.0, amount=2.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        yield eng
    finally:
        eng.close()
        eng.unlink()


@pytest.fixture(scope="module")
def no_journal() -> Iterator[Engine]:
    """One open position on an engine created with ``journal=None``."""
    yield from _engine(journal=None)


@pytest.fixture(scope="module")
def price_journal() -> Iterator[Engine]:
    """One open position on an engine created with ``journal_prices=True``."""
    yield from _engine(journal_prices=True)


@pytest.fixture(scope="module")
def journal_on() -> Iterator[Engine]:
    """One open position on an engine created with ``journal=True``."""
    yield from _engine(journal=True)


@pytest.mark.benchmark(group="journal (us per round = ns per call)")
class TestJournalCost:
    def test_transition_no_journal(self, timer: CallTimer, no_journal: Engine) -> None:
        """``Engine.transition`` PAUSE / RESUME without a journal."""
        eng = no_journal
        timer.calls("transition_no_journal", ["f(s, P)", "f(s, R)"], f=eng.transition,
                    s=eng.id_of(0), P=PAUSE, R=RESUME)

    def test_transition_journaled(self, timer: CallTimer, journal_on: Engine) -> None:
        """``Engine.transition`` PAUSE / RESUME with the journal: one record per commit."""
        eng = journal_on
        timer.calls("transition_journaled", ["f(s, P)", "f(s, R)"], f=eng.transition,
                    s=eng.id_of(0), P=PAUSE, R=RESUME)

    def test_update_price_no_journal(self, timer: CallTimer, no_journal: Engine) -> None:
        """``Engine.update_price`` without a journal."""
        timer.calls("update_price_no_journal", ["f(s, 101.5)", "f(s, 99.5)"],
                    f=no_journal.update_price, s=no_journal.id_of(0))

    def test_update_price_journaled(self, timer: CallTimer, price_journal: Engine) -> None:
        """``Engine.update_price`` with ``journal_prices=True``: one record per write."""
        timer.calls("update_price_journaled", ["f(s, 101.5)", "f(s, 99.5)"],
                    f=price_journal.update_price, s=price_journal.id_of(0))


#: records each read benchmark reads per round
READ_RECORDS = 4096


@pytest.fixture(scope="module")
def filled() -> Iterator[tuple[Engine, int]]:
    """A journal holding READ_RECORDS transitions after the returned seq."""
    eng = Engine.create(capacity=64, journal=True, journal_records=1 << 14)
    try:
        ids = [eng.open_position(entry_price=100.0, amount=1.0) for _ in range(64)]
        for p in ids:
            eng.transition(p, Trigger.POSITION_OPENED)
        first = eng.journal_seq
        while eng.journal_seq < first + READ_RECORDS:
            for p in ids:
                eng.transition(p, PAUSE)
                eng.transition(p, RESUME)
        yield eng, first
    finally:
        eng.close()
        eng.unlink()


@pytest.mark.benchmark(group="journal reads (us per round = ns per record / 4.096)")
class TestJournalReads:
    def test_events_read(self, timer: CallTimer, filled: tuple[Engine, int]) -> None:
        """``events()``: READ_RECORDS Events per round from a filled ring."""
        eng, first = filled

        def read() -> None:
            for _ev, _ in zip(eng.events(since=first, timeout=0), range(READ_RECORDS),
                              strict=False):
                pass

        timer.rounds("journal_events_read", read, READ_RECORDS, unit="record")

    def test_read_events(self, timer: CallTimer, filled: tuple[Engine, int]) -> None:
        """``read_events()``: READ_RECORDS numpy rows per round from a filled ring."""
        eng, first = filled
        timer.rounds("journal_read_events", lambda: eng.read_events(first, max=READ_RECORDS),
                     READ_RECORDS, unit="record")


class TestJournalFigures:
    def test_commit_to_subscriber_and_scaling(self, benchmark: Any, recorder: Any) -> None:
        """Commit -> subscriber in another process (busy, spin-then-sleep, sleeping) and 1 vs 2
        workers with and without the journal (``engine.tools.bench.journal``), noted."""
        from engine._native import lib
        from engine.tools.bench import journal

        def measure() -> None:
            for label, spin in (("busy", journal.BUSY_SPIN_US),
                                ("spin", lib.ENG_JOURNAL_SPIN_US), ("sleep", 0)):
                got = journal.engine_latency(spin, bursts=100)
                recorder.note(f"journal_{label}_p50_ns", got["p50_us"] * 1e3)
                recorder.note(f"journal_{label}_p99_ns", got["p99_us"] * 1e3)
            for label, by in journal.scaling(0.5).items():
                for workers, rate in by.items():
                    recorder.note(f"journal_scaling_{label}_{workers}w_per_s", rate)

        benchmark.pedantic(measure, rounds=1, iterations=1)   # one run: the figures are noted
