"""Adversary of the journal's riders (the key and books records filled with a
slot's record under one latch, native/keys.c "riders"): kills and stops between
every two steps, a ring that wraps over riders, a durable writer behind, and
restore after each kill.

Forbidden: a key/account record without its slot commit, a slot commit without
its riders, a rider published twice or out of order, books in the journal that
differ from the account's after the commit, a restore that differs from the
live engine, and (durable) a rider that overwrites a record the files lack.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from test_durable import (  # noqa: F401  (the fixture)
    child_writer,
    durable,
    durable_info,
    event_keys,
    file_records,
    frame_keys,
    hand_off_writer,
)

from engine import Engine, JournalFullError
from tests.procs import READY_TIMEOUT, sigkill, until


class TestDurableRoomForRiders:
    def test_riders_never_overwrite_a_record_the_files_lack(self, durable: Any,
                                                           spawner: Any) -> None:
        """A keyed, booked open at the last free record of a stopped writer's ring: refused, files whole."""
        eng = durable(journal_records=16, max_accounts=2)
        acct = eng.open_account(10_000, 10_000, 50, 5_000)
        hand_off_writer(eng)
        ready, go = spawner.ctx.Event(), spawner.ctx.Event()
        p = spawner.start(child_writer, eng.handle, ready, go, 0)
        assert ready.wait(READY_TIMEOUT)
        until(lambda: durable_info(eng).written_seq == eng.journal_seq, "the child to write")
        written = durable_info(eng).written_seq
        os.kill(p.pid, signal.SIGSTOP)   # the holder cannot write: the ring fills
        try:
            try:   # plain opens (one record each) up to the ring's last free record
                while eng.journal_seq + 1 < written + 16:
                    eng.open_position(1.0, 1.0)
                # this commit's own record is the last free one; its two riders
                # (key, books) would overwrite written + 1 and written + 2
                eng.open_position(10.0, 1.0, key="K-rider", account=acct)
            except JournalFullError:
                pass   # refused, nothing changed (what the fix does)
            assert eng.journal_seq <= written + 16, "the ring overwrote a record the files lack"
        finally:
            os.kill(p.pid, signal.SIGCONT)
        until(lambda: durable_info(eng).written_seq == eng.journal_seq or
              durable_info(eng).failure != 0, "the writer to drain the ring")
        assert durable_info(eng).failure == 0, "the writer failed: a record it lacked was overwritten"
        sigkill(p)
        eng.flush(timeout=10)
        got, end = file_records(eng.jdir)
        assert [f.seq for f in got] == list(range(1, eng.journal_seq + 1)), "a record missing from the files"
        assert end.torn is None
        since = max(0, eng.journal_seq - 13)
        assert frame_keys(got)[since:] == event_keys(eng, since)
