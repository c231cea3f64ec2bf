"""The journal as a second, independent witness (engine/tools/stress/witness.py).

The stress verifier and the chaos runs check every commit twice: against
what the workers logged, and against the engine's own journal.  These tests
show the cross-check passes on clean runs of every mix (shared memory and
Redis), and that it fails -- with its own violation kind -- on each defect it
exists to catch: a commit a worker did not log, a record for a refused call,
a commit without its record, a state out of order, a seq seen twice or
missing, a lapped reader, books that their records do not make.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import Engine, Trigger
from engine.tools.stress import StressConfig, run_stress
from engine.tools.stress.witness import (
    CATEGORIES,
    JREC_DTYPE,
    WITNESS_JOURNAL,
    JournalRecords,
    JournalWitness,
    follower_main,
    load_followed,
    read_shm,
    verify_journal,
)


# -- a small engine's journal, then mutated ---------------------------------------------------
@pytest.fixture
def journaled():
    """An engine with a journal and a few committed changes of every kind,
    including refused calls (which must record nothing)."""
    eng = Engine.create(capacity=8, max_accounts=2, journal=True, journal_records=1024)
    a = eng.open_account(cash=1000, max_exposure=500, max_positions=10, max_loss=100)
    p = eng.open_position(entry_price=10.0, amount=2.0, side=1, token=1, account=a)
    q = eng.open_position(entry_price=11.0, amount=1.0, side=-1, token=2)
    eng.transition(p, Trigger.POSITION_OPENED)
    eng.transition(p, Trigger.EXIT_STARTED)          # refused: INVALID from MONITORING
    eng.transition(q, Trigger.POSITION_OPENED)
    eng.transition(q, Trigger.PAUSE)
    eng.update_price(p, 12.0)
    for t in (Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED, Trigger.EXIT_COMPLETED):
        eng.transition(p, t)
    eng.deposit(a, 5)
    eng.release_position(p)
    eng.open_position(entry_price=10.0, amount=3.0, side=1, token=1, account=a)
    try:
        yield eng, a
    finally:
        eng.close()
        eng.unlink()


def _final(eng: Engine) -> dict:
    rows = eng.snapshot()
    return {"final_words": np.array([eng.state_word(s) for s in range(eng.capacity)],
                                    dtype=np.uint64),
            "counters": np.array([int(eng._slot(s).transitions) for s in range(eng.capacity)]),
            "final_ids": {int(r["slot"]): int(r["id"]) for r in rows}}


def _with_rows(eng: Engine, rows: np.ndarray, lapped: str | None = None) -> JournalRecords:
    rows = np.frombuffer(rows.tobytes(), dtype=JREC_DTYPE)
    jr = read_shm(eng)
    return JournalRecords(rows, np.zeros(len(rows), np.int64), True, jr.event, lapped)


def _transitions(rows: np.ndarray) -> np.ndarray:
    return np.flatnonzero(rows["kind"] == 1)


class TestVerifyJournal:
    """verify_journal against an engine's real journal, then against mutations of it."""

    def test_clean_journal_agrees(self, journaled):
        """An untouched journal agrees with the slots, ids and books, and counts its records."""
        eng, a = journaled
        jr = read_shm(eng)
        rep = verify_journal(jr, eng.spec, books={a: eng.account(a)}, **_final(eng))
        assert rep.violations == 0, rep.messages
        # 12 changes (the refused call: none) and 3 account records riding on booked commits
        assert rep.links == len(jr) == eng.journal_seq == 15
        assert rep.accounts == 1
        assert rep.triggers == {"POSITION_OPENED": 2, "PAUSE": 1, "EXIT_CONDITION_MET": 1,
                                "EXIT_STARTED": 1, "EXIT_COMPLETED": 1}

    def test_missing_record_is_reported(self, journaled):
        """A commit without its record breaks the slot's chain and count (journal_chain, _count)."""
        eng, _ = journaled
        rows = read_shm(eng).rows.copy()
        drop = _transitions(rows)[1]
        rows = np.delete(rows, drop)
        rows["seq"] = np.arange(1, len(rows) + 1)     # renumbered: no seq gap to give it away
        rep = verify_journal(_with_rows(eng, rows), eng.spec, **_final(eng))
        assert {"journal_chain", "journal_count"} <= set(rep.by_category), rep.messages

    def test_record_of_refused_call_is_reported(self, journaled):
        """A record for a call that changed nothing is an illegal move and one too many."""
        eng, _ = journaled
        rows = read_shm(eng).rows.copy()
        extra = rows[_transitions(rows)[0]].copy()       # p: CREATED -> MONITORING
        extra["trigger"] = int(Trigger.EXIT_STARTED)     # ... again, as the refused call
        rows = np.insert(rows, _transitions(rows)[0] + 1, extra)
        rows["seq"] = np.arange(1, len(rows) + 1)
        rep = verify_journal(_with_rows(eng, rows), eng.spec, **_final(eng))
        assert {"journal_chain", "journal_count"} <= set(rep.by_category), rep.messages

    def test_duplicate_and_missing_seq_are_reported(self, journaled):
        """A seq seen twice and a seq missing are each a journal_seq violation."""
        eng, _ = journaled
        rows = read_shm(eng).rows.copy()
        rows["seq"][3] = rows["seq"][2]
        rep = verify_journal(_with_rows(eng, rows), eng.spec, **_final(eng))
        assert rep.by_category.get("journal_seq") == 2, rep.messages   # a repeat, then a gap
        rows = read_shm(eng).rows.copy()
        rows["seq"][5:] += 1
        rep = verify_journal(_with_rows(eng, rows), eng.spec, **_final(eng))
        assert rep.by_category.get("journal_seq") == 1, rep.messages

    def test_final_word_disagreeing_with_last_record_is_reported(self, journaled):
        """A slot whose word moved past its last record is a journal_final violation."""
        eng, _ = journaled
        jr = read_shm(eng)
        final = _final(eng)
        final["final_words"][1] += 1 << 32       # q one generation further than recorded
        rep = verify_journal(jr, eng.spec, **final)
        assert "journal_final" in rep.by_category, rep.messages

    def test_books_not_made_by_records_are_reported(self, journaled):
        """An account whose cash moved without a record is a journal_books violation."""
        eng, a = journaled
        books = eng.account(a)._replace(cash=eng.account(a).cash + 1)
        rep = verify_journal(read_shm(eng), eng.spec, books={a: books}, **_final(eng))
        assert "journal_books" in rep.by_category, rep.messages

    def test_links_out_of_order_are_reported(self, journaled):
        """Workers' links whose states differ from the records' are a journal_links violation."""
        from engine.tools.stress import links_from_words

        eng, _ = journaled
        jr = read_shm(eng)
        slot = (jr.rows["id"] & 0xFFFFFF).astype(int)
        words = jr.rows["word"].astype(np.uint64)
        m = np.isin(jr.rows["kind"], (0, 1, 2))
        slots, new = slot[m], words[m]
        old = np.zeros_like(new)
        for i in range(len(new)):
            prev = np.flatnonzero(slots[:i] == slots[i])
            old[i] = new[prev[-1]] if len(prev) else 0
        links = links_from_words(slots, old, new)
        assert verify_journal(jr, eng.spec, links=links, **_final(eng)).violations == 0
        bad = links.copy()
        bad["new_state"][2] = 1 << 6              # a state the journal never recorded there
        rep = verify_journal(jr, eng.spec, links=bad, **_final(eng))
        assert "journal_links" in rep.by_category, rep.messages

    def test_lapped_reader_is_a_failure(self):
        """A reader lapped by the ring reports journal_lapped, never a silent pass."""
        eng = Engine.create(capacity=4, journal=True, journal_records=4)
        try:
            pos = eng.open_position(100.0, 1.0)
            eng.transition(pos, Trigger.POSITION_OPENED)
            for _ in range(5):
                eng.transition(pos, Trigger.PAUSE)
                eng.transition(pos, Trigger.RESUME)
            jr = read_shm(eng)
            assert jr.lapped
            rep = verify_journal(jr, eng.spec, **_final(eng))
            assert "journal_lapped" in rep.by_category
        finally:
            eng.close()
            eng.unlink()

    def test_follower_lapped_is_a_failure(self, tmp_path):
        """The stress follower that finds its next record overwritten says so (journal_lapped)."""
        import multiprocessing as mp

        eng = Engine.create(capacity=4, journal=True, journal_records=4)
        try:
            pos = eng.open_position(100.0, 1.0)
            eng.transition(pos, Trigger.POSITION_OPENED)
            for _ in range(5):
                eng.transition(pos, Trigger.PAUSE)
                eng.transition(pos, Trigger.RESUME)
            ctx = mp.get_context("spawn")
            stop, target, status = ctx.RawValue("B", 1), ctx.RawValue("Q", 0), ctx.RawArray("Q", 4)
            path = str(tmp_path / "j.jrec")
            follower_main(eng.handle, path, stop, target, status)     # in this process
            jr = load_followed(eng, path, status)
            assert jr.lapped and status[2] == 1
            assert "journal_lapped" in verify_journal(jr, eng.spec, **_final(eng)).by_category
        finally:
            eng.close()
            eng.unlink()


