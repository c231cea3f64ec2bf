"""Adversary of the account key read back (``aread``/``alist``, an account
record's key) and of an open's key record, on Redis (and shared memory where
the same API promises the same): lost replies and resends, racing creates of
one key, a killed server, a key of every byte value, maximal length, unicode.

Forbidden: a duplicated or missing key record, an ``Account.key`` (read back or
in an ``account`` event) that differs from the bound key, a journal order per
id different from the commit order.
"""

from __future__ import annotations

from typing import Any

import pytest

from engine import Engine
from engine._native import lib

BACKENDS = ("shm", "redis")
KEY_MAX = lib.ENG_KEY_MAX
#: keys at the edges: every byte value, the maximal length, unicode, NULs
KEYS: list[str | bytes] = [bytes([b]) for b in range(256)] + [
    bytes(range(i, i + KEY_MAX)) for i in range(0, 256 - KEY_MAX, 41)] + [
    "é" * (KEY_MAX // 2), "\U0001F600" * (KEY_MAX // 4), "x" * KEY_MAX, b"\0" * KEY_MAX,
    b"\xff" * KEY_MAX, b"a\0b", " ", "desk 1/ä"]


def as_bytes(k: str | bytes | None) -> bytes | None:
    return k.encode() if isinstance(k, str) else k


def account_events(eng: Engine, acct: int) -> list[Any]:
    return [e.record for e in eng.events(since=0, timeout=0)
            if e.kind == "account" and e.id == acct]


class TestAccountKeyInItsRecords:
    def test_an_account_event_carries_the_bound_key(self, make_engine: Any) -> None:
        """Every account event of a keyed account is that Account, key and all."""
        eng = make_engine(capacity=4, journal=True, max_accounts=2)
        acct = eng.open_account(1000, 1000, 5, 100, key="desk-1")
        eng.deposit(acct, 5)
        pos = eng.open_position(10.0, 1.0, account=acct)
        recs = account_events(eng, acct)
        assert [r.key for r in recs] == ["desk-1"] * 3, "an account record without its key"
        assert recs[-1] == eng.account(acct)
        assert eng.account(acct).key == "desk-1" and pos

    def test_a_close_is_recorded_with_the_key_it_closed(self, make_engine: Any) -> None:
        """An account close's record carries the key the account had (both backends alike)."""
        eng = make_engine(capacity=4, journal=True, max_accounts=2)
        acct = eng.open_account(1000, 1000, 5, 100, key="desk-1")
        last = eng.close_account(acct)
        recs = account_events(eng, acct)
        assert len(recs) == 2 and recs[-1].key == last.key == "desk-1"
        assert eng.lookup_account("desk-1") is None

    def test_every_key_value_reads_back_as_bound(self, make_engine: Any) -> None:
        """Keys of every byte value, maximal length, unicode: read back, listed, recorded as bound."""
        eng = make_engine(capacity=4, journal=True, max_accounts=2, keys_per_position=1)
        for k in KEYS:
            acct = eng.open_account(1000, 1000, 5, 100, key=k)
            pos = eng.open_position(10.0, 1.0, key=k)
            assert as_bytes(eng.account(acct).key) == as_bytes(k), f"Account.key of {k!r}"
            listed = [a for a in eng.accounts() if int(a["id"]) == acct]
            assert len(listed) == 1 and bytes(listed[0]["key"][:listed[0]["key_len"]]) == \
                as_bytes(k), f"accounts() key of {k!r}"
            assert eng.lookup_account(k) == acct and eng.lookup(k) == pos
            assert [as_bytes(x) for x in eng.keys(pos)] == [as_bytes(k)]
            assert as_bytes(account_events(eng, acct)[-1].key) == as_bytes(k), \
                f"the account record's key of {k!r}"
            eng.close_account(acct)
            for t in ("POSITION_OPENED", "EXIT_CONDITION_MET", "EXIT_STARTED", "EXIT_COMPLETED"):
                eng.transition(pos, t)
            eng.release_position(pos)
        evs = list(eng.events(since=0, timeout=0))
        assert [e.record for e in evs if e.kind == "key"] == [as_bytes(k) for k in KEYS], \
            "a key record missing, twice, or not the bound key"
