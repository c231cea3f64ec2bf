"""The GIL: hot calls keep it (no release/re-take per call), calls that can
take long release it, so the other threads of a process run meanwhile.

What is forbidden: a thread of the process frozen while another one sleeps
in ``wait_for_change`` (or scans in ``snapshot``/``recover``).
"""

from __future__ import annotations

import threading
import time

from engine import Engine, State, Trigger

JOURNAL_OFF_TOO = True   # also on shared memory with journal=None (conftest)

LOOP_SECONDS = 0.2   # each thread's loop: 40 GIL switch intervals, so the two interleave


class TestReleasedCalls:
    def test_other_thread_runs_while_one_waits(self, make_engine):
        """wait_for_change releases the GIL: another thread runs and its commit wakes the waiter."""
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
        deadline = time.monotonic() + 10.0
        while not eng._slot(eng.slot_of(pos)).waiting:   # set inside the C wait
            assert time.monotonic() < deadline, "the waiter never reached the C wait"
            time.sleep(0.0005)
        work = sum(range(200_000))   # Python work: impossible while a wait holds the GIL
        still_waiting = t.is_alive() and not got   # the wait's timeout is 10 s
        assert eng.transition(pos, Trigger.PAUSE).name == "APPLIED"
        t.join(10.0)
        assert work and still_waiting, "the main thread ran only after the wait ended"
        assert not t.is_alive() and got == [State.PAUSED]

    def test_hot_calls_still_work_from_threads(self, make_engine):
        """Two threads' transition loops overlap for 200 ms and every commit is counted once."""
        eng = make_engine(capacity=8)
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        applied = [0, 0]
        other_moved = [False, False]   # the other thread committed during this one's loop
        start = threading.Barrier(2)

        def flip(i: int) -> None:
            with Engine.attach(eng.handle) as mine:
                start.wait(10.0)
                other_before = applied[1 - i]
                end = time.monotonic() + LOOP_SECONDS
                while time.monotonic() < end:
                    for trig in (Trigger.PAUSE, Trigger.RESUME):
                        applied[i] += mine.transition(pos, trig).name == "APPLIED"
                    if applied[1 - i] != other_before:
                        other_moved[i] = True

        threads = [threading.Thread(target=flip, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60.0)
        assert not any(t.is_alive() for t in threads)
        assert other_moved == [True, True], "the two loops never interleaved: no race was run"
        assert applied[0] > 0 and applied[1] > 0
        assert int(eng._slot(eng.slot_of(pos)).transitions) == 2 + sum(applied)