class TestJournalWitness:
    """The chaos runs' witness: follow between rounds, check at rest."""

    def test_rounds_then_rest_agree(self, journaled):
        """Following in rounds and checking at rest finds nothing on a clean engine."""
        eng, a = journaled
        w = JournalWitness(eng)
        assert w.follow().violations == 0
        pos = eng.open_position(100.0, 1.0)
        eng.transition(pos, Trigger.POSITION_OPENED)
        assert w.follow().violations == 0
        rep = w.check(books={a: eng.account(a)})
        assert rep.violations == 0, rep.messages
        assert w.records == eng.journal_seq

    def test_lost_record_found_at_rest(self, journaled):
        """A commit whose record the witness never saw is found at rest (record iff committed)."""
        eng, _ = journaled
        w = JournalWitness(eng)
        w.follow()
        pos = eng.id_of(1)
        eng.transition(pos, Trigger.RESUME)
        w.after = eng.journal_seq          # as if that record had never been written
        rep = w.check()
        assert "journal_final" in rep.by_category, rep.messages

    def test_needs_a_journal(self):
        """The witness refuses an engine without a journal instead of passing vacuously."""
        eng = Engine.create(capacity=4, journal=None)
        try:
            with pytest.raises(ValueError, match="journal=True"):
                JournalWitness(eng)
        finally:
            eng.close()
            eng.unlink()

    def test_witness_journal_options_make_a_journal(self):
        """WITNESS_JOURNAL (what the chaos tests create with) turns the journal on."""
        eng = Engine.create(capacity=4, **WITNESS_JOURNAL)
        try:
            assert eng.journal_records == WITNESS_JOURNAL["journal_records"]
        finally:
            eng.close()
            eng.unlink()


