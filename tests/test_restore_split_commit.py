"""Restore after a power cut that splits one commit's records: the slot's record
of a keyed open or a booked change reached the disk, a record that rides on its
commit (the key's, the account's books: native/keys.c journal_fill_riders) did
not.

The writer writes in batches that end anywhere (ENG_DJ_BATCH, a file's last
frame), so a power failure can keep any prefix of the frames past what flush()
reported. A commit is restored whole or not at all: the slot's record counts
its riders (eng_jrec.riders), and a last commit missing some is cut with them,
as a torn tail (engine/durable/restore.py, _split_commit). Forbidden: an open
restored without its key, a close or open restored without the books it
moved, a cut that drops a whole commit, riders missing in the middle taken for
a torn tail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from durable_helpers import Made, crc32c, locate, made_engines, power_cut  # noqa: F401

from engine import Engine, Outcome, State, Trigger
from engine._native import ffi, lib
from engine.durable.frames import read
from engine.errors import EngineError, RestoreError

T = Trigger
RIDERS_AT = int(ffi.offsetof("eng_jrec", "riders"))
LATCH_AT = int(ffi.offsetof("eng_jrec", "latch"))


def cut_and_restore(made: Made, eng: Engine, durable: int) -> Engine:
    """Flush and close ``eng``, keep its frames up to seq ``durable`` (the rest
    zeroed, as a power cut leaves them) and restore that."""
    eng.flush(10.0)
    eng.close()
    return made.restore(power_cut(made.jdir(eng), made.dir("cut"), durable))


def _kinds_riders(made: Made, eng: Engine, seq: int) -> list[tuple[int, int]]:
    """(kind, riders) of every record on disk from ``seq`` on."""
    eng.flush(10.0)
    return [(f.kind, f.riders) for f in read(str(made.jdir(eng))) if f.seq >= seq]


def _booked_close(eng: Engine) -> tuple[int, int, Any, int]:
    """A booked position opened at 100 x 2, priced at 110: (account, position,
    the account before its close, the close's seq); then closed."""
    a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
    p = eng.open_position(100.0, 2.0, side=1, account=a)
    for trig in (T.POSITION_OPENED, T.EXIT_CONDITION_MET, T.EXIT_STARTED):
        eng.transition(p, trig)
    eng.update_price(p, 110.0)
    before, seq = eng.account(a), eng.journal_seq + 1
    assert eng.transition(p, T.EXIT_COMPLETED) is Outcome.APPLIED
    return a, p, before, seq


class TestSplitCommitIsCutWhole:
    def test_a_close_without_its_account_record_is_cut_with_it(self, made: Made) -> None:
        """The close's account record lost: the close is not restored, nor its books."""
        eng = made.create(max_accounts=4)
        a, p, before, seq = _booked_close(eng)
        assert _kinds_riders(made, eng, seq) == [(lib.ENG_JK_TRANSITION, 1),
                                                 (lib.ENG_JK_ACCOUNT, 0)]
        got = cut_and_restore(made, eng, seq)
        assert got.restore_report.last_seq == seq - 1 and got.restore_report.tail_cut
        assert got.state(p) is State.EXITING
        assert got.account(a) == before

    def test_a_booked_open_without_its_account_record_is_cut_with_it(self, made: Made) -> None:
        """The open's account record lost: no position, the account as before the open."""
        eng = made.create(max_accounts=4)
        a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
        before, seq = eng.account(a), eng.journal_seq + 1
        p = eng.open_position(100.0, 2.0, side=1, account=a)
        assert _kinds_riders(made, eng, seq) == [(lib.ENG_JK_OPEN, 1), (lib.ENG_JK_ACCOUNT, 0)]
        got = cut_and_restore(made, eng, seq)
        assert got.restore_report.last_seq == seq - 1
        assert got.account(a) == before
        with pytest.raises(EngineError):
            got.state(p)

    @pytest.mark.parametrize("kept", [0, 1])
    def test_a_keyed_booked_open_missing_a_rider_is_cut_whole(self, made: Made,
                                                              kept: int) -> None:
        """An open with two riders (key, books), one or both lost: no position, no key."""
        eng = made.create(max_accounts=4)
        a = eng.open_account(100_000, 100_000, 5, 50_000, key="acct")
        seq = eng.journal_seq + 1
        p = eng.open_position(100.0, 2.0, side=1, account=a, key="order-1")
        assert _kinds_riders(made, eng, seq) == [(lib.ENG_JK_OPEN, 2), (lib.ENG_JK_KEY, 0),
                                                 (lib.ENG_JK_ACCOUNT, 0)]
        got = cut_and_restore(made, eng, seq + kept)
        assert got.restore_report.last_seq == seq - 1
        assert got.lookup("order-1") is None
        with pytest.raises(EngineError):
            got.state(p)

    def test_a_keyed_open_without_its_key_record_is_cut_with_it(self, made: Made) -> None:
        """An open whose key record was lost is not restored (never without its key)."""
        eng = made.create(max_accounts=4)
        seq = eng.journal_seq + 1
        p = eng.open_position(100.0, 2.0, key="order-1")
        assert _kinds_riders(made, eng, seq) == [(lib.ENG_JK_OPEN, 1), (lib.ENG_JK_KEY, 0)]
        got = cut_and_restore(made, eng, seq)
        assert got.restore_report.last_seq == seq - 1
        with pytest.raises(EngineError):
            got.state(p)

    def test_a_whole_last_commit_is_kept(self, made: Made) -> None:
        """The same keyed open with its key record on disk: restored, key and all."""
        eng = made.create(max_accounts=4)
        seq = eng.journal_seq + 1
        p = eng.open_position(100.0, 2.0, key="order-1")
        got = cut_and_restore(made, eng, seq + 1)
        assert got.restore_report.last_seq == seq + 1 and got.restore_report.tail_cut is None
        assert got.lookup("order-1") == p and got.state(p) is State.CREATED

    def test_the_journal_goes_on_over_the_cut_commit(self, made: Made) -> None:
        """A restored engine writes its records over the cut commit; restored again: its own."""
        eng = made.create(max_accounts=4)
        seq = eng.journal_seq + 1
        eng.open_position(100.0, 2.0, key="order-1")
        eng.flush(10.0)
        eng.close()
        cut = power_cut(made.jdir(eng), made.dir("cut"), seq)
        got = made.restore(cut)
        q = got.open_position(50.0, 1.0, key="order-2")
        got.flush(10.0)
        name = got.name
        got.close()
        Engine.attach(name).unlink()
        again = made.restore(cut)
        assert again.lookup("order-2") == q and again.lookup("order-1") is None
        assert again.restore_report.tail_cut is None


class TestSplitCommitInTheMiddle:
    def test_a_rider_replaced_in_the_middle_is_corruption(self, made: Made,
                                                          tmp_path: Path) -> None:
        """A rider whose latch word is not its commit's, records after it: RestoreError."""
        eng = made.create(max_accounts=4)
        seq = eng.journal_seq + 1
        eng.open_position(100.0, 2.0, key="order-1")
        eng.open_position(100.0, 2.0)
        eng.flush(10.0)
        d = made.jdir(eng)
        eng.close()
        path, off = locate(d, seq + 1)   # the key's record, a valid frame after it
        data = bytearray(path.read_bytes())
        rec = off + 8
        latch = int.from_bytes(data[rec + LATCH_AT:rec + LATCH_AT + 8], "little")
        data[rec + LATCH_AT:rec + LATCH_AT + 8] = (latch + 1).to_bytes(8, "little")
        data[off + 4:off + 8] = crc32c(bytes(data[rec:rec + lib.ENG_JREC_SIZE])).to_bytes(
            4, "little")
        path.write_bytes(bytes(data))
        with pytest.raises(RestoreError, match="should ride on the commit") as err:
            made.restore(d)
        assert err.value.offset == off   # type: ignore[attr-defined]


class TestSplitCommitInTheFilesCommand:
    def test_journal_command_holds_a_cut_commit_back(self, made: Made) -> None:
        """`journal DIR` prints what a restore keeps: a cut commit is reported, not printed."""
        eng = made.create(max_accounts=4)
        before = eng.journal_seq
        eng.open_position(100.0, 2.0, key="order-1")
        eng.flush(10.0)
        eng.close()
        cut = power_cut(made.jdir(eng), made.dir("cut"), before + 1)   # the open, not its key
        r = subprocess.run([sys.executable, "-m", "engine", "journal", str(cut), "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == \
            list(range(1, before + 1))
        assert "a commit cut short (1 of its 2 records" in r.stderr
        assert f"after seq {before}" in r.stderr
