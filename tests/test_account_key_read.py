"""An account's key read back: ``Account.key``, ``accounts()``'s key columns
and the Prometheus ``account`` label (its key, or its id), on both backends."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import collector

BACKENDS = ("shm", "redis")


def _labels(eng: Any, name: str) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(eng))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            if s.name == name:
                out[s.labels.get("account", "")] = s.value
    return out


class TestAccountKey:
    def test_account_reads_its_key(self, make_engine: Any) -> None:
        """account() gives the key the account was opened with (str, bytes, or None)."""
        eng = make_engine(max_accounts=4)
        a = eng.open_account(1000, 500, 5, 100, key="desk-a")
        b = eng.open_account(1000, 500, 5, 100, key=b"\xff\x00raw")
        c = eng.open_account(1000, 500, 5, 100)
        assert (eng.account(a).key, eng.account(b).key, eng.account(c).key) == (
            "desk-a", b"\xff\x00raw", None)

    def test_a_reopened_record_does_not_keep_the_old_key(self, make_engine: Any) -> None:
        """A record closed and opened again without a key reads no key."""
        eng = make_engine(max_accounts=1)
        a = eng.open_account(10, 10, 1, 10, key="gone")
        eng.close_account(a)
        b = eng.open_account(10, 10, 1, 10)
        assert eng.account(b).key is None and eng.lookup_account("gone") is None

    def test_accounts_rows_carry_the_key(self, make_engine: Any) -> None:
        """accounts(): key_len and key bytes per row, the key's bytes exactly."""
        eng = make_engine(max_accounts=4)
        a = eng.open_account(1000, 500, 5, 100, key="k-1")
        b = eng.open_account(1000, 500, 5, 100)
        rows = {int(r["id"]): r for r in eng.accounts()}
        assert bytes(rows[a]["key"][: rows[a]["key_len"]]) == b"k-1"
        assert rows[b]["key_len"] == 0

    def test_prometheus_labels_an_account_by_its_key_else_its_id(self,
                                                                 make_engine: Any) -> None:
        """engine_account_cash{account=...}: the key where there is one, else the id."""
        eng = make_engine(max_accounts=4)
        eng.open_account(1000, 500, 5, 100, key="desk-a")
        b = eng.open_account(250, 500, 5, 100)
        assert _labels(eng, "engine_account_cash") == {"desk-a": 1000.0, str(b): 250.0}


class TestJournalGauges:
    def test_journal_seq_is_exported(self, make_engine: Any) -> None:
        """engine_journal_seq equals journal_seq after some changes."""
        eng = make_engine(journal=True)
        p = eng.open_position(10.0, 1.0)
        eng.transition(p, "POSITION_OPENED")
        assert _labels(eng, "engine_journal_seq") == {"": float(eng.journal_seq)}
        assert eng.journal_seq >= 2

    def test_durable_seq_is_exported_with_a_journal_on_disk(self, tmp_path: Any) -> None:
        """engine_journal_durable_seq equals flush()'s durable seq (shared memory, journal=DIR)."""
        from engine import Engine
        eng = Engine.create(capacity=8, journal=str(tmp_path / "j"), temporary=True)
        try:
            eng.open_position(10.0, 1.0)
            seq = eng.flush()
            assert seq == eng.journal_seq
            assert _labels(eng, "engine_journal_durable_seq") == {"": float(seq)}
        finally:
            eng.close()
