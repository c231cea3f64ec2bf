"""Account keys: ``open_account(key=)`` stores the key, unique among open
accounts, and ``lookup_account(key)`` finds the account from any process."""

from __future__ import annotations

import os

import pytest
from procs import JOIN_TIMEOUT, READY_TIMEOUT

from engine import (
    ArgumentError,
    BusyError,
    Engine,
    EngineTypeError,
    Handle,
    KeyExistsError,
)
from engine._native import lib

BACKENDS = ("shm", "redis")


def _open(eng: Engine, key: object = None) -> int:
    return eng.open_account(1_000, 1_000, 10, 100, key=key)  # type: ignore[arg-type]


class TestAccountKeys:
    """The key is stored with the account and names it while it is open."""

    def test_lookup(self, engine):
        """lookup_account returns the id the key was opened with; None for others."""
        a, b = _open(engine, "desk-A"), _open(engine, "desk-B")
        assert engine.lookup_account("desk-A") == a and engine.lookup_account("desk-B") == b
        assert engine.lookup_account("desk-C") is None

    def test_unkeyed_accounts_are_not_found(self, engine):
        """An account opened without a key is found by no key."""
        _open(engine)
        assert engine.lookup_account("desk-A") is None

    def test_duplicate_refused_nothing_changes(self, engine):
        """A key an open account has: KeyExistsError naming it, no account opened."""
        a = _open(engine, "desk-A")
        before = engine.accounts()
        with pytest.raises(KeyExistsError, match=f"desk-A.*{a}"):
            _open(engine, "desk-A")
        assert len(engine.accounts()) == len(before) and engine.lookup_account("desk-A") == a

    def test_closed_frees_the_key(self, engine):
        """A closed account's key names nothing and may be opened again."""
        a = _open(engine, "desk-A")
        engine.close_account(a)
        assert engine.lookup_account("desk-A") is None
        b = _open(engine, "desk-A")
        assert b != a and engine.lookup_account("desk-A") == b

    def test_str_and_bytes_are_one_key(self, engine):
        """A str key is its UTF-8 bytes: either form finds it, and collides."""
        a = _open(engine, "déck")
        assert engine.lookup_account("déck".encode()) == a
        with pytest.raises(KeyExistsError):
            _open(engine, "déck".encode())
        b = _open(engine, b"\xff\x00raw")
        assert engine.lookup_account(b"\xff\x00raw") == b

    def test_apart_from_position_keys(self, engine):
        """Position keys and account keys do not collide."""
        a = _open(engine, "K-1")
        pos = engine.open_position(100.0, 1.0, key="K-1", account=a)
        assert engine.lookup("K-1") == pos and engine.lookup_account("K-1") == a

    @pytest.mark.parametrize(("key", "err"), [("", ArgumentError), ("x" * 49, ArgumentError),
                                              (7, EngineTypeError)])
    def test_bad_key(self, engine, key, err):
        """An empty, too long or non-str key is refused; no account is opened."""
        with pytest.raises(err):
            _open(engine, key)
        with pytest.raises(err):
            engine.lookup_account(key)
        assert len(engine.accounts()) == 0

    def test_longest_key(self, engine):
        """A key of ENG_KEY_MAX bytes is kept whole."""
        key = "k" * lib.ENG_KEY_MAX
        a = _open(engine, key)
        assert engine.lookup_account(key) == a and engine.lookup_account(key[:-1]) is None

    def test_another_engine_sees_it(self, engine):
        """An Engine attached by handle finds the account by its key."""
        a = _open(engine, "desk-A")
        with Engine.attach(engine.handle) as other:
            assert other.lookup_account("desk-A") == a
            with pytest.raises(KeyExistsError):
                _open(other, "desk-A")


def _race_open(h: Handle, key: str, go: object, out: object) -> None:
    """Wait for go, open an account with key; put its id, 0 on KeyExistsError,
    -1 on BusyError (the key lock held past the bound: nothing changed)."""
    with Engine.attach(h) as eng:
        go.wait(READY_TIMEOUT)  # type: ignore[attr-defined]
        try:
            out.put(_open(eng, key))  # type: ignore[attr-defined]
        except KeyExistsError:
            out.put(0)  # type: ignore[attr-defined]
        except BusyError:
            out.put(-1)  # type: ignore[attr-defined]


def _die_opening(h: Handle, key: str) -> None:
    """Open an account with key under the die-in-key fault: SIGKILLed with the
    key lock and the latch held, its open sealed."""
    with Engine.attach(h) as eng:
        eng._set_fault(lib.ENG_FAULT_DIE_IN_KEY)
        _open(eng, key)


class TestAccountKeysAcrossProcesses:
    """Uniqueness holds across processes and across a SIGKILLed opener."""

    @pytest.mark.shm_only
    def test_race_one_wins(self, engine, spawner):
        """Six processes open the same key at once: exactly one account opens,
        every other gets KeyExistsError or BusyError (two opened is the forbidden outcome)."""
        go, out = spawner.ctx.Event(), spawner.ctx.Queue()
        for _ in range(6):
            spawner.start(_race_open, engine.handle, "K", go, out)
        # each keyed open sleeps 0.3 s between its scan and its publish: without the
        # key lock every racer would scan before any publishes
        engine._set_fault(0, 300_000_000)
        go.set()
        got = [out.get(timeout=READY_TIMEOUT) for _ in range(6)]
        spawner.join_all(JOIN_TIMEOUT)
        engine._set_fault(0, 0)
        winners = [g for g in got if g > 0]
        assert len(winners) == 1 and engine.lookup_account("K") == winners[0]
        assert len(engine.accounts()) == 1

    @pytest.mark.shm_only
    def test_killed_opener(self, engine, spawner):
        """An opener SIGKILLed holding the key lock and the latch (open sealed):
        the next keyed open takes both over, rolls that open forward and
        refuses the key; lookup then finds the killed one's account."""
        p = spawner.start(_die_opening, engine.handle, "K")
        p.join(JOIN_TIMEOUT)
        assert p.exitcode == -9
        engine._set_fault(0)   # the switch is the segment's: off before this process opens
        assert engine.lookup_account("K") is None   # sealed, not yet published
        with pytest.raises(KeyExistsError):
            _open(engine, "K")
        a = engine.lookup_account("K")
        assert a is not None and engine.account(a).cash == 1_000
        assert _open(engine, "L") != a and engine.lookup_account("L") is not None
        assert os.getpid() not in engine.recover().removed_pids


class TestAccountKeysOnShards:
    """On Redis, a keyed account lives on its key's shard: still one call."""

    def test_many_keys_four_shards(self, url):
        """Twenty keyed accounts on a 4-shard engine: each found, each unique."""
        eng = Engine.create(16, url=url, shards=4, max_accounts=64)
        try:
            ids = {f"desk-{i}": _open(eng, f"desk-{i}") for i in range(20)}
            assert len(set(ids.values())) == 20
            for key, a in ids.items():
                assert eng.lookup_account(key) == a
                with pytest.raises(KeyExistsError):
                    _open(eng, key)
            eng.close_account(ids["desk-3"])
            assert eng.lookup_account("desk-3") is None
            assert eng.lookup_account("desk-4") == ids["desk-4"]
        finally:
            eng.unlink()
            eng.close()
