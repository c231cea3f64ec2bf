"""The journal's cost on the hot calls: the same calls on an engine without a
journal (``journal=None``) and with price records (``journal_prices=True``),
timed in the same run as ``test_bench_core``'s (journal on, the default), so
the summary shows with / without side by side against the same floors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

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
    yield from _engine(journal=True, journal_prices=True)   # the journal is off by default


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
