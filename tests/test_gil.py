"""The GIL: hot calls keep it (no release/re-take per call), calls that can
take long release it, so the other threads of a process run meanwhile.

What is forbidden: a thread of the process frozen while another one sleeps
in ``wait_for_change`` (or scans in ``snapshot``/``recover``).
"""

from __future__ import annotations

import threading
import time

from engine import Engine, State, Trigger


class TestReleasedCalls:
    def test_other_thread_runs_while_one_waits(self, make_engine):
        """A thread in wait_for_change (its own Engine: one per thread)
        sleeps with the GIL released: the main thread keeps running Python
        and its commit wakes the waiter."""
        eng = make_engine()
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        got: list[object] = []
        waiting = threading.Event()

        def waiter() -> None:
            with Engine.attach(eng.handle) as mine:
                waiting.set()
                got.append(mine.wait_for_change(pos, timeout=10.0))

        t = threading.Thread(target=waiter)
        t.start()
        assert waiting.wait(10.0)
        time.sleep(0.05)   # the waiter is inside the C wait now
        work = sum(range(200_000))   # Python work: impossible while a wait holds the GIL
        still_waiting = t.is_alive() and not got   # the wait's timeout is 10 s
        assert eng.transition(pos, Trigger.PAUSE).name == "APPLIED"
        t.join(10.0)
        assert work and still_waiting, "the main thread ran only after the wait ended"
        assert not t.is_alive() and got == [State.PAUSED]

    def test_hot_calls_still_work_from_threads(self, make_engine):
        """Hot calls keep the GIL; threads with their own Engines interleave
        them and every commit is counted once (the counters add up)."""
        eng = make_engine(capacity=8)
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        applied = [0, 0]

        def flip(i: int) -> None:
            with Engine.attach(eng.handle) as mine:
                for _ in range(2000):
                    for trig in (Trigger.PAUSE, Trigger.RESUME):
                        applied[i] += mine.transition(pos, trig).name == "APPLIED"

        threads = [threading.Thread(target=flip, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60.0)
        assert int(eng._slot(eng.slot_of(pos)).transitions) == 2 + sum(applied)