def _run(**kw) -> dict:
    cfg = StressConfig(**{"workers": 2, "seconds": 1.0, **kw})
    res = run_stress(cfg)
    return {"res": res, "journal": res.verification.get("journal"),
            "cats": res.verification["by_category"]}


class TestStressCrossCheck:
    """``python -m engine stress`` with its journal cross-check, every mix."""

    @pytest.mark.parametrize("mix", ["default", "orders", "accounts", "exits"])
    def test_clean_run_is_cross_checked(self, mix):
        """A clean run of each mix checks every journal record and finds nothing."""
        out = _run(mix=mix)
        res, j = out["res"], out["journal"]
        assert res.ok, res.violation_messages[:10]
        assert j is not None and j["lapped"] is None
        assert j["checked"] == j["records"] > 0
        if mix != "exits":
            assert j["checked"] >= res.verification["links"] > 0
        if mix == "accounts":
            assert j["accounts"] == res.config["accounts"]
        if mix == "exits":
            assert j["by_trigger"]["EXIT_CONDITION_MET"] == res.exits["fires"] > 0

    def test_dropped_link_is_caught_by_the_journal(self):
        """A worker that leaves a committed transition out of its log disagrees with the journal."""
        out = _run(fault="drop-link")
        assert not out["res"].ok
        assert out["cats"].get("journal_count", 0) >= 1, out["res"].violation_messages[:10]
        assert out["journal"]["violations"]["journal_count"] >= 1

    def test_no_journal_run_says_so(self):
        """--no-journal runs without the cross-check and reports no journal figures."""
        out = _run(journal=False)
        assert out["res"].ok and out["journal"] is None

    def test_categories_are_described(self):
        """Every journal violation kind has a description for the report."""
        assert all(k.startswith("journal_") and v for k, v in CATEGORIES.items())


class TestStressCrossCheckRedis:
    """The same cross-check on Redis: per shard, per id and per account."""

    @pytest.mark.parametrize("mix", ["default", "accounts"])
    def test_clean_run_is_cross_checked(self, mix):
        """A clean run on Redis checks every record of every shard's journal."""
        out = _run(mix=mix, url="auto", sample_every=1, alert_p99_us=None)
        res, j = out["res"], out["journal"]
        assert res.ok, res.violation_messages[:10]
        assert j["per_shard"] and j["lapped"] is None
        assert j["checked"] == j["records"] >= res.verification["links"] > 0

    def test_dropped_link_is_caught_by_the_journal(self):
        """On Redis too, a worker's lost commit disagrees with the journal."""
        out = _run(fault="drop-link", url="auto", sample_every=1, alert_p99_us=None,
                   seconds=2.0)
        assert out["cats"].get("journal_count", 0) >= 1, out["res"].violation_messages[:10]
