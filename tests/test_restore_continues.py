"""A restore from a journal directory, then the journal goes on in it.

Engine.create(journal=DIR) writes every change to DIR; Engine.restore(DIR)
brings the engine back.  What the restored engine changes must be durable
in DIR too, so that a second loss restores the second engine, not the
first; the records that ride on a commit (an open's key, a booked change's
account books) come back exactly, prices journaled or not.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from restore_helpers import state_of
from test_restore import T, workload

from engine import Engine
from engine.durable import format as fmt


def _create(name: str, jdir: Path, **kw: Any) -> Engine:
    return Engine.create(64, name=name, journal=str(jdir), journal_records=4096,
                         keys_per_position=3, max_accounts=8, **kw)


def _lose(eng: Engine) -> None:
    """Everything durable, then every process gone and the segment unlinked."""
    eng.flush()
    eng.unlink()
    eng.close()


class TestRestoreContinues:
    def test_changes_after_a_restore_survive_a_second_loss(self, names: Any,
                                                           tmp_path: Path) -> None:
        """A restored engine journals on in its directory: a second restore has its changes."""
        jdir = tmp_path / "j"
        eng = _create(names(), jdir)
        workload(eng, random.Random(1))
        _lose(eng)
        first = Engine.restore(jdir)
        try:
            assert first.seg.hdr.halted   # the workload ends halted: the restore keeps it
            first.halt(False)
            workload(first, random.Random(2), n=10, tag="-2")
            first.halt(False)
            keyed = first.open_position(70.0, 1.0, side=1, key="after-restore")
            want = state_of(first, prices=False)   # prices are not journaled here
            assert first.flush() == first.journal_seq
            name = first.name
            first.unlink()
        finally:
            first.close()
        second = Engine.restore(jdir)
        try:
            assert second.name == name
            assert state_of(second, prices=False) == want
            assert second.lookup("after-restore") == keyed
        finally:
            second.unlink()
            second.close()

    def test_a_cut_tail_is_written_over(self, names: Any, tmp_path: Path) -> None:
        """Garbage after the last record is cut once, then zeroed: the next restore cuts nothing."""
        jdir = tmp_path / "j"
        eng = _create(names(), jdir)
        p = eng.open_position(10.0, 1.0, key="k-1")
        eng.transition(p, T.POSITION_OPENED)
        last = eng.flush()
        _lose(eng)
        path = jdir / fmt.journal_name(1)
        end = lib_frame_end(path, last)
        with open(path, "r+b") as f:
            f.seek(end)
            f.write(os.urandom(100))
        first = Engine.restore(jdir)
        try:
            assert first.restore_report.tail_cut == (str(path), end)
            first.transition(p, T.EXIT_CONDITION_MET)
            want = state_of(first, prices=False)   # prices are not journaled here
            first.flush()
            first.unlink()
        finally:
            first.close()
        second = Engine.restore(jdir)
        try:
            assert second.restore_report.tail_cut is None
            assert state_of(second, prices=False) == want
        finally:
            second.unlink()
            second.close()

    def test_a_booked_close_and_an_opens_key_come_back_without_journaled_prices(
            self, names: Any, tmp_path: Path) -> None:
        """An open's key and a booked close's books ride on their commits: restored exactly."""
        jdir = tmp_path / "j"
        eng = _create(names(), jdir)
        a = eng.open_account(10_000, 10_000, 5, 5_000, key="desk")
        p = eng.open_position(100.0, 3.0, side=-1, account=a, key="ord-7")
        for trig in (T.POSITION_OPENED, T.EXIT_CONDITION_MET, T.EXIT_STARTED):
            eng.transition(p, trig)
        eng.update_price(p, 97.5)   # not journaled: the close books at it
        q = eng.open_position(50.0, 2.0, side=1, account=a, key="ord-8")
        eng.transition(p, T.EXIT_COMPLETED)
        books = eng.account(a)
        assert books.realized_pnl == 7.5
        _lose(eng)
        back = Engine.restore(jdir)
        try:
            assert back.account(a) == books
            assert back.lookup("ord-7") == p and back.lookup("ord-8") == q
            assert back.lookup_account("desk") == a
        finally:
            back.unlink()
            back.close()


def lib_frame_end(path: Path, last_seq: int) -> int:
    """The byte offset right after the frame of last_seq in the journal file
    at path (its frames start at the file's first seq)."""
    with open(path, "rb") as f:
        head = f.read(fmt.FILE_HDR)
    first = int.from_bytes(head[16:24], "little")
    return fmt.FILE_HDR + (last_seq - first + 1) * fmt.FRAME_BYTES
