"""The exits stress workload (``--mix exits``): a run is clean and fires,
and its verifier reports what it is meant to catch."""

from __future__ import annotations

import pytest

from engine import ExitReason
from engine.tools.stress import StressConfig
from engine.tools.stress.exits import Levels, fire_problem
from engine.tools.stress.runner import run_stress

R = ExitReason
LONG = Levels(1, 95.0, 105.0, 4.0)
SHORT = Levels(-1, 105.0, 95.0, 0.0)


class TestFireCheck:
    @pytest.mark.parametrize("lv, reason, price", [
        (LONG, R.STOP_LOSS, 94.0), (LONG, R.TAKE_PROFIT, 106.0), (LONG, R.TRAILING_STOP, 100.0),
        (SHORT, R.STOP_LOSS, 105.0), (SHORT, R.TAKE_PROFIT, 95.0)])
    def test_right_fires_pass(self, lv, reason, price):
        """A fire whose reason is the one its price gives passes."""
        assert fire_problem(lv, int(reason), price) is None

    @pytest.mark.parametrize("lv, reason, price", [
        (LONG, R.TAKE_PROFIT, 94.0),      # past the stop: STOP_LOSS wins
        (LONG, R.STOP_LOSS, 96.0),        # not past the stop
        (LONG, R.TAKE_PROFIT, 104.0),     # not past the take profit
        (LONG, R.TRAILING_STOP, 105.0),   # no peak of the run is 4 above
        (SHORT, R.TRAILING_STOP, 100.0),  # no trailing stop
        (LONG, 7, 100.0)])                # not an engine exit
    def test_wrong_fires_are_named(self, lv, reason, price):
        """A fire whose reason or price does not fit its levels is reported."""
        assert fire_problem(lv, int(reason), price)


class TestRun:
    @pytest.mark.parametrize("url", [None, "auto"])
    def test_short_run_is_clean_and_fires(self, url):
        """3 workers for 2 s: fires happen, each counted once, no violation."""
        res = run_stress(StressConfig(workers=3, seconds=2.0, mix="exits", url=url))
        assert res.ok, res.violation_messages
        assert res.exits is not None and res.exits["fires"] > 0
        assert res.exits["fires"] == res.exits["fires_counted"]
        assert res.workload["pause"]["ok"] > 0 and res.workload["rearm"]["ok"] > 0
